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


@contextlib.contextmanager
def file_lock(path, on_wait: Callable[[], None] | None = None, poll_s: float = 0.1) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Blocks while another process holds it; ``on_wait`` is called once when that happens (to say why
    the command pauses).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                while True:  # polling rather than a blocking flock: Ctrl-C stays responsive
                    time.sleep(poll_s)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        continue
        yield path
    finally:
        os.close(fd)  # releases the lock
