"""Shared machinery of the trained detectors (EfficientAD, GLASS, REB).

One place for what every training loop needs and must do the same way: seeding, device and mixed
precision choice, a step/time budget with progress, image loading into tensors, and a versioned
on-disk artifact keyed by a hash of (method, config, seed, support images) so evaluation reloads a
trained model instead of training again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot_core.atomic import atomic_write_bytes
from fewshot_core.device import resolve_device
from fewshot_core.errors import FsadError

# Bump when the artifact layout changes; old artifacts are then retrained instead of misread.
ARTIFACT_FORMAT = 1

ImageLike = str | os.PathLike | Image.Image | np.ndarray


# ---------------------------------------------------------------- seeding, device, precision

def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for the method's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def cpu_threads(n: int | None) -> None:
    """Cap intra-op threads (the benchmark machines are shared); ``None`` leaves torch's choice."""
    if n:
        torch.set_num_threads(int(n))


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


def load_images(items: Iterable[ImageLike] | torch.Tensor, size: int) -> torch.Tensor:
    """Images (paths, PIL, HxWx3 arrays, or a float tensor [n,3,H,W] in [0,1]) -> float32 [n,3,size,size] in [0,1]."""
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
    """Content hash of the (resized) support images: the artifact key must change when the images do."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update((x.detach().cpu().numpy() * 255).round().astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- versioned artifacts

def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def config_hash(payload: dict) -> str:
    """Stable short hash of a JSON-able dict (key order does not matter)."""
    text = json.dumps(_jsonable(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArtifactStore:
    """``<root>/<method>/<key>/{model.pt, meta.json}``; ``key`` is ``config_hash`` of everything that shaped training.

    ``model.pt`` is written before ``meta.json``, so a present meta means a complete artifact.
    """

    root: Path

    def dir_for(self, method: str, key: str) -> Path:
        return Path(self.root) / method / key

    def load(self, method: str, key: str, map_location: str | torch.device = "cpu") -> tuple[dict, dict] | None:
        d = self.dir_for(method, key)
        meta_path, model_path = d / "meta.json", d / "model.pt"
        if not meta_path.is_file() or not model_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FsadError(f"{meta_path}: unreadable artifact metadata ({exc}); delete {d} to retrain") from exc
        if meta.get("format") != ARTIFACT_FORMAT:
            return None  # older layout: retrain rather than misread
        try:
            state = torch.load(model_path, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated/corrupt file
            raise FsadError(f"{model_path}: cannot load trained weights ({exc}); delete {d} to retrain") from exc
        return state, meta

    def save(self, method: str, key: str, state: dict, meta: dict) -> Path:
        d = self.dir_for(method, key)
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(d / "model.pt", buf.getvalue())
        full_meta = {
            "format": ARTIFACT_FORMAT,
            "method": method,
            "key": key,
            "torch": torch.__version__,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **_jsonable(meta),
        }
        atomic_write_bytes(d / "meta.json", json.dumps(full_meta, indent=2, sort_keys=True).encode())
        return d


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


# ---------------------------------------------------------------- the common estimator shell

class TrainedDetector:
    """Base of the image-trained one-class detectors.

    Subclasses set ``name`` and ``version`` and implement ``_train(x, gen)`` (x: float [n,3,S,S] in [0,1]
    on the device), ``_state()`` / ``_load_state(state)`` and ``_score(x) -> (scores [m], maps [m,S,S])``.
    ``fit_images`` looks the trained weights up in the artifact store first and trains only on a miss.
    Anomaly maps come back at ``map_size`` = ``config.image_size`` pixels (resize to the mask size).
    """

    name = "trained"
    version = 1
    # Config fields that do not change the trained weights (kept out of the artifact key).
    runtime_fields = ("device", "amp", "progress", "threads", "artifact_dir", "score_batch")

    def __init__(self, config, artifact_dir: str | os.PathLike | None = None):
        self.config = config
        self.store = ArtifactStore(Path(artifact_dir)) if artifact_dir else None
        self.device = resolve_device(getattr(config, "device", None))
        self.train_summary: dict = {}
        self.meta: dict = {}
        self.loaded_from_artifact = False
        self.artifact_path: Path | None = None
        self._fitted = False

    @property
    def map_size(self) -> int:
        return int(self.config.image_size)

    def artifact_key(self, x: torch.Tensor, seed: int) -> str:
        cfg = {k: v for k, v in _jsonable(self.config).items() if k not in self.runtime_fields}
        return config_hash({"method": self.name, "version": self.version, "config": cfg, "seed": seed,
                            "support": images_fingerprint(x)})

    def fit_images(self, support: Iterable[ImageLike] | torch.Tensor, seed: int = 0) -> "TrainedDetector":
        cpu_threads(getattr(self.config, "threads", None))
        x = load_images(support, self.config.image_size)
        key = self.artifact_key(x, seed)
        if self.store is not None:
            hit = self.store.load(self.name, key, map_location=self.device)
            if hit is not None:
                state, meta = hit
                self._load_state(state)
                self.meta, self.train_summary = meta, meta.get("train", {})
                self.loaded_from_artifact, self._fitted = True, True
                self.artifact_path = self.store.dir_for(self.name, key)
                return self
        gen = seed_everything(seed)
        t0 = time.perf_counter()
        self.train_summary = dict(self._train(x.to(self.device), gen) or {})
        self.train_summary["fit_s"] = round(time.perf_counter() - t0, 3)
        self.meta = {"config": self.config, "seed": seed, "n_support": len(x), "train": self.train_summary,
                     "device": str(self.device), **self._extra_meta()}
        self._fitted, self.loaded_from_artifact = True, False
        if self.store is not None:
            self.artifact_path = self.store.save(self.name, key, self._state(), self.meta)
        return self

    @torch.no_grad()
    def score_images(self, query: Iterable[ImageLike] | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [m] and anomaly maps [m, map_size, map_size] (float32, higher = more anomalous)."""
        if not self._fitted:
            raise FsadError(f"{self.name}: score_images called before fit_images; fit on good images first")
        batch = int(getattr(self.config, "score_batch", 8) or 8)
        items = query if isinstance(query, torch.Tensor) else list(query)
        scores, maps = [], []
        for i in range(0, len(items), batch):
            x = load_images(items[i:i + batch], self.config.image_size).to(self.device)
            s, m = self._score(x)
            scores.append(s.float().cpu().numpy())
            maps.append(m.float().cpu().numpy())
        return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)

    # subclasses
    def _extra_meta(self) -> dict:
        return {}

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError

    def _load_state(self, state: dict) -> None:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


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


# ---------------------------------------------------------------- the evaluation path

def get_image_method(name: str, artifact_dir=None, **params) -> TrainedDetector:
    """A new image-trained detector ``name`` with config fields ``params`` (unknown fields: FsadError)."""
    from fewshot_core.methods import registry

    entry = registry.get(name, protocol=registry.ONECLASS)
    if entry.input_kind != registry.IMAGES:
        raise FsadError(f"method {name!r}: not an image-trained method; use one of "
                        f"{', '.join(registry.names(input_kind=registry.IMAGES, family=registry.ONECLASS))}")
    cls = entry.load_class()
    try:
        return cls(artifact_dir=artifact_dir, **params)
    except TypeError as exc:
        raise FsadError(f"method {name!r}: bad parameters {params} ({exc}); see {cls.__module__}") from exc


def _episode_images(dataset, ids, size: int, cache: dict | None) -> torch.Tensor:
    """Images of ``ids`` at ``size`` (float [n,3,S,S]); decoded once per (image, size) when a cache is given."""
    if cache is None:
        return load_images([dataset.by_id(i).path for i in ids], size)
    missing = [i for i in ids if (i, size) not in cache]
    if missing:
        for i, x in zip(missing, load_images([dataset.by_id(i).path for i in missing], size)):
            cache[(i, size)] = x
    return torch.stack([cache[(i, size)] for i in ids])


def run_image_episode(dataset, episode, method: str, method_params: dict | None = None, mask_size: int = 256,
                      artifact_dir="auto", details: dict | None = None, score_batch: int = 16,
                      cache: dict | None = None) -> dict:
    """The one-class protocol for image-trained methods: fit on the episode's support *images*, score its queries.

    Same row as ``evaluation.oneclass.run_oneclass_episode`` (image/pixel AUROC, F1-max, AUPRO, fit_s,
    score_s, ...), so the two kinds of methods sit in one table. ``fit_s`` is the training time, or the
    artifact load time when ``artifact_dir`` holds this exact model (``loaded_from_artifact`` says which);
    ``train_s`` is always the original training time. ``artifact_dir="auto"`` is ``$FSAD_HOME/artifacts``;
    None trains without saving. ``cache`` (a dict) keeps decoded images and masks across episodes.
    Anomaly maps come at the method's ``map_size`` and are resized bilinearly to ``mask_size``.
    """
    import torch.nn.functional as F  # noqa: F811

    from fewshot_core.evaluation.oneclass import episode_identity, query_metrics, score_in_batches

    if artifact_dir == "auto":  # trained weights live beside the feature store, so reruns reload them
        from fewshot_core.paths import default_work_dir

        artifact_dir = default_work_dir() / "artifacts"
    params = dict(method_params or {})
    model = get_image_method(method, artifact_dir=artifact_dir, **params)
    support = _episode_images(dataset, list(episode.support_ids), model.config.image_size, cache)
    t0 = time.perf_counter()
    model.fit_images(support, seed=int(episode.seed))
    fit_s = time.perf_counter() - t0

    query_ids = list(episode.query_ids)
    scores, maps, score_s = score_in_batches(
        query_ids, lambda ids: _episode_images(dataset, ids, model.config.image_size, cache), model.score_images,
        score_batch)
    def resize(batch: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(batch)[:, None], size=(mask_size, mask_size), mode="bilinear",
                             align_corners=False)[:, 0].numpy()

    labels, metrics = query_metrics(dataset, query_ids, scores, maps, resize, int(mask_size),
                                    {} if cache is None else cache)
    if details is not None:
        details.update(model=model, image_scores=scores, anomaly_maps=maps, labels=labels, query_ids=query_ids)
    return {
        **episode_identity(dataset, episode, method, _jsonable(model.config), getattr(model.config, "backbone", None),
                           None, len(query_ids), "none", mask_size),
        **metrics,
        "bank_size": int(model.train_summary.get("bank", 0)),
        "fit_s": round(fit_s, 4),
        "score_s": round(score_s, 4),
        "train_s": float(model.train_summary.get("fit_s", fit_s)),  # the original training, even when reloaded
        "train_steps": int(model.train_summary.get("steps", 0)),
        "stopped_by": str(model.train_summary.get("stopped_by", "")),
        "loaded_from_artifact": bool(model.loaded_from_artifact),
        "device": str(model.device),
    }
