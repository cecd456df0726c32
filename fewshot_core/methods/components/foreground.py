"""Object-centric scoring: a foreground estimate from the support's own patch features.

On object categories the image score is the largest patch score, and background patches (a rotation's
corners, a shifted part's empty side, a background texture the few shots did not cover) can win that
maximum on good images. Like AnomalyDINO's masking (Damm et al., 2024), the first principal component of
patch features separates object from background. Here it is fitted once on the support, not per image,
so every query is cut at the same place:

* project every support patch on the first principal direction, orient it so the grid's border ring
  (background on an object category) lies on the negative side, and split at the two-means threshold;
* the category counts as an object when the support's foreground covers between ``MIN_FRACTION`` and
  ``MAX_FRACTION`` of the grid, at most ``MAX_BORDER`` of the border ring, and the ring at most half as
  densely as the whole grid; else nothing is masked (textures: a pattern, even a sparse one, reaches the
  border as often as the middle);
* a query's mask is its patches above the threshold, grown by one patch so a defect on the object's
  outline (a broken rim) stays inside; an empty mask scores the whole image.

A missing or misplaced part leaves background where the part belongs, which the mask would exclude and
whose patches match the support's own background patches. So the estimate also keeps a **positional
prior**: the grid positions where the support (all its views) is foreground in at least ``PRIOR_SHARE``
of the images, shrunk to its core (``PRIOR_MARGIN`` patches plus ``PRIOR_DEPTH`` of its radius from the
outline) so a part lying a little differently does not trip it. A query patch there that the estimate calls background is *missing*: it stays in the image score and is
scored against the support's foreground patches only (``PartBank``), in the detector's own units, so a
patch of background where the part should be is as far from the bank as the part's absence is. The
mirror rule catches a part (or a piece of it) where it never is: positions that are background in at
least ``PRIOR_SHARE`` of the support's views and deeper than ``PRIOR_MARGIN`` patches from the part and
the grid edge (``absent_``; no radius term, the background is a ring around the part); a query patch
there that the estimate calls foreground is *intruding* and is scored against the background rows only.

Only the image score uses the mask; anomaly maps stay whole, except that missing and intruding patches
carry their distance to the other side's patches there too.
(DefectMaker's ``foreground_mask`` is another estimate, from pixels, for placing synthetic defects.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MODES = ("none", "auto")
MIN_FRACTION, MAX_FRACTION, MAX_BORDER = 0.05, 0.85, 0.25
PRIOR_SHARE, PRIOR_MARGIN, PRIOR_DEPTH = 0.9, 1.0, 0.25
_MAX_FIT_ROWS = 65_536  # the principal direction of a subsample: a bank of 500k patches needs no more


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"foreground must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _border(h: int, w: int) -> np.ndarray:
    ring = np.zeros((h, w), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring


def _core(region: np.ndarray) -> np.ndarray:
    """The inside of ``region`` [h, w]: positions farther from its outline (the grid's edge counts as
    outline) than ``PRIOR_MARGIN`` patches plus ``PRIOR_DEPTH`` of its equivalent radius, so a part a
    little shifted or scaled from the support's still covers it."""
    if not region.any():
        return region
    return _depth(region) > PRIOR_MARGIN + PRIOR_DEPTH * np.sqrt(region.sum() / np.pi)


def _depth(region: np.ndarray) -> np.ndarray:
    """Each position's distance (in patches) to the nearest position outside ``region`` or the grid."""
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def _project(flat: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """(flat - mean) @ direction without building the [N, d] centred copy."""
    return np.asarray(flat, dtype=np.float32) @ direction - np.float32(mean @ direction)


def _two_means(values: np.ndarray, rounds: int = 50) -> float:
    """The 1-D two-means (Otsu-like) split point of ``values``."""
    t = float(np.median(values))
    for _ in range(rounds):
        lo, hi = values[values <= t], values[values > t]
        if not len(lo) or not len(hi):
            break
        new = 0.5 * (float(lo.mean()) + float(hi.mean()))
        if abs(new - t) <= 1e-7 * max(1.0, abs(t)):
            break
        t = new
    return t


class Foreground:
    """``fit(support [n, h, w, d])`` then ``mask(query [m, h, w, d]) -> bool [m, h, w]`` (all True for a
    texture) and ``missing(query)``. Fitted state: ``mean_``, ``direction_``, ``threshold_``,
    ``is_object_``, ``prior_`` and ``absent_`` (bool [h, w])."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, support: np.ndarray) -> "Foreground":
        n, h, w, d = support.shape
        flat = support.reshape(-1, d)
        rows = flat
        if len(flat) > _MAX_FIT_ROWS:
            rows = flat[np.sort(np.random.default_rng(self.seed).choice(len(flat), _MAX_FIT_ROWS, replace=False))]
        mean = rows.mean(0, dtype=np.float64).astype(np.float32)
        centred = rows - mean
        # first principal direction from the d x d scatter matrix (float32, as the features) rather than an
        # SVD of the rows: the threshold's leave-one-out copies fit one estimate each
        direction = np.linalg.eigh(centred.T @ centred)[1][:, -1].astype(np.float32)
        proj = _project(flat, mean, direction).reshape(n, h, w)
        ring = _border(h, w)
        if proj[:, ring].mean() > 0:  # the border ring is background on the negative side
            direction, proj = -direction, -proj
        threshold = _two_means(proj.ravel())
        fg = proj > threshold
        fraction, border = float(fg.mean()), float(fg[:, ring].mean())
        self.mean_ = mean
        self.direction_ = direction
        self.threshold_ = np.float32(threshold)
        self.is_object_ = bool(MIN_FRACTION <= fraction <= MAX_FRACTION and border <= MAX_BORDER
                               and border <= 0.5 * fraction)
        share = fg.mean(0)
        self.prior_ = _core(share >= PRIOR_SHARE) & self.is_object_
        self.absent_ = (_depth(share <= 1.0 - PRIOR_SHARE) > PRIOR_MARGIN) & self.is_object_
        return self

    def project(self, flat: np.ndarray) -> np.ndarray:
        """Each row's position on the foreground direction (above ``threshold_``: foreground)."""
        return _project(flat, self.mean_, self.direction_)

    def mask(self, query: np.ndarray) -> np.ndarray:
        m, h, w, d = query.shape
        if not self.is_object_:
            return np.ones((m, h, w), bool)
        proj = _project(query.reshape(-1, d), self.mean_, self.direction_).reshape(m, h, w)
        fg = ndimage.binary_dilation(proj > self.threshold_, structure=np.ones((1, 3, 3), bool))
        fg[~fg.any(axis=(1, 2))] = True  # nothing found: score the whole image
        return fg

    def missing(self, query: np.ndarray) -> np.ndarray:
        """bool [m, h, w]: the patches at the prior's positions that look like background."""
        return self._off_side(query, self.prior_, part=False)

    def intruding(self, query: np.ndarray) -> np.ndarray:
        """bool [m, h, w]: the patches at ``absent_``'s positions that look like the part."""
        return self._off_side(query, self.absent_, part=True)

    def _off_side(self, query: np.ndarray, where: np.ndarray, part: bool) -> np.ndarray:
        m, h, w, d = query.shape
        if not where.any() or where.shape != (h, w):
            return np.zeros((m, h, w), bool)
        above = self.project(query.reshape(-1, d)).reshape(m, h, w) > self.threshold_
        return where[None] & (above if part else ~above)

    def get_state(self) -> dict:
        return {"fg_mean": self.mean_, "fg_direction": self.direction_,
                "fg_threshold": np.asarray([self.threshold_], np.float32),
                "fg_is_object": np.asarray([self.is_object_], bool), "fg_prior": self.prior_,
                "fg_absent": self.absent_}

    @classmethod
    def from_state(cls, arrays: dict) -> "Foreground | None":
        if "fg_mean" not in arrays:
            return None
        out = cls()
        out.mean_ = np.asarray(arrays["fg_mean"], np.float32)
        out.direction_ = np.asarray(arrays["fg_direction"], np.float32)
        out.threshold_ = np.float32(np.asarray(arrays["fg_threshold"]).ravel()[0])
        out.is_object_ = bool(np.asarray(arrays["fg_is_object"]).ravel()[0])
        # a model saved before the positional prior scores as it did then
        none = np.zeros((0, 0), bool)
        out.prior_ = np.asarray(arrays["fg_prior"], bool) if "fg_prior" in arrays else none
        out.absent_ = np.asarray(arrays["fg_absent"], bool) if "fg_absent" in arrays else none
        return out


def fit_foreground(support: np.ndarray, mode: str, seed: int = 0) -> Foreground | None:
    """The foreground estimate of ``support`` [n, h, w, d] for ``mode`` \"auto\", None for \"none\"."""
    return Foreground(seed).fit(support) if check_mode(mode) == "auto" else None


def query_mask(fg: Foreground | None, query: np.ndarray) -> np.ndarray | None:
    """The mask a detector applies to ``query``; None when nothing is masked (no estimate, or a texture)."""
    return fg.mask(query) if fg is not None and fg.is_object_ else None


def scored_mask(fg: Foreground | None, query: np.ndarray, missing: np.ndarray | None) -> np.ndarray | None:
    """The patches an image score takes its maximum over: the query's foreground and its missing patches."""
    mask = query_mask(fg, query)
    return mask if mask is None or missing is None else mask | missing


class PartBank:
    """The bank rows the support's estimate calls the part and those it calls background, each searched
    for the query patches on the wrong side: missing ones against the part's rows, intruding ones against
    the background's. An index is built on the first query that needs it (good images rarely do), so
    fitting costs only a projection of the bank. ``search(flat [N, d], which [N], part, k)`` -> (rows of
    ``flat`` searched, squared distances [r, k], bank indices [r, k]) or None when none is asked for."""

    def __init__(self, fg: Foreground | None, bank: np.ndarray, make_index):
        self._bank, self._make, self._rows, self._nn = bank, make_index, {}, {}
        if fg is not None and fg.is_object_:
            above = fg.project(bank) > fg.threshold_
            self._rows = {True: np.flatnonzero(above), False: np.flatnonzero(~above)}

    def search(self, flat: np.ndarray, which: np.ndarray | None, part: bool, k: int = 1):
        rows = self._rows.get(part)
        if rows is None or not len(rows) or which is None or not which.any():
            return None
        if part not in self._nn:
            self._nn[part] = self._make(np.ascontiguousarray(self._bank[rows]))
        at = np.flatnonzero(which.ravel())
        sq, idx = self._nn[part].search(np.ascontiguousarray(flat[at]), min(k, len(rows)))
        return at, sq, rows[idx]


def search_patches(nn, banks: PartBank, fg: Foreground | None, query: np.ndarray, k: int = 1):
    """The ``k`` nearest bank rows of every patch of ``query`` [m, h, w, d] -> (squared distances [N, k],
    bank indices [N, k], missing patches [m, h, w] or None). A missing patch's neighbours are the part's
    bank rows (background where the part belongs is as far as the part's absence), an intruding patch's
    the background's (the part where it never is)."""
    flat = query.reshape(-1, query.shape[-1])
    sq, idx = nn.search(flat, k)
    if fg is None or not fg.is_object_:
        return sq, idx, None
    missing = fg.missing(query)
    for which, part in ((missing, True), (fg.intruding(query), False)):
        found = banks.search(flat, which, part, k)
        if found is not None:
            at, side_sq, side_idx = found
            sq[at, :side_sq.shape[1]], idx[at, :side_idx.shape[1]] = side_sq, side_idx
    return sq, idx, missing


def state_arrays(fg: Foreground | None) -> dict:
    """The arrays a detector saves for its estimate (none without one)."""
    return fg.get_state() if fg is not None else {}


def masked_for_max(patch: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``patch`` [m, ...] (a [m, h, w] map or its [m, h * w] rows) with the patches outside ``mask``
    [m, h, w] lowered to each image's minimum, so a maximum (or a pooled maximum) lands on the foreground."""
    if mask is None:
        return patch
    low = patch.reshape(len(patch), -1).min(1).reshape((-1,) + (1,) * (patch.ndim - 1))
    return np.where(mask.reshape(patch.shape), patch, low).astype(patch.dtype, copy=False)
