"""The on-disk feature store: one partition per (backbone, weights, image size, layers, patch dim, category, images).

A partition is a folder named by its key holding

- ``patch.npy``   float16 [N, h, w, d]  PatchCore patch features (memory-mapped on read)
- ``global.npy``  float16 [N, D]        pooled pre-classifier embeddings
- ``index.parquet``                     image_id -> row, the image's content sha256 (plus split/defect_type/label)
- ``meta.json``                         backbone, weights source + sha256, preprocessing, grid, versions,
                                        and a block checksum of each of the three files above

The key covers the images' *content* (``fingerprint``), so an image rewritten in place gives a new
partition, and the build says what changed against the last partition of the same settings. Loads verify
the files against ``meta.json`` (``integrity``); a damaged partition is reported in one line and rebuilt.

A build writes into a hidden temporary folder and renames it into place only when complete, so a crash
never leaves a visible half partition. It holds a per-key lock file (``.locks/<key>.lock``, ``lockf``)
while it builds: a second process asking for the same partition waits and then reuses the first one's
result instead of computing it again. Disk-full and read-only stores end in one line and leave no
temporary folder behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import platform
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fewshot_core.backbones.models import DEFAULT_BACKBONE, create_extractor
from fewshot_core.backbones.preprocess import as_shape, preprocessing_record, working_shape
from fewshot_core.backbones.stages import resolve_layers, stage_info
from fewshot_core.backbones.weights import resolve_weights
from fewshot_core.data.aspect import resolve_aspect
from fewshot_core.data.imageio import CONVERSION_RULES
from fewshot_core.device import resolve_device
from fewshot_core.errors import FsadError
from fewshot_core.features.extract import iter_embeddings
from fewshot_core.features.fingerprint import CACHE_NAME, HashCache, content_hashes, describe_changes, fingerprint_of
from fewshot_core.features.integrity import ARRAY_FILES, BlockHasher, check_files, checksum_file, write_stamp
from fewshot_core.features.patch import PATCH_SIZE, patch_dim_of
from fewshot_core.paths import default_store_dir
from fewshot_core.processes import pid_alive
from fewshot_core.sizes import WORKING_SIZE, check_size

# Bump when the feature computation or the partition format changes, so old partitions are never reused.
# 2: content fingerprints of the images, per-file checksums in meta.json.
STORE_VERSION = 2
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_LOCKS = ".locks"
# errno values that mean "this folder cannot take the partition", reported in one line
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_SYNC_EVERY = 32 << 20  # bytes of an array file between flushes to disk during a build


def dataset_fingerprint(records, cache: HashCache | None = None) -> str:
    """sha256 over the sorted (image_id, sha256 of the file's bytes) pairs: same images -> same partition."""
    return fingerprint_of(content_hashes(records, cache))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


def _spec(category, backbone, weights_sha, image_size, layers, patch_dim, shape=None) -> dict:
    spec = {"store_version": STORE_VERSION, "backbone": backbone, "weights_sha256": weights_sha,
            "image_size": int(image_size), "layers": [int(i) for i in layers], "patch_dim": patch_dim,
            "patch_size": PATCH_SIZE, "crop": False, "category": category}
    h, w = as_shape(shape if shape is not None else image_size)
    if h != w:  # only a non-square input is named, so square partitions keep the keys they always had
        spec["input_shape"] = [h, w]
    return spec


def spec_key(category: str, backbone: str, weights_sha: str, image_size: int, layers, patch_dim,
             shape=None) -> str:
    """Hash of the settings alone (no images): partitions of one setting over different images share it."""
    spec = _spec(category, backbone, weights_sha, image_size, layers, patch_dim, shape)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def partition_key(category: str, backbone: str, weights_sha: str, image_size: int, layers, patch_dim,
                  fingerprint: str, shape=None) -> str:
    spec = {**_spec(category, backbone, weights_sha, image_size, layers, patch_dim, shape), "dataset": fingerprint}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{_slug(category)}-{_slug(backbone)}-{int(image_size)}-{digest}"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("fsad", "torch", "timm", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


    return True


def _notice(message: str) -> None:
    """One line on stderr for what the store did on its own (rebuild, wait); Dagster captures it too."""
    print(f"fsad: {message}", file=sys.stderr, flush=True)


def _os_error(exc: OSError, root: Path) -> FsadError | None:
    """The one-line user error for a store folder that is full or not writable (None for other errors)."""
    where = exc.filename or root
    if exc.errno in _NO_SPACE:
        return FsadError(f"{where}: no space left for the feature partition ({exc.strerror}); free space on that "
                         f"disk or pass --store DIR (or FSAD_HOME) on a larger one; nothing was kept")
    if exc.errno in _NOT_WRITABLE:
        return FsadError(f"{where}: feature store folder is not writable ({exc.strerror}); pass --store DIR "
                         f"(or set FSAD_HOME) to a writable folder")
    return None


class PartitionDamaged(FsadError):
    """A partition folder exists but its files do not match ``meta.json`` (or ``meta.json`` is unusable)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path}: feature partition damaged ({reason}); rebuild it with `fsad embed` "
                         f"(a build replaces a damaged partition)")


def read_meta(folder: str | Path) -> dict:
    """The partition's ``meta.json``; ``PartitionDamaged`` when missing, unreadable or not a partition record."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise PartitionDamaged(folder, "meta.json missing") from None
    except (OSError, ValueError) as exc:
        raise PartitionDamaged(folder, f"meta.json unreadable: {exc}".splitlines()[0]) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), str):
        raise PartitionDamaged(folder, "meta.json is not a partition record")
    if meta.get("store_version") != STORE_VERSION:
        raise PartitionDamaged(folder, f"store version {meta.get('store_version')}, this fsad writes {STORE_VERSION}")
    return meta


def verify_partition(path: str | Path, full: bool = True) -> list[str]:
    """Problems found in the partition at ``path`` ([] when intact), one short line each.

    ``full=True`` hashes every block of every file against the checksums in ``meta.json`` (what
    ``fsad store verify`` runs; an asset check over the store calls ``FeatureStore(root).verify()`` and
    fails on any non-empty list); ``full=False`` is the cheap check done on every load (sizes, small
    files, and sampled blocks unless the files changed since the last full verification). Never raises
    for a damaged partition; only for a path that is not a folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise FsadError(f"{path}: no feature partition folder here; list them with `fsad store verify`")
    try:
        meta = read_meta(path)
    except PartitionDamaged as exc:
        return [exc.reason]
    problems = check_files(path, meta.get("files"), "full" if full else "auto")
    if not problems and meta["key"] != path.name:
        problems.append(f"meta.json names partition {meta['key']}, the folder is {path.name}")
    if not problems:
        for name in ARRAY_FILES:
            try:
                arr = np.load(path / name, mmap_mode="r")
            except (OSError, ValueError) as exc:
                problems.append(f"{name}: not a readable .npy ({exc})".splitlines()[0])
                continue
            if arr.shape[0] != meta["n_images"] or arr.dtype != np.float16:
                problems.append(f"{name}: shape {arr.shape} {arr.dtype}, meta.json says {meta['n_images']} rows float16")
    return problems


class FeaturePartition:
    """Read access to one complete partition; arrays are memory-mapped, rows gathered on demand.

    Opening verifies the files against ``meta.json`` (``verify``: "auto" = the cheap load check of
    ``verify_partition(full=False)``, "full", or "none" for a partition this process just wrote) and
    raises ``PartitionDamaged`` (a ``FsadError``) instead of serving damaged features.
    """

    def __init__(self, path: str | Path, cache_hit: bool = False, verify: str = "auto"):
        self.path = Path(path)
        self.cache_hit = cache_hit  # True when ``FeatureStore.build`` found it already complete
        if not self.path.is_dir():
            raise FsadError(f"{self.path}: feature partition missing or incomplete; rebuild it with `fsad embed`")
        self.meta: dict = read_meta(self.path)
        if verify != "none":
            problems = check_files(self.path, self.meta.get("files"), "full" if verify == "full" else "auto")
            if problems:
                raise PartitionDamaged(self.path, "; ".join(problems))
        try:
            self.index: pd.DataFrame = pd.read_parquet(self.path / "index.parquet")
            self._patch = np.load(self.path / "patch.npy", mmap_mode="r")
            self._global = np.load(self.path / "global.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:  # only reachable with verify="none"
            raise PartitionDamaged(self.path, str(exc).splitlines()[0]) from None
        self._rows = dict(zip(self.index["image_id"], self.index["row"].astype(int)))

    key = property(lambda self: self.meta["key"])
    image_ids = property(lambda self: list(self.index["image_id"]))
    grid = property(lambda self: tuple(self.meta["grid"]))
    stride = property(lambda self: int(self.meta["stride"]))
    image_size = property(lambda self: int(self.meta["image_size"]))
    # (height, width) the images were resized to; partitions written before aspect-kept inputs are square
    input_shape = property(lambda self: as_shape(self.meta.get("input_shape") or self.meta["image_size"]))
    patch_dim = property(lambda self: int(self.meta["patch_dim"]))
    is_random = property(lambda self: bool(self.meta["is_random"]))

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, ids) -> np.ndarray:
        if isinstance(ids, str):
            raise TypeError("pass a list of image ids, not one string")
        try:
            return np.fromiter((self._rows[i] for i in ids), dtype=np.int64)
        except KeyError as exc:
            raise FsadError(f"{self.path / 'index.parquet'}: image id {exc.args[0]!r} not in this partition; "
                            f"build the store for the dataset that holds it") from None

    def patch(self, ids=None) -> np.ndarray:
        """float32 [n, h, w, d] patch features in the order of ``ids`` (all images if None)."""
        if ids is None:
            return np.asarray(self._patch, dtype=np.float32)
        return self._gather(self._patch, self.rows(ids))

    def global_(self, ids=None) -> np.ndarray:
        """float32 [n, D] global embeddings in the order of ``ids`` (all images if None)."""
        if ids is None:
            return np.asarray(self._global, dtype=np.float32)
        return self._gather(self._global, self.rows(ids))

    @staticmethod
    def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")  # read the memmap forwards, then restore the caller's order
        out = np.empty((len(rows),) + array.shape[1:], dtype=np.float32)
        out[order] = array[rows[order]]
        return out

    def __repr__(self) -> str:
        return f"FeaturePartition({self.key!r}, n={len(self)}, grid={self.grid}, d={self.patch_dim})"


def _preallocate(fd: int, size: int, path: Path) -> None:
    """Reserve the whole file now, so a full disk fails here with ENOSPC instead of mid-build."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        if shutil.disk_usage(path.parent).free < size:  # filesystem without fallocate: check instead
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None


class _ArrayFile:
    """A float16 ``.npy`` written front to back with plain writes (a full disk raises ENOSPC, where a
    memmap write would kill the process with SIGBUS), preallocated, and block-hashed as it is written."""

    def __init__(self, path: Path, n: int):
        self.path, self.n, self.rows, self.shape = path, n, 0, None
        self.fd: int | None = None
        self.hasher = BlockHasher()
        self._synced = 0

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float16)
        if self.fd is None:
            self.shape = (self.n,) + array.shape[1:]
            header = _npy_header(self.shape)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _preallocate(self.fd, len(header) + int(np.prod(self.shape)) * 2, self.path)
            self._write(header)
        self._write(array)
        self.rows += len(array)
        if self.hasher.size - self._synced >= _SYNC_EVERY:
            # on the writer thread: the disk writes back while the forward runs, not all at the end
            os.fdatasync(self.fd)
            self._synced = self.hasher.size

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        while len(view):
            try:
                view = view[os.write(self.fd, view):]
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def finish(self) -> dict:
        if self.rows != self.n:
            raise RuntimeError(f"{self.path}: {self.rows} rows written, {self.n} expected")
        os.fsync(self.fd)  # on disk before the folder is renamed into place
        self.close()
        return self.hasher.record()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _npy_header(shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


class _BackgroundWriter:
    """Writes (and hashes) batches on a thread so the disk never stalls the forward pass.

    The queue holds two batches: enough to overlap one write with one forward, and memory stays a few
    batches deep. File writes and sha256 release the GIL.
    """

    def __init__(self, folder: Path, n: int):
        self.patch, self.global_ = _ArrayFile(folder / "patch.npy", n), _ArrayFile(folder / "global.npy", n)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fsad-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.patch.append(item[0])
                    self.global_.append(item[1])
                except BaseException as exc:  # handed to the main thread on its next put or at finish
                    self._error = exc

    def put(self, patch: np.ndarray, pooled: np.ndarray) -> None:
        self._check()
        self._queue.put((patch, pooled))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> tuple[dict, dict]:
        self._queue.put(None)
        self._thread.join()
        self._check()
        return self.patch.finish(), self.global_.finish()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.patch.close()
        self.global_.close()


@dataclass(frozen=True)
class FeatureSpec:
    """What a partition's features are; all of it goes into the partition key. ``backbone`` (a timm name)
    with its ``weights`` (``"auto"``, a file, ``"random"``: ``backbones/weights.py``), ``image_size`` the
    short side, ``aspect`` the long one (``data/aspect.py``: ``"auto"`` the category's own, ``"square"``, or
    a ratio), ``layers`` the backbone stages (None: its stride-8 + stride-16 pair), ``patch_dim`` the patch
    feature dimensions (None: every stage's channels)."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = WORKING_SIZE
    layers: Sequence[int] | None = None
    weights: str = "auto"
    patch_dim: int | None = None
    aspect: str | float = "auto"


@dataclass(frozen=True)
class EmbedCompute:
    """How a partition is embedded; never part of its key: images per forward pass, decode workers, the
    device (None: the best available) and the progress bar."""

    batch_size: int = 16
    num_workers: int = 2
    device: object = None
    progress: bool = True


@dataclass(frozen=True)
class _Plan:
    """One partition to write: its key and spec, the images (records and content hashes), what their
    features are (backbone and resolved weights, short side, working shape, stages, patch dims) and what
    changed since the previous partition of the same spec."""

    key: str
    spec: str
    dataset: object
    records: list
    hashes: dict
    fingerprint: str
    backbone: str
    weights: object  # backbones.weights.WeightsInfo
    image_size: int
    shape: tuple[int, int]
    layers: tuple[int, ...]
    patch_dim: int | None
    change: dict | None


class FeatureStore:
    """Builds and opens partitions under ``root`` (default ``fewshot_core.paths.default_store_dir()``)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            root = default_store_dir()
        self.root = Path(root)

    def open(self, key: str, verify: str = "auto") -> FeaturePartition:
        return FeaturePartition(self.root / key, verify=verify)

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / "meta.json").is_file())

    def partition_dirs(self) -> list[Path]:
        """Every partition folder, complete or damaged (temporary and trash folders excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def verify(self, full: bool = True) -> dict[str, list[str]]:
        """``{key: problems}`` for every partition folder ([] = intact); see ``verify_partition``."""
        return {p.name: verify_partition(p, full=full) for p in self.partition_dirs()}

    def _hash_cache(self) -> HashCache:
        return HashCache(self.root / CACHE_NAME)

    def key_for(self, dataset, spec: FeatureSpec | None = None) -> str:
        """The partition key without computing features (weights and images are hashed, not loaded)."""
        spec = spec or FeatureSpec()
        info = resolve_weights(spec.backbone, spec.weights)
        return partition_key(dataset.category, spec.backbone, info.sha256, spec.image_size,
                             resolve_layers(spec.backbone, spec.layers), spec.patch_dim,
                             dataset_fingerprint(dataset.records, self._hash_cache()),
                             working_shape(spec.image_size, resolve_aspect(dataset, spec.aspect)))

    @contextmanager
    def lock(self, key: str):
        """Exclusive per-key build lock across processes and threads.

        A POSIX record lock (``lockf``): the kernel drops it when the holder dies, forked decode
        workers do not inherit it, and it also holds on NFS. It does not exclude threads of one
        process, so a per-key thread lock comes first.
        """
        with _THREAD_LOCKS_GUARD:
            thread_lock = _THREAD_LOCKS.setdefault(str(self.root.absolute() / key), threading.Lock())
        with thread_lock:
            try:
                (self.root / _LOCKS).mkdir(parents=True, exist_ok=True)
                fd = os.open(self.root / _LOCKS / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise (_os_error(exc, self.root) or exc) from None
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    _notice(f"{key}: another process (pid {holder}) is building this partition; waiting to reuse it")
                    fcntl.lockf(fd, fcntl.LOCK_EX)
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except OSError:
                    pass  # the pid is only for the waiting message
                yield
            finally:
                os.close(fd)  # releases the record lock

    def build(self, dataset, spec: FeatureSpec | None = None, compute: EmbedCompute | None = None
              ) -> FeaturePartition:
        """Embed every image of ``dataset`` (train and test) once as ``spec`` says (``FeatureSpec``: backbone,
        weights, short side, aspect, stages, patch dims), computing as ``compute`` says (``EmbedCompute``);
        reuse the partition when it exists.

        A damaged partition is reported in one line and rebuilt; a build of the same partition running
        in another process is waited for and reused.
        """
        spec, compute = spec or FeatureSpec(), compute or EmbedCompute()
        backbone, image_size, layers, weights, patch_dim, aspect = (spec.backbone, spec.image_size, spec.layers,
                                                                    spec.weights, spec.patch_dim, spec.aspect)
        records = list(dataset.records)
        if not records:
            raise FsadError(f"{dataset.root}: category {dataset.category!r} has no images; check the dataset folder")
        check_size(image_size)
        if patch_dim is not None and int(patch_dim) < 1:
            raise FsadError(f"--patch-dim {patch_dim}: must be a positive number of dimensions (or omitted)")
        info = resolve_weights(backbone, weights)
        layers = resolve_layers(backbone, layers)
        if patch_dim is not None:
            infos = stage_info(backbone)
            full_dim = sum(int(infos[i]["num_chs"]) for i in layers)
            if int(patch_dim) > full_dim:
                raise FsadError(f"--patch-dim {patch_dim}: larger than the {full_dim} dims of {backbone} stages "
                                f"{','.join(map(str, layers))} (it would only repeat values); use at most "
                                f"{full_dim} or omit it")
        hashes = content_hashes(records, self._hash_cache())
        fingerprint = fingerprint_of(hashes)
        shape = working_shape(image_size, resolve_aspect(dataset, aspect))
        key = partition_key(dataset.category, backbone, info.sha256, image_size, layers, patch_dim, fingerprint, shape)
        final = self.root / key
        if final.is_dir():
            try:
                return FeaturePartition(final, cache_hit=True)
            except PartitionDamaged:
                pass  # reported and replaced below, under the lock

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (_os_error(exc, self.root) or exc) from None
        with self.lock(key):
            if final.is_dir():
                try:
                    return FeaturePartition(final, cache_hit=True)  # e.g. built by the process we waited for
                except PartitionDamaged as exc:
                    _notice(f"{key}: partition damaged ({exc.reason}); rebuilding it")
                    self._discard(final)
            self._remove_stale_tmp(key)
            spec_id = spec_key(dataset.category, backbone, info.sha256, image_size, layers, patch_dim, shape)
            change = self._changes_since_previous(dataset.category, spec_id, key, hashes)
            compute = replace(compute, device=resolve_device(compute.device))
            tmp = self.root / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                plan = _Plan(key, spec_id, dataset, records, hashes, fingerprint, backbone, info, image_size, shape,
                             layers, patch_dim, change)
                self._write(tmp, plan, compute)
                os.rename(tmp, final)  # nobody else writes this key while we hold the lock
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError) and (err := _os_error(exc, self.root)) is not None:
                    raise err from None
                raise
        return FeaturePartition(final, verify="none")  # just written and hashed by this process

    def _discard(self, folder: Path) -> None:
        """Move a damaged partition out of the way first (readers holding its memmaps keep their files)."""
        trash = self.root / f"{_TRASH_PREFIX}{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except OSError as exc:
            raise (_os_error(exc, self.root) or exc) from None
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_tmp(self, key: str) -> None:
        """Drop temp and trash folders of this key left by processes that died (kill -9, power loss)."""
        for prefix in (_TMP_PREFIX, _TRASH_PREFIX):
            for tmp in self.root.glob(f"{prefix}{key}-*"):
                pid = tmp.name[len(prefix) + len(key) + 1:].split("-")[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(tmp, ignore_errors=True)

    def _changes_since_previous(self, category: str, spec: str, key: str, hashes: dict) -> dict | None:
        """Compare the images with the newest partition of the same settings, say what changed (one line)."""
        prefix = key.rsplit("-", 1)[0] + "-"
        best = None
        for folder in self.root.glob(f"{prefix}*"):
            if folder.name == key:
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
                if meta.get("spec_key") != spec:
                    continue
                created = str(meta.get("build", {}).get("created", ""))
            except (OSError, ValueError, AttributeError):
                continue
            if best is None or created > best[0]:
                best = (created, folder)
        if best is None:
            return None
        try:
            index = pd.read_parquet(best[1] / "index.parquet", columns=["image_id", "sha256"])
        except Exception:  # a damaged old partition only costs the explanation
            return None
        summary, record = describe_changes(dict(zip(index["image_id"], index["sha256"])), hashes)
        _notice(f"{category}: images differ from partition {best[1].name}: {summary}; building {key}")
        return {"previous": best[1].name, "summary": summary, **record}

    def _write(self, tmp: Path, plan: _Plan, compute: EmbedCompute) -> dict:
        records, key, spec, dataset, hashes, fingerprint = (plan.records, plan.key, plan.spec, plan.dataset,
                                                            plan.hashes, plan.fingerprint)
        backbone, info, image_size, shape, layers, patch_dim = (plan.backbone, plan.weights, plan.image_size,
                                                                plan.shape, plan.layers, plan.patch_dim)
        batch_size, num_workers, device = compute.batch_size, compute.num_workers, compute.device

        extractor = create_extractor(backbone, layers, weights_info=info, device=device)
        n = len(records)
        started = time.perf_counter()
        bar = tqdm(total=n, unit="img", desc=f"embed {dataset.category}", disable=not compute.progress)
        writer = _BackgroundWriter(tmp, n)
        try:
            for _, patch, pooled in iter_embeddings(extractor, [r.path for r in records], shape,
                                                    patch_dim, batch_size, num_workers):
                writer.put(patch, pooled)
                bar.update(len(patch))
            files = dict(zip(ARRAY_FILES, writer.finish()))
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        grid, global_dim = writer.patch.shape[1:3], writer.global_.shape[1]
        seconds = time.perf_counter() - started

        index = pd.DataFrame({
            "image_id": [r.image_id for r in records], "row": np.arange(n, dtype=np.int64),
            "split": [r.split for r in records], "defect_type": [r.defect_type for r in records],
            "label": np.array([r.label for r in records], dtype=np.int8),
            "sha256": [hashes[r.image_id] for r in records],
        })
        buf = io.BytesIO()  # serialised here so a full disk surfaces as an OSError of the plain write below
        index.to_parquet(buf, index=False)
        _write_file(tmp / "index.parquet", buf.getvalue())
        files["index.parquet"] = checksum_file(tmp / "index.parquet")
        infos = stage_info(backbone)
        channels = [int(infos[i]["num_chs"]) for i in layers]
        meta = {
            "key": key, "spec_key": spec, "store_version": STORE_VERSION, "category": dataset.category,
            "n_images": n, "dataset_fingerprint": fingerprint, "backbone": backbone,
            "weights": info.to_dict(), "is_random": info.is_random,
            "image_size": int(image_size), "input_shape": [int(v) for v in shape],
            "preprocessing": {**preprocessing_record(backbone, image_size, crop=False, shape=shape),
                              "reader": "fewshot_core.data.imageio.load_rgb", "rgb_conversion": CONVERSION_RULES},
            "layers": list(layers),
            "layer_info": [{"index": i, "module": infos[i].get("module"), "channels": c,
                            "stride": int(infos[i]["reduction"])} for i, c in zip(layers, channels)],
            "grid": [int(g) for g in grid], "stride": int(infos[layers[0]]["reduction"]),
            "patch_size": PATCH_SIZE, "patch_dim": patch_dim_of(channels, patch_dim),
            "patch_reduction": None if patch_dim is None else "adaptive_avg_pool per stage then over stack",
            "global_dim": int(global_dim), "global": "pooled pre-classifier features (timm forward_head pre_logits)",
            "dtype": "float16", "versions": _versions(), "files": files, "changed_from": plan.change,
            "build": {"device": str(device), "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3),
                      "batch_size": batch_size, "num_workers": num_workers,
                      "created": datetime.now(timezone.utc).isoformat(timespec="microseconds")},
        }
        tmp_meta = tmp / "meta.json.part"
        _write_file(tmp_meta, json.dumps(meta, indent=2).encode())
        os.replace(tmp_meta, tmp / "meta.json")
        write_stamp(tmp)
        return meta
