"""Output folders: one-line errors instead of ``OSError`` tracebacks when a folder cannot be written.

A read-only mount, a folder without write permission or a full disk are user-fixable situations; the
message names the folder and what to do about it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from fewshot_core.errors import FsadError

# errno -> (what happened, generic remedy); the caller's ``fix`` says which option or variable to change
WRITE_ERRNOS = {
    errno.EROFS: ("read-only file system", "remount it read-write or choose another folder"),
    errno.EACCES: ("permission denied", "fix its permissions or choose another folder"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose another folder"),
    errno.ENOSPC: ("no space left on the device", "free space there or choose another folder"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another folder"),
}


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def _existing_folder(path: Path) -> Path:
    """The folder the failure is about: the path if it is a folder, else its nearest existing parent."""
    path = Path(path)
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def write_error(exc: OSError, path=None, fix: str | None = None) -> FsadError:
    """A one-line ``FsadError`` for a failed write: the folder, the reason, the fix."""
    what, remedy = WRITE_ERRNOS.get(exc.errno, (exc.strerror or type(exc).__name__, "choose another folder"))
    where = Path(path or exc.filename or ".")
    folder = _existing_folder(where) if not where.is_dir() else where
    detail = f"{what}, at {where}" if where != folder else what
    return FsadError(f"{folder}: cannot write there ({detail}); {fix or remedy}")


def require_writable(folder, fix: str | None = None, min_free_mb: float = 0) -> Path:
    """Create ``folder`` if needed and prove a file can be created in it; else a one-line FsadError.

    For commands that always write (``fsad run``, ``fsad data manifest``): failing before any work is
    done beats failing minutes later with half the outputs written. ``min_free_mb``: also refuse a
    folder with less free space than that (an empty probe file fits even on a full disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fsad-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        free_mb = shutil.disk_usage(folder).free / 2**20
    except OSError as exc:
        raise write_error(exc, folder, fix) from None
    if free_mb < min_free_mb:
        what, remedy = WRITE_ERRNOS[errno.ENOSPC]
        raise FsadError(f"{folder}: cannot write there ({what}: {free_mb:.1f} MiB free, {min_free_mb:g} MiB "
                        f"needed); {fix or remedy}")
    return folder
