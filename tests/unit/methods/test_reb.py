"""REB: DefectMaker fine-tuning learns the 7-class task; LDKNN on the fine-tuned features separates; reload."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.methods import registry
from fewshot_core.methods.base import Method
from fewshot_core.methods.reb import REB
from fewshot_core.runtime import Runtime


def _renders(tag, n, size):
    kind = next(k for k in KINDS if k.name == "disk")
    pal = np.asarray(kind.palette, float)
    return [render_sample(kind, pal, size, 0, (tag, str(i)))[0] for i in range(n)]


def _defects(n, size):
    kind = next(k for k in KINDS if k.name == "disk")
    pal = np.asarray(kind.palette, float)
    kinds = ("contamination", "missing_part", "color_shift", "crack")
    return [render_sample(kind, pal, size, 0, ("bad", str(i)), defect=kinds[i % 4])[0] for i in range(n)]


def _cfg(**kw):
    return {**dict(image_size=64, steps=3, batch_size=8), **kw}


def _rt(artifacts=None) -> Runtime:
    return Runtime(device="cpu", threads=1, progress=False, artifact_dir=artifacts)


def _fit(images, artifacts=None, **params) -> REB:
    return registry.create("reb", runtime=_rt(artifacts), **_cfg(**params)).fit(images)


def test_finetuning_learns_and_ldknn_separates(tmp_path):
    train, good, bad = _renders("train", 5, 96), _renders("good", 5, 96), _defects(5, 96)
    m = _fit(train, tmp_path, image_size=96, steps=40, batch_size=14, lr=0.01, seed=0)
    s = m.fit_info_
    assert s["steps"] == 40 and s["loss_last"] < s["loss_first"]
    assert s["acc_last"] > 1 / 7  # better than guessing among the 7 classes
    assert s["bank"] == 5 * s["grid"][0] * s["grid"][1]  # no coreset: every support patch
    scores, maps = m.score(good + bad)
    assert maps.shape == (10, 96, 96) and np.isfinite(maps).all()
    assert roc_auc_score([0] * 5 + [1] * 5, scores) > 0.7
    # the fine-tuned backbone differs from the ImageNet one
    from fewshot_core.backbones import create_model

    name = "conv_stem.weight"
    assert not torch.equal(create_model("tf_efficientnet_lite0").state_dict()[name], m.model_.state_dict()[name])
    # reload: same scores, no training
    again = _fit(train, tmp_path, image_size=96, steps=40, batch_size=14, lr=0.01, seed=0)
    assert again.fit_info_["loaded_from_artifact"]
    np.testing.assert_allclose(again.score(good + bad)[0], scores, rtol=1e-5, atol=1e-6)


def test_deterministic_by_seed_and_ablation_without_finetuning(tmp_path):
    train = _renders("train", 2, 64)
    model = _fit(train, seed=1)
    a = model.score(train)[0]
    b = _fit(train, seed=1).score(train)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = _fit(train, finetune=False, seed=1)
    assert plain.fit_info_["steps"] == 0
    assert not np.allclose(plain.score(train)[0], a)
    # save / Method.load: fine-tuned network and LDKNN bank come back, scoring identically
    again = Method.load(model.save(tmp_path / "reb"), runtime=_rt())
    assert isinstance(again, REB) and again.ldknn_.seed == model.ldknn_.seed
    for x, y in zip(again.score(train), model.score(train)):
        np.testing.assert_array_equal(x, y)
