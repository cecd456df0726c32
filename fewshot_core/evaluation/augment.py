"""Few-shot augmentation: the support images' flips and 90-degree rotations added to the memory bank.

A known remedy for 1-shot memory banks (more poses of the same normal texture). Two ways:

* ``"images"`` (the proper one): each support image is flipped / rotated and embedded again with the
  partition's own backbone, weights, layers and preprocessing (``embed_augmented``), so the bank holds
  real features of the transformed images.
* ``"features"`` (a cheap approximation): the *feature maps* are flipped / rotated on their grid. This
  is **not** the same: CNN filters are not rotation-equivariant, so a rotated feature map is not the
  feature map of the rotated image (the texture *inside* each patch descriptor stays un-rotated). It only
  adds spatial re-arrangements of existing descriptors, useful for position-dependent scores, never new
  descriptors. Kept for ablations.

Transforms are applied after the store's resize to its working shape (to what the backbone sees). For
square originals (MVTec AD) a flip or a 90-degree rotation commutes with that resize, so the result
matches embedding the transformed original. A non-square working shape (aspect kept) takes only the
transforms that keep it (flips and the half turn, ``transforms_for``): a quarter turn would not fit the bank.
Note that with a 1-NN bank (PatchCore, LDKNN) the "features" mode only duplicates descriptors.

Part of the one-class protocol, not of any method: the protocol builds the augmented bank and hands the
method plain features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from fewshot_core.backbones.models import create_extractor
from fewshot_core.backbones.preprocess import Normalize, preprocess_config, resize_image, to_uint8_tensor
from fewshot_core.data.imageio import load_rgb
from fewshot_core.episode_cache import EpisodeCache, ExtractorKey, ViewKey, episode_cache
from fewshot_core.errors import FsadError
from fewshot_core.features.extract import embed_batch
from fewshot_core.features.view_cache import ViewCache

TRANSFORMS = ("hflip", "vflip", "rot90", "rot180", "rot270")
AUGMENT_MODES = ("none", "features", "images")

_PIL_OPS = {"hflip": Image.Transpose.FLIP_LEFT_RIGHT, "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
            "rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
            "rot270": Image.Transpose.ROTATE_270}


def transforms_for(shape, transforms: Sequence[str] = TRANSFORMS) -> tuple[str, ...]:
    """The ``transforms`` that keep a (height, width) working shape: quarter turns only for a square."""
    h, w = shape
    return tuple(t for t in transforms if h == w or t not in ("rot90", "rot270"))


def check_transforms(transforms: Sequence[str]) -> tuple[str, ...]:
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad:
        raise FsadError(f"augmentation {bad}: unknown transform; choose from {', '.join(TRANSFORMS)}")
    return tuple(transforms)


def _grid_op(maps: np.ndarray, t: str) -> np.ndarray:
    # maps [n, h, w, d]; PIL's ROTATE_90 is counter-clockwise, as np.rot90 with k=1
    if t == "hflip":
        return maps[:, :, ::-1]
    if t == "vflip":
        return maps[:, ::-1]
    return np.rot90(maps, k={"rot90": 1, "rot180": 2, "rot270": 3}[t], axes=(1, 2))


def augment_feature_maps(patches: np.ndarray, transforms: Sequence[str] = TRANSFORMS) -> np.ndarray:
    """The approximation: feature maps [n, h, w, d] flipped/rotated on the grid, concatenated after the originals.

    Rotations by 90/270 degrees need a square grid (the bank must keep one shape).
    """
    transforms = check_transforms(transforms)
    n, h, w, _ = patches.shape
    if h != w and any(t in ("rot90", "rot270") for t in transforms):
        raise FsadError(f"feature grid {h}x{w}: 90-degree rotations need a square grid; drop rot90/rot270")
    parts = [patches] + [_grid_op(patches, t) for t in transforms]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _weights_spec(meta: dict):
    weights = meta.get("weights") or {}
    source = weights.get("source")
    if source == "file":
        return weights["path"]
    return {"bundled": "auto", "timm": "timm", "random": "random"}.get(source, "auto")


def embed_augmented(dataset, partition, support_ids: Sequence[str], transforms: Sequence[str] = TRANSFORMS,
                    device=None, batch_size: int = 16, cache: EpisodeCache | None = None,
                    persist: bool = True) -> np.ndarray:
    """Patch features [len(ids) * len(transforms), h, w, d] of the transformed support images.

    Uses the partition's backbone, weights, layers, image size and patch reduction, and rounds the
    features through float16 like the store does, so augmented and stored features are comparable.
    ``cache`` keeps the extractor and already embedded (image, transform) pairs across calls;
    ``persist`` also keeps them in the partition folder (``features/view_cache.py``) for later processes,
    so the backbone is only built for views never embedded before.
    """
    transforms = check_transforms(transforms)
    meta = partition.meta
    cache = episode_cache(cache)
    # an aligned partition's views are views of its aligned images: never stored under the plain partition
    keep = persist and hasattr(partition, "path") and getattr(partition, "persist_views", True)
    views = ViewCache(partition) if keep else None
    rows = dict(zip(support_ids, partition.rows(list(support_ids)))) if views is not None else {}
    todo = []
    for image_id in support_ids:
        for t in transforms:
            key = ViewKey(meta["key"], image_id, t)
            if key in cache:
                continue
            stored = views.get(rows[image_id], t) if views is not None else None
            if stored is None:
                todo.append((image_id, t))
            else:
                cache[key] = stored.astype(np.float32)
    if todo:
        _embed_views(dataset, partition, todo, device, batch_size, cache, views, rows)
    return np.stack([cache[ViewKey(meta["key"], i, t)] for i in support_ids for t in transforms])


def partition_extractor(partition, cache: EpisodeCache, device=None):
    """(extractor, preprocessing config, normalisation) of ``partition``'s backbone, built once per
    partition into ``cache``; weights whose hash differs from the partition's are refused."""
    meta = partition.meta
    key = ExtractorKey(meta["key"])
    if key not in cache:
        extractor = create_extractor(meta["backbone"], meta["layers"], weights=_weights_spec(meta), device=device)
        expected = (meta.get("weights") or {}).get("sha256")
        if expected and extractor.weights.sha256 != expected:
            raise FsadError(f"{partition.path}: built with weights sha256 {expected[:12]}… but these resolve to "
                            f"{str(extractor.weights.sha256)[:12]}…; rebuild the partition with `fsad embed`")
        cfg = preprocess_config(meta["backbone"])
        cache[key] = (extractor, cfg, Normalize(cfg["mean"], cfg["std"]))
    return cache[key]


def working_image(partition, path, cache: EpisodeCache) -> Image.Image:
    """The image at ``path`` read and resized to ``partition``'s working shape, as the store did."""
    _, cfg, _ = partition_extractor(partition, cache)
    return resize_image(load_rgb(path), partition.input_shape, cfg["interpolation"], crop=False)


def embed_images(partition, images: Sequence[Image.Image], cache: EpisodeCache, device=None,
                 batch_size: int = 16) -> np.ndarray:
    """Patch features float32 [n, h, w, d] of PIL ``images`` already at the working shape, with the
    partition's backbone, layers and patch reduction, rounded through float16 like the store's."""
    extractor, _, normalize = partition_extractor(partition, cache, device)
    meta = partition.meta
    patch_dim = meta.get("patch_dim") if meta.get("patch_reduction") else None
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([to_uint8_tensor(img) for img in images[start:start + batch_size]])
        feats, _ = embed_batch(extractor, batch, normalize, patch_dim)
        out.append(feats.cpu().numpy().astype(np.float16).astype(np.float32))
    return np.concatenate(out)


def _embed_views(dataset, partition, todo, device, batch_size, cache, views, rows) -> None:
    meta = partition.meta
    partition_extractor(partition, cache, device)
    images = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for image_id, _ in chunk:
            if image_id not in images:  # an aligned partition serves its own (rotated, cropped) images
                images[image_id] = (partition.image(image_id) if hasattr(partition, "image")
                                    else working_image(partition, dataset.by_id(image_id).path, cache))
        feats = embed_images(partition, [images[i].transpose(_PIL_OPS[t]) for i, t in chunk], cache, device,
                             batch_size)
        for (image_id, t), f in zip(chunk, feats):
            cache[ViewKey(meta["key"], image_id, t)] = f
            if views is not None:
                views.put(rows[image_id], t, f)
