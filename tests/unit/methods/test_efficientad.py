"""EfficientAD-S: short training learns, separates anomalies, is deterministic, reloads instead of retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.errors import FsadError
from fewshot_core.methods import efficientad
from fewshot_core.methods.efficientad import AutoEncoder, EfficientAD, pdn_output_size, pdn_small
from fewshot_core.methods.generic_images import GenericImages

SIZE = 64


def _renders(tag, n):
    kind = next(k for k in KINDS if k.name == "disk")
    pal = np.asarray(kind.palette, float)
    return [render_sample(kind, pal, SIZE, 0, (tag, str(i)))[0] for i in range(n)]


def _with_noise_patch(images, seed=0):
    """Anomalous copies: a 16x16 patch of random colours (a defect a PDN cannot have learned)."""
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        im = im.copy()
        y, x = rng.integers(12, 36, 2)
        im[y:y + 16, x:x + 16] = rng.integers(0, 256, (16, 16, 3))
        out.append(im)
    return out


def _tiny(**kw):
    base = dict(image_size=SIZE, steps=3, teacher_steps=2, penalty="none", progress=False, threads=1, device="cpu")
    return {**base, **kw}


@pytest.mark.parametrize("size", [64, 128, 256])
def test_architecture_shapes(size):
    x = torch.rand(1, 3, size, size)
    out = pdn_output_size(size)
    assert pdn_small(384)(x).shape == (1, 384, out, out)
    assert AutoEncoder(size, 384, out)(x).shape == (1, 384, out, out)
    assert pdn_output_size(256) == 56  # the paper's grid


def test_short_training_lowers_loss_and_separates():
    train, good = _renders("train", 6), _renders("good", 4)
    bad = _with_noise_patch(_renders("bad", 4))
    m = EfficientAD(**_tiny(steps=50, teacher_steps=30, lr=1e-3, hard_quantile=0.5)).fit_images(train, seed=0)
    s = m.train_summary
    assert s["loss_last"] < s["loss_first"]
    assert s["teacher"]["teacher_loss_last"] < s["teacher"]["teacher_loss_first"]
    assert s["teacher"]["source"] == "distilled:generic" and m.meta["teacher_source"] == "distilled:generic"
    scores, maps = m.score_images(good + bad)
    assert maps.shape == (8, SIZE, SIZE) and np.isfinite(maps).all()
    assert roc_auc_score([0] * 4 + [1] * 4, scores) > 0.6


def test_deterministic_reload_and_published_teacher(tmp_path):
    train = _renders("train", 3)
    a = EfficientAD(**_tiny(), artifact_dir=tmp_path / "a").fit_images(train, seed=3)
    b = EfficientAD(**_tiny(), artifact_dir=tmp_path / "b").fit_images(train, seed=3)
    sa, ma = a.score_images(train)
    sb, mb = b.score_images(train)
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    c = EfficientAD(**_tiny(), artifact_dir=tmp_path / "a").fit_images(train, seed=3)
    assert c.loaded_from_artifact and not a.loaded_from_artifact
    np.testing.assert_array_equal(c.score_images(train)[0], sa)
    assert c.train_summary["steps"] == 3 and c.train_summary["stopped_by"] == "steps"

    # a published-style teacher file is loaded, not distilled, and recorded
    path = tmp_path / "teacher_small.pth"
    torch.save(a.teacher.state_dict(), path)
    d = EfficientAD(**_tiny(teacher_path=str(path))).fit_images(train, seed=3)
    assert d.train_summary["teacher"] == {"source": "published", "path": str(path)}
    assert torch.equal(d.teacher[0].weight, a.teacher[0].weight)
    with pytest.raises(FsadError, match="teacher"):
        EfficientAD(**_tiny(teacher_path=str(tmp_path / "missing.pth"))).fit_images(train, seed=3)
    torch.save({"bad": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(FsadError, match="teacher_small"):
        EfficientAD(**_tiny(teacher_path=str(tmp_path / "bad.pth"))).fit_images(train, seed=3)


def test_time_budget_stops_training():
    m = EfficientAD(**_tiny(steps=10_000, teacher_steps=10_000, time_budget_s=3, teacher="support")).fit_images(
        _renders("t", 2), seed=0)
    assert m.train_summary["stopped_by"] == "time"
    assert m.train_summary["teacher"]["teacher_stopped_by"] == "time"


def test_generic_teacher_is_shared_cached_and_never_sees_the_support(tmp_path):
    """One teacher per configuration, distilled on generic pictures only (the paper's ImageNet teacher)."""
    efficientad._TEACHERS.clear()
    a = EfficientAD(**_tiny(teacher_steps=4), artifact_dir=tmp_path).fit_images(_renders("a", 2), seed=0)
    assert a.train_summary["teacher"]["source"] == "distilled:generic"
    assert "scikit-image" in a.train_summary["teacher"]["images"]
    assert (tmp_path / "efficientad-teacher").is_dir()
    # other support images, other seed, nothing in memory: the same teacher comes back from the store
    efficientad._TEACHERS.clear()
    b = EfficientAD(**_tiny(teacher_steps=4), artifact_dir=tmp_path).fit_images(_renders("b", 3), seed=5)
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        assert torch.equal(pa, pb)
    # cached or freshly distilled, the episode's own random draws (student init, batches) are the same
    efficientad._TEACHERS.clear()
    c = EfficientAD(**_tiny(teacher_steps=4)).fit_images(_renders("b", 3), seed=5)
    np.testing.assert_allclose(c.score_images(_renders("q", 2))[0], b.score_images(_renders("q", 2))[0], rtol=1e-5)


def test_generic_images_are_deterministic_and_check_their_folder(tmp_path):
    g = GenericImages()
    a, b = g.batch(6, 48, np.random.default_rng(3)), g.batch(6, 48, np.random.default_rng(3))
    assert a.shape == (6, 3, 48, 48) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1 and len({im.numpy().tobytes() for im in a}) == 6  # varied crops
    with pytest.raises(FsadError, match="not found"):
        GenericImages(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FsadError, match="no images"):
        GenericImages(tmp_path / "empty")
    with pytest.raises(FsadError, match="teacher"):
        EfficientAD(teacher="imagenet")


def test_bad_image_size():
    with pytest.raises(FsadError, match="multiple of 32"):
        EfficientAD(image_size=100)
