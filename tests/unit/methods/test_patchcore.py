"""PatchCore, the greedy coreset, faiss search, anomaly maps and the method registry, on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_core.errors import FsadError
from fewshot_core.methods import create
from fewshot_core.methods.components.anomaly_map import to_image_maps
from fewshot_core.methods.base import Method
from fewshot_core.methods.components.coreset import approximate_greedy_coreset, coreset_size
from fewshot_core.methods.components.nn_search import NearestNeighbors
from fewshot_core.methods.patchcore import PatchCore

torch.set_num_threads(1)


def _support_query(seed=0, n=4, q=6, g=8, d=16):
    rng = np.random.default_rng(seed)
    sup = rng.normal(size=(n, g, g, d)).astype(np.float32)
    qry = rng.normal(size=(q, g, g, d)).astype(np.float32)
    qry[q // 2:, 2:5, 3:6] += 4.0  # second half of the queries carry a 3x3 "defect"
    return sup, qry


# --- coreset -------------------------------------------------------------------------------------
def test_coreset_size_keeps_small_banks_whole():
    assert coreset_size(784, 0.01, 10_000) == 784  # 1 shot: everything
    assert coreset_size(200_000, 0.1, 10_000) == 20_000
    assert coreset_size(50_000, 0.1, 10_000) == 10_000
    with pytest.raises(ValueError):
        coreset_size(10, 0.0, 0)


def _reference_greedy(x, n_select, n_starts, seed):
    """The same algorithm written plainly in numpy (no projection: d <= proj_dim)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(x), generator=gen)[:n_starts].numpy()
    d = np.sqrt(((x[:, None] - x[starts][None]) ** 2).sum(-1))
    min_d = d.mean(1) ** 2
    out = []
    for _ in range(n_select):
        j = int(np.argmax(min_d))
        out.append(j)
        min_d = np.minimum(min_d, ((x - x[j]) ** 2).sum(1))
    return np.array(out)


def test_coreset_matches_plain_farthest_point_reference():
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float64)
    got = approximate_greedy_coreset(x.astype(np.float32), 40, proj_dim=128, n_starts=10, seed=3)
    assert np.array_equal(got, _reference_greedy(x, 40, 10, seed=3))


def test_coreset_is_seeded_unique_and_covers_better_than_random():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(20, 200)) * 5
    x = (centers[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, 200))).astype(np.float32)
    a = approximate_greedy_coreset(x, 100, seed=0)
    assert np.array_equal(a, approximate_greedy_coreset(x, 100, seed=0))
    assert len(np.unique(a)) == 100

    def radius(idx):
        return torch.cdist(torch.from_numpy(x), torch.from_numpy(x[idx])).min(1).values.max().item()

    random_idx = rng.choice(3000, 100, replace=False)
    assert radius(a) < radius(random_idx)


def _clustered(seed: int, n: int = 6000, d: int = 32, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)) * 4
    spread = rng.uniform(0.3, 2.0, size=clusters)  # clusters of different widths: greedy favours wide ones
    which = rng.integers(0, clusters, n)
    return (centers[which] + rng.normal(size=(n, d)) * spread[which, None]).astype(np.float32)


def test_partitioned_selection_is_seeded_complete_and_covers_close_to_the_exact_rule(monkeypatch):
    import fewshot_core.methods.components.coreset as coreset

    monkeypatch.setattr(coreset, "PARTITION", 1000)  # six cells
    x = _clustered(4)
    exact = approximate_greedy_coreset(x, 300, seed=0, selection="lazy")
    part = approximate_greedy_coreset(x, 300, seed=0, selection="partitioned")
    assert np.array_equal(part, approximate_greedy_coreset(x, 300, seed=0, selection="partitioned"))
    assert len(np.unique(part)) == 300 and part.min() >= 0 and part.max() < len(x)

    def cover(idx):
        d = torch.cdist(torch.from_numpy(x), torch.from_numpy(x[idx])).min(1).values
        return d.max().item(), d.mean().item()

    rng = np.random.default_rng(5)
    (e_max, e_mean), (p_max, p_mean) = cover(exact), cover(part)
    r_max, _ = cover(rng.choice(len(x), 300, replace=False))
    # the greedy rule bounds the largest distance (random draws leave far points uncovered), not the mean
    assert p_max < 1.25 * e_max < r_max and p_mean < 1.1 * e_mean


def test_partitioned_selection_in_one_cell_is_the_exact_rule():
    from fewshot_core.methods.components.coreset import PARTITION

    x = _clustered(6, n=PARTITION // 2)
    assert np.array_equal(approximate_greedy_coreset(x, 200, seed=1, selection="partitioned"),
                          approximate_greedy_coreset(x, 200, seed=1, selection="plain"))


def test_partitioned_selection_fills_the_quota_when_cells_are_small(monkeypatch):
    import fewshot_core.methods.components.coreset as coreset

    monkeypatch.setattr(coreset, "PARTITION", 64)  # ~90 cells for 6000 points, asking for nearly all of them
    x = _clustered(7)
    got = approximate_greedy_coreset(x, 5900, seed=0, selection="partitioned")
    assert len(got) == 5900 and len(np.unique(got)) == 5900


def test_coreset_selection_is_a_method_parameter_and_checked():
    x = _clustered(8, n=3000)[:, None, None, :].reshape(30, 10, 10, 32)
    a = PatchCore(coreset_ratio=0.1, min_bank=0, coreset_selection="partitioned").fit(x).bank_
    b = PatchCore(coreset_ratio=0.1, min_bank=0, coreset_selection="lazy").fit(x).bank_
    assert a.shape == b.shape == (300, 32)
    with pytest.raises(ValueError, match="coreset selection"):
        PatchCore(coreset_selection="fast")


# --- nearest neighbours --------------------------------------------------------------------------
def test_flat_search_is_exact_and_squared():
    rng = np.random.default_rng(3)
    bank, query = rng.normal(size=(500, 12)).astype(np.float32), rng.normal(size=(50, 12)).astype(np.float32)
    dist, idx = NearestNeighbors().fit(bank).search(query, 3)
    ref = torch.cdist(torch.from_numpy(query).double(), torch.from_numpy(bank).double()) ** 2
    ref_d, ref_i = ref.topk(3, largest=False)
    assert np.array_equal(idx, ref_i.numpy())
    np.testing.assert_allclose(dist, ref_d.numpy(), rtol=1e-4, atol=1e-4)
    assert NearestNeighbors().fit(bank[:2]).search(query, 5)[1].shape == (50, 2)  # k clamped to the bank


def test_torch_fallback_search_matches_faiss():
    from fewshot_core.methods.components.nn_search import TorchFlatIndex

    rng = np.random.default_rng(5)
    bank, query = rng.normal(size=(300, 10)).astype(np.float32), rng.normal(size=(40, 10)).astype(np.float32)
    d_f, i_f = NearestNeighbors(use_gpu=False).fit(bank).search(query, 4)
    d_t, i_t = TorchFlatIndex(bank, "cpu").search(query, 4)
    assert np.array_equal(i_f, i_t)
    np.testing.assert_allclose(d_f, d_t, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_neighbours(kind):
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(30, 16)) * 4
    bank = (centers[rng.integers(0, 30, 6000)] + rng.normal(size=(6000, 16))).astype(np.float32)
    query = (centers[rng.integers(0, 30, 200)] + rng.normal(size=(200, 16))).astype(np.float32)
    exact = NearestNeighbors().fit(bank).search(query, 1)[1]
    nn = NearestNeighbors(kind, nlist=16, nprobe=4).fit(bank)
    assert nn.effective_kind == kind
    assert (nn.search(query, 1)[1] == exact).mean() >= 0.9


# --- PatchCore ---------------------------------------------------------------------------------
def test_patch_map_is_euclidean_distance_to_nearest_bank_patch():
    sup, qry = _support_query()
    model = PatchCore(min_bank=10_000).fit(sup)  # 256 patches: kept whole
    assert len(model.bank_) == 4 * 64
    _, maps = model.score(qry)
    ref = torch.cdist(torch.from_numpy(qry.reshape(-1, 16)).double(),
                      torch.from_numpy(sup.reshape(-1, 16)).double()).min(1).values
    np.testing.assert_allclose(maps.ravel(), ref.numpy(), rtol=1e-4, atol=1e-4)


def _reference_image_score(model, q):
    """Eq. 7 written out per image: weight = 1 - exp(d(m_test,*, m*)) / sum_b exp(d(m_test,*, n_b))."""
    bank = model.bank_.astype(np.float64)
    out = []
    for img in q.reshape(len(q), -1, q.shape[-1]).astype(np.float64):
        d = np.sqrt(((img[:, None] - bank[None]) ** 2).sum(-1))
        star = d.min(1).argmax()
        s_star, m_star = d[star].min(), d[star].argmin()
        nb = np.argsort(((bank - bank[m_star]) ** 2).sum(1), kind="stable")[: model.num_neighbors]
        dn = np.sqrt(((img[star] - bank[nb]) ** 2).sum(1))
        out.append((1 - np.exp(dn[0]) / np.exp(dn).sum()) * s_star)
    return np.array(out)


def test_image_score_is_papers_reweighting():
    sup, qry = _support_query(seed=5)
    model = PatchCore(num_neighbors=5).fit(sup)
    scores, maps = model.score(qry)
    np.testing.assert_allclose(scores, _reference_image_score(model, qry), rtol=1e-4)
    plain, _ = PatchCore(num_neighbors=1).fit(sup).score(qry)
    np.testing.assert_allclose(plain, maps.reshape(len(qry), -1).max(1))


def test_detects_and_locates_synthetic_defects():
    sup, qry = _support_query(seed=6)
    scores, maps = PatchCore(coreset_ratio=0.25, min_bank=0).fit(sup).score(qry)
    assert scores[3:].min() > scores[:3].max()
    for m in maps[3:]:
        r, c = np.unravel_index(m.argmax(), m.shape)
        assert 2 <= r < 5 and 3 <= c < 6


def test_coreset_reduces_the_bank():
    sup, _ = _support_query(seed=7)
    model = PatchCore(coreset_ratio=0.1, min_bank=0).fit(sup)
    assert len(model.bank_) == int(256 * 0.1)


def test_save_load_round_trip(tmp_path):
    sup, qry = _support_query(seed=8)
    model = PatchCore(coreset_ratio=0.5, min_bank=0, num_neighbors=3).fit(sup)
    path = model.save(tmp_path / "sub" / "patchcore")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    for cls in (PatchCore, Method):
        again = cls.load(path)
        assert isinstance(again, PatchCore) and again.get_params() == model.get_params()
        for a, b in zip(model.score(qry), again.score(qry)):
            np.testing.assert_array_equal(a, b)
    (tmp_path / "bad").mkdir()
    with pytest.raises(FsadError, match="bad"):
        PatchCore.load(tmp_path / "bad")


def test_unfitted_and_bad_input():
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore().score(np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[n, h, w, d\]"):
        PatchCore().fit(np.zeros((4, 3), np.float32))


# --- anomaly maps ------------------------------------------------------------------------------
def test_image_maps_upsample_smooth_and_stay_in_range():
    patch = np.random.default_rng(9).random((3, 8, 8)).astype(np.float32)
    maps = to_image_maps(patch, 64)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= patch.min() - 1e-6 and maps.max() <= patch.max() + 1e-6
    raw = to_image_maps(patch, (64, 32), sigma=0)
    ref = torch.nn.functional.interpolate(torch.from_numpy(patch)[:, None], size=(64, 32), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(raw, ref)
    assert maps[0].std() < to_image_maps(patch, 64, sigma=0)[0].std()  # smoothing smooths
    np.testing.assert_allclose(to_image_maps(np.full((5, 5), 2.0), 40), 2.0, rtol=1e-6)


# --- registry ----------------------------------------------------------------------------------
def test_registry():
    assert isinstance(create("patchcore", coreset_ratio=0.5), PatchCore)
    with pytest.raises(FsadError, match="unknown"):
        create("nope")
    with pytest.raises(FsadError, match="bad parameters"):
        create("patchcore", coreset_ratio=2.0)
    with pytest.raises(FsadError, match="bad parameters"):
        create("knn", kay=3)


def _plain_and_lazy(x, n_select, block, seed=0):
    from fewshot_core.methods.components import coreset

    plain = approximate_greedy_coreset(x, n_select, seed=seed, selection="plain")
    old = coreset.LAZY_BLOCK
    coreset.LAZY_BLOCK = block
    try:
        lazy = approximate_greedy_coreset(x, n_select, seed=seed, selection="lazy")
    finally:
        coreset.LAZY_BLOCK = old
    return plain, lazy


def test_lazy_coreset_selects_what_the_plain_loop_selects():
    """Lazily refreshed, pruned blocks pick the same points in the same order (well-separated data)."""
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(30, 16)) * 6
    x = (centers[rng.integers(0, 30, 2000)] + rng.normal(size=(2000, 16))).astype(np.float32)
    plain, lazy = _plain_and_lazy(x, 300, block=64)
    assert np.array_equal(plain, lazy)


def test_lazy_coreset_on_duplicates_selects_the_same_features():
    """Exact duplicates tie on distance; which copy wins may differ by float rounding, the features do not."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(400, 8)).astype(np.float32)
    x = np.concatenate([base, base[::-1]])  # every point twice, the copies in reverse order
    plain, lazy = _plain_and_lazy(x, 120, block=32)
    assert np.array_equal(x[plain], x[lazy])


def test_coreset_selection_option_is_checked():
    with pytest.raises(ValueError, match="selection"):
        approximate_greedy_coreset(np.zeros((10, 4), np.float32), 2, selection="fast")


def test_index_spec_carries_search_options():
    from fewshot_core.methods.components.nn_search import parse_index

    assert parse_index("flat") == ("flat", {})
    assert parse_index("ivf:nprobe=16,nlist=64") == ("ivf", {"nprobe": 16, "nlist": 64})
    assert parse_index("hnsw:ef_search=32") == ("hnsw", {"ef_search": 32})
    for bad in ("ivfx", "ivf:ef_search=3", "hnsw:ef_search=0", "flat:nprobe=2"):
        with pytest.raises(ValueError):
            parse_index(bad)
    x = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
    nn = NearestNeighbors("ivf:nprobe=3,nlist=16", use_gpu=False).fit(x)
    assert nn.effective_kind == "ivf" and nn.index.nprobe == 3 and nn.index.nlist == 16


def test_auto_index_is_exact_for_small_banks_and_ivf_for_large(monkeypatch):
    import fewshot_core.methods.components.nn_search as nn_search

    monkeypatch.setattr(nn_search, "AUTO_IVF_ROWS", 2000)
    rng = np.random.default_rng(9)
    small, large = rng.normal(size=(1500, 8)).astype(np.float32), rng.normal(size=(30000, 8)).astype(np.float32)
    assert NearestNeighbors("auto", use_gpu=False).fit(small).effective_kind == "flat"
    nn = NearestNeighbors("auto", use_gpu=False).fit(large)
    assert nn.effective_kind == "ivf" and nn.index.nprobe == nn_search.AUTO_NPROBE
    assert NearestNeighbors("auto:nprobe=5", use_gpu=False).fit(large).index.nprobe == 5
    exact = NearestNeighbors("flat", use_gpu=False).fit(large).search(large[:300], 1)[1]
    assert (nn.search(large[:300], 1)[1] == exact).mean() == 1.0  # each query is a bank row: found


def test_threshold_copies_search_exactly_only_where_ivf_lists_would_cost_more():
    """A held-out copy scores one image: exact search while its patches are no more than the IVF lists
    its bank would get (4 sqrt(rows)), IVF for larger grids, and never overriding a chosen index."""
    from fewshot_core.methods.knn import KNN
    from fewshot_core.methods.patchcore import PatchCore

    at_256 = PatchCore.threshold_copy_params({"index": "auto"}, (16, 6, 32, 32, 152))
    at_512 = PatchCore.threshold_copy_params({"index": "auto"}, (16, 6, 64, 64, 152))
    assert at_256 == {"index": "flat", "coreset_ratio": 1.0}
    assert at_512 == {"index": "auto", "coreset_ratio": 1.0}
    assert PatchCore.threshold_copy_params({"index": "hnsw"}, (16, 6, 32, 32, 152))["index"] == "hnsw"
    assert KNN.threshold_copy_params({}, (16, 6, 32, 32, 152)) == {"index": "flat"}
    assert KNN.threshold_copy_params({}, None) == {}
