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

Transforms are applied after the store's square resize (to what the backbone sees). For square
originals (MVTec AD) a flip or a 90-degree rotation commutes with that resize, so the result matches
embedding the transformed original; for non-square originals it is the transformed squashed image.
Note that with a 1-NN bank (PatchCore, LDKNN) the "features" mode only duplicates descriptors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from fewshot_core.errors import FsadError

TRANSFORMS = ("hflip", "vflip", "rot90", "rot180", "rot270")
AUGMENT_MODES = ("none", "features", "images")

_PIL_OPS = {"hflip": Image.Transpose.FLIP_LEFT_RIGHT, "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
            "rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
            "rot270": Image.Transpose.ROTATE_270}


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
                    device=None, batch_size: int = 16, cache: dict | None = None,
                    persist: bool = True) -> np.ndarray:
    """Patch features [len(ids) * len(transforms), h, w, d] of the transformed support images.

    Uses the partition's backbone, weights, layers, image size and patch reduction, and rounds the
    features through float16 like the store does, so augmented and stored features are comparable.
    ``cache`` (a dict) keeps the extractor and already embedded (image, transform) pairs across calls;
    ``persist`` also keeps them in the partition folder (``features/view_cache.py``) for later processes,
    so the backbone is only built for views never embedded before.
    """
    from fewshot_core.features.view_cache import ViewCache

    transforms = check_transforms(transforms)
    meta = partition.meta
    cache = {} if cache is None else cache
    views = ViewCache(partition) if persist and hasattr(partition, "path") else None
    rows = dict(zip(support_ids, partition.rows(list(support_ids)))) if views is not None else {}
    todo = []
    for image_id in support_ids:
        for t in transforms:
            key = ("augment", meta["key"], image_id, t)
            if key in cache:
                continue
            stored = views.get(rows[image_id], t) if views is not None else None
            if stored is None:
                todo.append((image_id, t))
            else:
                cache[key] = stored.astype(np.float32)
    if todo:
        _embed_views(dataset, partition, todo, device, batch_size, cache, views, rows)
    return np.stack([cache[("augment", meta["key"], i, t)] for i in support_ids for t in transforms])


def _embed_views(dataset, partition, todo, device, batch_size, cache, views, rows) -> None:
    import torch

    from fewshot_core.backbones.models import create_extractor
    from fewshot_core.backbones.preprocess import Normalize, preprocess_config, resize_image, to_uint8_tensor
    from fewshot_core.data.imageio import load_rgb
    from fewshot_core.features.extract import embed_batch

    meta = partition.meta
    key = ("augment-extractor", meta["key"])
    if key not in cache:
        extractor = create_extractor(meta["backbone"], meta["layers"], weights=_weights_spec(meta), device=device)
        expected = (meta.get("weights") or {}).get("sha256")
        if expected and extractor.weights.sha256 != expected:
            raise FsadError(f"{partition.path}: built with weights sha256 {expected[:12]}… but these resolve to "
                            f"{str(extractor.weights.sha256)[:12]}…; rebuild the partition with `fsad embed`")
        cfg = preprocess_config(meta["backbone"])
        cache[key] = (extractor, cfg, Normalize(cfg["mean"], cfg["std"]))
    extractor, cfg, normalize = cache[key]
    patch_dim = meta.get("patch_dim") if meta.get("patch_reduction") else None
    size = int(meta["image_size"])
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = {}
        tensors = []
        for image_id, t in chunk:
            if image_id not in images:
                img = load_rgb(dataset.by_id(image_id).path)
                images[image_id] = resize_image(img, size, cfg["interpolation"], crop=False)
            tensors.append(to_uint8_tensor(images[image_id].transpose(_PIL_OPS[t])))
        feats, _ = embed_batch(extractor, torch.stack(tensors), normalize, patch_dim)
        feats = feats.cpu().numpy().astype(np.float16)
        for (image_id, t), f in zip(chunk, feats):
            cache[("augment", meta["key"], image_id, t)] = f.astype(np.float32)
            if views is not None:
                views.put(rows[image_id], t, f)
