"""AUPRO: area under the per-region-overlap curve up to a false-positive rate of 0.3, normalised.

Definition (Bergmann et al., MVTec AD, IJCV 2021): every connected component of every ground-truth
mask is one region (8-connectivity, as the official evaluation code labels them). At a threshold t,
PRO(t) is the mean over all regions of the fraction of the region's pixels scored >= t, and FPR(t) is
the fraction of all defect-free pixels (of every test image) scored >= t. The PRO curve is integrated
over FPR from 0 to ``limit`` (linear interpolation at the limit) and divided by ``limit`` so that a
perfect detector scores 1.

PRO(t) is a weighted pixel count: a pixel of region r carries weight 1 / (|r| · R), R the number of
regions. That lets the streaming accumulator in ``pixel.py`` compute AUPRO from the same sorted (or
histogrammed) scores as the pixel ROC, without keeping per-region state; ``pixel.aupro`` is the
one-call version for a small set of maps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FPR_LIMIT = 0.3
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1/|region| for the defect pixels of ``mask`` (0 elsewhere) and the region count."""
    labels, n_regions = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    weights = np.zeros(labels.shape, dtype=np.float32)
    if n_regions:
        sizes = np.bincount(labels.ravel())
        inv = np.zeros(len(sizes), dtype=np.float32)
        inv[1:] = 1.0 / sizes[1:]
        weights = inv[labels]
    return weights, int(n_regions)


def area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under y(x) for x in [0, limit]; ``x`` non-decreasing from 0, interpolated at ``limit``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit and inside.sum() < len(x):
        # first point beyond the limit: interpolate the curve at x = limit
        j = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_lim)
    return float(_trapezoid(ys, xs))


def aupro_from_curve(fpr: np.ndarray, pro: np.ndarray, limit: float = FPR_LIMIT) -> float:
    """Normalised AUPRO from a PRO curve sampled at decreasing thresholds (fpr starting at 0)."""
    return area_to_limit(fpr, pro, limit) / limit
