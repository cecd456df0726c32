"""Per-backbone preprocessing from timm's pretrained config (EfficientNet-Lite: mean = std = 0.5).

For anomaly maps the features must cover the whole image, so the default is a plain resize to
``image_size`` x ``image_size`` without the centre crop timm (and PatchCore's 256 -> 224) use for
classification; ``crop=True`` gives timm's evaluation crop instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from fewshot_core.errors import FsadError

_PIL_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                      "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
# PIL first box-reduces by an integer factor while the image stays >= REDUCING_GAP x the target, then
# resamples: several times faster on 900 px PNGs, visually indistinguishable from a direct resize.
REDUCING_GAP = 3.0


def preprocess_config(name: str) -> dict:
    """``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct`` of timm's pretrained config."""
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


def preprocessing_record(name: str, image_size: int, crop: bool = False) -> dict:
    """What the store writes into meta.json to say exactly how images were prepared."""
    cfg = preprocess_config(name)
    resize = math.floor(image_size / cfg["crop_pct"]) if crop else image_size
    return {"resize": {"mode": "shorter_side", "size": resize} if crop else {"mode": "square", "size": image_size},
            "center_crop": image_size if crop else None,
            "interpolation": cfg["interpolation"], "reducing_gap": REDUCING_GAP,
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": [image_size, image_size]}


def resize_image(img: Image.Image, image_size: int, interpolation: str = "bicubic", crop: bool = False,
                 crop_pct: float = 1.0) -> Image.Image:
    """Resize a PIL RGB image to a square ``image_size`` (or timm-style shorter-side resize + centre crop)."""
    resample = _PIL_INTERPOLATION.get(interpolation, Image.Resampling.BICUBIC)
    if not crop:
        return img.resize((image_size, image_size), resample, reducing_gap=REDUCING_GAP)
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


def build_transform(name: str, image_size: int = 256, crop: bool = False):
    """PIL image -> normalised float tensor [3, S, S] for backbone ``name`` (for fine-tuning methods)."""
    cfg = preprocess_config(name)
    norm = Normalize(cfg["mean"], cfg["std"])

    def transform(img: Image.Image) -> torch.Tensor:
        img = resize_image(img.convert("RGB"), image_size, cfg["interpolation"], crop, cfg["crop_pct"])
        return norm(to_uint8_tensor(img).unsqueeze(0))[0]

    return transform
