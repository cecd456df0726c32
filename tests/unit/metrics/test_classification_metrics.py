"""Classification metrics: hand-checked values and the absent-not-NaN rule."""

import json

import numpy as np
import pytest

from fewshot_core.metrics.classification import classification_metrics, confusion


def test_hand_example_multiclass():
    y_true = ["good", "good", "good", "good", "crack", "crack", "hole", "hole"]
    y_pred = ["good", "good", "good", "crack", "crack", "good", "hole", "hole"]
    m = classification_metrics(y_true, y_pred, classes=["crack", "good", "hole"])
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["recall_good"] == pytest.approx(3 / 4)
    assert m["recall_crack"] == pytest.approx(1 / 2)
    assert m["recall_hole"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # per-class F1: crack p=1/2 r=1/2 -> 1/2; good p=3/4 r=3/4 -> 3/4; hole 1
    assert m["macro_f1"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert "image_auroc" not in m  # no score given
    cm = confusion(y_true, y_pred, ["crack", "good", "hole"])
    assert cm == [[1, 1, 0], [1, 3, 0], [0, 0, 2]]
    json.dumps(cm)  # serialisable as is


def test_balanced_accuracy_punishes_majority_guessing():
    y_true = ["good"] * 9 + ["bad"]
    m = classification_metrics(y_true, ["good"] * 10, classes=["bad", "good"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)


def test_binary_auroc_groups_all_defects_and_ranks_by_score():
    y_true = np.array(["good", "good", "crack", "hole"])
    score = np.array([-50.0, -49.0, 10.0, -49.5])  # hole sits between the two goods
    m = classification_metrics(y_true, y_true, classes=["crack", "good", "hole"], anomaly_score=score)
    assert m["image_auroc"] == pytest.approx(3 / 4)


def test_auroc_absent_with_one_group_and_recall_absent_for_missing_class():
    m = classification_metrics(["good", "good"], ["good", "bad"], classes=["bad", "good"], anomaly_score=[0.1, 0.2])
    assert "image_auroc" not in m
    assert "recall_bad" not in m and m["recall_good"] == pytest.approx(0.5)
    assert all(np.isfinite(v) for v in m.values())
