"""Augmented views kept in the partition folder: reused across processes, verified, never required."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.evaluation import augment as augment_mod
from fewshot_core.evaluation.augment import embed_augmented
from fewshot_core.features.store import EmbedCompute, FeatureSpec, FeatureStore, verify_partition
from fewshot_core.features.view_cache import FOLDER, ViewCache

TRANSFORMS = ["hflip", "rot90"]


@pytest.fixture()
def part(synth_root, tmp_path):
    dataset = load_dataset(synth_root, list_categories(synth_root)[0])
    partition = FeatureStore(tmp_path / "store").build(dataset, FeatureSpec(image_size=64),
                                                       EmbedCompute(num_workers=0, progress=False))
    return dataset, partition, [r.image_id for r in dataset.train_good()[:2]]


def _no_backbone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was run although every view was stored")
    monkeypatch.setattr(augment_mod, "_embed_views", refuse)


def test_a_later_process_reads_the_stored_views_instead_of_embedding(part, monkeypatch):
    dataset, partition, ids = part
    first = embed_augmented(dataset, partition, ids, TRANSFORMS)  # a fresh cache: a new process
    files = sorted((partition.path / FOLDER).iterdir())
    assert len(files) == len(ids) * len(TRANSFORMS)
    _no_backbone(monkeypatch)
    again = embed_augmented(dataset, partition, ids, TRANSFORMS)
    np.testing.assert_array_equal(again, first)  # bit-identical: the same float16 rounding either way
    assert verify_partition(partition.path) == []  # the store's own checksums are untouched


def test_a_damaged_view_is_dropped_and_embedded_again(part, capsys):
    dataset, partition, ids = part
    first = embed_augmented(dataset, partition, ids, TRANSFORMS)
    victim = sorted((partition.path / FOLDER).iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = embed_augmented(dataset, partition, ids, TRANSFORMS)
    # embedded alone, not in the first call's batch: equal up to the backbone's batch-dependent rounding
    np.testing.assert_allclose(again, first, rtol=1e-2, atol=1e-2)
    assert "damaged augmented view" in capsys.readouterr().err
    assert not victim.exists() and len(list((partition.path / FOLDER).iterdir())) == len(ids) * len(TRANSFORMS)


def test_a_view_of_the_wrong_shape_is_not_served(part):
    _, partition, _ = part
    views = ViewCache(partition)
    views.put(0, "hflip", np.zeros((3, 3, partition.patch_dim), np.float16))  # another partition's grid
    assert ViewCache(partition).get(0, "hflip") is None


def test_an_unwritable_folder_costs_only_the_re_embedding(part, monkeypatch, capsys):
    dataset, partition, ids = part

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("fewshot_core.features.view_cache.atomic_write_bytes", read_only)
    views = embed_augmented(dataset, partition, ids, TRANSFORMS)
    assert views.shape == (len(ids) * len(TRANSFORMS), *partition.grid, partition.patch_dim)
    assert capsys.readouterr().err.count("cannot keep augmented views") == 1
    assert not (partition.path / FOLDER).exists()


def test_persist_false_writes_nothing(part):
    dataset, partition, ids = part
    embed_augmented(dataset, partition, ids, TRANSFORMS, persist=False)
    assert not (partition.path / FOLDER).exists()
