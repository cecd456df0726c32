"""Atomic file writes: write a temporary sibling, then ``os.replace`` it over the target.

Readers never see half a file, and a failed or interrupted write leaves the earlier file intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path, write: Callable[[str], None], suffix: str = ".tmp", mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then move it into place.

    ``suffix`` matters for writers that append their own extension (``np.savez`` adds ``.npz``);
    ``mode`` sets the permissions (``mkstemp`` creates 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode=mode)


def atomic_write_text(path, text: str, mode: int | None = None) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=mode)


def replace_dir(tmp, target) -> Path:
    """Move the finished folder ``tmp`` into place at ``target`` (a sibling), replacing an earlier one: the
    old folder is moved aside first (``os.replace`` cannot overwrite a non-empty folder), then deleted."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
