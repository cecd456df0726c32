"""Vanilla kNN detector, the baseline REB compares LDKNN against (ShuaiLYU/REB ``KnnAdHead``).

Patch score = mean squared L2 distance to the k nearest support patches (faiss, as REB computes it);
image score = maximum of the 3 x 3 average-pooled patch map. The bank is every support patch unless
``coreset_ratio`` < 1.
"""

from __future__ import annotations

import numpy as np

from fewshot_core.methods.base import OneClassMethod, as_patch_array, pooled_max
from fewshot_core.methods.coreset import approximate_greedy_coreset, coreset_size
from fewshot_core.methods.nn_search import NearestNeighbors


def build_bank(support: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """All support patches [N, d] and the (coreset-reduced) bank drawn from them."""
    feats = as_patch_array(support, "support")
    flat = feats.reshape(-1, feats.shape[-1])
    keep = coreset_size(len(flat), params["coreset_ratio"], params["min_bank"])
    if keep >= len(flat):
        return flat, flat
    idx = approximate_greedy_coreset(flat, keep, seed=params["seed"])
    return flat, flat[np.sort(idx)]


class KNN(OneClassMethod):
    name = "knn"

    def __init__(self, k: int = 3, pool: int = 3, coreset_ratio: float = 1.0, min_bank: int = 10_000,
                 index: str = "flat", use_gpu="auto", seed: int = 0):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(k=k, pool=pool, coreset_ratio=coreset_ratio, min_bank=min_bank, index=index,
                         use_gpu=use_gpu, seed=seed)

    def fit(self, support) -> KNN:
        _, self.bank_ = build_bank(support, self.params)
        self.bank_ = np.array(self.bank_, copy=True)
        self._build_index()
        return self

    def _build_index(self) -> None:
        self.nn_ = NearestNeighbors(self.params["index"], self.params["use_gpu"], seed=self.params["seed"])
        self.nn_.fit(self.bank_)
        self.fitted_ = True

    def score(self, query) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        q = as_patch_array(query, "query")
        m, h, w, d = q.shape
        sq, _ = self.nn_.search(q.reshape(-1, d), self.params["k"])
        patch = sq.mean(1).reshape(m, h, w)
        return pooled_max(patch, self.params["pool"]), patch

    def _state(self):
        return {"bank": self.bank_}

    def _set_state(self, state):
        self.bank_ = np.ascontiguousarray(state["bank"], dtype=np.float32)
        self._build_index()
