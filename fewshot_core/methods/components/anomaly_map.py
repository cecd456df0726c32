"""Patch score maps -> image-resolution anomaly maps: bilinear upsampling, then a Gaussian blur (sigma = 4).

PatchCore (Roth et al., 2022, section 3.3) upsamples the patch scores to the input size and smooths
them with a Gaussian of sigma 4 pixels; sigma is in output pixels. Both steps are convex combinations of
the patch scores, so an image map never leaves the [min, max] range of its patch map (the pixel
metrics rely on that to fix their histogram range up front). ``gaussian_blur`` is a Gaussian blur in torch
(kernel 2·⌈4σ⌉+1), for a method that smooths its own maps on its device (GLASS).
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


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of [m, H, W] maps (σ in pixels, kernel 2·⌈4σ⌉+1 as in PatchCore/GLASS)."""
    if sigma <= 0:
        return maps
    radius = int(np.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(maps.dtype)
    x = maps.unsqueeze(1)
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1))
    return x.squeeze(1)
