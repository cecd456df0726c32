"""GLASS: Perlin masks and textures, local synthesis, short training separates, determinism, reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.errors import FsadError
from fewshot_core.methods.glass import GLASS, focal_loss
from fewshot_core.methods.perlin import TextureSource, make_texture, perlin_2d, perlin_mask

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
    base = dict(image_size=SIZE, steps=40, batch_size=2, dsc_hidden=128, ascent_steps=5, progress=False,
                threads=1, device="cpu")
    return {**base, **kw}


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
    m = GLASS(**_cfg())
    imgs = np.stack(_renders("t", 2))
    fgs = [np.ones((SIZE, SIZE), bool)] * 2
    aug, mask_s = m._synthesize(imgs, fgs, np.random.default_rng(0))
    assert aug.shape == (2, 3, SIZE, SIZE) and mask_s.shape == (2 * m.grid[0] * m.grid[1],)
    changed = (aug - torch.from_numpy(imgs).permute(0, 3, 1, 2) / 255).abs().amax(1) > 1e-6
    # every patch labelled anomalous contains changed pixels
    cell = SIZE // m.grid[0]
    cells = changed.reshape(2, m.grid[0], cell, m.grid[1], cell).any(4).any(2).flatten()
    assert mask_s.sum() > 0 and bool(cells[mask_s > 0].all())


def test_short_training_lowers_loss_and_separates(tmp_path):
    size = 96
    train, good, bad = _renders("train", 6, size), _renders("good", 6, size), _defects(6, size)
    m = GLASS(**_cfg(image_size=size, steps=100), artifact_dir=tmp_path).fit_images(train, seed=0)
    s = m.train_summary
    assert s["loss_last"] < s["loss_first"] and s["focal_last"] < s["focal_first"]
    scores, maps = m.score_images(good + bad)
    assert maps.shape == (12, size, size) and np.isfinite(maps).all()
    assert roc_auc_score([0] * 6 + [1] * 6, scores) > 0.7
    loaded = GLASS(**_cfg(image_size=size, steps=100), artifact_dir=tmp_path).fit_images(train, seed=0)
    assert loaded.loaded_from_artifact
    np.testing.assert_array_equal(loaded.score_images(good + bad)[0], scores)


def test_deterministic_by_seed():
    train = _renders("train", 3)
    a = GLASS(**_cfg(steps=4)).fit_images(train, seed=5).score_images(train)[0]
    b = GLASS(**_cfg(steps=4)).fit_images(train, seed=5).score_images(train)[0]
    c = GLASS(**_cfg(steps=4)).fit_images(train, seed=6).score_images(train)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, c)


def test_runs_the_oneclass_protocol_from_images(synth_root, tmp_path):
    from fewshot_core.data import load_dataset
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.methods.training import run_image_episode

    ds = load_dataset(synth_root, "synth_disk")
    episode = sample_oneclass(ds, 2, 0)
    params = _cfg(steps=5)
    row = run_image_episode(ds, episode, "glass", params, mask_size=64, artifact_dir=tmp_path)
    assert row["method"] == "glass" and row["shots"] == 2 and row["n_query"] == len(ds.test())
    assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and "aupro" in row
    assert row["train_steps"] == 5 and not row["loaded_from_artifact"]
    again = run_image_episode(ds, episode, "glass", params, mask_size=64, artifact_dir=tmp_path)
    assert again["loaded_from_artifact"] and again["image_auroc"] == row["image_auroc"]
    assert again["train_s"] == row["train_s"]
    with pytest.raises(FsadError, match="bad parameters"):
        run_image_episode(ds, episode, "glass", {"nonsense": 1})
    with pytest.raises(FsadError, match="not an image-trained"):
        run_image_episode(ds, episode, "patchcore", {})
