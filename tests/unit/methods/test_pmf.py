"""P>M>F fine-tuning: learns a tiny image task the frozen backbone misses, picks its lr on held-out
support, is deterministic, bounded, never touches the caller's backbone or the queries."""

import numpy as np
import pytest
import torch
from torch import nn

from fewshot_core.methods.pmf import PMF, augment, meta_train_backbone

torch.set_num_threads(1)


def _images(n, kind, rng, size=32, amp=1.2):
    """Noise images; 'bad' ones carry a faint red 4x4 blob at a random place."""
    x = rng.normal(0, 0.5, (n, 3, size, size)).astype(np.float32)
    if kind == "bad":
        for i in range(n):
            r, c = rng.integers(4, size - 8, 2)
            x[i, 0, r : r + 4, c : c + 4] += amp
            x[i, 1:, r : r + 4, c : c + 4] -= amp
    return torch.from_numpy(x)


def _backbone(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    X = torch.cat([_images(20, "good", rng), _images(20, "bad", rng)])
    y = np.array(["good"] * 20 + ["bad"] * 20)
    support = np.r_[0:5, 20:25]
    query = np.setdiff1d(np.arange(40), support)
    return X, y, support, query


def test_fine_tuning_learns_what_the_frozen_backbone_misses(task):
    X, y, s, q = task
    bb = _backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    plain = PMF(bb, steps=0, lr_candidates=()).fit(X[s], y[s])
    tuned = PMF(bb, steps=60, lr_candidates=(1e-2, 1e-3), seed=0).fit(X[s], y[s])
    acc_plain = (plain.predict(X[q]) == y[q]).mean()
    acc_tuned = (tuned.predict(X[q]) == y[q]).mean()
    assert tuned.fit_info_["lr"] > 0 and tuned.fit_info_["steps_done"] == 60
    assert acc_tuned >= 0.9 and acc_tuned > acc_plain + 0.1, (acc_plain, acc_tuned)
    for k, v in bb.state_dict().items():  # the caller's backbone is never modified
        assert torch.equal(v, before[k]), k


def test_diverged_fine_tuning_falls_back_to_the_pretrained_backbone(task, monkeypatch):
    """A final fine-tuning that sorts its own support worse than the pretrained backbone is discarded."""
    from fewshot_core.methods import pmf as pmf_module

    X, y, s, q = task
    real_steps = pmf_module._steps

    def steps_then_diverge(model, x_proto, *args):
        done = real_steps(model, x_proto, *args)
        if len(x_proto) == len(s):  # the final run on the whole support (the search uses one shot per class)
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()  # every image maps to the same point: the support is no longer separable
        return done

    monkeypatch.setattr(pmf_module, "_steps", steps_then_diverge)
    tuned = PMF(_backbone(), steps=60, lr_candidates=(1e-2, 1e-3), seed=0).fit(X[s], y[s])
    plain = PMF(_backbone(), steps=0, lr_candidates=()).fit(X[s], y[s])
    assert tuned.fit_info_["reverted_lr"] in (1e-2, 1e-3) and tuned.fit_info_["lr"] == 0.0
    np.testing.assert_allclose(tuned.predict_proba(X[q]), plain.predict_proba(X[q]), rtol=1e-6)
    monkeypatch.undo()
    healthy = PMF(_backbone(), steps=60, lr_candidates=(1e-2, 1e-3), seed=0).fit(X[s], y[s])
    assert healthy.fit_info_["reverted_lr"] is None and healthy.fit_info_["lr"] > 0


def test_deterministic_by_seed_and_queries_scored_independently(task):
    X, y, s, q = task
    a = PMF(_backbone(), steps=4, search_steps=2, lr_candidates=(1e-2,), seed=3).fit(X[s], y[s])
    b = PMF(_backbone(), steps=4, search_steps=2, lr_candidates=(1e-2,), seed=3).fit(X[s], y[s])
    pa = a.predict_proba(X[q])
    np.testing.assert_array_equal(pa, b.predict_proba(X[q]))
    np.testing.assert_allclose(a.predict_proba(X[q][:1]), pa[:1], rtol=1e-5, atol=1e-7)  # no transduction
    np.testing.assert_allclose(pa.sum(1), 1.0)
    assert list(a.classes_) == ["bad", "good"]


def test_one_shot_keeps_lr_zero_unless_augmented_fallback(task):
    X, y, _, _ = task
    s = np.array([0, 20])
    paper = PMF(_backbone(), steps=3, lr_candidates=(1e-2,)).fit(X[s], y[s])
    assert paper.fit_info_["lr"] == 0.0 and paper.fit_info_["lr_scores"] == {}
    aug = PMF(_backbone(), steps=3, lr_candidates=(1e-2,), search_fallback="augmented").fit(X[s], y[s])
    assert set(aug.fit_info_["lr_scores"]) == {"0.0", "0.01"}


def test_single_class_held_out_does_not_pick_an_lr(task):
    """1 good : 4 bad leaves only bad images held out: any collapsed model would score 100% there."""
    X, y, _, _ = task
    s = np.array([0, 20, 21, 22, 23])
    m = PMF(_backbone(), steps=3, lr_candidates=(1e-2,)).fit(X[s], y[s])
    assert m.fit_info_["lr"] == 0.0 and m.fit_info_["lr_scores"] == {}


def test_time_budget_bounds_the_work(task):
    X, y, s, _ = task
    m = PMF(_backbone(), steps=1000, lr_candidates=(1e-2,), time_budget_s=0.0).fit(X[s], y[s])
    assert m.fit_info_["steps_done"] == 0 and m.fit_info_["budget_hit"]


def test_augment_is_seeded_and_changes_images(task):
    X = task[0][:4]
    a = augment(X, torch.Generator().manual_seed(1), prob=1.0)
    b = augment(X, torch.Generator().manual_seed(1), prob=1.0)
    assert torch.equal(a, b) and not torch.equal(a, X)


def test_meta_training_never_reads_the_evaluated_category():
    rng = np.random.default_rng(1)
    pool = {c: (torch.cat([_images(4, "good", rng), _images(4, "bad", rng)]), np.array(["good"] * 4 + ["bad"] * 4))
            for c in ("a", "b", "evaluated")}
    poisoned = dict(pool, evaluated=(torch.full_like(pool["evaluated"][0], 1e3), pool["evaluated"][1]))
    m1 = meta_train_backbone(_backbone(), pool, exclude="evaluated", steps=3, seed=0)
    m2 = meta_train_backbone(_backbone(), poisoned, exclude="evaluated", steps=3, seed=0)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert m1.trained_on == ("a", "b") and m1.meta_steps_done == 3
    assert not torch.equal(m1[0].weight, _backbone()[0].weight)  # it did train


def test_runs_on_the_offline_lite0_timm_model():
    from fewshot_core.backbones import create_model

    try:
        bb = create_model("tf_efficientnet_lite0", weights="auto", device="cpu")
    except Exception as exc:  # noqa: BLE001 - weights package missing in a bare checkout
        pytest.skip(f"Lite0 weights unavailable: {exc}")
    rng = np.random.default_rng(0)
    X = torch.cat([_images(3, "good", rng, size=64), _images(3, "bad", rng, size=64)])
    y = np.array(["good"] * 3 + ["bad"] * 3)
    m = PMF(bb, steps=2, search_steps=1, lr_candidates=(1e-3,)).fit(X, y)
    assert m.prototypes_.shape == (2, bb.num_features)
    assert m.predict_proba(X[:2]).shape == (2, 2)
