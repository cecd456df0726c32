"""PatchCore patch features (Roth et al. 2022) from a list of stage maps.

Each stage map is locally aggregated over its 3x3 neighbourhood (PatchCore unfolds 3x3 patches and
average-pools them; for a per-channel mean that is ``avg_pool2d(k=3, s=1, p=1)``), the coarser stages
are bilinearly upsampled to the finest grid, the channels concatenated, and optionally reduced to
``patch_dim`` by adaptive average pooling over channels (first per stage, then over the stack, as
PatchCore's preprocessing + aggregator do, so each stage keeps an equal share of the dimensions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_SIZE = 3


def local_aggregate(fmap: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Mean over each position's ``patch_size`` neighbourhood; zero padding counts, as in PatchCore's unfold."""
    return F.avg_pool2d(fmap, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)


def _pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling of the last axis to ``dim`` ([..., C] -> [..., dim])."""
    lead = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), dim).reshape(*lead, dim)


def patch_features(maps: list[torch.Tensor], patch_dim: int | None = None,
                   patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Stage maps [B, C_i, h_i, w_i] -> patch features [B, h, w, d] on the finest stage's grid.

    ``patch_dim=None`` keeps the concatenation (d = sum C_i).
    """
    h, w = maps[0].shape[-2:]
    parts = []
    for fmap in maps:
        fmap = local_aggregate(fmap.float(), patch_size)
        if fmap.shape[-2:] != (h, w):
            fmap = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(fmap.permute(0, 2, 3, 1))  # [B, h, w, C_i]
    if patch_dim is None:
        return torch.cat(parts, dim=-1)
    stacked = torch.stack([_pool_channels(p, patch_dim) for p in parts], dim=-2)  # [B, h, w, L, dim]
    return _pool_channels(stacked.flatten(-2), patch_dim)


def patch_dim_of(channels: list[int], patch_dim: int | None) -> int:
    return sum(channels) if patch_dim is None else int(patch_dim)
