"""Pixel-level localisation metrics: pixel AUROC, pixel F1-max and AUPRO, accumulated image by image.

All three are functions of one curve: for every threshold t, the number of defect pixels, of
defect-free pixels, and the summed per-region weight (see ``aupro.py``) scored >= t. The
``PixelAccumulator`` gathers that curve while maps stream in, so a test set never sits in memory as
more than one float32 score and one float32 weight per pixel:

* exact mode (default while the pixel count stays <= ``exact_max_pixels``, 8.4 M = 128 images at
  256 x 256): every distinct score is a threshold; pixel AUROC then equals scikit-learn's
  ``roc_auc_score`` and F1-max its ``precision_recall_curve`` maximum.
* binned mode (beyond that): scores fall into ``bins`` (65,536) equal-width bins over ``value_range``
  and each bin edge is a threshold. Memory is O(bins); the values differ from the exact ones only by
  ties within a bin (far below 1e-4 on MVTec-like maps). Pass ``value_range`` (the runner uses the
  min/max of the patch maps, which bound the upsampled and smoothed maps) or the range of the
  buffered pixels is used and later scores are clipped into it.

Masks must share the map's shape: the caller resizes both to one stated resolution (e.g. 256).
"""

from __future__ import annotations

import numpy as np

from fewshot_core.metrics.aupro import FPR_LIMIT, aupro_from_curve, region_weights

_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def exact_curve(scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(negatives, positives, region weight) scored >= t at thresholds t descending: the exact curve with
    every distinct score a threshold, less the points that lie on a straight piece of it.

    Between two neighbouring distinct defect-pixel scores only negatives cross, so the curve is flat there
    and its inner points change neither the area nor the F1 maximum (F1 is largest at the highest
    threshold of a given true-positive count). Each distinct defect score t therefore gives two points,
    negatives > t with the counts above t, then negatives >= t with t's own (ties joined by the diagonal
    the full curve draws); the last point counts every pixel. So only the defect pixels (a few per cent of
    a test set) need an argsort; the defect-free ones are sorted as plain floats, which is far cheaper.
    """
    pos = weights > 0
    pos_scores, pos_weights = scores[pos], weights[pos]
    neg = np.sort(scores[~pos])
    n_neg = len(neg)
    order = np.argsort(pos_scores, kind="stable")[::-1]
    pos_scores, pos_weights = pos_scores[order], pos_weights[order]
    tp = np.arange(1, len(pos_scores) + 1, dtype=np.float64)
    pro = np.cumsum(pos_weights, dtype=np.float64)
    ends = np.flatnonzero(np.diff(pos_scores)) if len(pos_scores) else np.zeros(0, np.int64)
    ends = np.append(ends, len(pos_scores) - 1) if len(pos_scores) else ends
    t, tp, pro = pos_scores[ends], tp[ends], pro[ends]
    above = n_neg - np.searchsorted(neg, t, side="right")  # negatives > t
    at_or_above = n_neg - np.searchsorted(neg, t, side="left")  # negatives >= t
    tp_before, pro_before = np.concatenate([[0.0], tp])[:-1], np.concatenate([[0.0], pro])[:-1]
    fp_curve = np.stack([above, at_or_above], 1).ravel().astype(np.float64)
    tp_curve = np.stack([tp_before, tp], 1).ravel()
    pro_curve = np.stack([pro_before, pro], 1).ravel()
    if len(scores):  # the lowest threshold: every pixel
        fp_curve = np.append(fp_curve, float(n_neg))
        tp_curve = np.append(tp_curve, tp[-1] if len(tp) else 0.0)
        pro_curve = np.append(pro_curve, pro[-1] if len(pro) else 0.0)
    return fp_curve, tp_curve, pro_curve


class PixelAccumulator:
    def __init__(self, exact_max_pixels: int = 2**23, bins: int = 2**16, value_range=None):
        self.exact_max_pixels = int(exact_max_pixels)
        self.bins = int(bins)
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.n_pixels = 0
        self.n_regions = 0
        self._scores: list[np.ndarray] = []  # exact mode buffers
        self._weights: list[np.ndarray] = []
        self._hist = None  # binned mode: (neg, pos, pro) per bin

    @property
    def exact(self) -> bool:
        return self._hist is None

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """One image: its anomaly map and its ground-truth mask (all False for a good image)."""
        scores = np.asarray(anomaly_map, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if scores.shape != mask.shape:
            raise ValueError(f"anomaly map {scores.shape} and mask {mask.shape} differ in shape")
        if not np.all(np.isfinite(scores)):
            raise ValueError("anomaly map contains NaN or inf")
        weights, n_regions = region_weights(mask)
        self.n_regions += n_regions
        self.n_pixels += scores.size
        if self.exact:
            self._scores.append(scores.ravel())
            self._weights.append(weights.ravel())
            if self.n_pixels > self.exact_max_pixels:
                self._switch_to_bins()
        else:
            self._bin(scores.ravel(), weights.ravel())

    def _switch_to_bins(self) -> None:
        scores = np.concatenate(self._scores)
        weights = np.concatenate(self._weights)
        self._scores, self._weights = [], []
        if self.value_range is None:
            self.value_range = (float(scores.min()), float(scores.max()))
        self._hist = np.zeros((3, self.bins), dtype=np.float64)
        self._bin(scores, weights)

    def _bin(self, scores: np.ndarray, weights: np.ndarray) -> None:
        lo, hi = self.value_range
        span = hi - lo if hi > lo else 1.0
        idx = ((np.clip(scores, lo, hi) - lo) * (self.bins / span)).astype(np.int64)
        np.minimum(idx, self.bins - 1, out=idx)
        pos = weights > 0
        self._hist[0] += np.bincount(idx[~pos], minlength=self.bins)
        self._hist[1] += np.bincount(idx[pos], minlength=self.bins)
        self._hist[2] += np.bincount(idx[pos], weights=weights[pos], minlength=self.bins)

    def _grouped_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative (negatives, positives, region weight) scored >= each threshold, thresholds descending."""
        if not self.exact:
            neg, pos, pro = self._hist[:, ::-1]
            return np.cumsum(neg), np.cumsum(pos), np.cumsum(pro)
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)
        weights = np.concatenate(self._weights) if self._weights else np.zeros(0, np.float32)
        self._scores, self._weights = [scores], [weights]  # drop the per-image pieces
        return exact_curve(scores, weights)

    def compute(self, limit: float = FPR_LIMIT) -> dict[str, float]:
        """``pixel_auroc``, ``pixel_f1_max`` and ``aupro``; empty when no defect or no defect-free pixel was seen."""
        fp, tp, pro = self._grouped_counts()
        if len(tp) == 0:
            return {}
        n_pos, n_neg = tp[-1], fp[-1]
        if n_pos == 0 or n_neg == 0 or self.n_regions == 0:
            return {}
        fpr = np.concatenate([[0.0], fp / n_neg])
        tpr = np.concatenate([[0.0], tp / n_pos])
        f1 = 2 * tp / (tp + fp + n_pos)
        pro_curve = np.concatenate([[0.0], pro / self.n_regions])
        return {
            "pixel_auroc": float(_trapezoid(tpr, fpr)),
            "pixel_f1_max": float(f1.max()),
            "aupro": aupro_from_curve(fpr, pro_curve, limit),
        }


def pixel_metrics(anomaly_maps, masks, **accumulator_options) -> dict[str, float]:
    """Pixel AUROC, pixel F1-max and AUPRO of equally shaped maps and masks (sequences or [n, H, W] arrays)."""
    acc = PixelAccumulator(**accumulator_options)
    for amap, mask in zip(anomaly_maps, masks, strict=True):
        acc.add(amap, mask)
    return acc.compute()


def aupro(anomaly_maps, masks, limit: float = FPR_LIMIT) -> float:
    """Exact AUPRO of a small set of maps (every distinct score is a threshold).

    ``anomaly_maps`` and ``masks`` are sequences (or arrays) of equally shaped 2-D maps. Raises
    ValueError when there is no defect region or no defect-free pixel.
    """
    acc = PixelAccumulator()
    for amap, mask in zip(anomaly_maps, masks, strict=True):
        acc.add(amap, mask)
    result = acc.compute(limit=limit)
    if "aupro" not in result:
        raise ValueError("AUPRO needs at least one defect region and one defect-free pixel")
    return result["aupro"]
