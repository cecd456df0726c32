"""Supervised protocol runner: rows and metrics, no query leakage, CAML's category guard, one-class
methods under the protocol, and P>M>F + ProtoNet end to end on generated images through the store."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import torch

from fewshot_core.data.mvtec import Dataset
from fewshot_core.data.records import ImageRecord, make_image_id
from fewshot_core.episode_cache import EpisodeCache
from fewshot_core.episodes import sample_supervised
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.meta_pool import pool_from_partitions
from fewshot_core.evaluation.supervised import evaluate_supervised, run_supervised_episode
from fewshot_core.runtime import Runtime
from fewshot_core.evaluation.options import EvalContext, SupervisedDraw
from fewshot_core.features.store import EmbedCompute, FeatureSpec

DEFECTS = ("crack", "hole", "stain")
torch.set_num_threads(1)


def _dataset(category="part", n_train=10, n_good=12, n_per_defect=8):
    recs = []
    for split, dt, n in [("train", "good", n_train), ("test", "good", n_good)] + [("test", d, n_per_defect) for d in DEFECTS]:
        for i in range(n):
            iid = make_image_id(category, split, dt, f"{i:03d}")
            recs.append(ImageRecord(iid, category, split, dt, 0 if dt == "good" else 1, f"/nonexistent/{iid}.png"))
    return Dataset(root="/nonexistent", category=category, records=recs, has_masks=False)


class FakePartition:
    """Global embeddings: one Gaussian cluster per class; patch maps: defects light up one patch.
    Records which ids were read, to check what fitting saw."""

    def __init__(self, dataset, seed=0, d=16, spread=0.4):
        rng = np.random.default_rng(seed)
        base = rng.standard_normal(d) * 3
        means = {"good": base, **{k: base + rng.standard_normal(d) * 1.5 for k in DEFECTS}}
        self.g, self.p = {}, {}
        for r in dataset.records:
            self.g[r.image_id] = (means[r.defect_type] + spread * rng.standard_normal(d)).astype(np.float32)
            patch = 0.3 * rng.standard_normal((4, 4, 8)).astype(np.float32)
            if r.label:
                patch[rng.integers(4), rng.integers(4)] += 3.0
            self.p[r.image_id] = patch
        self.meta = {"backbone": "fake", "image_size": 32}
        self.reads = []

    def global_(self, ids):
        self.reads.append(("global", tuple(ids)))
        return np.stack([self.g[i] for i in ids])

    def patch(self, ids):
        self.reads.append(("patch", tuple(ids)))
        return np.stack([self.p[i] for i in ids])


@pytest.fixture(scope="module")
def data():
    ds = _dataset()
    return ds, FakePartition(ds)


@pytest.mark.parametrize("label_mode", ["binary", "multiclass"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_rows_and_metrics(data, label_mode, distance):
    ds, part = data
    rows = evaluate_supervised(ds, part, "protonet", SupervisedDraw(2, 2, label_mode=label_mode), [0, 1, 2],
                               {"distance": distance})
    assert [r["seed"] for r in rows] == [0, 1, 2] and len({r["episode_id"] for r in rows}) == 3
    for r in rows:
        classes = json.loads(r["classes"])
        cm = np.array(json.loads(r["confusion"]))
        assert cm.shape == (len(classes), len(classes)) and cm.sum() == r["n_query"]
        assert r["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert all(f"recall_{c}" in r for c in classes)
        assert 0 <= r["image_auroc"] <= 1 and r["fit_s"] >= 0 and r["score_s"] >= 0 and r["protocol"] == "supervised"
        assert json.loads(r["params"]) == {"distance": distance}
        assert r["balanced_accuracy"] > 0.75  # easy clusters; chance is 1/len(classes)
    if label_mode == "multiclass":
        assert json.loads(rows[0]["classes"]) == ["good", *DEFECTS]
    again = evaluate_supervised(ds, part, "protonet", SupervisedDraw(2, 2, label_mode=label_mode), [0, 1, 2],
                                {"distance": distance})
    assert [r["balanced_accuracy"] for r in again] == [r["balanced_accuracy"] for r in rows]  # deterministic


def test_fitting_sees_only_the_support(data, monkeypatch):
    ds, part = data
    from fewshot_core.methods import protonet

    seen = {}
    real_fit = protonet.ProtoNet.fit

    def spy(self, X, y):
        seen["X"], seen["y"] = np.array(X), np.array(y)
        return real_fit(self, X, y)

    monkeypatch.setattr(protonet.ProtoNet, "fit", spy)
    ep = sample_supervised(ds, 3, 1, seed=5, label_mode="multiclass")
    part.reads.clear()
    run_supervised_episode(ds, part, ep, "protonet")
    (kind1, fit_ids), (kind2, query_ids) = part.reads
    assert fit_ids == ep.support_ids and query_ids == ep.query_ids and not set(fit_ids) & set(query_ids)
    np.testing.assert_array_equal(seen["X"], np.stack([part.g[i] for i in ep.support_ids]))
    truth = {r.image_id: r.defect_type for r in ds.records}
    assert list(seen["y"]) == [truth[i] for i in ep.support_ids]  # labels are the real classes


def test_auroc_is_the_auroc_of_one_minus_p_good(data):
    ds, part = data
    ep = sample_supervised(ds, 2, 1, seed=0, label_mode="multiclass")
    row = run_supervised_episode(ds, part, ep, "protonet", {"distance": "cosine", "temperature": 5.0}).row
    from fewshot_core.methods.protonet import ProtoNet

    names = np.array(ep.classes)
    p = ProtoNet("cosine", 5.0).fit(part.global_(ep.support_ids), names[list(ep.support_labels)])
    p_good = p.predict_proba(part.global_(ep.query_ids))[:, list(p.classes_).index("good")]
    truth = (np.array(ep.query_labels) != 0).astype(int)
    assert row["image_auroc"] == pytest.approx(roc_auc_score(truth, 1 - p_good))


def test_caml_meta_trains_on_other_categories_only(data, tmp_path, monkeypatch):
    ds, part = data
    others = [(_dataset(c), None) for c in ("other1", "other2", "other3")]
    pairs = [(d, FakePartition(d, seed=i + 1)) for i, (d, _) in enumerate(others)]
    pool = pool_from_partitions(pairs + [(ds, part)], source="test")  # the evaluated category is in the pool on purpose
    params = {"train": {"steps": 150, "episodes_per_step": 4, "time_budget_s": 600}}
    rt = Runtime(artifact_dir=tmp_path)
    rows = evaluate_supervised(ds, part, "caml", SupervisedDraw(2, 2, label_mode="multiclass"), [0, 1], params,
                               context=EvalContext(runtime=rt, meta_pool=pool))
    info = json.loads(rows[0]["info"])
    assert sorted(info["trained_on"]) == ["other1", "other2", "other3"]
    assert rows[0]["meta_pool"] == "test: other1, other2, other3"  # the row says what it learnt from
    assert np.mean([r["balanced_accuracy"] for r in rows]) > 0.4  # 4 ways: chance 0.25
    assert len(list((tmp_path / "caml").iterdir())) == 1  # one artifact, shared across seeds

    # A cache shared across categories (as the pipeline does) never reuses another category's model.
    shared, quick = EpisodeCache(), dict(params, train={"steps": 3, "time_budget_s": 30})
    run_supervised_episode(ds, part, sample_supervised(ds, 1, 1, 0), "caml", quick,
                           context=EvalContext(runtime=rt, cache=shared, meta_pool=pool))
    other_ds, other_part = pairs[0]
    row = run_supervised_episode(other_ds, other_part, sample_supervised(other_ds, 1, 1, 0), "caml", quick,
                                 context=EvalContext(runtime=rt, cache=shared, meta_pool=pool)).row
    assert "other1" not in json.loads(row["info"])["trained_on"]

    # A model that did see the evaluated category is refused.
    from fewshot_core.methods import caml

    from fewshot_core.methods.base import Method

    leaky = Method.load(next((tmp_path / "caml").iterdir())).sequence_model_
    leaky.trained_on = ("part", "other1")
    monkeypatch.setattr(caml, "meta_train_or_load", lambda *a, **k: leaky)
    with pytest.raises(FsadError, match="meta-trained on 'part'"):
        evaluate_supervised(ds, part, "caml", SupervisedDraw(2, 2, label_mode="multiclass"), [0], params,
                            context=EvalContext(runtime=rt, meta_pool=pool))
    with pytest.raises(FsadError, match="checkpoint"):
        evaluate_supervised(ds, part, "caml", SupervisedDraw(1, 1), [0])


@pytest.mark.parametrize("method", ["patchcore", "ldknn"])
def test_one_class_methods_under_the_protocol(data, method):
    ds, part = data
    params = {} if method == "patchcore" else {"k": 1, "pool": 1}
    rows = evaluate_supervised(ds, part, method, SupervisedDraw(3, 1), [0, 1], params)
    for r in rows:
        assert r["image_auroc"] > 0.9 and r["balanced_accuracy"] > 0.7, r
        assert json.loads(r["info"])["n_bank_images"] == 3  # good shots only in the bank
    with pytest.raises(FsadError, match="binary"):
        evaluate_supervised(ds, part, method, SupervisedDraw(2, 1, label_mode="multiclass"), [0], params)


def test_unknown_method_is_a_user_error(data):
    ds, part = data
    with pytest.raises(FsadError, match="unknown; choose one of"):
        evaluate_supervised(ds, part, "svm", SupervisedDraw(1, 1), [0])
    with pytest.raises(FsadError, match="not available under the supervised protocol"):
        evaluate_supervised(ds, part, "efficientad", SupervisedDraw(1, 1), [0])


def test_pmf_and_protonet_through_the_real_store(synth_root, tmp_path):
    """Generated images -> Lite0 feature store -> ProtoNet rows; P>M>F re-reads the pixels."""
    from fewshot_core.data import load_dataset
    from fewshot_core.features.store import FeatureStore

    try:
        from fewshot_core.backbones import resolve_weights

        resolve_weights("tf_efficientnet_lite0", "auto")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Lite0 weights unavailable: {exc}")
    cat = sorted(p.name for p in synth_root.iterdir() if p.is_dir())[0]
    ds = load_dataset(synth_root, cat)
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=64),
                                                  EmbedCompute(num_workers=0, progress=False))
    proto = evaluate_supervised(ds, part, "protonet", SupervisedDraw(2, 1), [0], {"distance": "cosine"})
    pmf = evaluate_supervised(ds, part, "pmf", SupervisedDraw(2, 1), [0],
                              {"steps": 2, "search_steps": 1, "lr_candidates": [1e-3], "image_size": 64,
                                             "backbone": "tf_efficientnet_lite0"})
    for r in proto + pmf:
        assert 0 <= r["balanced_accuracy"] <= 1 and "image_auroc" in r
    assert json.loads(pmf[0]["info"])["steps_done"] in (0, 2)
    assert pmf[0]["n_query"] == proto[0]["n_query"]


def test_pmf_takes_dino_vit_s_when_its_weights_can_be_had(monkeypatch):
    """P>M>F's paper backbone when available and nothing else was asked for; the store's otherwise."""
    from fewshot_core.backbones import DEFAULT_BACKBONE
    from fewshot_core.methods import pmf

    monkeypatch.setattr(pmf, "paper_backbone_available", lambda: True)
    assert pmf.default_backbone(DEFAULT_BACKBONE) == "vit_small_patch16_224.dino"
    assert pmf.default_backbone(DEFAULT_BACKBONE, weights_given=True) == DEFAULT_BACKBONE
    assert pmf.default_backbone("resnet50") == "resnet50"  # fsad evaluate --backbone resnet50
    assert pmf.PMF(backbone="vit_small_patch16_224.dino").input_size == 224
    assert pmf.PMF(backbone="tf_efficientnet_lite0").input_size == 128
    monkeypatch.setattr(pmf, "paper_backbone_available", lambda: False)  # offline, not cached
    assert pmf.default_backbone(DEFAULT_BACKBONE) == DEFAULT_BACKBONE
