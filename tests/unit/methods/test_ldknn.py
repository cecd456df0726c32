"""LDKNN (REB) and the vanilla kNN baseline against brute-force references on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_core.methods.base import Method, pooled_max
from fewshot_core.methods.knn import KNN
from fewshot_core.methods.ldknn import LDKNN

torch.set_num_threads(1)


def _data(seed=0, n=3, q=6, g=9, d=8):
    rng = np.random.default_rng(seed)
    # a dense and a sparse mode, so the local density varies across the bank
    sup = rng.normal(size=(n, g, g, d)) * np.where(rng.random((n, g, g, 1)) < 0.7, 0.3, 2.0)
    qry = rng.normal(size=(q, g, g, d))
    qry[q // 2:, 3:6, 3:6] += 5.0
    return sup.astype(np.float32), qry.astype(np.float32)


def _sq(a, b):
    return ((a.astype(np.float64)[:, None] - b.astype(np.float64)[None]) ** 2).sum(-1)


def test_lambda_zero_is_exactly_one_nn():
    sup, qry = _data()
    s_ld, m_ld = LDKNN(k=5, ld_coef=0.0).fit(sup).score(qry)
    s_nn, m_nn = KNN(k=1).fit(sup).score(qry)
    np.testing.assert_array_equal(m_ld, m_nn)
    np.testing.assert_array_equal(s_ld, s_nn)
    ref = _sq(qry.reshape(-1, 8), sup.reshape(-1, 8)).min(1).reshape(m_ld.shape)
    np.testing.assert_allclose(m_ld, ref, rtol=1e-4, atol=1e-4)
    # also for the ratio form: lambda = 0 means no density term at all
    np.testing.assert_array_equal(LDKNN(k=5, ld_coef=0.0, ld_form="ratio").fit(sup).score(qry)[1], m_nn)


def test_local_density_excludes_self_and_uses_k_neighbours():
    sup, _ = _data(seed=1)
    model = LDKNN(k=4).fit(sup)
    flat = sup.reshape(-1, 8)
    d = _sq(flat, flat)
    np.fill_diagonal(d, np.inf)  # self excluded
    ref = np.sort(d, axis=1)[:, :4].mean(1)
    np.testing.assert_allclose(model.ld_, ref, rtol=1e-4, atol=1e-5)


def test_local_density_of_a_coreset_bank_is_measured_in_the_full_support():
    sup, _ = _data(seed=2)
    model = LDKNN(k=3, coreset_ratio=0.2, min_bank=0).fit(sup)
    flat = sup.reshape(-1, 8)
    assert len(model.bank_) == int(len(flat) * 0.2)
    d = _sq(model.bank_, flat)
    d[d < 1e-9] = np.inf  # each bank row is one of the support rows: exclude itself
    np.testing.assert_allclose(model.ld_, np.sort(d, axis=1)[:, :3].mean(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["difference", "ratio"])
def test_patch_score_formula(form):
    sup, qry = _data(seed=3)
    model = LDKNN(k=5, ld_coef=0.5, ld_form=form).fit(sup)
    scores, maps = model.score(qry)
    d = _sq(qry.reshape(-1, 8), model.bank_)
    dist, star = d.min(1), d.argmin(1)
    ld = model.ld_[star].astype(np.float64)
    ref = dist - 0.5 * ld if form == "difference" else dist / ld**0.5
    np.testing.assert_allclose(maps.ravel(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, pooled_max(maps, 3))


def test_pooled_max_is_max_of_non_overlapping_3x3_means():
    m = np.random.default_rng(4).random((2, 7, 8)).astype(np.float32)
    ref = [max(m[i, r:r + 3, c:c + 3].mean() for r in (0, 3) for c in (0, 3)) for i in range(2)]
    np.testing.assert_allclose(pooled_max(m, 3), ref, rtol=1e-6)
    np.testing.assert_allclose(pooled_max(m, 1), m.reshape(2, -1).max(1))
    np.testing.assert_allclose(pooled_max(m[:, :2, :2], 3), m[:, :2, :2].reshape(2, -1).max(1))  # grid < kernel


def test_knn_is_mean_of_k_squared_distances():
    sup, qry = _data(seed=5)
    _, maps = KNN(k=3).fit(sup).score(qry)
    ref = np.sort(_sq(qry.reshape(-1, 8), sup.reshape(-1, 8)), axis=1)[:, :3].mean(1)
    np.testing.assert_allclose(maps.ravel(), ref, rtol=1e-4, atol=1e-4)


def test_density_correction_changes_scores_and_both_detect_defects():
    sup, qry = _data(seed=6)
    for model in (LDKNN(k=5), KNN(k=3)):
        scores, _ = model.fit(sup).score(qry)
        assert scores[3:].min() > scores[:3].max(), type(model).__name__
    assert not np.allclose(LDKNN(k=5).fit(sup).score(qry)[1], LDKNN(k=5, ld_coef=0).fit(sup).score(qry)[1])


def test_save_load_and_bad_params(tmp_path):
    sup, qry = _data(seed=7)
    model = LDKNN(k=3, ld_coef=0.7).fit(sup)
    again = Method.load(model.save(tmp_path / "ld"))
    assert isinstance(again, LDKNN)
    np.testing.assert_array_equal(again.ld_, model.ld_)
    for a, b in zip(model.score(qry), again.score(qry)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ld_form"):
        LDKNN(ld_form="log")
    with pytest.raises(ValueError):
        KNN(k=0)


def test_density_on_the_coreset_bank_only():
    """``density_on="bank"``: LD among the coreset rows themselves (the cheaper, coarser estimate)."""
    sup, _ = _data(seed=2)
    model = LDKNN(k=3, coreset_ratio=0.2, min_bank=0, density_on="bank").fit(sup)
    d = _sq(model.bank_, model.bank_)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(model.ld_, np.sort(d, axis=1)[:, :3].mean(1), rtol=1e-4, atol=1e-5)
    full = LDKNN(k=3, coreset_ratio=0.2, min_bank=0).fit(sup)
    assert np.array_equal(full.bank_, model.bank_) and not np.allclose(full.ld_, model.ld_)
    with pytest.raises(ValueError, match="density_on"):
        LDKNN(density_on="all")
