"""Nearest-neighbour search over a memory bank with faiss.

``index="flat"`` (default) is exact (``IndexFlatL2``); ``"ivf"`` (inverted lists, ``nprobe`` probed)
and ``"hnsw"`` are approximate options for large banks. With a GPU build of faiss and a visible GPU,
``use_gpu="auto"`` moves the index there (flat and IVF; HNSW stays on the CPU). Distances are
**squared** L2, as faiss returns them; callers take the square root where they want Euclidean.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_KINDS = ("flat", "ivf", "hnsw")


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class NearestNeighbors:
    def __init__(self, index: str = "flat", use_gpu="auto", nlist: int | None = None, nprobe: int = 8,
                 hnsw_m: int = 32, ef_search: int = 128, seed: int = 0):
        if index not in INDEX_KINDS:
            raise ValueError(f"unknown index {index!r}; choose one of {INDEX_KINDS}")
        self.kind = index
        self.use_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search, self.seed = nlist, nprobe, hnsw_m, ef_search, seed
        self.index = None
        self.ntotal = 0

    def fit(self, bank: np.ndarray) -> NearestNeighbors:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        n, d = bank.shape
        kind = self.kind
        nlist = self.nlist or max(1, int(4 * math.sqrt(n)))
        if kind == "ivf" and n < 39 * nlist:  # too few points to train the coarse quantiser: stay exact
            kind = "flat"
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.cp.seed = self.seed
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m)
            index.hnsw.efSearch = self.ef_search
        if self.use_gpu and kind != "hnsw":
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
        np.maximum(dist, 0.0, out=dist)  # ||a||^2 + ||b||^2 - 2ab can dip below 0 in float32
        return dist, idx
