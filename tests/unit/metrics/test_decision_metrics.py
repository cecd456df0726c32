"""What a deployed decision gets wrong: false alarms on good images, misses on defective ones, and which
defect types slip through, at the one-class threshold and for the supervised predicted class."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_core.evaluation.threshold import Threshold, decision_metrics
from fewshot_core.metrics import recall_per_defect_type
from fewshot_core.metrics.classification import classification_metrics


def test_false_alarm_and_miss_rate_at_the_threshold():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.4, 0.95])  # one good above 0.5, one defective below
    out = decision_metrics(labels, scores, Threshold(0.5, "loo fpr=0.05 n=4", 0.05, 4))
    assert out["false_alarm_rate"] == pytest.approx(1 / 4)
    assert out["miss_rate"] == pytest.approx(1 / 3)
    assert out["balanced_accuracy"] == pytest.approx(1 - (1 / 4 + 1 / 3) / 2)
    # no threshold: no decisions, so no rates either (NaN, and the rule says why)
    none = decision_metrics(labels, scores, Threshold(None, "loo", 0.05, 1, [], "1 good support image"))
    assert math.isnan(none["false_alarm_rate"]) and math.isnan(none["miss_rate"])
    assert none["threshold_rule"].startswith("none: 1 good")


def test_recall_per_defect_type_counts_the_flagged_images_of_each_type():
    types = ["good", "good", "crack", "crack", "crack", "hole"]
    labels = [0, 0, 1, 1, 1, 1]
    decided = np.array([True, False, True, False, True, True])
    assert recall_per_defect_type(types, labels, decided) == {"recall_crack": pytest.approx(2 / 3),
                                                              "recall_hole": 1.0}
    assert recall_per_defect_type(types, labels, None) == {}


def test_supervised_rates_read_the_predicted_class():
    y_true = ["good", "good", "crack", "hole", "hole"]
    y_pred = ["crack", "good", "good", "hole", "crack"]  # a false alarm, a miss, a hole named crack (caught)
    out = classification_metrics(y_true, y_pred, ["good", "crack", "hole"])
    assert out["false_alarm_rate"] == pytest.approx(0.5)
    assert out["miss_rate"] == pytest.approx(1 / 3)
