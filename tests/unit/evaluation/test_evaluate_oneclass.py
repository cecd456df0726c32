"""The one-class runner and ``fsad evaluate`` on the synthetic dataset; the real-bottle bar on shared data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fewshot_core.cli import main
from fewshot_core.data import list_categories, load_dataset
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.oneclass import evaluate_oneclass, parse_shots, run_oneclass_episode
from fewshot_core.methods import registry
from fewshot_core.methods.base import Detector
from fewshot_core.episode_cache import EpisodeCache
from fewshot_core.episodes import sample_oneclass
from fewshot_core.features.store import FeatureStore
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext
from fewshot_core.features.store import EmbedCompute, FeatureSpec

torch.set_num_threads(2)
IMAGE_SIZE = 64
METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro")


@pytest.fixture(scope="module")
def synth(synth_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    dataset = load_dataset(synth_root, list_categories(synth_root)[0])
    partition = FeatureStore(store).build(dataset, FeatureSpec(image_size=IMAGE_SIZE),
                                          EmbedCompute(num_workers=0, progress=False))
    return dataset, partition, store


def test_rows_per_seed_with_every_metric(synth):
    dataset, partition, _ = synth
    rows = evaluate_oneclass(dataset, partition, "patchcore", 2, [0, 1], options=EpisodeOptions(mask_size=48))
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert r["protocol"] == "oneclass" and r["method"] == "patchcore" and r["shots"] == 2
        assert r["n_query"] == len(dataset.test()) and r["bank_size"] == 2 * 6 * np.prod(partition.grid)  # augmented (auto)
        assert json.loads(r["params"])["seed"] == r["seed"]  # the coreset follows the episode seed
        for m in METRICS:
            assert 0.0 <= r[m] <= 1.0, m
        assert r["fit_s"] >= 0 and r["score_s"] > 0
    assert rows[0]["episode_id"] != rows[1]["episode_id"]
    # the synthetic defects are visible to a pretrained backbone even with two shots
    assert np.mean([r["image_auroc"] for r in rows]) > 0.7
    again = evaluate_oneclass(dataset, partition, "patchcore", 2, [0, 1], options=EpisodeOptions(mask_size=48))
    for a, b in zip(rows, again):
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}  # deterministic


def test_full_shot_and_other_methods(synth):
    dataset, partition, _ = synth
    n_train = len(dataset.train_good())
    (row,) = evaluate_oneclass(dataset, partition, "ldknn", "full", [0], {"k": 3},
                               options=EpisodeOptions(mask_size=32))
    assert row["shots"] == n_train and row["full_shot"] == "yes" and json.loads(row["params"])["k"] == 3
    (row,) = evaluate_oneclass(dataset, partition, "knn", 1, 0, options=EpisodeOptions(mask_size=32))
    assert row["full_shot"] == "no" and set(METRICS) <= set(row)


def test_image_level_dataset_has_no_pixel_metrics(synth):
    dataset, partition, _ = synth
    records = [dataclasses.replace(r, mask_path=None) for r in dataset.records]
    image_level = dataclasses.replace(dataset, records=records, has_masks=False)
    (row,) = evaluate_oneclass(image_level, partition, "patchcore", 1, [0])
    assert "image_auroc" in row
    assert not {"pixel_auroc", "pixel_f1_max", "aupro"} & set(row)  # absent, not NaN


def test_augmentation_adds_transformed_supports(synth):
    dataset, partition, _ = synth
    episode = sample_oneclass(dataset, 1, 0)
    cache = EpisodeCache()
    res = run_oneclass_episode(dataset, partition, episode, "patchcore",
                               options=EpisodeOptions(mask_size=32, augment="none"))
    plain = res.row
    assert res.patch_maps.shape == (len(episode.query_ids), *partition.grid)
    assert len(res.model.bank_) == plain["bank_size"] and len(res.image_scores) == plain["n_query"]
    feats = run_oneclass_episode(dataset, partition, episode, "patchcore",
                                 options=EpisodeOptions(mask_size=32, augment="features")).row
    imgs = run_oneclass_episode(dataset, partition, episode, "patchcore",
                                options=EpisodeOptions(mask_size=32, augment="images"),
                                context=EvalContext(cache=cache)).row
    cells = int(np.prod(partition.grid))
    assert plain["bank_size"] == cells and feats["bank_size"] == imgs["bank_size"] == 6 * cells
    assert imgs["augment"] == "images"
    from fewshot_core.evaluation.augment import embed_augmented

    rotated = embed_augmented(dataset, partition, episode.support_ids, ["rot180"], cache=cache)
    assert rotated.shape == (1, *partition.grid, partition.patch_dim)


def test_auto_augmentation_is_the_methods_default_for_small_supports_only(synth):
    from fewshot_core.evaluation.support_views import AUGMENT_MAX_SHOTS, resolve_augment

    dataset, partition, _ = synth
    cells = int(np.prod(partition.grid))
    row = run_oneclass_episode(dataset, partition, sample_oneclass(dataset, 1, 0), "patchcore",
                               options=EpisodeOptions(mask_size=32)).row
    assert row["augment"] == "images" and row["bank_size"] == 6 * cells  # the stored map + five transforms
    assert resolve_augment("ldknn", "auto", AUGMENT_MAX_SHOTS) == resolve_augment("knn", "auto", 1) == "images"
    assert resolve_augment("patchcore", "auto", AUGMENT_MAX_SHOTS + 1) == "none"  # full-shot banks stay plain
    assert resolve_augment("efficientad", "auto", 1) == "none"  # trains on images: nothing to add to a bank
    assert resolve_augment("patchcore", "none", 1) == "none"
    with pytest.raises(FsadError, match="augment 'rotate'"):
        resolve_augment("patchcore", "rotate", 1)


def test_threshold_copies_are_fitted_with_the_same_augmentation(synth):
    """The decision threshold's held-out copies see augmented banks like the model they stand for, so an
    augmented model's (lower) good scores are not judged against a threshold from plain banks."""
    from fewshot_core.evaluation.threshold import ThresholdConfig

    dataset, partition, _ = synth
    episode = sample_oneclass(dataset, 4, 0)
    cut = {}
    for augment in ("none", "images"):
        row = run_oneclass_episode(dataset, partition, episode, "patchcore",
                                   options=EpisodeOptions(mask_size=32, augment=augment,
                                                          threshold=ThresholdConfig(rule="loo", seed=0))).row
        cut[augment] = row["threshold"]
    assert cut["images"] < cut["none"]


def test_augment_features_are_real_re_embeddings(synth):
    """The 'images' mode embeds the transformed image: close to, but not equal to, the transformed map."""
    from fewshot_core.evaluation.augment import augment_feature_maps, embed_augmented

    dataset, partition, _ = synth
    ids = [dataset.train_good()[0].image_id]
    stored = partition.patch(ids)
    real = embed_augmented(dataset, partition, ids, ["hflip"])
    approx = augment_feature_maps(stored, ["hflip"])[1:]
    assert real.shape == approx.shape
    assert not np.allclose(real, approx, atol=1e-3)  # CNN features are not flip-equivariant
    assert np.corrcoef(real.ravel(), approx.ravel())[0, 1] > 0.8  # but the same image content


class ToyImages(Detector):
    """An image-kind detector: the registry entry's input kind makes the protocol hand it decoded images."""

    name = "toy"
    input_kind = "images"
    map_sigma = 0.0
    seen: list = []

    def __init__(self, image_size: int = 24, seed: int = 0):
        self.image_size = image_size
        self.seed = seed

    def fit(self, X):
        self.seen.append(("fit", tuple(X.shape), float(X.min()), float(X.max())))
        self.mean_ = X.mean(0)
        self.fit_info_ = {"steps": 7, "stopped_by": "steps", "fit_s": 1.5, "device": "cpu",
                          "loaded_from_artifact": False}
        self.fitted_ = True
        return self

    def score(self, X):
        self.seen.append(("score", tuple(X.shape)))
        maps = ((X - self.mean_) ** 2).mean(1).numpy()
        return maps.reshape(len(maps), -1).max(1), maps


def test_image_kind_methods_get_images_at_their_size_and_the_shared_post_processing(synth, monkeypatch):
    dataset, _, _ = synth
    ToyImages.seen = []
    monkeypatch.setitem(registry.REGISTRY, "toy",
                        registry.MethodEntry("toy", "oneclass", "images", f"{__name__}:ToyImages", "toy"))
    ep = sample_oneclass(dataset, 2, 1)
    res = run_oneclass_episode(dataset, None, ep, "toy", {"image_size": 24}, options=EpisodeOptions(mask_size=32))
    row = res.row
    assert ToyImages.seen[0][:2] == ("fit", (2, 3, 24, 24)) and 0 <= ToyImages.seen[0][2] <= ToyImages.seen[0][3] <= 1
    assert all(kind == "score" and shape[1:] == (3, 24, 24) for kind, shape in ToyImages.seen[1:])
    assert row["train_steps"] == 7 and row["train_s"] == 1.5 and row["stopped_by"] == "steps"
    assert row["seed"] == 1 and json.loads(row["params"]) == {"image_size": 24, "seed": 1}
    assert row["partition_key"] is None and not row["loaded_from_artifact"] and 0 <= row["pixel_auroc"] <= 1
    # trained on images: no threshold, no stated bound, and the row says why
    assert np.isnan(row["threshold_fpr_bound"]) and row["threshold_rule"].startswith("none: trained on images")
    # pixel metrics come from the detector's own maps, only rescaled (map_sigma 0) to the mask size
    model = res.model
    assert res.patch_maps.shape[1:] == (24, 24)
    np.testing.assert_allclose(model.anomaly_maps(res.patch_maps[:1], 32)[0],
                               torch.nn.functional.interpolate(torch.from_numpy(res.patch_maps[:1])[:, None],
                                                               size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy())
    rows = evaluate_oneclass(dataset, None, "toy", 1, [0, 1], {"image_size": 24},
                             options=EpisodeOptions(mask_size=32))
    assert [r["seed"] for r in rows] == [0, 1]
    # no mask size: the detector's own input size (its input_size), not a library constant
    (own,) = evaluate_oneclass(dataset, None, registry.get("toy"), 1, [0], {"image_size": 40})
    assert own["input_shape"] == "40x40" and own["mask_size"] == 40 and own["method"] == "toy"
    from fewshot_core.evaluation.run import evaluate_setting
    from fewshot_core.settings import Setting

    monkeypatch.setattr(ToyImages, "get_state", lambda self: {"arrays": {"mean": self.mean_.numpy()}})  # its folder
    result = evaluate_setting(dataset, None, "toy", Setting.parse("oc-k1-s0"), {"image_size": 40})
    assert result.row["input_shape"] == "40x40" and result.artifacts["plots/roc_curve.png"].startswith(b"\x89PNG")
    with pytest.raises(FsadError, match="augment"):
        evaluate_oneclass(dataset, None, "toy", 1, [0], options=EpisodeOptions(augment="images"))


def test_bad_inputs_raise_fsad_errors(synth):
    dataset, partition, _ = synth
    with pytest.raises(FsadError, match="not available under the oneclass protocol"):
        evaluate_oneclass(dataset, partition, "protonet", 1, [0])
    with pytest.raises(FsadError, match="shots"):
        parse_shots("many")
    with pytest.raises(FsadError, match="augment"):
        evaluate_oneclass(dataset, partition, "patchcore", 1, [0], options=EpisodeOptions(augment="mixup"))
    with pytest.raises(FsadError):
        evaluate_oneclass(dataset, partition, "patchcore", 10_000, [0])


def test_cli_json_and_table(synth, synth_root, capsys):
    dataset, _, store = synth
    base = [str(synth_root), "--category", dataset.category, "--store", str(store), "--image-size",
            str(IMAGE_SIZE), "--num-workers", "0", "--mask-size", "32"]
    assert main(["evaluate", *base, "--method", "knn", "--shots", "2", "--seeds", "0", "1", "--json",
                 "--param", "k=2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and json.loads(rows[0]["params"])["k"] == 2 and "aupro" in rows[0]
    assert main(["evaluate", *base, "--method", "ldknn", "--shots", "1", "--seeds", "3", "4"]) == 0
    out = capsys.readouterr().out
    assert "mean±std" in out and "image_auroc" in out and out.count("\n") >= 4


def test_cli_dispatches_the_supervised_protocol(synth, synth_root, capsys):
    dataset, _, store = synth
    base = [str(synth_root), "--category", dataset.category, "--store", str(store), "--image-size",
            str(IMAGE_SIZE), "--num-workers", "0"]
    assert main(["evaluate", *base, "--protocol", "supervised", "--method", "protonet", "--k-good", "2",
                 "--k-bad", "1", "--seeds", "0", "--distance", "cosine", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["k_good"] == 2 and row["k_bad"] == 1 and json.loads(row["params"])["distance"] == "cosine"


def test_cli_errors_are_one_line(synth, synth_root, capsys):
    dataset, _, store = synth
    base = [str(synth_root), "--category", dataset.category, "--store", str(store), "--image-size",
            str(IMAGE_SIZE), "--num-workers", "0"]
    assert main(["evaluate", *base, "--method", "nope", "--shots", "1", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsad: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["evaluate", *base, "--method", "patchcore", "--seeds", "0"]) == 2
    assert "--shots" in capsys.readouterr().err
    assert main(["evaluate", *base, "--protocol", "supervised", "--method", "protonet"]) == 2
    assert "--k-good" in capsys.readouterr().err


# --- real MVTec AD bottle --------------------------------------------------------------------------
@pytest.mark.shared_data
@pytest.mark.slow
def test_patchcore_reaches_the_bar_on_real_bottle(mvtec_root):
    """Issue bars: full-shot image AUROC >= 0.99 and pixel AUROC >= 0.97; 1-shot image AUROC >= 0.95 per
    seed and >= 0.995 over seeds 0-2.

    Uses the project's default feature store (a content-addressed cache: the first run embeds the 292
    images, ~1-4 min on a CPU; later runs reuse it) and a 0.2 % coreset at full shot (428 of 214k
    patches: the greedy coreset loop is memory-bound on a CPU); the benchmark runs the 10 % default.
    """
    dataset = load_dataset(mvtec_root, "bottle")
    # the defaults: Lite2, 256 px, stride 8 + 16 stages
    partition = FeatureStore().build(dataset, compute=EmbedCompute(progress=False))
    (full,) = evaluate_oneclass(dataset, partition, "patchcore", "full", [0], {"coreset_ratio": 0.002, "min_bank": 0})
    assert full["image_auroc"] >= 0.99 and full["pixel_auroc"] >= 0.97, full
    one = evaluate_oneclass(dataset, partition, "patchcore", 1, [0, 1, 2])
    assert min(r["image_auroc"] for r in one) >= 0.95, one
    # issue 23's bar for the defaults (no flags) at one shot
    assert np.mean([r["image_auroc"] for r in one]) >= 0.995, one


def test_patchcore_threshold_from_its_own_bank_fits_no_copy(synth, monkeypatch):
    """The episode's PatchCore scores each held-out support image with its own coreset bank less that
    image's rows: one fit, no copy; the rule says where its held-out scores came from. Without the model
    (the refit fallback), leave-one-out fits one copy per support image, keeping every patch (no coreset
    per copy), every other parameter as the model's."""
    from fewshot_core.evaluation import oneclass
    from fewshot_core.evaluation.threshold import ThresholdConfig

    dataset, partition, _ = synth
    made = []
    real = oneclass.registry.create

    def create(name, runtime=None, **params):
        made.append(params)
        return real(name, runtime=runtime, **params)

    monkeypatch.setattr(oneclass.registry, "create", create)
    episode = sample_oneclass(dataset, 3, 0)
    res = run_oneclass_episode(dataset, partition, episode, "patchcore",
                               {"coreset_ratio": 0.5, "min_bank": 0, "num_neighbors": 3},
                               options=EpisodeOptions(mask_size=32, augment="none",
                                                      threshold=ThresholdConfig(rule="loo")))
    row = res.row
    assert len(made) == 1 and made[0]["coreset_ratio"] == 0.5
    assert row["threshold_rule"].startswith("loo fpr=0.05 n=3 (held out from the model's bank)")
    assert res.threshold.good_scores == pytest.approx(
        [res.model.heldout_scores(partition.patch([i]), [k])[0] for k, i in enumerate(episode.support_ids)])
    # the row states what 3 held-out scores can stand behind, not the 5 % asked
    assert row["threshold_fpr_bound"] == pytest.approx(1 - 0.05 ** (1 / 3))
    assert ("3 held-out scores support at best 63.2% false alarms (95% confidence), not the 5.0% asked"
            in row["threshold_rule"])

    made.clear()
    cut = oneclass.support_threshold("patchcore", res.model.get_params(), partition.patch(list(episode.support_ids)),
                                     None, ThresholdConfig(rule="loo"))
    assert len(made) == 3 and "held out from refits" in cut.rule
    assert all(c["coreset_ratio"] == 1.0 and c["num_neighbors"] == 3 and c["min_bank"] == 0 for c in made)
