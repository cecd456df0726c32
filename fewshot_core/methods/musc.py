"""Mutual patch scoring over the unlabeled test images (transductive; after MuSc, Li et al., ICLR 2024).

Its own protocol (``evaluation/transductive.py``): the test images are scored *together*. A normal patch
finds a close match in most other test images (same part, same surface), a defective one in few, since
defects are rare and vary. For each test patch x of image i and each other test image j:

    d_j(x) = min over patches y of j of ||x - y||

and the patch score is the mean of the smallest ``ratio`` fraction of {d_j(x)}_{j != i} (MuSc's interval
average: the lowest matches, robust to the few images that are themselves defective at that place).
With support shots (``fit(X)``), each good support image is one more reference image j. Image score = the
maximum of the 3 x 3 average-pooled patch map, as LDKNN and kNN do.

Scoring all m test images costs m^2 image-to-image searches of the patch grid; ``score`` must receive the
whole test set at once (the protocol does that), never a batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fewshot_core.methods.base import Detector, as_patch_array, pooled_max


class MutualScoring(Detector):
    name = "musc"
    input_kind = "patches"

    def __init__(self, ratio: float = 0.3, pool: int = 3, seed: int = 0):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.pool = pool
        self.seed = seed  # no randomness; kept so every detector takes the episode seed

    def fit(self, X=None) -> MutualScoring:
        """Good support images as extra references (None or empty: zero shots, test images only)."""
        if X is None or len(X) == 0:
            self.support_ = np.zeros((0, 1, 1, 1), np.float32)
        else:
            self.support_ = as_patch_array(X, "support")
        self.fitted_ = True
        return self

    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        q = as_patch_array(X, "query")
        m, h, w, d = q.shape
        refs = [q[j].reshape(-1, d) for j in range(m)] + [s.reshape(-1, d) for s in self.support_ if s.size > 1]
        flat = torch.from_numpy(q.reshape(-1, d))
        sq = (flat * flat).sum(1, keepdim=True)
        nearest = torch.empty(len(refs), m * h * w)
        with torch.no_grad():
            for j, ref in enumerate(refs):
                r = torch.from_numpy(np.ascontiguousarray(ref))
                d2 = torch.addmm(sq, flat, r.T, alpha=-2.0).add_((r * r).sum(1)[None])
                nearest[j] = d2.amin(1).clamp_min_(0).sqrt_()
            own = torch.arange(m).repeat_interleave(h * w)
            nearest[own, torch.arange(m * h * w)] = float("inf")  # an image is never its own reference
        n_refs = len(refs) - 1  # every image has all references but itself
        keep = max(1, math.ceil(self.ratio * n_refs))
        patch = nearest.topk(keep, dim=0, largest=False).values.mean(0).reshape(m, h, w).numpy()
        return pooled_max(patch, self.pool), patch.astype(np.float32)

    def get_state(self) -> dict:
        return {"arrays": {"support": self.support_}}

    def set_state(self, state: dict) -> None:
        self.support_ = np.ascontiguousarray(state["arrays"]["support"], dtype=np.float32)
        self.fitted_ = True
