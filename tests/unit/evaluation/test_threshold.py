"""The decision threshold from good support images only."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_core.errors import FsadError
from fewshot_core.evaluation.threshold import (
    Threshold,
    ThresholdConfig,
    decision_metrics,
    fit_threshold,
    threshold_from_scores,
)


def _distance_fit_score(values):
    """A toy one-class model: score = distance to the mean of the training rows."""
    values = np.asarray(values, dtype=float)

    def fit_score(train, held):
        return np.abs(values[held] - values[train].mean())

    return fit_score


def test_quantile_keeps_at_most_fpr_of_good_scores_above():
    scores = np.arange(1, 21, dtype=float)  # 20 held-out good scores
    t = threshold_from_scores(scores, 0.1, "x")
    assert t.value == 19.0 and (scores > t.value).mean() <= 0.1
    assert threshold_from_scores(scores, 0.0, "x").value == 20.0


def test_leave_one_out_scores_each_image_with_a_model_that_did_not_see_it():
    values = [0.0, 1.0, 2.0, 10.0]
    t = fit_threshold(4, _distance_fit_score(values), ThresholdConfig(rule="loo", fpr=0.0))
    # image 10 scored against the mean of the other three (1.0): 9.0 is the largest held-out score
    assert t.value == pytest.approx(9.0) and t.rule.startswith("loo") and t.n_good == 4
    assert len(t.good_scores) == 4


def test_auto_switches_to_holdout_for_large_supports_and_is_seeded():
    values = np.random.default_rng(0).normal(size=40)
    a = fit_threshold(40, _distance_fit_score(values), ThresholdConfig(seed=3))
    b = fit_threshold(40, _distance_fit_score(values), ThresholdConfig(seed=3))
    c = fit_threshold(40, _distance_fit_score(values), ThresholdConfig(seed=4))
    assert a.rule.startswith("holdout") and len(a.good_scores) == 8
    assert a.value == b.value and a.good_scores != c.good_scores


def test_one_good_shot_says_it_cannot():
    t = fit_threshold(1, _distance_fit_score([0.0]))
    assert t.value is None and not t.usable and "2 or more" in t.reason
    assert t.decide([1.0, 2.0]) is None
    m = decision_metrics([0, 1], [0.1, 0.9], t)
    assert np.isnan(m["balanced_accuracy"]) and m["threshold_rule"].startswith("none")


def test_balanced_accuracy_at_the_threshold():
    t = Threshold(0.5, "loo fpr=0.05 n=2", 0.05, 2)
    m = decision_metrics([0, 0, 1, 1], [0.1, 0.7, 0.9, 0.2], t)
    assert m["balanced_accuracy"] == pytest.approx(0.5) and m["threshold"] == 0.5
    assert Threshold.from_dict(t.to_dict()) == t


def test_bad_config_is_a_user_error():
    with pytest.raises(FsadError, match="fpr"):
        ThresholdConfig(fpr=1.5)
    with pytest.raises(FsadError, match="rule"):
        ThresholdConfig(rule="magic")


def test_identical_support_images_are_degenerate_not_a_zero_threshold():
    """Three copies of one image: every held-out copy scored 0, the threshold was 0.0 and every test image
    was called anomalous (balanced accuracy 0.5)."""
    copies = _distance_fit_score([3.0, 3.0, 3.0])
    t = fit_threshold(3, copies)  # known from the scores alone
    assert t.value is None and not t.usable and t.reason.startswith("degenerate: identical support images")
    m = decision_metrics([0, 1, 1], [0.1, 0.9, 0.8], t)
    assert np.isnan(m["balanced_accuracy"]) and "degenerate: identical support images" in m["threshold_rule"]

    def never(train, held):  # with content hashes the copies are refused before any fit
        raise AssertionError("fitted")

    t = fit_threshold(3, never, support_keys=["abc", "abc", "abc"])
    assert t.value is None and "degenerate: identical support images (all 3" in t.reason
    # some copies among distinct images still give a threshold from the distinct ones
    t = fit_threshold(3, _distance_fit_score([3.0, 3.0, 5.0]), ThresholdConfig(rule="loo"),
                      support_keys=["abc", "abc", "def"])
    assert t.usable and t.value == pytest.approx(2.0)


def test_identical_support_images_in_an_evaluated_episode_say_degenerate(tmp_path):
    """End to end: the one-class protocol passes the store's content hashes to the threshold rule."""
    import shutil

    from _builders import build_mvtec_category
    from fewshot_core.data import load_dataset
    from fewshot_core.evaluation.oneclass import evaluate_oneclass
    from fewshot_core.features.store import FeatureStore

    cat = build_mvtec_category(tmp_path / "d", "w", n_train=3, n_test_good=2, defects={"cut": 2})
    for name in ("001.png", "002.png"):
        shutil.copy(cat / "train/good/000.png", cat / "train/good" / name)
    ds = load_dataset(tmp_path / "d", "w")
    part = FeatureStore(tmp_path / "s").build(ds, image_size=32, weights="random", num_workers=0, progress=False)
    row = evaluate_oneclass(ds, part, "knn", 3, [0], augment="none")[0]
    assert row["threshold_rule"].startswith("none: degenerate: identical support images"), row["threshold_rule"]
    assert np.isnan(row["balanced_accuracy"])
