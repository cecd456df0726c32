"""Where things live: shared real data, default stores. One place, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_root() -> Path:
    """The ``../shared`` folder beside the project (override with ``FSAD_SHARED``)."""
    return Path(os.environ.get("FSAD_SHARED", PROJECT_ROOT.parent / "shared"))


def shared_mvtec_root() -> Path | None:
    """MVTec AD root with real data: ``MVTEC_ROOT`` when set, else ``../shared/data/mvtec_ad``; None if absent."""
    env = os.environ.get("MVTEC_ROOT")
    root = Path(env) if env else shared_root() / "data" / "mvtec_ad"
    return root if root.is_dir() else None


def default_work_dir() -> Path:
    """Writable working folder for caches and outputs (``FSAD_HOME``, default ``<project>/.fsad``)."""
    return Path(os.environ.get("FSAD_HOME", PROJECT_ROOT / ".fsad"))


def default_store_dir() -> Path:
    return default_work_dir() / "features"
