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
        order = np.argsort(scores)[::-1]
        scores = scores[order]
        weights = weights[order]
        del order
        tp = np.cumsum(weights > 0, dtype=np.int64)
        pro = np.cumsum(weights, dtype=np.float64)
        # one threshold per distinct score: keep the last index of every run of ties
        ends = np.flatnonzero(np.diff(scores)) if len(scores) else np.zeros(0, np.int64)
        ends = np.append(ends, len(scores) - 1) if len(scores) else ends
        tp, pro = tp[ends], pro[ends]
        fp = ends + 1 - tp
        return fp.astype(np.float64), tp.astype(np.float64), pro

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
