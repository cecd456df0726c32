"""Weight resolution: explicit file > bundled offline Lite0/1/2 > timm pretrained download > error.

Random weights are never a fallback; they are used only for ``weights="random"`` and flagged
``is_random`` so every downstream result can say so.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from fewshot_core.backbones.lite_weights import (
    bundled_weights_path,
    is_efficientnet_pytorch_state_dict,
    to_timm_state_dict,
)
from fewshot_core import checksums
from fewshot_core.errors import FsadError

RANDOM_SEED = 0  # random init is seeded so "random" features are reproducible and cacheable
_HOW_TO = "pass --weights PATH to a local checkpoint (.pth/.pt/.bin/.safetensors) or --weights random"


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "file" | "bundled" | "timm" | "random"
    sha256: str | None
    path: str | None
    is_random: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path) -> str:
    path = Path(path)
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:  # size/mtime in the key: a changed file re-hashes
    return checksums.sha256_file(path)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("FSAD_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_weights(name: str, weights: str | os.PathLike | None = "auto") -> WeightsInfo:
    """Find the weights for backbone ``name`` without building the model (so the store can key on them)."""
    if weights is None or weights == "auto":
        bundled = bundled_weights_path(name)
        if bundled is not None:
            path, expected = bundled
            sha = sha256_file(path)
            if expected is not None and sha != expected:
                raise FsadError(f"{path}: bundled weights are corrupt (sha256 {sha[:12]}… != {expected[:12]}…); "
                                f"reinstall the package or {_HOW_TO}")
            return WeightsInfo("bundled", sha, str(path))
        return _resolve_timm(name)
    if weights == "random":
        return WeightsInfo("random", f"random-seed{RANDOM_SEED}", None, is_random=True)
    if weights == "timm":
        return _resolve_timm(name)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FsadError(f"{path}: weights file not found; {_HOW_TO}")
    return WeightsInfo("file", sha256_file(path), str(path.resolve()))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Quick TCP probe so an offline machine fails in seconds, not after the hub client's retries."""
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _resolve_timm(name: str) -> WeightsInfo:
    """Download (or find in the local cache) timm's pretrained checkpoint for ``name``."""
    # deferred: timm is heavy, and the code location loads this module without resolving weights
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise FsadError(f"{name}: no pretrained weights known to timm and none bundled; {_HOW_TO}")
    try:
        if cfg.hf_hub_id:
            # deferred: only a download needs the Hub client, off the code location's load
            from huggingface_hub import hf_hub_download

            from huggingface_hub import try_to_load_from_cache

            filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            cached = [p for f in filenames if isinstance(p := try_to_load_from_cache(cfg.hf_hub_id, f), str)]
            if cached:
                return WeightsInfo("timm", sha256_file(cached[0]), cached[0])
            if _offline() or not _reachable("https://huggingface.co"):
                raise ConnectionError("not in the local cache and huggingface.co is unreachable")
            last: Exception | None = None
            for filename in filenames:
                try:
                    path = hf_hub_download(cfg.hf_hub_id, filename)  # honours HF_HUB_OFFLINE (cache only)
                    break
                except Exception as exc:  # missing file variant or no network: try the next, then report
                    last = exc
            else:
                raise last  # type: ignore[misc]
        else:
            hub_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
            if not hub_file.is_file():
                if _offline() or not _reachable(cfg.url):
                    raise ConnectionError(f"{hub_file} not cached and {urlparse(cfg.url).hostname} is unreachable")
                hub_file.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(cfg.url, str(hub_file), progress=False)
            path = str(hub_file)
    except FsadError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise FsadError(f"{name}: no bundled weights and timm's pretrained download failed ({reason}); "
                        f"{_HOW_TO}") from None
    return WeightsInfo("timm", sha256_file(path), str(path))


def read_state_dict(path: str | Path) -> dict:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            # deferred: only .safetensors checkpoints need it, off the code location's load
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FsadError(f"{path}: cannot read weights ({type(exc).__name__}); {_HOW_TO}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise FsadError(f"{path}: not a state dict; {_HOW_TO}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: torch.nn.Module, info: WeightsInfo) -> None:
    """Load a local file (``file``/``bundled``) into a full timm ``model`` strictly; a mismatch names the file.

    timm downloads are loaded by timm itself (``pretrained_cfg_overlay``), which applies its checkpoint filters.
    """
    if info.is_random:
        return
    state = read_state_dict(info.path)
    if is_efficientnet_pytorch_state_dict(state):
        try:
            state = to_timm_state_dict(state, [len(stage) for stage in model.blocks])
        except (KeyError, AttributeError) as exc:
            raise FsadError(f"{info.path}: efficientnet_pytorch weights do not fit this backbone ({exc}); "
                            f"choose the matching tf_efficientnet_lite* backbone") from None
    problem = _try_load(model, state)
    if problem:
        # original-source checkpoints (DINO, CLIP, ...): timm's own key/shape adapter for this architecture
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        try:
            filtered = filter_fn(state, model) if filter_fn is not None else None
        except Exception:  # the adapter does not apply to this file: report the plain mismatch
            filtered = None
        if filtered is not None and _try_load(model, filtered) is None:
            return
        raise FsadError(f"{info.path}: weights do not match the backbone ({problem}); "
                        f"pass weights trained for this architecture")


def _try_load(model: torch.nn.Module, state: dict) -> str | None:
    """Load non-strictly and describe any mismatch (None = every key matched in name and shape)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        return str(exc).strip().splitlines()[-1].strip()[:150]
    if result.missing_keys or result.unexpected_keys:
        return (f"{len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:2]}; "
                f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]}")
    return None
