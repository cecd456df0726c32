"""Content fingerprints of a dataset's images, so a partition is keyed on what the pixels are, not on names.

Every image is identified by the sha256 of its bytes. Hashing a category on every call would cost a
full read of the dataset, so the store keeps a cache of ``path -> (size, mtime, ctime, inode, sha256)``
beside its partitions: a file whose stat still matches its entry reuses the hash, any other file is
hashed again. ``ctime`` is part of the match because restoring ``mtime`` (``touch -d``, ``cp -p``)
still moves it. As in git's "racily clean" rule, an entry is trusted only when the file's timestamps
are older than the moment it was hashed by more than the filesystem's timestamp granularity: a file
rewritten right after it was hashed could otherwise keep the same size and timestamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fewshot_core.atomic import atomic_write_text
from fewshot_core.errors import FsadError

CACHE_NAME = ".file-hashes.json"
CACHE_VERSION = 1
# Coarser than any local filesystem's timestamp tick (ext4/xfs/tmpfs: ns to a few ms; FAT: 2 s).
RACY_NS = 2_000_000_000


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class HashCache:
    """The store's ``path -> sha256`` cache; a missing or unreadable cache file only costs re-hashing."""

    def __init__(self, file: str | Path | None):
        self.file = None if file is None else Path(file)
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.file is not None:
            self.entries = self._read(self.file)

    @staticmethod
    def _read(file: Path) -> dict:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def lookup(self, path: str, st: os.stat_result) -> str | None:
        entry = self.entries.get(path)
        if not isinstance(entry, list) or len(entry) != 6 or entry[:4] != _stat_key(st):
            return None
        hashed_ns = entry[5]
        if max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS > hashed_ns:
            return None  # modified too close to the hashing to trust the timestamps
        return entry[4]

    def record(self, path: str, st: os.stat_result, sha: str, hashed_ns: int) -> None:
        self.entries[path] = [*_stat_key(st), sha, hashed_ns]
        self.dirty = True

    def save(self) -> None:
        """Merge with entries other processes saved meanwhile and write atomically; best effort."""
        if self.file is None or not self.dirty:
            return
        merged = {**self._read(self.file), **self.entries}
        try:
            atomic_write_text(self.file, json.dumps({"version": CACHE_VERSION, "entries": merged}))
        except OSError:
            pass  # read-only or full store: the hashes are recomputed next time, nothing is wrong
        self.dirty = False


def content_hashes(records, cache: HashCache | None = None, threads: int = 4) -> dict[str, str]:
    """``image_id -> sha256`` of each record's file (cached hashes reused where the file is unchanged)."""
    cache = cache or HashCache(None)
    out: dict[str, str] = {}
    todo: list[tuple[str, str, os.stat_result]] = []
    for r in records:
        path = str(Path(r.path).absolute())
        try:
            st = os.stat(path)
        except OSError:
            raise FsadError(f"{r.path}: image listed in the dataset is missing; re-read the dataset folder") from None
        sha = cache.lookup(path, st)
        if sha is None:
            todo.append((r.image_id, path, st))
        else:
            out[r.image_id] = sha

    def hash_one(item):
        image_id, path, st = item
        started = time.time_ns()
        try:
            sha = sha256_of(path)
            after = os.stat(path)
        except OSError as exc:
            raise FsadError(f"{path}: image unreadable ({exc.strerror}); check the dataset folder") from None
        if _stat_key(after) != _stat_key(st):
            raise FsadError(f"{path}: image changed while it was being read; rerun when the dataset is stable")
        return image_id, path, after, sha, started

    if todo:
        # hashlib releases the GIL on large buffers, so a few threads overlap reads and hashing
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            for image_id, path, st, sha, started in pool.map(hash_one, todo):
                out[image_id] = sha
                cache.record(path, st, sha, started)
        cache.save()
    return out


def fingerprint_of(hashes: dict[str, str]) -> str:
    """sha256 over the sorted (image_id, content sha256) pairs: same images, same bytes -> same partition."""
    digest = hashlib.sha256()
    for image_id in sorted(hashes):
        digest.update(f"{image_id}\0{hashes[image_id]}\n".encode())
    return digest.hexdigest()


def describe_changes(old: dict[str, str], new: dict[str, str], limit: int = 3) -> tuple[str, dict]:
    """One-line summary of how ``new`` differs from ``old`` (image_id -> sha256), and the same as a record."""
    changed = sorted(i for i in new.keys() & old.keys() if new[i] != old[i])
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    parts = []
    for label, ids in (("changed content", changed), ("added", added), ("removed", removed)):
        if ids:
            shown = ", ".join(ids[:limit]) + (f", ... (+{len(ids) - limit})" if len(ids) > limit else "")
            parts.append(f"{len(ids)} {label} ({shown})")
    record = {"changed": changed, "added": added, "removed": removed}
    return ("; ".join(parts) or "no image changed"), record
