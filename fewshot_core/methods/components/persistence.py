"""One save/load for every method: a folder with a small manifest plus the method's arrays and weights.

    <folder>/fsad_model.json   format, format_version, method, method_version, params, provenance
                               (backbone, weights hash), code_version, created_utc, files {name: sha256}, info,
                               manifest_sha256 (of the manifest's other fields: an edited threshold is refused)
    <folder>/arrays.npz        numpy state (memory banks, densities, prototypes), no pickle
    <folder>/tensors.pt        torch state (network weights), loaded with ``weights_only=True``

The folder is written aside and renamed into place, so a reader never sees half a model; every file's
checksum, and the manifest's own, is verified on load. A folder of an older format, of another method version or of something
else entirely is refused with one line that says how to rebuild it. This is the folder the MLflow model
wraps and the trained detectors cache their weights in.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_core import __version__
from fewshot_core.atomic import replace_dir
from fewshot_core.checksums import sha256_file
from fewshot_core.errors import FsadError
from fewshot_core.methods import registry

MANIFEST = "fsad_model.json"
FORMAT = "fsad-model"
FORMAT_VERSION = 2  # 2: the manifest carries the checksum of its own body
MANIFEST_DIGEST = "manifest_sha256"
ARRAYS = "arrays.npz"
TENSORS = "tensors.pt"
REBUILD = "rebuild it: rerun the evaluation that produced it, or fit the method and call save(folder)"


def jsonable(obj: Any) -> Any:
    """Parameters and info as plain JSON values (dataclasses, tuples, paths, numpy scalars)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    return obj


def config_hash(payload: dict) -> str:
    """Stable short hash of a JSON-able dict (key order does not matter)."""
    text = json.dumps(jsonable(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its digest field, as canonical JSON (key order and indentation do not
    count, every value does)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_state(tmp: Path, state: dict) -> dict[str, str]:
    files = {}
    arrays = {k: np.ascontiguousarray(v) for k, v in (state.get("arrays") or {}).items()}
    if arrays:
        np.savez(tmp / ARRAYS, **arrays)
        files[ARRAYS] = sha256_file(tmp / ARRAYS)
    tensors = state.get("tensors") or {}
    if tensors:
        # deferred: torch is heavy, and `fsad --help` loads this module (test_help_fast)
        import torch

        buf = io.BytesIO()
        torch.save(tensors, buf)
        (tmp / TENSORS).write_bytes(buf.getvalue())
        files[TENSORS] = sha256_file(tmp / TENSORS)
    return files


def save_model(model, folder, extra: dict | None = None) -> Path:
    """Write ``model`` (fitted) into ``folder``, replacing an earlier save there atomically."""
    model._check_fitted()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = model.get_state()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files = _write_state(tmp, state)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": model.name,
            "method_version": model.version,
            "params": jsonable(model.get_params()),
            "provenance": jsonable(model.provenance()),
            "code_version": __version__,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            "info": jsonable(state.get("info") or {}),
            **({"extra": jsonable(extra)} if extra else {}),
        }
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_manifest(folder, rebuild: str = REBUILD) -> dict:
    """The manifest of a saved model folder; anything else is a one-line error saying how to rebuild
    (``rebuild``: that advice, e.g. a cache's "delete it to retrain")."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FsadError(f"{folder}: no saved fsad model there (not a folder); {rebuild}")
    if not path.is_file():
        raise FsadError(f"{folder}: not a saved fsad model ({MANIFEST} missing; an older or foreign folder); {rebuild}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FsadError(f"{path}: unreadable model manifest ({exc}); {rebuild}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FsadError(f"{path}: not an fsad model manifest; {rebuild}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FsadError(f"{path}: model format v{manifest.get('format_version')}, this fsad reads "
                        f"v{FORMAT_VERSION}; {rebuild}")
    if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        raise FsadError(f"{path}: model manifest damaged (its checksum does not match: edited or corrupted after "
                        f"saving); {rebuild}")
    return manifest


def read_state(folder, manifest: dict, rebuild: str = REBUILD) -> dict:
    """The state files of ``folder``, each verified against the manifest's checksum."""
    folder = Path(folder)
    state: dict = {"info": manifest.get("info") or {}}
    for name, digest in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise FsadError(f"{path}: missing or damaged (checksum mismatch); {rebuild}")
    if ARRAYS in manifest.get("files", {}):
        with np.load(folder / ARRAYS, allow_pickle=False) as data:
            state["arrays"] = {k: data[k] for k in data.files}
    if TENSORS in manifest.get("files", {}):
        # deferred: torch is heavy, and `fsad --help` loads this module (test_help_fast)
        import torch

        state["tensors"] = torch.load(folder / TENSORS, map_location="cpu", weights_only=True)
    return state


def load_model(folder, runtime=None):
    """Rebuild the fitted method saved in ``folder`` (any method: the manifest names it)."""
    manifest = read_manifest(folder)
    name = manifest.get("method")
    if name not in registry.REGISTRY:
        raise FsadError(f"{Path(folder) / MANIFEST}: method {name!r} is not known to this fsad; {REBUILD}")
    cls = registry.get(name).load_class()
    if manifest.get("method_version") != cls.version:
        raise FsadError(f"{Path(folder) / MANIFEST}: {name} state v{manifest.get('method_version')}, this fsad "
                        f"reads v{cls.version}; {REBUILD}")
    model = registry.create(name, **manifest.get("params", {}))
    model.set_runtime(runtime)
    model.set_state(read_state(folder, manifest))
    model.fitted_ = True
    return model


def load_state_into(model, folder, rebuild: str = REBUILD) -> dict:
    """Give the unfitted ``model`` the state saved in ``folder`` and return the manifest, verified to be of
    the same method, method version and parameters (a cache folder found by key must hold that very model)."""
    manifest = read_manifest(folder, rebuild)
    path = Path(folder) / MANIFEST
    if manifest.get("method") != model.name or manifest.get("method_version") != model.version:
        raise FsadError(f"{path}: holds {manifest.get('method')} state v{manifest.get('method_version')}, not "
                        f"{model.name} v{model.version}; {rebuild}")
    if manifest.get("params") != jsonable(model.get_params()):
        raise FsadError(f"{path}: saved with other {model.name} parameters than asked for; {rebuild}")
    model.set_state(read_state(folder, manifest, rebuild))
    model.fitted_ = True
    return manifest


# What a damaged, foreign or outdated trained-weights cache folder tells the user (training again rebuilds it).
CACHE_REBUILD = "delete {folder} to retrain"


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
