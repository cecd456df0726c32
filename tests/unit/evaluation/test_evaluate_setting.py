"""``evaluate_setting``: one setting's episode, row and artifacts from one library call; support banks give
the very numbers the feature store gives, and a stale bank is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.oneclass import run_oneclass_episode
from fewshot_core.evaluation.run import evaluate_setting
from fewshot_core.evaluation.supervised import run_supervised_episode
from fewshot_core.evaluation.support import build_support_bank, sample_episode
from fewshot_core.features.store import FeatureStore
from fewshot_core.figures.gallery import GALLERY_ARTIFACT, pick_examples
from fewshot_core.reports.gallery import report_gallery
from fewshot_core.settings import Setting
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.evaluation.support import BankedPartition
from fewshot_core.features.store import EmbedCompute, FeatureSpec

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def synth(synth_root, tmp_path_factory):
    dataset = load_dataset(synth_root, list_categories(synth_root)[0])
    partition = FeatureStore(tmp_path_factory.mktemp("store")).build(dataset, FeatureSpec(image_size=64),
                                                                     EmbedCompute(num_workers=0, progress=False))
    return dataset, partition


def _same(a: dict, b: dict, keys):
    for k in keys:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k


@pytest.mark.parametrize("method", ["patchcore", "knn"])
def test_oneclass_setting_matches_the_protocol_with_and_without_a_bank(synth, method):
    dataset, partition = synth
    setting = Setting.parse("oc-k2-s1")
    direct = run_oneclass_episode(dataset, partition, sample_episode(dataset, setting), method,
                                  options=EpisodeOptions(mask_size=64)).row
    plain = evaluate_setting(dataset, partition, method, setting)
    banked = evaluate_setting(dataset, BankedPartition(partition, build_support_bank(dataset, partition, setting)),
                              method, setting)
    metrics = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
    _same(plain.row, direct, metrics)
    _same(banked.row, direct, metrics)
    assert banked.metrics.keys() >= set(metrics) and banked.overlap == 0
    for result in (plain, banked):
        art = result.artifacts
        assert art["plots/roc_curve.png"].startswith(b"\x89PNG") and art[GALLERY_ARTIFACT].startswith(b"\x89PNG")
        assert "model/fsad_model.json" in art
        episode = json.loads(art["episode.json"])
        assert episode["support_ids"] == list(result.episode.support_ids)


def test_supervised_setting_matches_the_protocol_with_a_bank(synth):
    dataset, partition = synth
    setting = Setting.parse("sup-g2b1-multi-s0")
    direct = run_supervised_episode(dataset, partition, sample_episode(dataset, setting), "protonet").row
    bank = build_support_bank(dataset, partition, setting)
    banked = evaluate_setting(dataset, BankedPartition(partition, bank), "protonet", setting)
    _same(banked.row, direct, ("balanced_accuracy", "accuracy", "macro_f1"))
    assert "plots/confusion_matrix.png" in banked.artifacts
    # prototypes: the mean support embedding of each class present in the support
    labels = bank["support_labels"]
    first = bank["prototype_labels"][0]
    assert np.allclose(bank["prototypes"][0], bank["support_embeddings"][labels == first].mean(0))


def test_a_bank_from_other_features_or_another_support_is_refused(synth):
    dataset, partition = synth
    bank = build_support_bank(dataset, partition, Setting.parse("oc-k2-s0"))
    with pytest.raises(FsadError, match="support images differ"):
        evaluate_setting(dataset, BankedPartition(partition, bank), "knn", Setting.parse("oc-k2-s1"))
    with pytest.raises(FsadError, match="re-materialise memory_banks"):
        evaluate_setting(dataset, BankedPartition(partition, {**bank, "feature_key": np.array("other")}), "knn",
                         Setting.parse("oc-k2-s0"))


def test_gallery_picks_hits_the_worst_false_alarm_and_the_worst_miss():
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7])
    assert pick_examples(labels, scores) == [1, 4, 0, 2]


def test_report_gallery_reads_the_strip_from_the_tracked_run():
    import pandas as pd

    rows = pd.DataFrame({"method": ["knn", "knn", "protonet"], "category": ["c", "c", "c"], "shots": [1, 2, 1],
                         "seed": [0, 0, 0], "setting_key": ["oc-k1-s0", "oc-k2-s0", "sup-g1b1-bin-s0"],
                         "mlflow_run_id": ["r1", "r2", "r3"], "gallery_artifact": [GALLERY_ARTIFACT] * 2 + [None]})
    fetched = []
    items = report_gallery(rows, lambda run, path: fetched.append((run, path)) or b"png")
    assert fetched == [("r2", GALLERY_ARTIFACT)] and [i["mlflow_run_id"] for i in items] == ["r2"]


@pytest.mark.parametrize("key", ["td-k0-s1", "td-k2-s0"])
def test_transductive_setting_runs_like_the_protocol_with_and_without_a_bank(synth, key):
    from fewshot_core.evaluation.transductive import evaluate_transductive

    dataset, partition = synth
    setting = Setting.parse(key)
    assert setting.protocol == "transductive" and setting.key == key and setting.name == key.rsplit("-s", 1)[0]
    (direct,) = evaluate_transductive(dataset, partition, "musc", setting.k_good, [setting.seed])
    plain = evaluate_setting(dataset, partition, "musc", setting)
    banked = evaluate_setting(dataset, BankedPartition(partition, build_support_bank(dataset, partition, setting)),
                              "musc", setting)
    metrics = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
    for result in (plain, banked):
        _same(result.row, direct, metrics)
        assert result.row["protocol"] == "transductive" and result.row["shots"] == setting.k_good
        assert result.metrics.keys() >= set(metrics) and result.overlap == 0
        assert result.artifacts["plots/roc_curve.png"].startswith(b"\x89PNG")
        assert json.loads(result.artifacts["episode.json"])["support_ids"] == list(result.episode.support_ids)
    # the masks and maps are compared at the partition's working shape when no mask size is given
    assert direct["input_shape"] == "x".join(map(str, partition.input_shape))
