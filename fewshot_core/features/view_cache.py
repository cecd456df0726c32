"""Augmented views of a partition's images, kept on disk inside the partition folder.

``augment="images"`` embeds every support image again flipped and rotated: at 16 shots that is 80
forward passes per evaluation, more than its fit and scoring together. A view depends only on what the
partition key already fixes (backbone, weights, layers, image size, patch reduction) and on the image, so
it is written once under ``<partition>/views/`` and read back by later seeds, settings and processes.

One file per (image row, transform), ``<row>-<transform>-<sha256[:16]>.npy``, float16 like the store. The
name carries the checksum of the file's bytes, so a reader verifies what it loads without an index that
concurrent writers would have to share; a damaged file is deleted and its view embedded again. Writes are
atomic, so two evaluations of one partition at worst embed a view twice. Rebuilding a partition replaces
its folder, views included; ``meta.json``'s checksums cover only the store's own files.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from pathlib import Path

import numpy as np

from fewshot_core.atomic import atomic_write_bytes

FOLDER = "views"
_NAME = re.compile(r"^(\d+)-([a-z0-9]+)-([0-9a-f]{16})\.npy$")


class ViewCache:
    """Read and write the views of one partition (``partition.path``, ``grid``, ``patch_dim``)."""

    def __init__(self, partition):
        self.folder = Path(partition.path) / FOLDER
        self.shape = (*partition.grid, partition.patch_dim)
        self.writable = True
        self._files: dict[tuple[int, str], Path] = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                match = _NAME.match(path.name)
                if match:
                    self._files.setdefault((int(match[1]), match[2]), path)

    def get(self, row: int, transform: str) -> np.ndarray | None:
        """The stored float16 view [h, w, d], or None when absent or damaged (a damaged file is removed)."""
        path = self._files.get((row, transform))
        if path is None:
            return None
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest()[:16] != _NAME.match(path.name)[3]:
                raise ValueError("checksum mismatch")
            view = np.load(io.BytesIO(data), allow_pickle=False)
            if view.shape != self.shape or view.dtype != np.float16:
                raise ValueError(f"shape {view.shape} {view.dtype}, expected {self.shape} float16")
        except (OSError, ValueError) as exc:
            print(f"fsad: {path}: damaged augmented view ({exc}); embedding it again", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            del self._files[(row, transform)]
            return None
        return view

    def put(self, row: int, transform: str, view: np.ndarray) -> None:
        """Store ``view`` (float16 [h, w, d]); a folder that cannot be written (a read-only store) only
        costs the re-embedding next time, so it is reported once and otherwise ignored."""
        if not self.writable or (row, transform) in self._files:
            return
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(view, dtype=np.float16), allow_pickle=False)
        data = buf.getvalue()
        path = self.folder / f"{row}-{transform}-{hashlib.sha256(data).hexdigest()[:16]}.npy"
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            self.writable = False
            print(f"fsad: {self.folder}: cannot keep augmented views ({exc.strerror}); they are embedded "
                  f"again on every run", file=sys.stderr, flush=True)
            return
        self._files[(row, transform)] = path
