"""Feature store: keyed on image content, verified on load, damaged partitions rebuilt, bad --patch-dim refused."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

import fewshot_core.features.fingerprint as fingerprint_mod
import fewshot_core.features.integrity as integrity_mod
import fewshot_core.features.store as store_mod
from fewshot_core.data.mvtec import load_category
from fewshot_core.data.synth import generate
from fewshot_core.errors import FsadError
from fewshot_core.features import FeatureStore, PartitionDamaged, verify_partition
from fewshot_core.features.store import EmbedCompute, FeatureSpec

torch.set_num_threads(2)
SIZE = 64
LITE0 = "tf_efficientnet_lite0"  # the message below names its 152 dims
OPTS = (FeatureSpec(image_size=SIZE), EmbedCompute(batch_size=4, num_workers=0, progress=False))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_integrity")
    (category,) = generate(root, categories=1, seed=3, size=80, n_train=5, n_test_good=2, n_test_per_defect=1)
    return root, category


@pytest.fixture()
def data(source, tmp_path):
    """A private copy of the synthetic category, free to be rewritten by the test."""
    root, category = source
    shutil.copytree(root / category, tmp_path / "data" / category)
    return tmp_path / "data", category


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """One partition built from the pristine images, to compare rebuilt features with."""
    root, category = source
    return FeatureStore(tmp_path_factory.mktemp("ref_store")).build(load_category(root, category), *OPTS)


def _no_forward(*args, **kwargs):
    raise AssertionError("the backbone was built although the partition is intact")


def test_same_size_rewrite_of_an_image_gives_a_new_partition_and_says_what_changed(data, tmp_path, capsys):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    first = store.build(load_category(root, category), *OPTS)
    target = root / category / "train" / "good" / "000.png"
    other = root / category / "train" / "good" / "001.png"
    assert target.stat().st_size == other.stat().st_size and target.read_bytes() != other.read_bytes()
    shutil.copyfile(other, target)  # new pixels, same byte size, immediately after the build
    capsys.readouterr()

    second = store.build(load_category(root, category), *OPTS)
    assert not second.cache_hit and second.key != first.key
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fsad: {category}: images differ from partition {first.key}")
    assert f"1 changed content ({category}/train/good/000)" in err[0] and second.key in err[0]
    assert second.meta["changed_from"]["previous"] == first.key
    assert second.meta["changed_from"]["changed"] == [f"{category}/train/good/000"]
    ids = [f"{category}/train/good/000", f"{category}/train/good/001"]
    assert not np.array_equal(first.patch(ids[:1]), second.patch(ids[:1]))
    assert np.array_equal(second.patch(ids[:1]), second.patch(ids[1:]))  # same pixels now, same features
    assert store.key_for(load_category(root, category), FeatureSpec(image_size=SIZE)) == second.key


def test_unchanged_images_are_not_hashed_again_and_touched_ones_are(data, tmp_path, monkeypatch):
    root, category = data
    monkeypatch.setattr(fingerprint_mod, "RACY_NS", 0)  # files were just written; skip the racy-clean wait
    store = FeatureStore(tmp_path / "store")
    part = store.build(load_category(root, category), *OPTS)
    hashed = []
    real = fingerprint_mod.sha256_of
    monkeypatch.setattr(fingerprint_mod, "sha256_of", lambda p: hashed.append(os.path.basename(p)) or real(p))
    monkeypatch.setattr(store_mod, "create_extractor", _no_forward)
    assert store.build(load_category(root, category), *OPTS).cache_hit and hashed == []

    touched = root / category / "test" / "good" / "000.png"
    os.utime(touched)  # same bytes, new mtime: hashed again, still the same partition
    again = store.build(load_category(root, category), *OPTS)
    assert again.cache_hit and again.key == part.key and hashed == ["000.png"]


def test_racily_clean_entries_are_hashed_again(data, tmp_path, monkeypatch):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    store.build(load_category(root, category), *OPTS)
    hashed = []
    real = fingerprint_mod.sha256_of
    monkeypatch.setattr(fingerprint_mod, "sha256_of", lambda p: hashed.append(p) or real(p))
    store.key_for(load_category(root, category), FeatureSpec(image_size=SIZE))
    # written moments before they were hashed: the stat cache cannot vouch for them yet
    assert len(hashed) == len(load_category(root, category).records)


def test_zeroed_patch_file_is_detected_and_the_partition_rebuilt(data, reference, tmp_path, capsys, monkeypatch):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    part = store.build(load_category(root, category), *OPTS)
    patch_file = part.path / "patch.npy"
    size = patch_file.stat().st_size
    header = size - np.load(patch_file, mmap_mode="r").nbytes  # the .npy header stays, the data is zeroed
    with open(patch_file, "r+b") as fh:
        fh.seek(header)
        fh.write(b"\0" * (size - header))
    assert patch_file.stat().st_size == size

    problems = verify_partition(part.path)
    assert len(problems) == 1 and problems[0].startswith("patch.npy: checksum mismatch in block 1 of 1")
    with pytest.raises(PartitionDamaged, match=r"feature partition damaged \(patch\.npy: checksum mismatch"):
        store.open(part.key)
    capsys.readouterr()
    rebuilt = store.build(load_category(root, category), *OPTS)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fsad: {part.key}: partition damaged (patch.npy: checksum mismatch in block 1 of 1 "
                   f"(bytes 0-{size})); rebuilding it"]
    assert not rebuilt.cache_hit and rebuilt.key == part.key and verify_partition(rebuilt.path) == []
    assert np.array_equal(rebuilt.patch(), reference.patch())
    assert store.keys() == [part.key] and not [p for p in tmp_path.joinpath("store").iterdir()
                                               if p.name.startswith((".tmp-", ".trash-"))]


def test_damage_that_keeps_size_and_mtime_is_still_caught(data, reference, tmp_path):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    part = store.build(load_category(root, category), *OPTS)
    target = part.path / "global.npy"
    st = target.stat()
    with open(target, "r+b") as fh:
        fh.seek(st.st_size - 2)
        fh.write(b"\x55\x55")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a restore that keeps timestamps would
    assert target.stat().st_mtime_ns == st.st_mtime_ns
    assert verify_partition(part.path, full=False)[0].startswith("global.npy: checksum mismatch")
    assert verify_partition(part.path)[0].startswith("global.npy: checksum mismatch")


def test_sampled_load_check_trusts_the_stamp_and_full_verify_does_not(data, tmp_path, monkeypatch):
    root, category = data
    monkeypatch.setattr(integrity_mod, "BLOCK", 4096)  # many blocks, so a load only samples some
    monkeypatch.setattr(integrity_mod, "RACY_NS", 0)
    store = FeatureStore(tmp_path / "store")
    part = store.build(load_category(root, category), *OPTS)
    blocks = part.meta["files"]["patch.npy"]["blocks"]
    assert len(blocks) > 20
    # bit rot in one block that no stat shows: the stamp is rewritten to match the damaged file
    with open(part.path / "patch.npy", "r+b") as fh:
        fh.seek(4096 * 7 + 5)
        fh.write(b"\xff")
    integrity_mod.write_stamp(part.path)
    reads = []
    real = integrity_mod._check_blocks
    monkeypatch.setattr(integrity_mod, "_check_blocks", lambda p, r, w: reads.append((p.name, list(w))) or real(p, r, w))
    verify_partition(part.path, full=False)
    sampled = dict(reads)["patch.npy"]
    assert len(sampled) == integrity_mod.SAMPLED_BLOCKS  # cheap: two blocks of patch.npy on a load
    reads.clear()
    assert verify_partition(part.path) == [f"patch.npy: checksum mismatch in block 8 of {len(blocks)} "
                                           f"(bytes {4096 * 7}-{4096 * 8})"]
    assert dict(reads)["patch.npy"] == list(range(len(blocks)))


@pytest.mark.parametrize("damage", ["truncate_patch", "missing_index", "broken_meta", "missing_meta",
                                    "old_store_version"])
def test_each_kind_of_damaged_partition_is_rebuilt_with_one_line(data, reference, tmp_path, capsys, damage):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    part = store.build(load_category(root, category), *OPTS)
    if damage == "truncate_patch":
        os.truncate(part.path / "patch.npy", 1000)
        reason = "patch.npy: truncated"
    elif damage == "missing_index":
        (part.path / "index.parquet").unlink()
        reason = "index.parquet: missing"
    elif damage == "broken_meta":
        (part.path / "meta.json").write_text('{"key": "x", ')
        reason = "meta.json unreadable"
    elif damage == "missing_meta":
        (part.path / "meta.json").unlink()
        reason = "meta.json missing"
    else:
        meta = json.loads((part.path / "meta.json").read_text())
        (part.path / "meta.json").write_text(json.dumps({**meta, "store_version": 1}))
        reason = "store version 1"
    with pytest.raises(FsadError, match=reason):
        store.open(part.key)
    capsys.readouterr()
    rebuilt = store.build(load_category(root, category), *OPTS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fsad: {part.key}: partition damaged ({reason}")
    assert err[0].endswith("rebuilding it")
    assert not rebuilt.cache_hit and verify_partition(rebuilt.path) == []
    assert np.array_equal(rebuilt.patch(), reference.patch())
    assert np.array_equal(rebuilt.global_(), reference.global_())


def test_store_verify_reports_every_partition(data, tmp_path):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    a = store.build(load_category(root, category), *OPTS)
    b = store.build(load_category(root, category), FeatureSpec(image_size=72), OPTS[1])
    os.truncate(b.path / "global.npy", 64)
    assert store.verify() == {a.key: [], b.key: [f"global.npy: truncated (64 bytes, "
                                                  f"{b.meta['files']['global.npy']['size']} recorded)"]}


def test_patch_dim_larger_than_the_features_is_refused(data, tmp_path):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    with pytest.raises(FsadError) as exc:
        store.build(load_category(root, category), FeatureSpec(LITE0, SIZE, patch_dim=153), OPTS[1])
    assert str(exc.value) == ("--patch-dim 153: larger than the 152 dims of tf_efficientnet_lite0 stages 2,3 "
                              "(it would only repeat values); use at most 152 or omit it")
    assert not (tmp_path / "store").exists()
    # the full width is allowed
    part = store.build(load_category(root, category), FeatureSpec(LITE0, SIZE, patch_dim=152), OPTS[1])
    assert part.patch_dim == 152


def test_two_threads_building_one_partition_build_it_once(data, tmp_path, monkeypatch):
    root, category = data
    store = FeatureStore(tmp_path / "store")
    builds = []
    real = store_mod.create_extractor
    monkeypatch.setattr(store_mod, "create_extractor", lambda *a, **k: builds.append(1) or real(*a, **k))
    results = [None, None]

    def build(i):
        results[i] = FeatureStore(tmp_path / "store").build(load_category(root, category), *OPTS)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sorted(p.cache_hit for p in results) == [False, True]
    assert results[0].key == results[1].key and store.keys() == [results[0].key]
    assert np.array_equal(results[0].patch(), results[1].patch())
