"""Shared machinery of the detectors that train on images (EfficientAD, GLASS, REB).

One place for what every training loop needs and must do the same way: scoped seeding, mixed precision,
a step/time budget with progress, images into tensors, backbone patch features, and the trained-weights
cache. ``TrainedDetector.fit`` first looks for this very model in ``<artifacts>/<method>/<key>/``, a folder
in the one save format of every method (methods/persistence.py), keyed by a hash of the parameters (seed
included), the backbone weights and the support images; it trains only on a miss and saves what it trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot_core.errors import FsadError
from fewshot_core.methods.base import Detector
from fewshot_core.methods.persistence import config_hash, load_state_into, save_model

ImageLike = str | os.PathLike | Image.Image | np.ndarray

# What a damaged, foreign or outdated cache folder tells the user (the cache is rebuilt by training again).
CACHE_REBUILD = "delete {folder} to retrain"


# ---------------------------------------------------------------- seeding, precision

@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """torch's global RNG seeded with ``seed`` for the duration, the caller's RNG state restored afterwards.

    Module initialisation and dropout draw from the global RNG, so a fit seeds it, but only inside this
    scope; the method's own draws use the yielded CPU generator (seeded alike).
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU, where fp32 is faster.

    bf16 needs no loss scaling, so the loops stay simple; fp16 users get ``grad_scaler``.
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    use = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=use)


# ---------------------------------------------------------------- budget + progress

@dataclass
class TrainLoop:
    """Iterate training steps until ``max_steps`` or ``time_budget_s`` runs out, whichever is first.

    ``for step in loop: ...; loop.log(loss=...)`` shows a progress line every ``log_every`` steps on
    stderr and keeps the history; ``summary()`` says how and when training stopped.
    """

    max_steps: int
    time_budget_s: float | None = None
    desc: str = "train"
    log_every: int = 25
    progress: bool = True
    history: list[dict] = field(default_factory=list)
    stopped_by: str = "not-started"
    steps_done: int = 0
    elapsed_s: float = 0.0

    def __post_init__(self):
        if self.max_steps < 0:
            raise FsadError(f"{self.desc}: steps={self.max_steps} is negative; give steps >= 0")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise FsadError(f"{self.desc}: time budget {self.time_budget_s}s is not positive; give a positive number")

    def __iter__(self) -> Iterator[int]:
        # The first step always runs and its time is not charged to the budget: on CUDA it pays the
        # one-off kernel loading and autotuning, which would otherwise eat a short budget whole.
        self._t0 = time.perf_counter()
        budget_t0 = self._t0
        self.stopped_by = "steps"
        for step in range(self.max_steps):
            now = time.perf_counter()
            if step == 1:
                budget_t0 = now
            if self.time_budget_s is not None and step > 0 and now - budget_t0 >= self.time_budget_s:
                self.stopped_by = "time"
                self._print(f"time budget {self.time_budget_s:.0f}s reached after {step} steps")
                break
            yield step
            self.steps_done = step + 1
        self.elapsed_s = time.perf_counter() - self._t0

    def log(self, **values: float) -> None:
        row = {"step": self.steps_done, **{k: float(v) for k, v in values.items()}}
        self.history.append(row)
        step = self.steps_done + 1
        if step == 1 or step % self.log_every == 0 or step == self.max_steps:
            parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            self._print(f"step {step}/{self.max_steps} {parts} ({time.perf_counter() - self._t0:.1f}s)")

    def _print(self, text: str) -> None:
        if self.progress:
            print(f"[{self.desc}] {text}", file=sys.stderr, flush=True)

    def mean(self, key: str, first: bool) -> float:
        """Mean of ``key`` over the first/last tenth of the logged steps (1 to 20 steps)."""
        vals = [r[key] for r in self.history if key in r]
        if not vals:
            return float("nan")
        n = min(20, max(1, len(vals) // 10))
        part = vals[:n] if first else vals[-n:]
        return float(np.mean(part))

    def summary(self) -> dict:
        keys = sorted({k for r in self.history for k in r if k != "step"})
        return {
            "steps": self.steps_done,
            "max_steps": self.max_steps,
            "time_budget_s": self.time_budget_s,
            "stopped_by": self.stopped_by,
            "elapsed_s": round(self.elapsed_s, 3),
            **{f"{k}_first": self.mean(k, True) for k in keys},
            **{f"{k}_last": self.mean(k, False) for k in keys},
        }


def cosine_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], step: int, total: int) -> None:
    """Cosine decay to 0 over ``total`` steps (REB's schedule), set in place."""
    factor = 0.5 * (1 + np.cos(np.pi * min(step, total) / max(total, 1)))
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * factor


# ---------------------------------------------------------------- images -> tensors

def _to_pil(item: ImageLike, max_side: int | None = None) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return Image.fromarray(arr[..., :3])
    from fewshot_core.data.imageio import load_rgb  # the project's one reading rule (EXIF, 16-bit, alpha)

    return load_rgb(Path(item), max_side=max_side)


def _is_image_batch(items) -> bool:
    return isinstance(items, np.ndarray) and items.ndim == 4 and items.shape[1] == 3


def load_images(items: Iterable[ImageLike] | torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """Images -> float32 [n, 3, size, size] in [0, 1].

    Takes a float batch [n, 3, H, W] in [0, 1] (torch or numpy), or a sequence of paths, PIL images or
    H x W (x 3) arrays (uint8, or floats in [0, 1]).
    """
    if _is_image_batch(items):
        items = torch.from_numpy(np.ascontiguousarray(items))
    if isinstance(items, torch.Tensor):
        x = items.float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise FsadError(f"images tensor of shape {tuple(x.shape)}: expected [n, 3, H, W]; pass RGB images")
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(0, 1)
    out = []
    for item in items:
        img = _to_pil(item, max_side=2 * size).resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    if not out:
        raise FsadError("support images: none given; pass at least one good image")
    return torch.stack(out)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def images_fingerprint(x: torch.Tensor) -> str:
    """Content hash of the (resized) support images: the cache key must change when the images do."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update((x.detach().cpu().numpy() * 255).round().astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- frozen/fine-tunable backbone features

def backbone_extractor(name: str, layers: Sequence[int] | None, weights: str = "auto",
                       device: torch.device | str | None = None) -> tuple[torch.nn.Module, dict]:
    """Frozen ``fewshot_core.backbones`` extractor (offline ImageNet weights; "random" for tests) + a description.

    ``layers=None`` takes the feature store's default (the stride-8 and stride-16 stages).
    """
    from fewshot_core.backbones import create_extractor, preprocess_config

    model = create_extractor(name, layers=layers, weights=weights, device=device)
    cfg = preprocess_config(name)
    return model, {"name": name, "layers": list(model.layers), "weights": model.weights.to_dict(),
                   "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def patch_embed(feature_maps: Sequence[torch.Tensor], out_dim: int | None = None) -> torch.Tensor:
    """Stage maps -> PatchCore patch features [n, d, h, w] (the feature store's own aggregation)."""
    from fewshot_core.features.patch import patch_features

    return patch_features(list(feature_maps), patch_dim=out_dim).permute(0, 3, 1, 2)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of [m, H, W] maps (σ in pixels, kernel 2·⌈4σ⌉+1 as in PatchCore/GLASS)."""
    if sigma <= 0:
        return maps
    radius = int(np.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(maps.dtype)
    x = maps.unsqueeze(1)
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1))
    return x.squeeze(1)


# ---------------------------------------------------------------- the trained-weights cache

def cached_fit(model, folder: Path | None, train) -> None:
    """Reload ``model`` from ``folder`` when it holds this very model, else run ``train()`` and save there.

    ``folder`` None: no cache. A folder that exists but is damaged, foreign or of an older format is a
    one-line error naming it (delete it to retrain), never silently overwritten or misread.
    """
    if folder is not None and folder.exists():
        load_state_into(model, folder, CACHE_REBUILD.format(folder=folder))
        return
    train()
    model.fitted_ = True
    if folder is not None:
        save_model(model, folder)


# ---------------------------------------------------------------- the common detector shell

class TrainedDetector(Detector):
    """Base of the one-class detectors that train on the support images.

    Subclasses hold their hyper-parameters as ``__init__`` keyword arguments (``image_size``, ``seed``,
    ``backbone``, ``backbone_weights`` among them) and implement ``_setup()`` (the untrained parts:
    frozen backbone, synthesis helpers), ``_train(x, gen) -> info`` (x: float [n, 3, S, S] on the device,
    under ``seeded(seed)``), ``get_state()`` / ``set_state()`` (extending this class's) and
    ``_score(x) -> (scores [m], maps [m, S, S])`` as tensors.

    ``fit`` reloads the trained weights from the runtime's artifact folder when they are there and trains
    only on a miss; ``fit_info_`` says what happened (steps, stopped_by, fit_s of the original training,
    loaded_from_artifact, device, and the method's own details). Maps come back at ``image_size`` pixels,
    already smoothed: ``map_sigma`` is 0, so ``anomaly_maps`` only rescales them.
    """

    input_kind = "images"
    map_sigma = 0.0
    # fit_info_ entries about this process, not about the trained model (never saved)
    _VOLATILE = ("loaded_from_artifact", "artifact", "device")

    def _setup(self) -> None:
        raise NotImplementedError

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ identity
    @property
    def backbone_name(self) -> str | None:
        """The frozen backbone's timm name (the ``backbone`` parameter)."""
        return self.backbone

    @property
    def bank_size(self) -> int:
        """The rows of a memory bank a detector builds from its trained features (``fit_info_["bank"]``)."""
        return int(self.fit_info_.get("bank", 0))

    def weights_info(self):
        """The resolved backbone weights (source, sha256, path) this detector starts from."""
        from fewshot_core.backbones import resolve_weights

        return resolve_weights(self.backbone, self.backbone_weights)

    def provenance(self) -> dict:
        info = self.weights_info()
        return {"backbone": self.backbone, "weights": {"source": info.source, "sha256": info.sha256}}

    def cache_key(self, x: torch.Tensor) -> str:
        """Hash of everything that shapes the trained weights: parameters (seed included), backbone weights
        and the support images; never the runtime (device, threads, artifact folder)."""
        return config_hash({"method": self.name, "version": self.version, "params": self.get_params(),
                            "provenance": self.provenance(), "support": images_fingerprint(x)})

    # ------------------------------------------------------------------ fit / score
    def fit(self, X) -> "TrainedDetector":
        """Train on good images ``X`` (float [n, 3, S, S] in [0, 1], or paths / PIL images / arrays)."""
        x = load_images(X, self.image_size)
        self.device_ = self.runtime.torch_device()
        root = self.runtime.artifacts
        folder = None if root is None else root / self.name / self.cache_key(x)

        def train():
            self._setup()
            t0 = time.perf_counter()
            with seeded(self.seed, self.device_) as gen:
                info = dict(self._train(x.to(self.device_), gen) or {})
            info.update(fit_s=round(time.perf_counter() - t0, 3), n_support=len(x))
            self.fit_info_ = {**info, "loaded_from_artifact": False}

        with self.runtime.thread_limit():
            cached_fit(self, folder, train)
        self.fit_info_.update(device=str(self.device_))
        if folder is not None:
            self.fit_info_["artifact"] = str(folder)
        return self

    @torch.no_grad()
    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [m] and anomaly maps [m, image_size, image_size] (float32, higher = more anomalous)."""
        self._check_fitted()
        items = torch.from_numpy(np.ascontiguousarray(X)) if _is_image_batch(X) else X
        items = items if isinstance(items, torch.Tensor) else list(items)
        batch = int(self.runtime.score_batch)
        scores, maps = [], []
        with self.runtime.thread_limit():
            for i in range(0, len(items), batch):
                x = load_images(items[i:i + batch], self.image_size).to(self.device_)
                s, m = self._score(x)
                scores.append(s.float().cpu().numpy())
                maps.append(m.float().cpu().numpy())
        return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)

    # ------------------------------------------------------------------ persistence (extended by subclasses)
    def get_state(self) -> dict:
        return {"info": {"fit": {k: v for k, v in self.fit_info_.items() if k not in self._VOLATILE}}}

    def set_state(self, state: dict) -> None:
        """The fitted state back (from ``get_state``); subclasses rebuild their networks after this."""
        self.device_ = self.runtime.torch_device()
        self.fit_info_ = {**(state.get("info") or {}).get("fit", {}), "loaded_from_artifact": True}
        self._setup()
