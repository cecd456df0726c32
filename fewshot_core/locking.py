"""An inter-process lock on a file, for one-time initialisation that several processes may race on.

``fcntl.flock`` locks belong to the open file: the kernel drops them when the holder exits, even on
kill -9, so a crashed process never leaves a stale lock behind (unlike a lock file that is created
and deleted).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; initialisation is then not guarded
    fcntl = None


class LockBusy(Exception):
    """``file_lock(..., wait=False)`` found the lock held; ``holder`` is the pid written in it ("?" if none)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: held by pid {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def file_lock(path, on_wait: Callable[[], None] | None = None, poll_s: float = 0.1,
              wait: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Blocks while another process holds it; ``on_wait`` is called once when that happens (to say why
    the command pauses). ``wait=False``: raise ``LockBusy`` instead of waiting. The holder's pid is
    written into the file, for the message of whoever finds it busy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockBusy(path, os.pread(fd, 32, 0).decode(errors="replace").strip() or "?") from None
                if on_wait is not None:
                    on_wait()
                while True:  # polling rather than a blocking flock: Ctrl-C stays responsive
                    time.sleep(poll_s)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # the pid only serves the message of a process finding the lock busy
        yield path
    finally:
        os.close(fd)  # releases the lock
