"""Shared training machinery: budgets, artifacts keyed by config + seed + images, image loading."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_core.device import resolve_device
from fewshot_core.errors import FsadError
from fewshot_core.methods.training import (
    ArtifactStore,
    TrainedDetector,
    TrainLoop,
    config_hash,
    gaussian_blur,
    images_fingerprint,
    load_images,
)


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


def test_config_hash_is_order_free_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


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


def test_artifact_store_roundtrip_and_corruption(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.load("m", "k") is None
    d = store.save("m", "k", {"w": torch.arange(3)}, {"config": {"a": 1}})
    state, meta = store.load("m", "k")
    assert torch.equal(state["w"], torch.arange(3))
    assert meta["format"] == 1 and meta["config"] == {"a": 1} and meta["method"] == "m"
    assert not list(d.glob("*.tmp"))  # atomic writes leave nothing behind
    # a future/older layout is retrained, not misread
    meta["format"] = 999
    (d / "meta.json").write_text(json.dumps(meta))
    assert store.load("m", "k") is None
    meta["format"] = 1
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "model.pt").write_bytes(b"garbage")
    with pytest.raises(FsadError, match="delete"):
        store.load("m", "k")


@dataclass
class _Cfg:
    image_size: int = 16
    steps: int = 5
    device: str | None = "cpu"
    progress: bool = False


class _Mean(TrainedDetector):
    """A trivial 'trained' detector: learns the mean image; score = squared distance to it."""

    name = "mean-test"
    calls = 0

    def _train(self, x, gen):
        type(self).calls += 1
        self.mu = x.mean(0) + 0.001 * torch.rand(x.shape[1:], generator=gen)
        return {"steps": self.config.steps}

    def _state(self):
        return {"mu": self.mu}

    def _load_state(self, state):
        self.mu = state["mu"]

    def _score(self, x):
        maps = ((x - self.mu) ** 2).mean(1)
        return maps.flatten(1).max(1).values, maps


def test_trained_detector_reloads_instead_of_retraining(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [(rng.random((20, 20, 3)) * 255).astype(np.uint8) for _ in range(3)]
    a = _Mean(_Cfg(), artifact_dir=tmp_path).fit_images(imgs, seed=1)
    assert _Mean.calls == 1 and not a.loaded_from_artifact and (a.artifact_path / "model.pt").is_file()
    b = _Mean(_Cfg(progress=True), artifact_dir=tmp_path).fit_images(imgs, seed=1)  # runtime field only
    assert _Mean.calls == 1 and b.loaded_from_artifact
    sa, ma = a.score_images(imgs)
    sb, mb = b.score_images(imgs)
    np.testing.assert_array_equal(sa, sb)
    assert ma.shape == (3, 16, 16) and a.map_size == 16
    _Mean(_Cfg(), artifact_dir=tmp_path).fit_images(imgs, seed=2)  # another seed: trains
    _Mean(_Cfg(steps=6), artifact_dir=tmp_path).fit_images(imgs, seed=1)  # another config: trains
    _Mean(_Cfg(), artifact_dir=tmp_path).fit_images(imgs[:2], seed=1)  # other images: trains
    assert _Mean.calls == 4
    with pytest.raises(FsadError, match="before fit"):
        _Mean(_Cfg()).score_images(imgs)
