"""Feature store: features computed once, keyed on everything that changes them, never half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import fewshot_core.features.store as store_mod
from fewshot_core.backbones import create_extractor
from fewshot_core.backbones.preprocess import Normalize, resize_image, to_uint8_tensor
from fewshot_core.data.imageio import load_rgb
from fewshot_core.data.mvtec import load_category
from fewshot_core.data.synth import generate
from fewshot_core.errors import FsadError
from fewshot_core.features import FeatureStore, embed_batch
from fewshot_core.features.store import EmbedCompute, FeatureSpec

torch.set_num_threads(2)
SIZE = 64
LITE0 = "tf_efficientnet_lite0"  # its 152 dims and 1280 pooled are spelled out below
# The store's own bookkeeping (image hash cache, lock files) is not partition data.
BOOKKEEPING = {".file-hashes.json", ".locks"}


def _leftovers(root):
    """Everything under the store root but its bookkeeping: partitions, temp and trash folders."""
    return sorted(p.name for p in root.iterdir() if p.name not in BOOKKEEPING)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_store")
    (category,) = generate(root, categories=1, seed=0, size=80, n_train=5, n_test_good=2, n_test_per_defect=1)
    return load_category(root, category)


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    store = FeatureStore(tmp_path_factory.mktemp("store"))
    part = store.build(dataset, FeatureSpec(LITE0, SIZE),
                       EmbedCompute(batch_size=4, num_workers=2, progress=False))
    return store, part


def test_build_writes_a_complete_partition_matching_direct_extraction(dataset, built):
    store, part = built
    assert not part.cache_hit and store.keys() == [part.key]
    assert {p.name for p in part.path.iterdir()} == {"patch.npy", "global.npy", "index.parquet", "meta.json",
                                                     ".verified.json"}
    n = len(dataset.records)
    raw = np.load(part.path / "patch.npy", mmap_mode="r")
    assert raw.dtype == np.float16 and raw.shape == (n, 8, 8, 152)
    assert np.load(part.path / "global.npy", mmap_mode="r").shape == (n, 1280)
    meta = json.loads((part.path / "meta.json").read_text())
    assert meta["weights"]["source"] == "bundled" and len(meta["weights"]["sha256"]) == 64
    assert meta["is_random"] is False and meta["grid"] == [8, 8] and meta["stride"] == 8
    assert meta["layers"] == [2, 3] and meta["patch_dim"] == 152 and meta["image_size"] == SIZE
    assert meta["preprocessing"]["center_crop"] is None and meta["preprocessing"]["mean"] == [0.5] * 3
    assert meta["versions"]["torch"] and meta["versions"]["timm"]
    assert part.image_ids == [r.image_id for r in dataset.records]

    # rows come back in the caller's order and equal an in-process forward pass on the same files
    ids = [dataset.records[3].image_id, dataset.records[0].image_id]
    ext = create_extractor(LITE0)
    batch = torch.stack([to_uint8_tensor(resize_image(load_rgb(dataset.by_id(i).path), SIZE)) for i in ids])
    patch, pooled = embed_batch(ext, batch, Normalize((0.5,) * 3, (0.5,) * 3))
    got = part.patch(ids)
    assert got.dtype == np.float32 and got.shape == (2, 8, 8, 152)
    assert np.allclose(got, patch.numpy(), atol=2e-2, rtol=1e-2)
    assert np.allclose(part.global_(ids), pooled.numpy(), atol=2e-2, rtol=1e-2)
    assert not np.allclose(got[0], got[1])


def test_complete_partition_is_reused_without_a_forward_pass(dataset, built, monkeypatch):
    store, part = built

    def no_forward(*args, **kwargs):
        raise AssertionError("the backbone was built although the partition exists")

    monkeypatch.setattr(store_mod, "create_extractor", no_forward)
    again = store.build(dataset, FeatureSpec(LITE0, SIZE),
                        EmbedCompute(batch_size=4, num_workers=2, progress=False))
    assert again.cache_hit and again.key == part.key and again.path == part.path
    assert np.array_equal(again.patch(again.image_ids[:2]), part.patch(part.image_ids[:2]))
    assert store.open(part.key).meta == part.meta


def test_key_changes_with_everything_that_changes_the_features(dataset, built):
    store, part = built
    base = FeatureSpec(backbone=LITE0, image_size=SIZE, layers=None)
    assert store.key_for(dataset, base) == part.key
    assert store.key_for(dataset, replace(base, layers=(2, 3))) == part.key  # default spelled out
    others = {
        store.key_for(dataset, replace(base, image_size=96)),
        store.key_for(dataset, replace(base, layers=(1, 2))),
        store.key_for(dataset, replace(base, backbone="tf_efficientnet_lite1")),
        store.key_for(dataset, replace(base, weights="random")),
        store.key_for(dataset, replace(base, patch_dim=64)),
        store.key_for(replace(dataset, records=dataset.records[1:]), base),
    }
    assert len(others) == 6 and part.key not in others


def test_interrupted_build_leaves_nothing_visible_and_rebuilds(dataset, tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    real = store_mod.iter_embeddings

    def dies_after_one_batch(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt  # like Ctrl-C mid-build
            yield item

    monkeypatch.setattr(store_mod, "iter_embeddings", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        store.build(dataset, FeatureSpec(image_size=SIZE), EmbedCompute(batch_size=3, num_workers=0, progress=False))
    assert store.keys() == [] and _leftovers(tmp_path) == []

    monkeypatch.setattr(store_mod, "iter_embeddings", real)
    part = store.build(dataset, FeatureSpec(image_size=SIZE),
                       EmbedCompute(batch_size=3, num_workers=0, progress=False))
    assert not part.cache_hit and store.keys() == [part.key] and len(part) == len(dataset.records)
    assert np.isfinite(part.patch()).all()


def test_stale_temp_folder_of_a_dead_build_is_removed(dataset, tmp_path):
    store = FeatureStore(tmp_path)
    key = store.key_for(dataset, FeatureSpec(backbone="resnet18", image_size=SIZE, weights="random"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{key}-{int(dead.stdout)}-deadbeef"
    stale.mkdir()
    (stale / "patch.npy").write_bytes(b"half written")
    live = tmp_path / f".tmp-{key}-{os.getpid()}-cafecafe"  # a build still running here: keep
    live.mkdir()
    part = store.build(dataset, FeatureSpec(backbone="resnet18", image_size=SIZE, weights="random"),
                       EmbedCompute(num_workers=0, progress=False))
    assert part.is_random and part.meta["weights"]["source"] == "random"
    assert part.meta["layer_info"][0]["module"] == "layer2" and part.grid == (8, 8)
    assert not stale.exists() and live.exists()


def test_unknown_ids_and_unreadable_images_are_user_errors(dataset, built, tmp_path):
    _, part = built
    with pytest.raises(FsadError, match=r"index\.parquet: image id 'nope' not in this partition"):
        part.patch(["nope"])
    broken_file = tmp_path / "000.png"
    broken_file.write_bytes(b"\x89PNG not really")
    broken = replace(dataset, records=[replace(dataset.records[0], path=broken_file)])
    store = FeatureStore(tmp_path / "store")
    with pytest.raises(FsadError) as exc:  # raised inside a worker process, reported as one line
        store.build(broken, FeatureSpec(image_size=SIZE), EmbedCompute(num_workers=1, progress=False))
    assert str(exc.value).startswith(f"{broken_file}: ") and "\n" not in str(exc.value)
    assert store.keys() == [] and _leftovers(tmp_path / "store") == []


def test_build_takes_what_the_features_are_and_how_to_compute_them_apart():
    """``FeatureSpec`` is the key's part of a build, ``EmbedCompute`` never is (a build on other workers and
    batch sizes opens the same partition)."""
    import inspect

    from fewshot_core.features.store import _Plan

    assert list(inspect.signature(FeatureStore.build).parameters) == ["self", "dataset", "spec", "compute"]
    assert list(inspect.signature(FeatureStore.key_for).parameters) == ["self", "dataset", "spec"]
    assert len(inspect.signature(FeatureStore._write).parameters) <= 4 and "key" in _Plan.__dataclass_fields__
