"""Image-level detection metrics: AUROC and F1-max (the best F1 over all thresholds).

Both come from scikit-learn; they need at least one good and one anomalous image, otherwise the
metric is left out of the returned dict (never NaN). ``recall_per_defect_type`` reads the decisions at a
threshold instead: which defect types a deployed model catches.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score


def f1_max(labels, scores) -> float:
    """Best F1 over every threshold of ``scores`` (label 1 = anomalous)."""
    precision, recall, _ = precision_recall_curve(np.asarray(labels), np.asarray(scores))
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def image_metrics(labels, scores) -> dict[str, float]:
    """``image_auroc`` and ``image_f1_max``; empty when the labels hold a single class."""
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if not np.all(np.isfinite(scores)):
        raise ValueError("image scores contain NaN or inf")
    if len(np.unique(labels)) < 2:
        return {}
    return {"image_auroc": float(roc_auc_score(labels, scores)), "image_f1_max": f1_max(labels, scores)}


def recall_per_defect_type(defect_types, labels, decided) -> dict[str, float]:
    """``recall_<type>``: the share of each defect type's images flagged anomalous (``decided`` True);
    empty without decisions (no threshold). Good images (label 0) are not a defect type."""
    if decided is None:
        return {}
    types = np.asarray(defect_types, dtype=object)
    bad = np.asarray(labels).astype(int) == 1
    decided = np.asarray(decided, dtype=bool)
    return {f"recall_{t}": float(decided[bad & (types == t)].mean()) for t in sorted(set(types[bad]))}
