"""Classification metrics for the supervised few-shot protocol (scikit-learn underneath).

Metric names are shared with the one-class protocol so that runs of both sort in one MLflow column:
``image_auroc`` is the good-vs-defective ranking of query images, ``balanced_accuracy`` the accuracy at the
decision threshold (here: the predicted class).

Binary AUROC (``image_auroc``) is computed from an anomaly score that is monotone in 1 − P(good); callers pass the
log-odds ``log P(not good) − log P(good)`` so that saturated probabilities (1 − 1e-40 == 1.0 in float)
do not turn into ties. A metric that cannot be computed (one class in the query) is absent, not NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)


def classification_metrics(
    y_true: Sequence,
    y_pred: Sequence,
    classes: Sequence,
    anomaly_score: Sequence[float] | None = None,
    good_label="good",
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 over ``classes``, ``recall_<class>``, ``false_alarm_rate`` (good
    queries predicted as any other class), ``miss_rate`` (other queries predicted ``good_label``) and binary
    ``image_auroc``.

    ``image_auroc`` treats every class other than ``good_label`` as anomalous and ranks by ``anomaly_score``;
    it is left out when the query holds only one of the two groups.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = list(classes)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected with few queries
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        # Macro over all episode classes, also those never predicted (zero_division=0 scores them 0).
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    present = set(y_true.tolist())
    for c, r in zip(labels, recalls):
        if c in present:  # recall of a class absent from the query is undefined: leave it out
            out[f"recall_{c}"] = float(r)
    # the deployment view of the predicted classes: a good part called defective, a defective part called good
    good = y_true == good_label
    if good.any():
        out["false_alarm_rate"] = float(np.mean(y_pred[good] != good_label))
    if (~good).any():
        out["miss_rate"] = float(np.mean(y_pred[~good] == good_label))
    if anomaly_score is not None:
        is_anomalous = (y_true != good_label).astype(int)
        if 0 < is_anomalous.sum() < len(is_anomalous):
            out["image_auroc"] = float(roc_auc_score(is_anomalous, np.asarray(anomaly_score, dtype=np.float64)))
    return out


def confusion(y_true: Sequence, y_pred: Sequence, classes: Sequence) -> list[list[int]]:
    """Confusion matrix as nested lists; rows = true class, columns = predicted, in ``classes`` order."""
    cm = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=list(classes))
    return cm.astype(int).tolist()
