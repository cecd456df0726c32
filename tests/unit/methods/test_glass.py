"""GLASS: Perlin masks and textures, local synthesis, short training separates, determinism, reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.errors import FsadError
from fewshot_core.methods import registry
from fewshot_core.methods.base import Method
from fewshot_core.methods.glass import GLASS, focal_loss
from fewshot_core.methods.components.perlin import TextureSource, make_texture, perlin_2d, perlin_mask
from fewshot_core.runtime import Runtime
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext

SIZE = 64


def _renders(tag, n, size=SIZE):
    kind = next(k for k in KINDS if k.name == "disk")
    pal = np.asarray(kind.palette, float)
    return [render_sample(kind, pal, size, 0, (tag, str(i)))[0] for i in range(n)]


def _defects(n, size=SIZE):
    kind = next(k for k in KINDS if k.name == "disk")
    pal = np.asarray(kind.palette, float)
    kinds = ("contamination", "missing_part", "color_shift", "crack")
    return [render_sample(kind, pal, size, 0, ("bad", str(i)), defect=kinds[i % 4])[0] for i in range(n)]


def _cfg(**kw):
    return {**dict(image_size=SIZE, steps=40, batch_size=2, dsc_hidden=128, ascent_steps=5), **kw}


def _rt(artifacts=None) -> Runtime:
    return Runtime(device="cpu", threads=1, progress=False, artifact_dir=artifacts)


def _fit(images, artifacts=None, **params) -> GLASS:
    return registry.create("glass", runtime=_rt(artifacts), **_cfg(**params)).fit(images)


def test_perlin_noise_and_masks_are_seeded():
    a = perlin_2d((40, 50), (4, 5), np.random.default_rng(0))
    b = perlin_2d((40, 50), (4, 5), np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (40, 50) and np.abs(a).max() <= 1.5 and a.std() > 0.1
    for seed in range(5):
        m = perlin_mask((64, 64), np.random.default_rng(seed))
        assert m.dtype == bool and 0 < m.mean() < 1
    t = make_texture(32, np.random.default_rng(1))
    assert t.shape == (32, 32, 3) and t.dtype == np.uint8 and t.std() > 1


def test_texture_folder(tmp_path):
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    (tmp_path / "banded").mkdir()
    Image.fromarray(arr).save(tmp_path / "banded" / "banded_0001.jpg")
    src = TextureSource(tmp_path)
    assert "1 images" in src.description
    assert src.sample(16, np.random.default_rng(0)).shape == (16, 16, 3)
    with pytest.raises(FsadError, match="texture folder"):
        TextureSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FsadError, match="no texture"):
        TextureSource(tmp_path / "empty")


def test_focal_loss_prefers_right_answers():
    t = torch.tensor([0.0, 1.0])
    assert focal_loss(torch.tensor([0.1, 0.9]), t) < focal_loss(torch.tensor([0.9, 0.1]), t)


def test_local_synthesis_marks_the_changed_patches():
    m = GLASS(**_cfg()).set_runtime(_rt())
    m.device_ = m.runtime.torch_device()
    m._setup()
    imgs = np.stack(_renders("t", 2))
    fgs = [np.ones((SIZE, SIZE), bool)] * 2
    aug, mask_s = m._synthesize(imgs, fgs, np.random.default_rng(0))
    assert aug.shape == (2, 3, SIZE, SIZE) and mask_s.shape == (2 * m.grid_[0] * m.grid_[1],)
    changed = (aug - torch.from_numpy(imgs).permute(0, 3, 1, 2) / 255).abs().amax(1) > 1e-6
    # every patch labelled anomalous contains changed pixels
    cell = SIZE // m.grid_[0]
    cells = changed.reshape(2, m.grid_[0], cell, m.grid_[1], cell).any(4).any(2).flatten()
    assert mask_s.sum() > 0 and bool(cells[mask_s > 0].all())


def test_short_training_lowers_loss_and_separates(tmp_path):
    size = 96
    train, good, bad = _renders("train", 6, size), _renders("good", 6, size), _defects(6, size)
    m = _fit(train, tmp_path, image_size=size, steps=100, seed=0)
    s = m.fit_info_
    assert s["loss_last"] < s["loss_first"] and s["focal_last"] < s["focal_first"]
    scores, maps = m.score(good + bad)
    assert maps.shape == (12, size, size) and maps.dtype == np.float32 and np.isfinite(maps).all()
    assert roc_auc_score([0] * 6 + [1] * 6, scores) > 0.7
    loaded = _fit(train, tmp_path, image_size=size, steps=100, seed=0)
    assert loaded.fit_info_["loaded_from_artifact"] and loaded.fit_info_["steps"] == 100
    np.testing.assert_array_equal(loaded.score(good + bad)[0], scores)


def test_deterministic_by_seed_and_reloads_from_its_folder(tmp_path):
    train = _renders("train", 3)
    a = _fit(train, steps=4, seed=5)
    b = _fit(train, steps=4, seed=5)
    c = _fit(train, steps=4, seed=6)
    np.testing.assert_allclose(a.score(train)[0], b.score(train)[0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(a.score(train)[0], c.score(train)[0])
    assert a.get_params()["seed"] == 5 and a.get_params()["steps"] == 4
    # save / Method.load: the one folder format rebuilds a detector that scores identically
    again = Method.load(a.save(tmp_path / "glass"), runtime=_rt())
    assert isinstance(again, GLASS) and again.fit_info_["loaded_from_artifact"]
    for x, y in zip(again.score(train), a.score(train)):
        np.testing.assert_array_equal(x, y)
    batch = np.stack(train).transpose(0, 3, 1, 2).astype(np.float32) / 255  # a float batch [n, 3, S, S]
    np.testing.assert_allclose(a.score(batch)[0], a.score(train)[0], rtol=1e-6)


def test_runs_the_oneclass_protocol_from_images(synth_root, tmp_path):
    from fewshot_core.data import load_dataset
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import evaluate_oneclass, run_oneclass_episode

    ds = load_dataset(synth_root, "synth_disk")
    episode = sample_oneclass(ds, 2, 0)
    params = _cfg(steps=5)
    res = run_oneclass_episode(ds, None, episode, "glass", params, options=EpisodeOptions(mask_size=32),
                               context=EvalContext(runtime=_rt(tmp_path)))
    row = res.row
    assert row["method"] == "glass" and row["shots"] == 2 and row["n_query"] == len(ds.test())
    assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and "aupro" in row
    assert row["train_steps"] == 5 and not row["loaded_from_artifact"] and row["device"] == "cpu"
    assert row["partition_key"] is None and row["backbone"] == "tf_efficientnet_lite0"
    assert '"seed": 0' in row["params"] and res.patch_maps.shape[1:] == (SIZE, SIZE)
    (again,) = evaluate_oneclass(ds, None, "glass", 2, [0], params, options=EpisodeOptions(mask_size=32),
                                 context=EvalContext(runtime=_rt(tmp_path)))
    assert again["loaded_from_artifact"] and again["image_auroc"] == row["image_auroc"]
    assert again["train_s"] == row["train_s"] and again["pixel_auroc"] == row["pixel_auroc"]
    with pytest.raises(FsadError, match="bad parameters"):
        run_oneclass_episode(ds, None, episode, "glass", {"nonsense": 1})
    with pytest.raises(FsadError, match="only for feature-based"):
        run_oneclass_episode(ds, None, episode, "glass", params, options=EpisodeOptions(augment="images"))
    with pytest.raises(FsadError, match="feature-store partition"):
        run_oneclass_episode(ds, None, episode, "patchcore", {})
