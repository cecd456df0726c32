"""Shared training machinery: budgets, scoped seeding, image loading, the trained-weights cache (keyed by
parameters + seed + backbone weights + images, in the one save format)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_core.device import resolve_device
from fewshot_core.errors import FsadError
from fewshot_core.methods.components.anomaly_map import gaussian_blur
from fewshot_core.methods.components.images import images_fingerprint, load_images
from fewshot_core.methods.components.persistence import MANIFEST, TENSORS
from fewshot_core.methods.components.training import TrainLoop, seeded
from fewshot_core.methods.trained import TrainedDetector
from fewshot_core.runtime import Runtime


def test_loop_stops_on_steps_and_keeps_history():
    loop = TrainLoop(7, None, desc="t", progress=False)
    seen = [step for step in loop if loop.log(loss=10 - step) is None]
    assert seen == list(range(7))
    s = loop.summary()
    assert s["steps"] == 7 and s["stopped_by"] == "steps"
    assert s["loss_first"] > s["loss_last"]


def test_loop_stops_on_time_budget():
    loop = TrainLoop(10_000, 0.2, desc="t", progress=False)
    for _ in loop:
        time.sleep(0.02)
    assert loop.stopped_by == "time"
    assert 3 <= loop.steps_done < 100


def test_loop_rejects_bad_budget():
    with pytest.raises(FsadError):
        TrainLoop(-1)
    with pytest.raises(FsadError):
        TrainLoop(5, 0)


def test_load_images_accepts_paths_pil_arrays_tensors(tmp_path):
    arr = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    gray = Image.fromarray(arr[..., 0])
    x = load_images([tmp_path / "a.png", Image.fromarray(arr), arr, gray], 32)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])
    assert torch.allclose(x[3][0], x[3][1])  # grey replicated
    t = load_images(torch.rand(2, 3, 48, 48), 32)
    assert t.shape == (2, 3, 32, 32)
    batch = np.random.default_rng(1).random((2, 3, 32, 32)).astype(np.float32)  # a numpy image batch
    assert torch.equal(load_images(batch, 32), torch.from_numpy(batch))
    with pytest.raises(FsadError):
        load_images([], 32)
    with pytest.raises(FsadError):
        load_images([tmp_path / "missing.png"], 32)


def test_fingerprint_follows_content():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0, 0, 0, 0] = 1
    assert images_fingerprint(x) == images_fingerprint(x.clone())
    assert images_fingerprint(x) != images_fingerprint(y)


def test_gaussian_blur_keeps_constants_and_mass():
    m = torch.full((2, 20, 20), 3.0)
    assert torch.allclose(gaussian_blur(m, 4.0), m, atol=1e-5)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1
    out = gaussian_blur(spike, 2.0)
    assert abs(out.sum().item() - 1) < 1e-3 and out[0, 20, 20] < 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_explicit_cuda_without_gpu_is_user_error():
    assert resolve_device(None).type == "cpu"
    with pytest.raises(FsadError):
        resolve_device("cuda")


def test_seeded_scope_restores_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7, torch.device("cpu")) as gen:
        inside = torch.rand(2)
        drawn = torch.rand(2, generator=gen)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream continues as if nothing happened
    with seeded(7, torch.device("cpu")) as gen:
        assert torch.equal(torch.rand(2), inside) and torch.equal(torch.rand(2, generator=gen), drawn)


class _Mean(TrainedDetector):
    """A trivial trained detector: learns the mean image (+ seeded noise); score = squared distance to it."""

    name = "mean-test"
    calls = 0

    def __init__(self, image_size: int = 16, steps: int = 5, seed: int = 0, backbone: str = "tf_efficientnet_lite0",
                 backbone_weights: str = "auto"):
        self.image_size = image_size
        self.steps = steps
        self.seed = seed
        self.backbone = backbone
        self.backbone_weights = backbone_weights

    def _setup(self):
        pass

    def _train(self, x, gen):
        type(self).calls += 1
        self.mu_ = x.mean(0) + 0.001 * torch.rand(x.shape[1:], generator=gen) + 0.001 * torch.rand(x.shape[1:])
        return {"steps": self.steps, "stopped_by": "steps"}

    def _score(self, x):
        maps = ((x - self.mu_) ** 2).mean(1)
        return maps.flatten(1).max(1).values, maps

    def get_state(self):
        return {**super().get_state(), "tensors": {"mu": self.mu_}}

    def set_state(self, state):
        super().set_state(state)
        self.mu_ = state["tensors"]["mu"]


def _imgs(n=3):
    rng = np.random.default_rng(0)
    return [(rng.random((20, 20, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_trained_detector_reloads_instead_of_retraining(tmp_path):
    imgs = _imgs()
    rt = Runtime(device="cpu", artifact_dir=tmp_path, progress=False)
    _Mean.calls = 0
    a = _Mean(seed=1).set_runtime(rt).fit(imgs)
    folder = tmp_path / "mean-test"
    assert _Mean.calls == 1 and not a.fit_info_["loaded_from_artifact"] and a.input_kind == "images"
    (key,) = [p.name for p in folder.iterdir()]
    assert {p.name for p in (folder / key).iterdir()} == {MANIFEST, TENSORS}  # the one save format
    manifest = json.loads((folder / key / MANIFEST).read_text())
    assert manifest["params"]["seed"] == 1 and manifest["provenance"]["weights"]["sha256"]
    assert manifest["info"]["fit"]["steps"] == 5 and "loaded_from_artifact" not in manifest["info"]["fit"]
    b = _Mean(seed=1).set_runtime(rt.replace(threads=1, score_batch=2)).fit(imgs)  # runtime only: reloads
    assert _Mean.calls == 1 and b.fit_info_["loaded_from_artifact"] and b.fit_info_["fit_s"] == a.fit_info_["fit_s"]
    sa, ma = a.score(imgs)
    sb, mb = b.score(imgs)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(ma, mb)
    assert ma.shape == (3, 16, 16) and ma.dtype == np.float32 and a.map_sigma == 0
    _Mean(seed=2).set_runtime(rt).fit(imgs)  # another seed: trains
    _Mean(seed=1, steps=6).set_runtime(rt).fit(imgs)  # another parameter: trains
    _Mean(seed=1).set_runtime(rt).fit(imgs[:2])  # other images: trains
    _Mean(seed=1).set_runtime(rt.replace(artifact_dir=None)).fit(imgs)  # no cache: trains, writes nothing
    assert _Mean.calls == 5 and len(list(folder.iterdir())) == 4
    with pytest.raises(RuntimeError, match="not fitted"):
        _Mean().score(imgs)


def test_training_is_seeded_without_touching_the_global_rng():
    imgs = _imgs()
    rt = Runtime(device="cpu", artifact_dir=None, progress=False)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    a = _Mean(seed=3).set_runtime(rt).fit(imgs)
    assert torch.equal(torch.rand(4), expected)
    b = _Mean(seed=3).set_runtime(rt).fit(imgs)
    c = _Mean(seed=4).set_runtime(rt).fit(imgs)
    assert torch.equal(a.mu_, b.mu_) and not torch.equal(a.mu_, c.mu_)


class _Threads(_Mean):
    """Records torch's thread count while training and scoring."""

    name = "threads-test"
    seen: list = []

    def _train(self, x, gen):
        self.seen.append(torch.get_num_threads())
        return super()._train(x, gen)

    def _score(self, x):
        self.seen.append(torch.get_num_threads())
        return super()._score(x)


def test_threads_are_scoped_to_fit_and_score():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = _Threads().set_runtime(Runtime(device="cpu", artifact_dir=None, progress=False, threads=1)).fit(_imgs())
        m.score(_imgs())
        assert _Threads.seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_damaged_or_foreign_cache_folder_is_a_one_line_error(tmp_path):
    imgs = _imgs()
    rt = Runtime(device="cpu", artifact_dir=tmp_path, progress=False)
    _Mean(seed=1).set_runtime(rt).fit(imgs)
    (folder,) = (tmp_path / "mean-test").iterdir()
    (folder / TENSORS).write_bytes(b"garbage")
    with pytest.raises(FsadError, match=f"checksum mismatch.*delete {folder} to retrain") as exc:
        _Mean(seed=1).set_runtime(rt).fit(imgs)
    assert "\n" not in str(exc.value)
    (folder / MANIFEST).unlink()
    (folder / "model.pt").write_bytes(b"the old ArtifactStore layout")
    with pytest.raises(FsadError, match=f"older or foreign folder.*delete {folder} to retrain"):
        _Mean(seed=1).set_runtime(rt).fit(imgs)
