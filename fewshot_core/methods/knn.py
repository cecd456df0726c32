"""Vanilla kNN detector, the baseline REB compares LDKNN against (ShuaiLYU/REB ``KnnAdHead``).

Patch score = mean squared L2 distance to the k nearest support patches (faiss, as REB computes it);
image score = maximum of the 3 x 3 average-pooled patch map. The bank is every support patch unless
``coreset_ratio`` < 1. ``foreground="auto"`` takes the maximum over the foreground and the missing
patches, a missing patch scored against the part's bank rows only (``methods/components/foreground.py``).
"""

from __future__ import annotations

import numpy as np

from fewshot_core.methods.base import Detector, as_patch_array, exact_copy_index, pooled_max
from fewshot_core.methods.components.coreset import approximate_greedy_coreset, check_selection, coreset_size
from fewshot_core.methods.components.foreground import (
    Foreground, PartBank, check_mode, fit_foreground, masked_for_max, scored_mask, search_patches,
    state_arrays)
from fewshot_core.methods.components.heldout import BankHeldout, loaded_sources, map_sources, source_array


def build_bank(support, coreset_ratio: float, min_bank: int, seed: int, selection: str = "auto"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All support patches [N, d], the (coreset-reduced) bank drawn from them and the support map each
    bank row came from (``bank_source_``)."""
    feats = as_patch_array(support, "support")
    flat = feats.reshape(-1, feats.shape[-1])
    keep = coreset_size(len(flat), coreset_ratio, min_bank)
    per_map = feats.shape[1] * feats.shape[2]
    if keep >= len(flat):
        return flat, flat, map_sources(np.arange(len(flat)), per_map)
    rows = np.sort(approximate_greedy_coreset(flat, keep, seed=seed, selection=selection))
    return flat, flat[rows], map_sources(rows, per_map)


class KNN(BankHeldout, Detector):
    name = "knn"
    input_kind = "patches"

    def __init__(self, k: int = 3, pool: int = 3, coreset_ratio: float = 1.0, min_bank: int = 10_000,
                 index: str = "auto", seed: int = 0, coreset_selection: str = "auto", foreground: str = "auto"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.pool = pool
        self.coreset_ratio = coreset_ratio
        self.min_bank = min_bank
        self.index = index
        self.seed = seed
        self.coreset_selection = coreset_selection
        self.foreground = check_mode(foreground)
        check_selection(coreset_selection)

    def fit(self, X) -> KNN:
        _, bank, self.bank_source_ = build_bank(X, self.coreset_ratio, self.min_bank, self.seed,
                                                self.coreset_selection)
        self.bank_ = np.array(bank, copy=True)
        self.foreground_ = fit_foreground(as_patch_array(X, "support"), self.foreground, self.seed)
        self._build_index()
        return self

    @classmethod
    def threshold_copy_params(cls, params: dict, support_shape: tuple | None = None) -> dict:
        return exact_copy_index(params, support_shape)

    def _build_index(self) -> None:
        self.nn_ = self._index(self.bank_)
        self.part_ = PartBank(self.foreground_, self.bank_, self._index)
        self.fitted_ = True

    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        q = as_patch_array(X, "query")
        m, h, w, d = q.shape
        sq, _, missing = search_patches(self.nn_, self.part_, self.foreground_, q, self.k)
        patch = sq.mean(1).reshape(m, h, w)
        return pooled_max(masked_for_max(patch, scored_mask(self.foreground_, q, missing)), self.pool), patch

    def get_state(self) -> dict:
        return {"arrays": {"bank": self.bank_, **source_array(self), **state_arrays(self.foreground_)}}

    def set_state(self, state: dict) -> None:
        self.bank_ = np.ascontiguousarray(state["arrays"]["bank"], dtype=np.float32)
        self.bank_source_ = loaded_sources(state["arrays"], len(self.bank_))
        self.foreground_ = Foreground.from_state(state["arrays"])
        self._build_index()
