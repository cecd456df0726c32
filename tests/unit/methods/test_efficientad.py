"""EfficientAD-S: short training learns, separates anomalies, is deterministic, reloads instead of retraining."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.errors import FsadError
from fewshot_core.methods import efficientad, registry
from fewshot_core.methods.base import Method
from fewshot_core.methods.efficientad import AutoEncoder, EfficientAD, GenericTeacher, pdn_output_size, pdn_small
from fewshot_core.methods.components.generic_images import GenericImages
from fewshot_core.methods.components.persistence import MANIFEST
from fewshot_core.runtime import Runtime

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
    return {**dict(image_size=SIZE, steps=3, teacher_steps=2, penalty="none"), **kw}


def _rt(artifacts=None) -> Runtime:
    return Runtime(device="cpu", threads=1, progress=False, artifact_dir=artifacts)


def _fit(images, artifacts=None, **params) -> EfficientAD:
    return registry.create("efficientad", runtime=_rt(artifacts), **_tiny(**params)).fit(images)


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
    m = _fit(train, steps=50, teacher_steps=30, lr=1e-3, hard_quantile=0.5, seed=0)
    s = m.fit_info_
    assert s["loss_last"] < s["loss_first"]
    assert s["teacher"]["teacher_loss_last"] < s["teacher"]["teacher_loss_first"]
    assert s["teacher"]["source"] == "distilled:generic" and m.provenance()["teacher"]["source"] == "distilled:generic"
    scores, maps = m.score(good + bad)
    assert maps.shape == (8, SIZE, SIZE) and maps.dtype == np.float32 and np.isfinite(maps).all()
    assert roc_auc_score([0] * 4 + [1] * 4, scores) > 0.6


def test_deterministic_reload_and_published_teacher(tmp_path):
    train = _renders("train", 3)
    a = _fit(train, tmp_path / "a", seed=3)
    b = _fit(train, tmp_path / "b", seed=3)
    sa, ma = a.score(train)
    sb, mb = b.score(train)
    np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)
    c = _fit(train, tmp_path / "a", seed=3)
    assert c.fit_info_["loaded_from_artifact"] and not a.fit_info_["loaded_from_artifact"]
    np.testing.assert_array_equal(c.score(train)[0], sa)
    assert c.fit_info_["steps"] == 3 and c.fit_info_["stopped_by"] == "steps"
    # the cached folder is a saved model: Method.load rebuilds it, scoring identically
    (folder,) = (tmp_path / "a" / "efficientad").iterdir()
    loaded = Method.load(folder, runtime=_rt())
    assert isinstance(loaded, EfficientAD) and loaded.get_params() == a.get_params()
    for x, y in zip(loaded.score(train), a.score(train)):
        np.testing.assert_array_equal(x, y)

    # a published-style teacher file is loaded, not distilled, and recorded (with its hash)
    path = tmp_path / "teacher_small.pth"
    torch.save(a.teacher_.state_dict(), path)
    d = _fit(train, teacher_path=str(path), seed=3)
    assert d.fit_info_["teacher"] == {"source": "published", "path": str(path)}
    assert len(d.provenance()["teacher"]["sha256"]) == 64
    assert torch.equal(d.teacher_[0].weight, a.teacher_[0].weight)
    with pytest.raises(FsadError, match="teacher"):
        _fit(train, teacher_path=str(tmp_path / "missing.pth"), seed=3)
    torch.save({"bad": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(FsadError, match="teacher_small"):
        _fit(train, teacher_path=str(tmp_path / "bad.pth"), seed=3)


def test_parameters_are_the_init_arguments_and_runtime_is_not_one():
    m = registry.create("efficientad", steps=4, lr=1e-3)
    params = m.get_params()
    assert params["steps"] == 4 and params["lr"] == 1e-3 and params["seed"] == 0 and params["teacher"] == "generic"
    assert not {"device", "amp", "progress", "threads", "artifact_dir", "score_batch"} & set(params)
    assert m.input_kind == "images" and m.map_sigma == 0
    with pytest.raises(FsadError, match="bad parameters"):
        registry.create("efficientad", device="cpu")


def test_time_budget_stops_training():
    m = _fit(_renders("t", 2), steps=10_000, teacher_steps=10_000, time_budget_s=3, teacher="support", seed=0)
    assert m.fit_info_["stopped_by"] == "time"
    assert m.fit_info_["teacher"]["teacher_stopped_by"] == "time"


def test_generic_teacher_is_shared_cached_and_never_sees_the_support(tmp_path):
    """One teacher per configuration, distilled on generic pictures only (the paper's ImageNet teacher)."""
    efficientad._TEACHERS.clear()
    a = _fit(_renders("a", 2), tmp_path, teacher_steps=4, seed=0)
    assert a.fit_info_["teacher"]["source"] == "distilled:generic"
    assert "scikit-image" in a.fit_info_["teacher"]["images"]
    (teacher_folder,) = (tmp_path / "efficientad-teacher").iterdir()
    assert json.loads((teacher_folder / MANIFEST).read_text())["method"] == "efficientad-teacher"  # the one format
    # other support images, other seed, nothing in memory: the same teacher comes back from its folder
    efficientad._TEACHERS.clear()
    b = _fit(_renders("b", 3), tmp_path, teacher_steps=4, seed=5)
    for pa, pb in zip(a.teacher_.parameters(), b.teacher_.parameters()):
        assert torch.equal(pa, pb)
    # cached or freshly distilled, the episode's own random draws (student init, batches) are the same
    efficientad._TEACHERS.clear()
    c = _fit(_renders("b", 3), teacher_steps=4, seed=5)
    np.testing.assert_allclose(c.score(_renders("q", 2))[0], b.score(_renders("q", 2))[0], rtol=1e-5)
    # a damaged teacher folder is refused in one line that says how to rebuild it
    efficientad._TEACHERS.clear()
    (teacher_folder / "tensors.pt").write_bytes(b"garbage")
    with pytest.raises(FsadError, match=f"delete {teacher_folder} to retrain"):
        _fit(_renders("b", 3), tmp_path, teacher_steps=4, seed=6)  # a new fit: it needs the teacher
    efficientad._TEACHERS.clear()


def test_prepare_teacher_fills_the_cache_that_fits_then_use(tmp_path):
    efficientad._TEACHERS.clear()
    model = registry.create("efficientad", runtime=_rt(tmp_path), **_tiny(teacher_steps=3))
    info = model.prepare_teacher()
    assert info["source"] == "distilled:generic" and info["teacher_steps"] == 3
    teacher = GenericTeacher(SIZE, steps=3).set_runtime(_rt(tmp_path))
    assert (tmp_path / "efficientad-teacher" / teacher.cache_key() / MANIFEST).is_file()
    with pytest.raises(FsadError, match="only the generic teacher"):
        registry.create("efficientad", **_tiny(teacher="support")).prepare_teacher()
    efficientad._TEACHERS.clear()


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
