"""Approximate greedy coreset (PatchCore, Roth et al. 2022, Alg. 1 with the random-projection speed-up).

Iterative farthest-point selection on features randomly projected to ``proj_dim`` (128) dimensions,
started from the mean distance to ``n_starts`` (10) random points, as patchcore-inspection's
``ApproximateGreedyCoresetSampler`` does. Memory is O(N · proj_dim): the projection is computed in
chunks and each step updates one distance per point (never an N x N matrix). Distances are kept
squared (same argmax, one op fewer per step). Runs on CUDA when available.

Selections (``selection``): ``"plain"`` is the loop above (the GPU default). On the CPU it streams all N
projected points once per selected point and is memory-bound once they leave the cache, so the CPU
default is ``"partitioned"``: the greedy rule run separately in k-means cells of about ``PARTITION``
points with a share of the coreset each, N x k / cells updates on cache-resident points. A bank of up
to ~1.5 x ``PARTITION`` points is one cell, where this is the plain loop (exact); above, it is an
approximation whose AUROC gap to the exact rule is measured in ``benchmarks/bank_speed.py --tables
coreset``. ``"lazy"`` is exact for any size, but its per-block bookkeeping is slower than the plain loop
on a cache-resident bank. ``lazy_greedy_select`` selects exactly the plain loop's points: the points are
grouped into blocks of neighbours; a block's stored maximum of "distance to the coreset" is an upper bound that can only
fall as members join, so a block is brought up to date (one matrix product with every member chosen
since its last update) only when it holds the largest bound. Far-away blocks wait while their bound
stays below the top, then take many pending members in one product, near the machine's arithmetic rate.
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


SELECTIONS = ("auto", "plain", "lazy", "partitioned")
_PRUNE_MARGIN = 1e-3
LAZY_BLOCK = 1024  # points per block: small enough to refresh only what moves, large enough for a fast product
# points per cell of the partitioned selection: a cell's projected points (4 MiB at 128 dims) stay in cache
PARTITION = 8192


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"coreset selection must be one of {SELECTIONS}, got {selection!r}")


def approximate_greedy_coreset(features: np.ndarray, n_select: int, proj_dim: int = 128, n_starts: int = 10,
                               seed: int = 0, device=None, chunk: int = 65536, selection: str = "auto") -> np.ndarray:
    """Indices (int64, selection order) of ``n_select`` rows of ``features`` [N, d] chosen greedily.

    ``selection``: ``"plain"`` (one full distance update per step), ``"lazy"`` (``lazy_greedy_select``,
    the same farthest-point rule), ``"partitioned"`` (``partitioned_greedy_select``, per k-means cell) or
    ``"auto"`` (partitioned on the CPU, exact up to one cell; plain on a GPU).
    """
    check_selection(selection)
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
        if selection == "auto" and dev.type == "cpu":
            selection = "partitioned"  # one cell (the plain loop, exact) up to ~1.5 x PARTITION points
        if selection == "partitioned":
            return partitioned_greedy_select(z.cpu(), sq.cpu(), min_d.cpu(), n_select, seed=seed).numpy()
        if selection == "lazy":
            return lazy_greedy_select(z.cpu(), sq.cpu(), min_d.cpu(), n_select, seed=seed).numpy()
        return plain_greedy_select(z, sq, min_d, n_select).cpu().numpy()


def plain_greedy_select(z: torch.Tensor, sq: torch.Tensor, min_d: torch.Tensor, n_select: int) -> torch.Tensor:
    """The reference loop: one full update of every point's squared distance to the coreset per step."""
    chosen = torch.empty(n_select, dtype=torch.int64, device=z.device)
    min_d = min_d.clone()
    # [p, N] layout: the row-vector x matrix product streams it once per step and measured ~1.5x
    # faster on CPU than a matrix-vector product over [N, p]; the loop is memory-bound
    zt = z.T.contiguous()
    sq_row = sq[None]
    with torch.no_grad():
        for i in range(n_select):
            j = torch.argmax(min_d)
            chosen[i] = j
            # squared distance of every point to the new coreset member: |z|^2 - 2 z.z_j + |z_j|^2
            new_d = torch.addmm(sq_row, z[j][None], zt, alpha=-2.0)[0].add_(sq[j])
            torch.minimum(min_d, new_d, out=min_d)
    return chosen


def partitioned_greedy_select(z: torch.Tensor, sq: torch.Tensor, min_d: torch.Tensor, n_select: int,
                              cell: int | None = None, seed: int = 0) -> torch.Tensor:
    """Greedy farthest-point selection run separately in k-means cells of about ``cell`` points.

    An approximation of the global greedy rule for large banks: each cell gets a share of the coreset
    proportional to its size (largest remainders) and runs the plain loop on its own points, which stay
    in cache, so the work is N x k / cells distance updates instead of N x k. Points near a cell border
    may keep a neighbour from the next cell that the global rule would not have picked; the detector's
    AUROC against the exact selection is measured in ``benchmarks/bank_speed.py``.
    """
    n = len(z)
    cells = max(1, round(n / (cell or PARTITION)))
    if cells == 1:
        return plain_greedy_select(z, sq, min_d, n_select)
    assign = torch.from_numpy(_kmeans_cells(z, cells, seed)).long()
    counts = torch.bincount(assign, minlength=cells)
    want = counts.double() * n_select / n
    quota = want.floor().long()
    # largest remainders first, ties to the lower cell; never more than a cell holds
    extra = n_select - int(quota.sum())
    for c in sorted(range(cells), key=lambda c: (-(float(want[c]) - int(quota[c])), c))[:extra]:
        quota[c] += 1
    quota = torch.minimum(quota, counts)
    short = n_select - int(quota.sum())
    for c in range(cells):  # only when a cell is smaller than its rounded share (tiny cells)
        if short <= 0:
            break
        take = min(short, int(counts[c] - quota[c]))
        quota[c] += take
        short -= take
    chosen = []
    for c in range(cells):
        if int(quota[c]) == 0:
            continue
        members = torch.nonzero(assign == c)[:, 0]
        picked = plain_greedy_select(z[members].contiguous(), sq[members], min_d[members], int(quota[c]))
        chosen.append(members[picked])
    return torch.cat(chosen)


def _blocks_of_neighbours(z: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """A permutation of the points that puts neighbours together (k-means cells, then blocks of ``block``).

    Only the speed depends on it: the selection is the same for any grouping.
    """
    n = len(z)
    cells = max(1, n // block)
    if cells == 1:
        return torch.arange(n)
    return torch.from_numpy(np.argsort(_kmeans_cells(z, cells, seed), kind="stable"))


def _kmeans_cells(z: torch.Tensor, cells: int, seed: int) -> np.ndarray:
    """The k-means cell (0 .. cells - 1) of every point: faiss k-means, seeded, on a sample of the points."""
    # deferred: faiss may be absent (nn_search falls back to torch); only this ordering needs it
    import faiss

    x = np.ascontiguousarray(z.numpy(), dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], cells, niter=6, seed=int(seed) + 1, max_points_per_centroid=64, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0]


def lazy_greedy_select(z: torch.Tensor, sq: torch.Tensor, min_d: torch.Tensor, n_select: int,
                       block: int | None = None, seed: int = 0) -> torch.Tensor:
    """Greedy farthest-point selection with lazily updated blocks (CPU tensors; see the module docstring).

    ``z`` [N, p] projected points, ``sq`` their squared norms, ``min_d`` the initial squared distance to
    the coreset. Picks the same points as the plain loop: at every step the block with the largest upper
    bound is refreshed until the top block is current, whose maximum is then the global maximum. Ties go
    to the lowest original index, as ``torch.argmax`` does.
    """
    n = len(z)
    block = block or LAZY_BLOCK
    order = _blocks_of_neighbours(z, block, seed)
    zp, sqp, mdp = z[order].contiguous(), sq[order].contiguous(), min_d[order].clone()
    n_blocks = (n + block - 1) // block
    spans = [(b * block, min(n, (b + 1) * block)) for b in range(n_blocks)]
    bounds = torch.stack([mdp[lo:hi].max() for lo, hi in spans])
    # each block's centre and radius: a member c' with |c' - centre| - radius >= sqrt(bound) is farther
    # from every point of the block than the block's largest distance to the coreset, so it changes nothing
    centres = torch.stack([zp[lo:hi].mean(0) for lo, hi in spans])
    radii = torch.stack([(zp[lo:hi] - c).norm(dim=1).max() for (lo, hi), c in zip(spans, centres)])
    applied = np.zeros(n_blocks, dtype=np.int64)  # members already folded into each block
    chosen_z = torch.empty(n_select, zp.shape[1], dtype=zp.dtype)
    chosen_sq = torch.empty(n_select, dtype=zp.dtype)
    chosen = torch.empty(n_select, dtype=torch.int64)

    def refresh(b: int, upto: int) -> None:
        lo, hi = spans[b]
        pend_z, pend_sq = chosen_z[applied[b]:upto], chosen_sq[applied[b]:upto]
        reach = (pend_z - centres[b]).norm(dim=1) - radii[b]
        # margin far above float32 rounding of the distances, so no member that could matter is skipped
        near = reach < bounds[b].sqrt() * (1 + _PRUNE_MARGIN) + _PRUNE_MARGIN
        applied[b] = upto
        if not bool(near.any()):
            return
        if not bool(near.all()):
            pend_z, pend_sq = pend_z[near], pend_sq[near]
        # squared distances to the pending members, |z|^2 - 2 z.c + |c|^2 in the plain loop's order
        d = torch.addmm(sqp[lo:hi, None], zp[lo:hi], pend_z.T, alpha=-2.0).add_(pend_sq[None])
        torch.minimum(mdp[lo:hi], d.amin(1), out=mdp[lo:hi])
        bounds[b] = mdp[lo:hi].max()

    with torch.no_grad():
        for i in range(n_select):
            while True:
                top = bounds.max()
                tied = torch.nonzero(bounds == top)[:, 0].tolist()
                stale = [b for b in tied if applied[b] < i]
                if not stale:
                    break
                for b in stale:
                    refresh(b, i)
            # every tied block is current: their maxima equal ``top``, the true global maximum
            best = None
            for b in tied:
                lo, hi = spans[b]
                pos = lo + torch.nonzero(mdp[lo:hi] == top)[:, 0]
                cand = order[pos]
                k = int(torch.argmin(cand))
                if best is None or int(cand[k]) < int(order[best]):
                    best = int(pos[k])
            chosen[i] = order[best]
            chosen_z[i] = zp[best]
            chosen_sq[i] = sqp[best]
    return chosen
