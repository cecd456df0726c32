"""Nearest-neighbour search over a memory bank with faiss.

``index="flat"`` is exact (``IndexFlatL2``); ``"ivf"`` (inverted lists, ``nprobe`` probed) and
``"hnsw"`` are approximate options for large banks; ``"auto"`` is exact up to ``AUTO_IVF_ROWS`` bank
rows and IVF at ``nprobe=8`` above. With a GPU build of faiss and a visible GPU,
``use_gpu="auto"`` moves the index there (flat and IVF; HNSW stays on the CPU). With CUDA but only
faiss-cpu installed (the usual pip setup) an exact flat search runs in torch on the GPU instead
(chunked matrix products + top-k), as it does when faiss is missing altogether. Distances are
**squared** L2, as faiss returns them; callers take the square root where they want Euclidean.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; torch covers exact search without it
    faiss = None

INDEX_KINDS = ("flat", "ivf", "hnsw", "auto")
_INDEX_OPTIONS = {"ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_search"), "flat": (), "auto": ("nprobe",)}
# "auto": exact up to this many bank rows, IVF above (rotated supports without a coreset, full-shot banks)
AUTO_IVF_ROWS = 1 << 15
AUTO_NPROBE = 8  # recall@1 0.995 on the rotated 16-shot bottle bank at 4 sqrt(N) lists (docs/benchmarks.md)
# IVF quantiser training: k-means rounds and points sampled per list (faiss's defaults: 25 and 256)
IVF_TRAIN_ROUNDS = 10
IVF_TRAIN_POINTS = 32


def ivf_lists(n: int) -> int:
    """The inverted lists of an IVF index over ``n`` bank rows unless ``nlist`` is given: 4 sqrt(n)."""
    return max(1, int(4 * math.sqrt(n)))


def parse_index(spec: str) -> tuple[str, dict]:
    """``"flat"``, ``"ivf"``, ``"ivf:nprobe=16"``, ``"hnsw:ef_search=64,hnsw_m=16"`` -> (kind, options).

    A method's ``index`` parameter is such a string, so the search settings travel with its parameters.
    """
    kind, _, rest = str(spec).partition(":")
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index {spec!r}; choose one of {INDEX_KINDS} (options as ivf:nprobe=16)")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in _INDEX_OPTIONS[kind] or not value.isdigit() or int(value) < 1:
            raise ValueError(f"index {spec!r}: bad option {item!r}; {kind} takes "
                             f"{', '.join(k + '=N' for k in _INDEX_OPTIONS[kind]) or 'no options'}")
        opts[key] = int(value)
    return kind, opts


_CHUNK_ELEMENTS = 1 << 27  # query rows x bank rows per distance block in the torch search (512 MB fp32)


def gpu_available() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


class TorchFlatIndex:
    """Exact squared-L2 k-NN in torch (GPU when available): the fallback without faiss-gpu."""

    def __init__(self, bank: np.ndarray, device: str):
        self.torch = torch
        self.bank = torch.from_numpy(bank).to(device)
        self.bank_sq = (self.bank * self.bank).sum(1)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        rows = max(1, _CHUNK_ELEMENTS // len(self.bank))
        dists, idxs = [], []
        with torch.no_grad():
            for start in range(0, len(query), rows):
                q = torch.from_numpy(query[start:start + rows]).to(self.bank.device)
                d2 = torch.addmm(self.bank_sq[None], q, self.bank.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
                d, i = d2.topk(k, dim=1, largest=False)
                dists.append(d.cpu())
                idxs.append(i.cpu())
        return torch.cat(dists).numpy(), torch.cat(idxs).numpy().astype(np.int64)


class NearestNeighbors:
    def __init__(self, index: str = "flat", use_gpu="auto", nlist: int | None = None, nprobe: int = 8,
                 hnsw_m: int = 32, ef_search: int = 128, seed: int = 0):
        index, opts = parse_index(index)
        self.kind = index
        nlist, nprobe = opts.get("nlist", nlist), opts.get("nprobe", AUTO_NPROBE if index == "auto" else nprobe)
        hnsw_m, ef_search = opts.get("hnsw_m", hnsw_m), opts.get("ef_search", ef_search)
        self.use_gpu = (gpu_available() or _torch_cuda()) if use_gpu == "auto" else bool(use_gpu)
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search, self.seed = nlist, nprobe, hnsw_m, ef_search, seed
        self.index = None
        self.ntotal = 0

    def fit(self, bank: np.ndarray) -> NearestNeighbors:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        n, d = bank.shape
        kind = self.kind
        if kind == "auto":
            kind = "ivf" if n > AUTO_IVF_ROWS else "flat"
        if faiss is None or (self.use_gpu and not gpu_available() and kind == "flat"):
            # exact search in torch: on the GPU when asked for and faiss has none, or without faiss at all
            device = "cuda" if self.use_gpu and _torch_cuda() else "cpu"
            self.index, self.ntotal, self.effective_kind = TorchFlatIndex(bank, device), n, f"torch-flat-{device}"
            return self
        nlist = self.nlist or ivf_lists(n)
        if kind == "ivf" and n < 39 * nlist:  # too few points to train the coarse quantiser: stay exact
            kind = "flat"
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.cp.seed = self.seed
            # the coarse quantiser only routes queries: 10 k-means rounds on 32 points per list train it in
            # about a tenth of faiss's default (25 rounds, up to 256 points per list) at the same recall
            index.cp.niter = IVF_TRAIN_ROUNDS
            index.cp.max_points_per_centroid = IVF_TRAIN_POINTS
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m)
            index.hnsw.efSearch = self.ef_search
        if self.use_gpu and kind != "hnsw" and gpu_available():
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        if not index.is_trained:
            index.train(bank)
        index.add(bank)
        self.index, self.ntotal, self.effective_kind = index, n, kind
        return self

    def search(self, query: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances [m, k] and bank indices [m, k] of the k nearest bank rows (k clamped to the bank)."""
        if self.index is None:
            raise RuntimeError("NearestNeighbors is not fitted")
        query = np.ascontiguousarray(query, dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        dist, idx = self.index.search(query, k)
        dist = np.ascontiguousarray(dist, dtype=np.float32)
        np.maximum(dist, 0.0, out=dist)  # ||a||^2 + ||b||^2 - 2ab can dip below 0 in float32
        return dist, idx


class BankIndex:
    """The search index of a bank detector (mixed in): built from the method's own ``index``, its runtime's
    faiss GPU choice and its ``seed``, for the bank and for any part of it (foreground rows, held-out
    copies), so every index a model searches follows the same settings."""

    def _index(self, data: np.ndarray) -> NearestNeighbors:
        return NearestNeighbors(self.index, self.runtime.faiss_gpu, seed=self.seed).fit(data)
