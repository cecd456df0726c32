"""Checksums of a partition's files, recorded in ``meta.json`` at build time and verified on load.

Each file is hashed in fixed blocks (sha256 of every ``BLOCK`` bytes; the file's checksum is the sha256
over its block digests). Blocks let a load verify a few sampled blocks instead of the whole file, and
let a full verification name where a file is damaged.

Loading is cheap but not blind: sizes and the small files are always checked; the big arrays are
verified in full whenever any file's stat (size, mtime, ctime, inode) differs from the stamp written by
the last full verification (``.verified.json``), so any write to a file since then is caught, and
otherwise a few random blocks are verified, which catches damage that left the timestamps alone
(bit rot, a restored backup) over repeated loads. ``fsad store verify`` checks every block.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

from fewshot_core.atomic import atomic_write_text
from fewshot_core.features.fingerprint import RACY_NS

BLOCK = 4 << 20
ALGORITHM = "sha256-blocks"
STAMP = ".verified.json"
ARRAY_FILES = ("patch.npy", "global.npy")
DATA_FILES = ARRAY_FILES + ("index.parquet",)
SAMPLED_BLOCKS = 2  # per large array file on a load whose stamp matches


def _block_digest(data) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _file_digest(blocks: list[str]) -> str:
    return hashlib.sha256("".join(blocks).encode()).hexdigest()


class BlockHasher:
    """Hashes a byte stream written in arbitrary pieces into fixed blocks, without copying the pieces."""

    def __init__(self):
        self.size = 0
        self.blocks: list[str] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(BLOCK - self._filled, len(view))
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == BLOCK:
                self.blocks.append(self._current.hexdigest()[:32])
                self._current, self._filled = hashlib.sha256(), 0

    def record(self) -> dict:
        blocks = self.blocks + ([self._current.hexdigest()[:32]] if self._filled else [])
        return {"size": self.size, "algorithm": ALGORITHM, "block_size": BLOCK, "blocks": blocks,
                "sha256_blocks": _file_digest(blocks)}


def checksum_file(path: str | Path) -> dict:
    hasher = BlockHasher()
    with open(path, "rb") as fh:
        while chunk := fh.read(BLOCK):
            hasher.update(chunk)
    return hasher.record()


def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def write_stamp(folder: Path, names=DATA_FILES) -> None:
    """Record the files' stat after a full verification (best effort: a read-only store keeps none)."""
    try:
        stamp = {"verified_ns": time.time_ns(), "files": {n: _stat_key(folder / n) for n in names}}
        atomic_write_text(folder / STAMP, json.dumps(stamp))
    except OSError:
        pass


def _stamp_matches(folder: Path, names) -> bool:
    try:
        stamp = json.loads((folder / STAMP).read_text())
        verified = int(stamp["verified_ns"])
        for n in names:
            key = _stat_key(folder / n)
            if stamp["files"][n] != key or max(key[1], key[2]) + RACY_NS > verified:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_blocks(path: Path, record: dict, which) -> str | None:
    """None when the listed blocks match ``record``, else a short description of the first mismatch."""
    blocks, size = record["blocks"], record["size"]
    with open(path, "rb") as fh:
        for i in which:
            fh.seek(i * record["block_size"])
            want = min(record["block_size"], size - i * record["block_size"])
            data = fh.read(want)
            if len(data) != want:
                return f"{path.name}: truncated"
            if _block_digest(data) != blocks[i]:
                return (f"{path.name}: checksum mismatch in block {i + 1} of {len(blocks)} "
                        f"(bytes {i * record['block_size']}-{i * record['block_size'] + want})")
    return None


def check_files(folder: str | Path, files: dict, mode: str = "full") -> list[str]:
    """Problems found in ``folder``'s data files against their ``meta.json`` records ([] = intact).

    ``mode``: "full" hashes every block of every file; "auto" does so only when the files changed since
    the last full verification (then records a new stamp) and otherwise samples; "size" checks sizes only.
    """
    folder = Path(folder)
    problems = []
    for name in DATA_FILES:
        rec = files.get(name) if isinstance(files, dict) else None
        path = folder / name
        if not isinstance(rec, dict) or rec.get("algorithm") != ALGORITHM:
            problems.append(f"{name}: no checksum recorded in meta.json")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != rec["size"]:
            got = path.stat().st_size
            problems.append(f"{name}: {'truncated' if got < rec['size'] else 'grown'} "
                            f"({got} bytes, {rec['size']} recorded)")
    if problems or mode == "size":
        return problems
    full = mode == "full" or not _stamp_matches(folder, DATA_FILES)
    for name in DATA_FILES:
        rec = files[name]
        n = len(rec["blocks"])
        if full or name not in ARRAY_FILES or n <= SAMPLED_BLOCKS:
            which = range(n)
        else:
            which = sorted(random.sample(range(n), SAMPLED_BLOCKS))
        problem = _check_blocks(folder / name, rec, which)
        if problem:
            problems.append(problem)
    if not problems and full:
        write_stamp(folder)
    return problems
