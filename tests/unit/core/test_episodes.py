"""Episode sampler: property-based checks (hypothesis) plus pinned episodes and the error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot_core.data.mvtec import Dataset, load_category
from fewshot_core.data.records import ImageRecord, make_image_id
from fewshot_core.episodes import sample_oneclass, sample_supervised
from fewshot_core.errors import FsadError

FAST = settings(max_examples=60, deadline=None)


def make_dataset(n_train: int, n_test_good: int, defects: dict[str, int], category: str = "part") -> Dataset:
    """An in-memory Dataset with the given counts (paths are never opened by the sampler)."""
    recs = []

    def add(split, defect, n):
        for i in range(n):
            stem = f"{i:03d}"
            mask = None if defect == "good" else Path(f"/x/{category}/ground_truth/{defect}/{stem}_mask.png")
            recs.append(ImageRecord(make_image_id(category, split, defect, stem), category, split, defect,
                                    int(defect != "good"), Path(f"/x/{category}/{split}/{defect}/{stem}.png"), mask))

    add("train", "good", n_train)
    add("test", "good", n_test_good)
    for d, n in defects.items():
        add("test", d, n)
    return Dataset(root=Path("/x"), category=category, records=recs, has_masks=True)


DEFECT_NAMES = st.sampled_from(["crack", "scratch", "hole", "contamination", "broken_large", "color"])


@st.composite
def datasets(draw):
    defects = draw(st.dictionaries(DEFECT_NAMES, st.integers(1, 12), min_size=1, max_size=4))
    return make_dataset(draw(st.integers(1, 30)), draw(st.integers(1, 25)), defects)


SEEDS = st.integers(0, 2**32)


@FAST
@given(data=st.data(), ds=datasets(), seed=SEEDS)
def test_oneclass_counts_disjoint_and_deterministic(data, ds, seed):
    n = len(ds.train_good())
    shots = data.draw(st.one_of(st.none(), st.integers(1, n)))
    ep = sample_oneclass(ds, shots, seed)
    assert len(ep.support_ids) == (n if shots is None else shots) == len(set(ep.support_ids))
    assert set(ep.support_ids) <= {r.image_id for r in ds.train_good()}
    assert set(ep.query_ids) == {r.image_id for r in ds.test()}
    assert not set(ep.support_ids) & set(ep.query_ids)
    assert sample_oneclass(ds, shots, seed) == ep  # same request, same episode (id included)
    assert ep.episode_id.startswith(f"oneclass-part-{'all' if shots is None else f'k{shots}'}-s{seed}-")


@FAST
@given(data=st.data(), ds=datasets(), seed=SEEDS, mode=st.sampled_from(["binary", "multiclass"]),
       pool=st.sampled_from(["test", "all"]))
def test_supervised_counts_disjoint_and_deterministic(data, ds, seed, mode, pool):
    defects = ds.defect_types()
    pool_recs = ds.test() + (ds.train_good() if pool == "all" else [])
    n_good = sum(r.label == 0 for r in pool_recs)
    k_good = data.draw(st.integers(1, n_good))
    k_bad = data.draw(st.integers(1, min(sum(r.defect_type == d for r in pool_recs) for d in defects)))
    if k_good + k_bad * len(defects) == len(pool_recs):  # would leave no query: a clear error instead
        with pytest.raises(FsadError, match="no query"):
            sample_supervised(ds, k_good, k_bad, seed, mode, pool)
        return
    ep = sample_supervised(ds, k_good, k_bad, seed, mode, pool)
    by_id = {r.image_id: r for r in pool_recs}

    # exact counts per class, support within the pool, query = the rest of the pool
    sup = [by_id[i] for i in ep.support_ids]
    assert sum(r.label == 0 for r in sup) == k_good
    for d in defects:
        assert sum(r.defect_type == d for r in sup) == k_bad
    assert len(set(ep.support_ids)) == len(ep.support_ids) == k_good + k_bad * len(defects)
    assert not set(ep.support_ids) & set(ep.query_ids)
    assert set(ep.support_ids) | set(ep.query_ids) == set(by_id)

    # labels follow the mode
    expected_classes = ("good", "anomalous") if mode == "binary" else ("good", *defects)
    assert ep.classes == expected_classes
    for ids, labels in ((ep.support_ids, ep.support_labels), (ep.query_ids, ep.query_labels)):
        for i, y in zip(ids, labels, strict=True):
            r = by_id[i]
            assert ep.classes[y] == ("good" if r.label == 0 else ("anomalous" if mode == "binary" else r.defect_type))
    assert sample_supervised(ds, k_good, k_bad, seed, mode, pool) == ep


@FAST
@given(ds=datasets(), seed=SEEDS)
def test_supports_are_nested_across_shots_and_shared_across_label_modes(ds, seed):
    n = len(ds.train_good())
    small, big = sample_oneclass(ds, max(1, n // 2), seed), sample_oneclass(ds, n, seed)
    assert set(small.support_ids) <= set(big.support_ids)
    k_good = min(2, sum(r.label == 0 for r in ds.test()))
    k_bad = 1
    try:
        b = sample_supervised(ds, k_good, k_bad, seed, "binary")
    except FsadError:  # tiny pool with no query left
        return
    m = sample_supervised(ds, k_good, k_bad, seed, "multiclass")
    assert b.support_ids == m.support_ids and b.episode_id != m.episode_id


def test_different_seeds_give_different_episodes():
    ds = make_dataset(50, 20, {"crack": 15, "hole": 15})
    ids = {sample_oneclass(ds, 5, s).support_ids for s in range(20)}
    assert len(ids) == 20
    sups = {sample_supervised(ds, 5, 2, s).support_ids for s in range(20)}
    assert len(sups) == 20


def test_pinned_episodes_are_the_same_on_every_machine():
    """Golden values: the sampler's output may never drift silently (SHA-256 seeding, sorted ids)."""
    ds = make_dataset(10, 6, {"crack": 5, "hole": 4})
    ep = sample_oneclass(ds, 3, 0)
    assert ep.support_ids == PINNED_ONECLASS
    assert ep.episode_id == PINNED_ONECLASS_ID
    sup = sample_supervised(ds, 2, 1, 0, "multiclass")
    assert sup.support_ids == PINNED_SUP
    assert sup.support_labels == PINNED_SUP_LABELS
    assert sup.episode_id == PINNED_SUP_ID


PINNED_ONECLASS = ("part/train/good/003", "part/train/good/004", "part/train/good/008")
PINNED_ONECLASS_ID = "oneclass-part-k3-s0-3332a2c3"
PINNED_SUP = ("part/test/crack/003", "part/test/good/001", "part/test/good/002", "part/test/hole/003")
PINNED_SUP_LABELS = (1, 0, 0, 2)
PINNED_SUP_ID = "sup-part-g2b1-multiclass-test-s0-fecee4f4"


def test_errors_say_how_many_exist_and_what_to_do():
    ds = make_dataset(4, 3, {"crack": 2})
    with pytest.raises(FsadError, match=r"/x/part: shots=5 asks for more shots than exist \(4 train/good"):
        sample_oneclass(ds, 5, 0)
    for bad in (0, -1):
        with pytest.raises(FsadError, match="fewer than one shot"):
            sample_oneclass(ds, bad, 0)
    with pytest.raises(FsadError, match="not an integer"):
        sample_oneclass(ds, 2.5, 0)
    with pytest.raises(FsadError, match=r"k_good=4 .*\(3 good images in the test pool\).*pool='all'.*4 train/good"):
        sample_supervised(ds, 4, 1, 0)
    assert len(sample_supervised(ds, 4, 1, 0, pool="all").support_ids) == 5  # the hint works
    with pytest.raises(FsadError, match=r"k_bad=3 .*\(2 'crack' images\)"):
        sample_supervised(ds, 1, 3, 0)
    with pytest.raises(FsadError, match="k_bad=0 asks for fewer than one shot"):
        sample_supervised(ds, 1, 0, 0)
    with pytest.raises(FsadError, match="unknown label_mode 'multi'; use one of binary, multiclass"):
        sample_supervised(ds, 1, 1, 0, label_mode="multi")
    with pytest.raises(FsadError, match="unknown pool"):
        sample_supervised(ds, 1, 1, 0, pool="train")
    with pytest.raises(FsadError, match="seed=-1 is invalid"):
        sample_oneclass(ds, 1, -1)
    with pytest.raises(FsadError, match="no defect images"):
        sample_supervised(make_dataset(3, 3, {}), 1, 1, 0)


def test_real_loader_on_synthetic_data(synth_root):
    ds = load_category(synth_root, "synth_disk")
    ep = sample_oneclass(ds, 4, 0)
    assert len(ep.support_ids) == 4 and len(ep.query_ids) == len(ds.test())
    sup = sample_supervised(ds, 3, 1, 0, "multiclass")
    assert sup.classes == ("good", *ds.defect_types()) and len(sup.support_ids) == 3 + len(ds.defect_types())


def test_thesis_settings_on_real_bottle(mvtec_root):
    """bottle: 20 test goods, so the 30-good imbalance needs pool='all'; 5 bad per defect type."""
    ds = load_category(mvtec_root, "bottle")
    for k_good in (5, 10, 15):
        ep = sample_supervised(ds, k_good, 5, 0)
        assert len(ep.support_ids) == k_good + 15 and len(ep.query_ids) == 83 - k_good - 15
    with pytest.raises(FsadError, match="pool='all'"):
        sample_supervised(ds, 30, 5, 0)
    ep = sample_supervised(ds, 30, 5, 0, pool="all")
    assert len(ep.query_ids) == 83 + 209 - 45
