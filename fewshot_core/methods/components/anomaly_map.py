"""Patch score maps -> image-resolution anomaly maps: bilinear upsampling, then a Gaussian blur (sigma = 4).

PatchCore (Roth et al., 2022, section 3.3) upsamples the patch scores to the input size and smooths
them with a Gaussian of sigma 4 pixels; sigma is in output pixels. Both steps are convex combinations of
the patch scores, so an image map never leaves the [min, max] range of its patch map (the pixel
metrics rely on that to fix their histogram range up front).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

DEFAULT_SIGMA = 4.0


def _size(out_size) -> tuple[int, int]:
    if isinstance(out_size, int):
        return out_size, out_size
    h, w = out_size
    return int(h), int(w)


def to_image_maps(patch_maps: np.ndarray, out_size, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """[m, h, w] (or [h, w]) patch maps -> float32 [m, H, W] (or [H, W]) smoothed image maps."""
    maps = np.asarray(patch_maps, dtype=np.float32)
    single = maps.ndim == 2
    if single:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"patch maps must be [m, h, w], got shape {maps.shape}")
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[:, None], size=_size(out_size),
                       mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma and sigma > 0:
        # truncate=4 sigma, scipy's default; a 2-D filter per map (not across the batch axis)
        up = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in up])
    up = up.astype(np.float32, copy=False)
    return up[0] if single else up
