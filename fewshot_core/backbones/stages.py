"""The feature stages of a timm backbone (channels, stride and module of each) and the layer choice.

Reading ``feature_info`` means building the model (on the meta device, no weights), which imports timm and
with it torchvision and torch._dynamo: seconds of start-up that a cached ``fsad evaluate`` needs for nothing
else. The stages depend only on the model name and timm's version, so they are kept on disk per timm version
(``$FSAD_HOME/cache/stage_info-timm-<version>.json``); an unreadable or foreign file is rebuilt, and a
cache folder that cannot be written only costs the import.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fewshot_core.atomic import atomic_write_text
from fewshot_core.errors import FsadError
from fewshot_core.paths import default_work_dir

_MEMO: dict[str, list[dict]] = {}


def _cache_file() -> Path | None:
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    return default_work_dir() / "cache" / f"stage_info-timm-{timm_version}.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid(infos) -> bool:
    return (isinstance(infos, list) and bool(infos)
            and all(isinstance(f, dict) and isinstance(f.get("num_chs"), int) and isinstance(f.get("reduction"), int)
                    for f in infos))


def _from_timm(name: str) -> list[dict]:
    # deferred: only a cache miss builds the model; `resolve_layers` from the cache stays free of timm
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise FsadError(f"{name}: unknown timm backbone; pick a name from timm.list_models()") from None
        raise
    return [dict(f) for f in model.feature_info]


def stage_info(name: str) -> list[dict]:
    """``feature_info`` of ``name`` (one dict per stage: ``num_chs``, ``reduction``, ``module``, ...)."""
    if name not in _MEMO:
        path = _cache_file()
        cached = _read_cache(path).get(name) if path is not None else None
        if _valid(cached):
            _MEMO[name] = cached
        else:
            _MEMO[name] = _from_timm(name)
            if path is not None:
                _write_cache(path, name, _MEMO[name])
    return [dict(f) for f in _MEMO[name]]


def _write_cache(path: Path, name: str, infos: list[dict]) -> None:
    data = _read_cache(path)  # another process may have added other backbones meanwhile
    data[name] = infos
    try:
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except (OSError, TypeError, ValueError):
        pass  # read-only work folder, or a stage record JSON cannot hold: the next call builds it again


def default_layers(feature_info: list[dict]) -> tuple[int, int]:
    """PatchCore's choice: the two mid-level stages, i.e. those at stride 8 and 16 when the model has them."""
    reductions = [int(f["reduction"]) for f in feature_info]
    if 8 in reductions and 16 in reductions:
        return reductions.index(8), reductions.index(16)
    mid = len(feature_info) // 2  # e.g. ViTs: every block has stride 16; take two from the middle
    return max(mid - 1, 0), mid


def resolve_layers(name: str, layers=None) -> tuple[int, ...]:
    """Validated stage indices for ``name`` (``None`` -> ``default_layers``)."""
    infos = stage_info(name)
    chosen = tuple(int(i) for i in (layers if layers is not None else default_layers(infos)))
    if not chosen or any(i < 0 or i >= len(infos) for i in chosen) or list(chosen) != sorted(set(chosen)):
        raise FsadError(f"{name}: layers {list(chosen)} invalid; choose increasing stage indices "
                        f"0..{len(infos) - 1} (strides {[f['reduction'] for f in infos]})")
    return chosen
