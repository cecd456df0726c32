"""Per-backbone preprocessing from timm's pretrained config (EfficientNet-Lite: mean = std = 0.5).

For anomaly maps the features must cover the whole image, so the default is a plain resize without the
centre crop timm (and PatchCore's 256 -> 224) use for classification; ``crop=True`` gives timm's evaluation
crop instead. The resize target is a working shape (height, width): a square ``image_size`` for square
categories, and for non-square ones ``image_size`` on the short side with the category's aspect ratio kept
(``working_shape``), so a tall crack image is not squashed to a square and its cracks to nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from fewshot_core.errors import FsadError
from fewshot_core.sizes import WORKING_SIZE

_PIL_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                      "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
# PIL first box-reduces by an integer factor while the image stays >= REDUCING_GAP x the target, then
# resamples: several times faster on 900 px PNGs, visually indistinguishable from a direct resize.
REDUCING_GAP = 3.0


def preprocess_config(name: str) -> dict:
    """``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct`` of timm's pretrained config."""
    # deferred: timm is heavy, and the code location loads this module without reading a config
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # timm raises on malformed names
        cfg = None
    if cfg is None:
        raise FsadError(f"{name}: unknown timm backbone; pick a name from timm.list_models(pretrained=True)")
    return {
        "input_size": tuple(cfg.input_size),
        "interpolation": cfg.interpolation or "bicubic",
        "mean": tuple(float(v) for v in cfg.mean),
        "std": tuple(float(v) for v in cfg.std),
        "crop_pct": float(cfg.crop_pct) if cfg.crop_pct is not None else 1.0,
    }


# A category whose images' height/width ratio stays within this factor of 1 is embedded square: the
# distortion is negligible, and square categories (MVTec AD's) keep their partitions and numbers.
SQUARE_TOLERANCE = 1.15
# The long side is rounded to a multiple of the coarsest stride a stage choice can take, so every stage's
# grid divides the input exactly and the stitched grids line up.
SHAPE_MULTIPLE = 32
# Aspect ratios are capped: beyond it a category is cut into tiles by the user, not stretched further.
MAX_ASPECT = 4.0


def working_shape(image_size: int, aspect: float = 1.0) -> tuple[int, int]:
    """(height, width) of the backbone input: ``image_size`` on the short side, the long side following
    ``aspect`` (height / width of the category's images) rounded to ``SHAPE_MULTIPLE``; square when the
    aspect is within ``SQUARE_TOLERANCE``."""
    size = int(image_size)
    aspect = float(aspect)
    if not math.isfinite(aspect) or aspect <= 0:
        raise FsadError(f"aspect ratio {aspect}: must be a positive number (height / width)")
    if 1 / SQUARE_TOLERANCE <= aspect <= SQUARE_TOLERANCE:
        return size, size
    ratio = min(max(aspect, 1 / aspect), MAX_ASPECT)
    long = max(size, int(round(size * ratio / SHAPE_MULTIPLE)) * SHAPE_MULTIPLE)
    return (long, size) if aspect > 1 else (size, long)


def as_shape(size) -> tuple[int, int]:
    """An int (square) or a (height, width) pair -> (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def preprocessing_record(name: str, image_size: int, crop: bool = False, shape=None) -> dict:
    """What the store writes into meta.json to say exactly how images were prepared (``shape``: the
    working (height, width), square ``image_size`` when None)."""
    cfg = preprocess_config(name)
    resize = math.floor(image_size / cfg["crop_pct"]) if crop else image_size
    h, w = as_shape(shape if shape is not None else image_size)
    mode = "square" if h == w else "aspect_kept"
    return {"resize": {"mode": "shorter_side", "size": resize} if crop else {"mode": mode, "size": image_size},
            "center_crop": image_size if crop else None,
            "interpolation": cfg["interpolation"], "reducing_gap": REDUCING_GAP,
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": [h, w]}


def resize_image(img: Image.Image, image_size, interpolation: str = "bicubic", crop: bool = False,
                 crop_pct: float = 1.0) -> Image.Image:
    """Resize a PIL RGB image to ``image_size``: an int (square) or a working (height, width) shape
    (or, with ``crop``, timm-style shorter-side resize + centre crop of a square int size)."""
    resample = _PIL_INTERPOLATION.get(interpolation, Image.Resampling.BICUBIC)
    if not crop:
        h, w = as_shape(image_size)
        return img.resize((w, h), resample, reducing_gap=REDUCING_GAP)
    short = math.floor(image_size / crop_pct)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample, reducing_gap=REDUCING_GAP)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """HWC PIL RGB -> CHW uint8 tensor (normalisation happens batched, after the worker hand-off)."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class Normalize:
    """uint8 [B, 3, H, W] -> float32 normalised with the backbone's mean/std (on the batch's device)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return (batch.float() / 255.0 - mean) / std


def build_transform(name: str, image_size=WORKING_SIZE, crop: bool = False):
    """PIL image -> normalised float tensor [3, H, W] for backbone ``name`` (for fine-tuning methods)."""
    cfg = preprocess_config(name)
    norm = Normalize(cfg["mean"], cfg["std"])

    def transform(img: Image.Image) -> torch.Tensor:
        img = resize_image(img.convert("RGB"), image_size, cfg["interpolation"], crop, cfg["crop_pct"])
        return norm(to_uint8_tensor(img).unsqueeze(0))[0]

    return transform
