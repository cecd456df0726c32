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


def _named(name: str, path: Path) -> str:
    """``--out /x``, ``FSAD_HOME=/x`` or just ``/x``."""
    return f"{name}{path}" if name.endswith("=") else f"{name} {path}".strip()


def require_folder(path, fix: str, name: str = "") -> Path:
    """``path`` is a folder or can become one: neither it nor a parent is a file. Else one line naming
    it (after ``name``, the option or variable that gave it) and ``fix``, instead of a
    ``FileExistsError`` or ``NotADirectoryError`` traceback from the first ``mkdir`` or ``open``."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.is_dir():
            break
        if part.exists() or part.is_symlink():
            where = _named(name, path) + (f": {part}" if part != path else "")
            raise FsadError(f"{where} is a file, not a folder; {fix}")
    return path


def require_file_path(path, fix: str, name: str = "") -> Path:
    """``path`` names a file to write, not an existing folder (the reverse of ``require_folder``)."""
    path = Path(path)
    if path.is_dir():
        raise FsadError(f"{_named(name, path)} is a folder, not a file; {fix}")
    require_folder(path.parent, fix, name)
    return path


def path_kind_error(exc: OSError, fix: str | None = None) -> FsadError | None:
    """A one-line error for a file found where a folder was expected (or the reverse) that reached the
    CLI from anywhere; None for other errors."""
    if exc.errno not in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST) or not exc.filename:
        return None
    path = Path(exc.filename)
    tail = f"; {fix}" if fix else ""
    if exc.errno == errno.EISDIR:
        return FsadError(f"{path} is a folder, not a file{tail}")
    for part in (path, *path.parents):
        if part.is_dir():
            return None  # EEXIST of an existing folder is not a mix-up of files and folders
        if part.exists():
            return FsadError(f"{part} is a file, not a folder{tail}")
    return None


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
