"""REB: DefectMaker fine-tuning learns the 7-class task; LDKNN on the fine-tuned features separates; reload."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.methods.reb import REB


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
    base = dict(image_size=64, steps=3, batch_size=8, progress=False, threads=1, device="cpu")
    return {**base, **kw}


def test_finetuning_learns_and_ldknn_separates(tmp_path):
    train, good, bad = _renders("train", 5, 96), _renders("good", 5, 96), _defects(5, 96)
    m = REB(**_cfg(image_size=96, steps=40, batch_size=14, lr=0.01), artifact_dir=tmp_path).fit_images(train, seed=0)
    s = m.train_summary
    assert s["steps"] == 40 and s["loss_last"] < s["loss_first"]
    assert s["acc_last"] > 1 / 7  # better than guessing among the 7 classes
    assert s["bank"] == 5 * s["grid"][0] * s["grid"][1]  # no coreset: every support patch
    scores, maps = m.score_images(good + bad)
    assert maps.shape == (10, 96, 96) and np.isfinite(maps).all()
    assert roc_auc_score([0] * 5 + [1] * 5, scores) > 0.7
    # the fine-tuned backbone differs from the ImageNet one
    fresh = REB(**_cfg(image_size=96))
    name = "conv_stem.weight"
    assert not torch.equal(fresh.model.state_dict()[name], m.model.state_dict()[name].to(fresh.device))
    # reload: same scores, no training
    again = REB(**_cfg(image_size=96, steps=40, batch_size=14, lr=0.01), artifact_dir=tmp_path).fit_images(train, seed=0)
    assert again.loaded_from_artifact
    np.testing.assert_allclose(again.score_images(good + bad)[0], scores, rtol=1e-5, atol=1e-6)


def test_deterministic_by_seed_and_ablation_without_finetuning():
    train = _renders("train", 2, 64)
    a = REB(**_cfg()).fit_images(train, seed=1).score_images(train)[0]
    b = REB(**_cfg()).fit_images(train, seed=1).score_images(train)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = REB(**_cfg(finetune=False)).fit_images(train, seed=1)
    assert plain.train_summary["steps"] == 0
    assert not np.allclose(plain.score_images(train)[0], a)
