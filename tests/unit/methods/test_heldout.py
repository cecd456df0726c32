"""Held-out scores from a fitted bank model's own state (``methods/components/heldout.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_core.evaluation.oneclass import support_threshold
from fewshot_core.evaluation.support_views import bank_groups, bank_input
from fewshot_core.evaluation.threshold import ThresholdConfig
from fewshot_core.methods.base import Method
from fewshot_core.methods.knn import KNN
from fewshot_core.methods.ldknn import LDKNN
from fewshot_core.methods.patchcore import PatchCore

BANK_METHODS = [(PatchCore, {"coreset_ratio": 1.0, "min_bank": 0, "num_neighbors": 3}), (KNN, {"k": 2}),
                (LDKNN, {"k": 3})]


def _support(n=4, seed=0) -> np.ndarray:
    """[n, h, w, d] features with one region per image that no other image has, so leaving an image's own
    rows in would lower its score."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5, 6, 8)).astype(np.float32)
    x[:, 2, 3] += 4.0 * rng.normal(size=(n, 8)).astype(np.float32)
    return x


@pytest.mark.parametrize("cls,params", BANK_METHODS, ids=lambda v: getattr(v, "__name__", ""))
def test_heldout_score_equals_a_refit_without_that_image(cls, params):
    x = _support()
    model = cls(foreground="none", **params).fit(x)
    for i in range(len(x)):
        refit = cls(foreground="none", **params).fit(np.delete(x, i, axis=0))
        want = refit.score(x[i:i + 1])[0]
        np.testing.assert_allclose(model.heldout_scores(x[i:i + 1], [i]), want, rtol=1e-5)
        # the image's own rows were removed: with them, the image meets itself
        assert model.score(x[i:i + 1])[0][0] < want[0]


@pytest.mark.parametrize("cls,params", BANK_METHODS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("augment", ["features", "images"])
def test_augmented_views_leave_with_their_image(cls, params, augment):
    """With augmented views in the bank, a held-out image's views leave with it: its score is a refit's
    on the other images' views only (``bank_groups`` follows ``bank_input``'s order)."""
    n, v = 3, 3
    views = np.stack([_support(n, seed=s) for s in range(v)], axis=1)  # [n, views, h, w, d]
    groups = bank_groups(views.shape[:2], augment)
    fitted = bank_input(views, augment)
    for g in range(n):  # every map of group g is one of image g's views
        members = fitted[groups == g]
        assert len(members) == v and all(any(np.array_equal(m, w) for w in views[g]) for m in members)
    model = cls(foreground="none", **params).fit(fitted)
    for i in range(n):
        refit = cls(foreground="none", **params).fit(bank_input(np.delete(views, i, axis=0), augment))
        np.testing.assert_allclose(model.heldout_scores(views[i:i + 1, 0], np.flatnonzero(groups == i)),
                                   refit.score(views[i:i + 1, 0])[0], rtol=1e-5)


def test_patchcore_keeps_its_own_coreset_rows_and_foreground():
    """A coreset model: the held-out score is the model's scoring against exactly its coreset rows not from
    that image, with its own foreground estimate (a model holding just those rows scores the same)."""
    x = _support(6)
    model = PatchCore(coreset_ratio=0.3, min_bank=0, num_neighbors=3, foreground="auto").fit(x)
    assert len(model.bank_) < x[..., 0].size and model.bank_source_.shape == (len(model.bank_),)
    for i in range(len(x)):
        keep = model.bank_source_ != i
        state = model.get_state()["arrays"]
        same_rows = PatchCore(num_neighbors=3)
        same_rows.set_state({"arrays": {**state, "bank": model.bank_[keep], "bank_source": model.bank_source_[keep]}})
        np.testing.assert_allclose(model.heldout_scores(x[i:i + 1], [i]), same_rows.score(x[i:i + 1])[0],
                                   rtol=1e-5)


def test_an_image_holding_every_bank_row_has_no_heldout_score():
    x = _support(2)
    model = KNN(foreground="none").fit(x)
    model.bank_source_ = np.zeros(len(model.bank_), np.int32)  # as if the coreset kept image 0's rows only
    scores = model.heldout_scores(x, [0])
    assert np.isnan(scores).all()
    cut = support_threshold("knn", model.get_params(), x, None, ThresholdConfig(rule="loo"), model=model)
    # image 1 is still scored against image 0's rows; image 0 has no model without it
    assert cut.usable and cut.n_good == 2 and len(cut.good_scores) == 1
    assert "1 held-out image(s) without a score (every bank row came from it)" in cut.rule

    model.bank_source_ = np.zeros(len(model.bank_), np.int32)
    cut = support_threshold("knn", model.get_params(), x[:2], None, ThresholdConfig(rule="holdout", share=0.5,
                                                                                   seed=_seed_holding_out(0)),
                            model=model)
    assert not cut.usable and "every bank row came from the held-out images" in cut.reason


def _seed_holding_out(image: int) -> int:
    """A holdout seed whose one held-out image of two is ``image``."""
    for seed in range(100):
        if np.random.default_rng(seed).choice(2, size=1, replace=False)[0] == image:
            return seed
    raise AssertionError


@pytest.mark.parametrize("cls,params", BANK_METHODS, ids=lambda v: getattr(v, "__name__", ""))
def test_provenance_is_saved_and_loaded_with_the_model(cls, params, tmp_path):
    x = _support()
    model = cls(**params).fit(x)
    again = Method.load(model.save(tmp_path / cls.name))
    np.testing.assert_array_equal(again.bank_source_, model.bank_source_)
    assert again.can_score_heldout()
    np.testing.assert_array_equal(again.heldout_scores(x[1:2], [1]), model.heldout_scores(x[1:2], [1]))


def test_a_model_saved_without_provenance_falls_back_to_refits(tmp_path, monkeypatch):
    from fewshot_core.evaluation import oneclass

    x = _support()
    model = PatchCore(min_bank=0).fit(x)
    state = model.get_state()
    state["arrays"].pop("bank_source")
    old = PatchCore(min_bank=0)
    old.set_state(state)
    assert not old.can_score_heldout()
    with pytest.raises(ValueError, match="no bank provenance"):
        old.heldout_scores(x[:1], [0])
    made = []
    real = oneclass.registry.create
    monkeypatch.setattr(oneclass.registry, "create",
                        lambda name, runtime=None, **p: made.append(p) or real(name, runtime=runtime, **p))
    cut = support_threshold("patchcore", old.get_params(), x, None, ThresholdConfig(rule="loo"), model=old)
    assert len(made) == len(x) and "held out from refits" in cut.rule


def test_ldknn_density_outside_a_coreset_bank_cannot_be_held_out():
    x = _support()
    assert not LDKNN(coreset_ratio=0.5, min_bank=0).fit(x).can_score_heldout()  # LD among all support rows
    assert LDKNN(coreset_ratio=0.5, min_bank=0, density_on="bank").fit(x).can_score_heldout()
    assert LDKNN().fit(x).can_score_heldout()
