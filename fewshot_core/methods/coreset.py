"""Approximate greedy coreset (PatchCore, Roth et al. 2022, Alg. 1 with the random-projection speed-up).

Iterative farthest-point selection on features randomly projected to ``proj_dim`` (128) dimensions,
started from the mean distance to ``n_starts`` (10) random points, as patchcore-inspection's
``ApproximateGreedyCoresetSampler`` does. Memory is O(N · proj_dim): the projection is computed in
chunks and each step updates one distance per point (never an N x N matrix). Distances are kept
squared (same argmax, one op fewer per step). Runs on CUDA when available.
"""

from __future__ import annotations

import numpy as np
import torch

from fewshot_core.device import resolve_device


def coreset_size(n: int, ratio: float, min_keep: int) -> int:
    """How many of ``n`` patches to keep: ``int(n * ratio)``, but never fewer than ``min(n, min_keep)``.

    Few-shot banks are small; ``int(n * ratio)`` alone would keep a handful of patches (1 shot,
    ratio 0.01 -> ~8 of 784), so small banks are kept whole.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return min(n, max(int(n * ratio), min_keep))


def approximate_greedy_coreset(features: np.ndarray, n_select: int, proj_dim: int = 128, n_starts: int = 10,
                               seed: int = 0, device=None, chunk: int = 65536) -> np.ndarray:
    """Indices (int64, selection order) of ``n_select`` rows of ``features`` [N, d] chosen greedily."""
    n, d = features.shape
    if n_select >= n:
        return np.arange(n, dtype=np.int64)
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with torch.no_grad():
        if d > proj_dim:
            proj = (torch.randn(d, proj_dim, generator=gen) / proj_dim**0.5).to(dev)
            z = torch.cat([x[i:i + chunk].to(dev) @ proj for i in range(0, n, chunk)])
        else:
            z = x.to(dev).clone()
        sq = (z * z).sum(1)
        starts = torch.randperm(n, generator=gen)[: min(n_starts, n)].to(dev)
        # initial "distance to the coreset": mean Euclidean distance to the random starting points
        start_d = (sq[:, None] - 2 * z @ z[starts].T + sq[starts][None]).clamp_min_(0).sqrt_()
        min_d = start_d.mean(1).square_()
        del start_d
        chosen = torch.empty(n_select, dtype=torch.int64, device=dev)
        # [p, N] layout: the row-vector x matrix product streams it once per step and measured ~1.5x
        # faster on CPU than a matrix-vector product over [N, p]; the loop is memory-bound
        zt = z.T.contiguous()
        sq_row = sq[None]
        for i in range(n_select):
            j = torch.argmax(min_d)
            chosen[i] = j
            # squared distance of every point to the new coreset member: |z|^2 - 2 z.z_j + |z_j|^2
            new_d = torch.addmm(sq_row, z[j][None], zt, alpha=-2.0)[0].add_(sq[j])
            torch.minimum(min_d, new_d, out=min_d)
    return chosen.cpu().numpy()
