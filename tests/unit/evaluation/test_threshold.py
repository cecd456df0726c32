"""The decision threshold from good support images only."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_core.errors import FsadError
from fewshot_core.evaluation.threshold import (
    CONFIDENCE,
    Threshold,
    ThresholdConfig,
    certified_rank,
    decision_metrics,
    fit_threshold,
    fpr_upper_bound,
    threshold_from_scores,
)
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec

FPR = 0.05
REPS = 4000


def _achieved_fpr(draw, sf, k: int, fpr: float = FPR, reps: int = REPS, seed: int = 0):
    """(false-alarm rates of the thresholds of ``reps`` supports of ``k`` good scores, their stated bound):
    the rate of a threshold is the survival function ``sf`` of the known score distribution at it, i.e.
    the share of fresh good draws above it."""
    rng = np.random.default_rng(seed)
    cuts = [threshold_from_scores(draw(rng, k), fpr, "t") for _ in range(reps)]
    assert len({c.fpr_bound for c in cuts}) == 1
    return sf(np.array([c.value for c in cuts])), cuts[0].fpr_bound


def _normal(rng, k):
    return rng.normal(10.0, 2.0, size=k)


def _normal_sf(x):
    from scipy.stats import norm

    return norm.sf(x, 10.0, 2.0)


def _lognormal(rng, k):  # right-skewed, like distance scores
    return rng.lognormal(0.0, 1.0, size=k)


def _lognormal_sf(x):
    from scipy.stats import lognorm

    return lognorm.sf(x, 1.0)


def _pareto(rng, k):  # heavy tail (alpha 1.5): the normal tail fit's shape is wrong here
    return rng.pareto(1.5, size=k) + 1.0


def _pareto_sf(x):
    return np.minimum(1.0, np.asarray(x, dtype=float) ** -1.5)


def _distance_fit_score(values):
    """A toy one-class model: score = distance to the mean of the training rows."""
    values = np.asarray(values, dtype=float)

    def fit_score(train, held):
        return np.abs(values[held] - values[train].mean())

    return fit_score


def test_threshold_keeps_at_most_fpr_of_good_scores_above():
    scores = np.arange(1, 21, dtype=float)  # 20 held-out good scores: too few to certify 10 %
    t = threshold_from_scores(scores, 0.1, "x")
    assert t.value == 20.0 and (scores > t.value).mean() <= 0.1  # the tail fit (18.5) stays below the highest
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
    assert t.usable and t.value >= 2.0  # the distinct image's distance, raised by the small-sample tail fit


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
    part = FeatureStore(tmp_path / "s").build(ds, FeatureSpec(image_size=32, weights="random"),
                                              EmbedCompute(num_workers=0, progress=False))
    row = evaluate_oneclass(ds, part, "knn", 3, [0], options=EpisodeOptions(augment="none"))[0]
    assert row["threshold_rule"].startswith("none: degenerate: identical support images"), row["threshold_rule"]
    assert np.isnan(row["balanced_accuracy"])


DISTRIBUTIONS = {"normal": (_normal, _normal_sf), "lognormal": (_lognormal, _lognormal_sf),
                 "pareto": (_pareto, _pareto_sf)}
MC = 3 / np.sqrt(REPS)  # about 3 standard errors of a simulated share


def _highest_bound(k):
    return 1 - (1 - CONFIDENCE) ** (1 / k)  # Beta(1, k): the rate above the highest of k exchangeable scores


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("k", [2, 4, 8, 16, 40, 59, 100, 200])
def test_stated_bound_holds_on_fresh_good_draws(name, k):
    draw, sf = DISTRIBUTIONS[name]
    rates, bound = _achieved_fpr(draw, sf, k)
    assert rates.mean() <= bound, (name, k, rates.mean(), bound)
    # the bound is a 95 % one: it may be exceeded by at most 5 % of the supports
    assert (rates > bound).mean() <= (1 - CONFIDENCE) + MC * 0.25, (name, k, (rates > bound).mean())


@pytest.mark.parametrize("k", [59, 100, 200])
def test_enough_scores_certify_the_requested_rate(k):
    rates, bound = _achieved_fpr(_lognormal, _lognormal_sf, k)
    assert bound <= FPR and "held-out scores, false alarms <=" in threshold_from_scores(np.ones(k), FPR, "x").rule
    # a certified rank, not a loose one: the next rank would break the bound
    r = certified_rank(k, FPR)
    assert fpr_upper_bound(k, r) == bound and fpr_upper_bound(k, r + 1) > FPR
    assert (rates > bound).mean() == pytest.approx(1 - CONFIDENCE, abs=MC * 0.25)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_few_normal_scores_reach_the_requested_rate_by_the_tail_fit(k):
    rates, bound = _achieved_fpr(_normal, _normal_sf, k)
    assert bound == pytest.approx(_highest_bound(k)) and bound > FPR
    assert rates.mean() == pytest.approx(FPR, abs=0.006)  # an exact prediction bound for normal scores


def test_old_quantile_rule_broke_its_promise_at_few_shots():
    # the rule before: the 1 - fpr quantile of the held-out scores, i.e. their maximum below 20 scores;
    # a fresh score is above the maximum of 4 with probability 1/5, four times the 5 % it claimed
    rng = np.random.default_rng(1)
    old = [float(np.quantile(_normal(rng, 4), 1 - FPR, method="higher")) for _ in range(REPS)]
    assert np.mean(_normal_sf(np.array(old))) == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("k", [2, 4, 18, 58])
def test_too_few_scores_say_they_cannot_support_the_rate(k):
    t = threshold_from_scores(np.arange(1.0, k + 1), FPR, "loo fpr=0.05 n=%d" % k)
    assert t.fpr_bound == pytest.approx(_highest_bound(k)) and t.fpr_bound > FPR
    assert (f"{k} held-out scores support at best {100 * _highest_bound(k):.1f}% false alarms (95% confidence), "
            "not the 5.0% asked") in t.rule
    assert t.value >= k and "raised to a normal tail fit at 5.0%" in t.rule  # never below the highest score
    if k <= 4:
        assert t.value > k  # few scores: the tail fit lies above the highest


def test_enough_scores_state_their_rank_and_bound():
    t = threshold_from_scores(np.arange(1.0, 101.0), FPR, "holdout")
    assert t.value == 99.0 and t.fpr_bound == pytest.approx(fpr_upper_bound(100, 2))
    assert "the 2nd highest of 100 held-out scores, false alarms <= 4.7% (95% confidence)" in t.rule
    t = threshold_from_scores(np.arange(1.0, 60.0), FPR, "holdout")
    assert t.value == 59.0 and t.fpr_bound <= FPR and "the highest of 59" in t.rule


def test_zero_fpr_keeps_the_largest_score_and_its_bound():
    t = threshold_from_scores([1.0, 2.0, 3.0], 0.0, "x")
    assert t.value == 3.0 and t.fpr_bound == pytest.approx(_highest_bound(3)) and "not the 0.0% asked" in t.rule


def test_bound_round_trips_and_older_records_still_load():
    t = fit_threshold(4, _distance_fit_score([0.0, 1.0, 2.0, 10.0]))
    assert t.fpr_bound == pytest.approx(_highest_bound(4)) and t.rule.startswith("loo fpr=0.05 n=4: ")
    assert Threshold.from_dict(t.to_dict()) == t
    old = {"value": 2.5, "rule": "loo fpr=0.05 n=4", "fpr": 0.05, "n_good": 4, "good_scores": [1.0, 2.5],
           "reason": ""}
    loaded = Threshold.from_dict(old)
    assert loaded.value == 2.5 and loaded.fpr_bound is None
    assert np.isnan(decision_metrics([0, 1], [1.0, 3.0], loaded)["threshold_fpr_bound"])
    assert decision_metrics([0, 1], [1.0, 3.0], t)["threshold_fpr_bound"] == pytest.approx(_highest_bound(4))


def test_one_good_shot_states_no_bound():
    t = fit_threshold(1, _distance_fit_score([0.0]))
    assert t.fpr_bound is None
    assert np.isnan(decision_metrics([0, 1], [0.1, 0.9], t)["threshold_fpr_bound"])
