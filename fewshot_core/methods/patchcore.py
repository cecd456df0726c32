"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Memory bank = greedy coreset of the support patch features; patch score = Euclidean distance to the
nearest bank feature (faiss); image score = the largest patch score re-weighted by how isolated its
nearest bank feature m* is (paper Eq. 7, as anomalib implements it; patchcore-inspection omits it):

    s = (1 - softmax_j(||m_test,* - n_j||)[m*]) · s*,  n_j over the b nearest bank features of m*

with b = ``num_neighbors`` (9); b = 1 gives the plain maximum. ``foreground="auto"`` takes m_test,* among
the foreground patches and the missing ones, a missing patch scored against the part's bank rows only
(``methods/components/foreground.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from fewshot_core.methods.base import Detector, as_patch_array, exact_copy_index
from fewshot_core.methods.components.coreset import approximate_greedy_coreset, check_selection, coreset_size
from fewshot_core.methods.components.foreground import (
    Foreground, PartBank, check_mode, fit_foreground, masked_for_max, scored_mask, search_patches,
    state_arrays)
from fewshot_core.methods.components.heldout import BankHeldout, loaded_sources, map_sources, source_array


class PatchCore(BankHeldout, Detector):
    name = "patchcore"
    input_kind = "patches"

    def __init__(self, coreset_ratio: float = 0.1, min_bank: int = 10_000, num_neighbors: int = 9,
                 proj_dim: int = 128, n_starts: int = 10, index: str = "auto", seed: int = 0,
                 coreset_selection: str = "auto", foreground: str = "auto"):
        self.coreset_ratio = coreset_ratio
        self.min_bank = min_bank
        self.num_neighbors = num_neighbors
        self.proj_dim = proj_dim
        self.n_starts = n_starts
        self.index = index
        self.seed = seed
        self.coreset_selection = coreset_selection
        self.foreground = check_mode(foreground)
        coreset_size(1, coreset_ratio, 0)  # validates the ratio early
        check_selection(coreset_selection)

    def fit(self, X) -> PatchCore:
        feats = as_patch_array(X, "support")
        flat = feats.reshape(-1, feats.shape[-1])
        keep = coreset_size(len(flat), self.coreset_ratio, self.min_bank)
        idx = approximate_greedy_coreset(flat, keep, self.proj_dim, self.n_starts, seed=self.seed,
                                         selection=self.coreset_selection)
        rows = np.sort(idx) if keep < len(flat) else np.arange(len(flat))
        self.bank_ = flat[rows]
        self.bank_source_ = map_sources(rows, feats.shape[1] * feats.shape[2])
        self.foreground_ = fit_foreground(feats, self.foreground, self.seed)
        self._build_index()
        return self

    @classmethod
    def threshold_copy_params(cls, params: dict, support_shape: tuple | None = None) -> dict:
        """The copies keep every support patch: a coreset per held-out image made a 16-shot evaluation
        spend most of its time on 16 extra coresets, and a whole bank scores the held-out image a little
        lower than the coreset would, against the copies' lean towards high scores (fewer images). Each
        copy scores one image, so small banks are searched exactly (``exact_copy_index``)."""
        return exact_copy_index({**params, "coreset_ratio": 1.0}, support_shape)

    def _build_index(self) -> None:
        self.nn_ = self._index(self.bank_)
        self.part_ = PartBank(self.foreground_, self.bank_, self._index)
        self.fitted_ = True

    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        q = as_patch_array(X, "query")
        m, h, w, d = q.shape
        flat = q.reshape(-1, d)
        sq, nn_idx, missing = search_patches(self.nn_, self.part_, self.foreground_, q)
        sq, nn_idx = sq[:, 0], nn_idx[:, 0]
        patch = np.sqrt(sq).reshape(m, h * w)
        mask = scored_mask(self.foreground_, q, missing)
        return self._image_scores(patch, nn_idx.reshape(m, h * w), flat.reshape(m, h * w, d), mask), \
            patch.reshape(m, h, w)

    def _image_scores(self, patch: np.ndarray, nn_idx: np.ndarray, q: np.ndarray, mask=None) -> np.ndarray:
        b = min(self.num_neighbors, len(self.bank_))
        rows = np.arange(len(patch))
        star = masked_for_max(patch, mask).argmax(1)  # m_test,* : the (foreground) patch farthest from the bank
        s_star = patch[rows, star]
        if b <= 1:
            return s_star
        m_star = nn_idx[rows, star]
        _, support = self.nn_.search(self.bank_[m_star], b)  # N_b(m*), m* itself first
        test = torch.from_numpy(q[rows, star])[:, None]  # [m, 1, d]
        dists = torch.cdist(test, torch.from_numpy(self.bank_[support]))[:, 0]  # [m, b]
        weights = 1.0 - torch.softmax(dists.double(), dim=1)[:, 0].numpy()
        return (weights * s_star).astype(np.float32)

    def get_state(self) -> dict:
        return {"arrays": {"bank": self.bank_, **source_array(self), **state_arrays(self.foreground_)}}

    def set_state(self, state: dict) -> None:
        self.bank_ = np.ascontiguousarray(state["arrays"]["bank"], dtype=np.float32)
        self.bank_source_ = loaded_sources(state["arrays"], len(self.bank_))
        self.foreground_ = Foreground.from_state(state["arrays"])
        self._build_index()
