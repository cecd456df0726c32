"""fsad predict's closing line says what its decisions rest on: the threshold, its rule and the
false-alarm rate the model stands behind (or that its support could not certify the rate asked)."""

from __future__ import annotations

from types import SimpleNamespace

from fewshot_core.cli.predict import threshold_summary
from fewshot_core.evaluation.threshold import Threshold, fit_threshold, threshold_from_scores


def _model(threshold, detector=True):
    return SimpleNamespace(is_detector=detector, threshold=threshold)


def test_few_shot_threshold_says_what_it_cannot_support():
    line = threshold_summary(_model(threshold_from_scores([1.0, 1.5, 2.0, 2.5], 0.05, "loo fpr=0.05 n=4")))
    assert line.startswith("threshold ") and "4 held-out scores support at best 52.7% false alarms" in line
    assert "not the 5.0% asked" in line


def test_certified_threshold_states_its_bound():
    line = threshold_summary(_model(threshold_from_scores([float(i) for i in range(100)], 0.05, "holdout")))
    assert "threshold 98 (holdout: the 2nd highest of 100 held-out scores, false alarms <= 4.7%" in line


def test_no_threshold_says_why():
    one_shot = fit_threshold(1, lambda train, held: held * 0.0)
    assert threshold_summary(_model(one_shot)).startswith("threshold none (1 good support image")
    assert threshold_summary(_model(None)) == "threshold none"
    assert threshold_summary(_model(None, detector=False)) == "threshold none"


def test_older_record_without_a_bound_says_so():
    old = Threshold.from_dict({"value": 2.5, "rule": "loo fpr=0.05 n=4", "fpr": 0.05, "n_good": 4})
    assert threshold_summary(_model(old)) == ("threshold 2.5 (loo fpr=0.05 n=4; recorded before thresholds "
                                              "stated a false-alarm bound)")
