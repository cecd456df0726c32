"""Where things live: shared real data, default stores. One place, overridable by environment.

Writable defaults come from the environment (``FSAD_HOME``, ``DAGSTER_HOME``) or the current directory,
never from where the package is installed: in a wheel install that is a read-only ``site-packages``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fewshot_core.outputs import require_folder


def source_checkout() -> Path | None:
    """The source checkout this package runs from (the folder holding its ``pyproject.toml``), else None
    (an installed wheel). Only for read-only look-ups: the git commit, ``../shared`` beside a checkout."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def shared_root() -> Path:
    """``FSAD_SHARED``, else the ``shared`` folder beside the checkout (or beside the current directory)."""
    if env := os.environ.get("FSAD_SHARED"):
        return Path(env)
    return (source_checkout() or Path.cwd()).parent / "shared"


def shared_mvtec_root() -> Path | None:
    """MVTec AD root with real data: ``MVTEC_ROOT`` when set, else ``../shared/data/mvtec_ad``; None if absent."""
    env = os.environ.get("MVTEC_ROOT")
    root = Path(env) if env else shared_root() / "data" / "mvtec_ad"
    return root if root.is_dir() else None


def _env_folder(name: str, default: Path) -> Path:
    """The folder an environment variable names (refused in one line when it is a file), else ``default``."""
    value = os.environ.get(name)
    if not value:
        return default
    return require_folder(Path(value), f"set {name} to a folder (or unset it)", name=f"{name}=")


def shared_mtd_root() -> Path | None:
    """Magnetic Tile Defects root (MVTec layout, category ``magnetic_tile``): ``MTD_ROOT`` when set, else
    ``../shared/data/mtd``; None if absent."""
    env = os.environ.get("MTD_ROOT")
    root = Path(env) if env else shared_root() / "data" / "mtd"
    return root if root.is_dir() else None


def dagster_home() -> Path:
    """The Dagster instance folder (also holding the MLflow store): ``DAGSTER_HOME``, else ``./dagster_home``."""
    return _env_folder("DAGSTER_HOME", Path.cwd() / "dagster_home")


def default_work_dir() -> Path:
    """Writable working folder for caches and outputs: ``FSAD_HOME``, else ``./.fsad``."""
    return _env_folder("FSAD_HOME", Path.cwd() / ".fsad")


def default_store_dir() -> Path:
    return default_work_dir() / "features"
