"""LDKNN, the local-density kNN of REB (Lyu et al., "Reducing Biases in representation", §3.3-3.4).

Follows the authors' code (ShuaiLYU/REB, ``NNHead`` with ``NN_Type.ldknn``):

* fit: bank = the support patches (optionally a coreset of them); for every bank feature m, the local
  density LD(m) = mean squared L2 distance to its K nearest neighbours among *all* support patches,
  m itself excluded (it is its own nearest neighbour at distance 0, so the first of K + 1 is dropped);
* score: patch score = d²(x, m*) - λ · LD(m*), m* the nearest bank feature of x (``ld_form="difference"``,
  the authors' form); ``ld_form="ratio"`` is the ablation d²(x, m*) / LD(m*)^λ;
* image score = maximum of the 3 x 3 average-pooled patch map (stride 3, torch's default there), over the
  foreground and the missing patches with ``foreground="auto"``, a missing patch scored against the
  part's bank rows only (``methods/components/foreground.py``).

λ = ``ld_coef`` (1 by default), K = ``k`` (5; REB sweeps 3-11). With λ = 0 the patch map is exactly the
1-NN squared distance.

Large banks (rotated supports): ``coreset_ratio`` < 1 keeps a coreset as the bank, and
``density_on="bank"`` estimates LD inside that coreset instead of among all support patches (the
K-NN search then runs over the coreset, not the full support: faster, a coarser density).
"""

from __future__ import annotations

import numpy as np

from fewshot_core.methods.base import Detector, as_patch_array, pooled_max
from fewshot_core.methods.components.coreset import check_selection
from fewshot_core.methods.components.foreground import (
    Foreground, PartBank, check_mode, fit_foreground, masked_for_max, scored_mask, search_patches,
    state_arrays)
from fewshot_core.methods.knn import build_bank
from fewshot_core.methods.components.heldout import BankHeldout, loaded_sources, source_array

LD_FORMS = ("difference", "ratio")
DENSITY_ON = ("support", "bank")
_RATIO_EPS = 1e-12  # LD is 0 for a patch with an exact duplicate; keeps the ratio finite


class LDKNN(BankHeldout, Detector):
    name = "ldknn"
    input_kind = "patches"

    def __init__(self, k: int = 5, ld_coef: float = 1.0, ld_form: str = "difference", pool: int = 3,
                 coreset_ratio: float = 1.0, min_bank: int = 10_000, index: str = "auto", seed: int = 0,
                 density_on: str = "support", coreset_selection: str = "auto", foreground: str = "auto"):
        if ld_form not in LD_FORMS:
            raise ValueError(f"ld_form must be one of {LD_FORMS}, got {ld_form!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if density_on not in DENSITY_ON:
            raise ValueError(f"density_on must be one of {DENSITY_ON}, got {density_on!r}")
        self.density_on = density_on
        self.foreground = check_mode(foreground)
        self.k = k
        self.ld_coef = ld_coef
        self.ld_form = ld_form
        self.pool = pool
        self.coreset_ratio = coreset_ratio
        self.min_bank = min_bank
        self.index = index
        self.seed = seed
        self.coreset_selection = coreset_selection
        check_selection(coreset_selection)

    def fit(self, X) -> LDKNN:
        everything, bank, self.bank_source_ = build_bank(X, self.coreset_ratio, self.min_bank, self.seed,
                                                         self.coreset_selection)
        self.bank_ = np.array(bank, copy=True)
        self.nn_ = self._index(self.bank_)
        # LD among the bank's own rows: a held-out image's rows can then be left out of it (heldout_scores)
        self.ld_in_bank_ = bank is everything or self.density_on == "bank"
        self.ld_ = self._density(self.bank_, self.nn_ if self.ld_in_bank_ else self._index(everything))
        self.foreground_ = fit_foreground(as_patch_array(X, "support"), self.foreground, self.seed)
        self.part_ = PartBank(self.foreground_, self.bank_, self._index)
        self.fitted_ = True
        return self

    def _density(self, rows: np.ndarray, index) -> np.ndarray:
        """LD of ``rows`` (bank rows): mean squared distance to their K nearest in ``index``, themselves
        excluded (the first of K + 1)."""
        sq, _ = index.search(rows, self.k + 1)
        neighbours = sq[:, 1:] if sq.shape[1] > 1 else sq  # a one-patch support has no other neighbour
        return neighbours.mean(1).astype(np.float32)

    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        q = as_patch_array(X, "query")
        sq, idx, missing = search_patches(self.nn_, self.part_, self.foreground_, q)
        return self._scores(q, sq[:, 0], self.ld_[idx[:, 0]], missing)

    def _scores(self, q: np.ndarray, dist: np.ndarray, ld: np.ndarray, missing) -> tuple[np.ndarray, np.ndarray]:
        m, h, w, _ = q.shape
        lam = self.ld_coef
        if self.ld_form == "difference":
            patch = dist - lam * ld if lam else dist
        else:
            patch = dist / np.maximum(ld, _RATIO_EPS) ** lam if lam else dist
        patch = patch.astype(np.float32).reshape(m, h, w)
        return pooled_max(masked_for_max(patch, scored_mask(self.foreground_, q, missing)), self.pool), patch

    def can_score_heldout(self) -> bool:
        """LD among support patches that a coreset bank does not keep cannot leave a held-out image out."""
        return super().can_score_heldout() and bool(getattr(self, "ld_in_bank_", False))

    def _heldout_score(self, X) -> np.ndarray:
        """On the bank less a held-out image's rows (``methods/components/heldout.py``): LD recomputed inside it for
        the nearest rows the held-out patches meet, as a refit without that image would."""
        q = as_patch_array(X, "query")
        sq, idx, missing = search_patches(self.nn_, self.part_, self.foreground_, q)
        used, at = np.unique(idx[:, 0], return_inverse=True)
        return self._scores(q, sq[:, 0], self._density(self.bank_[used], self.nn_)[at.ravel()], missing)[0]

    def get_state(self) -> dict:
        return {"arrays": {"bank": self.bank_, "ld": self.ld_, **source_array(self),
                           "ld_in_bank": np.asarray([self.ld_in_bank_], bool), **state_arrays(self.foreground_)}}

    def set_state(self, state: dict) -> None:
        arrays = state["arrays"]
        self.bank_ = np.ascontiguousarray(arrays["bank"], dtype=np.float32)
        self.ld_ = np.asarray(arrays["ld"], dtype=np.float32)
        self.bank_source_ = loaded_sources(arrays, len(self.bank_))
        self.ld_in_bank_ = bool(np.asarray(arrays.get("ld_in_bank", [False])).ravel()[0])
        self.foreground_ = Foreground.from_state(arrays)
        self.nn_ = self._index(self.bank_)
        self.part_ = PartBank(self.foreground_, self.bank_, self._index)
        self.fitted_ = True
