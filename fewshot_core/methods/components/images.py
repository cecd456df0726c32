"""Images into the tensors a detector that trains on pixels reads: float [n, 3, S, S] in [0, 1].

Paths go through the project's one reading rule (``data/imageio.py``: EXIF, 16-bit, alpha); the content
hash of the resized images is part of a trained model's cache key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot_core.errors import FsadError

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def _to_pil(item: ImageLike, max_side: int | None = None) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return Image.fromarray(arr[..., :3])
    from fewshot_core.data.imageio import load_rgb  # the project's one reading rule (EXIF, 16-bit, alpha)

    return load_rgb(Path(item), max_side=max_side)


def is_image_batch(items) -> bool:
    return isinstance(items, np.ndarray) and items.ndim == 4 and items.shape[1] == 3


def load_images(items: Iterable[ImageLike] | torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """Images -> float32 [n, 3, size, size] in [0, 1].

    Takes a float batch [n, 3, H, W] in [0, 1] (torch or numpy), or a sequence of paths, PIL images or
    H x W (x 3) arrays (uint8, or floats in [0, 1]).
    """
    if is_image_batch(items):
        items = torch.from_numpy(np.ascontiguousarray(items))
    if isinstance(items, torch.Tensor):
        x = items.float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise FsadError(f"images tensor of shape {tuple(x.shape)}: expected [n, 3, H, W]; pass RGB images")
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(0, 1)
    out = []
    for item in items:
        img = _to_pil(item, max_side=2 * size).resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    if not out:
        raise FsadError("support images: none given; pass at least one good image")
    return torch.stack(out)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def images_fingerprint(x: torch.Tensor) -> str:
    """Content hash of the (resized) support images: the cache key must change when the images do."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update((x.detach().cpu().numpy() * 255).round().astype(np.uint8).tobytes())
    return h.hexdigest()[:16]
