"""The on-disk feature store: one partition per (backbone, weights, image size, layers, patch dim, category, images).

A partition is a folder named by its key holding

- ``patch.npy``   float16 [N, h, w, d]  PatchCore patch features (memory-mapped on read)
- ``global.npy``  float16 [N, D]        pooled pre-classifier embeddings
- ``index.parquet``                     image_id -> row (plus split/defect_type/label for convenience)
- ``meta.json``                         backbone, weights source + sha256, preprocessing, grid, versions ...

It is built batch by batch into a hidden temporary folder and renamed into place only when complete,
so a crash never leaves a visible half partition and a rebuild simply starts again. A complete
partition is reused: features are computed once, never per few-shot setting or seed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from fewshot_core.backbones.models import DEFAULT_BACKBONE, create_extractor, resolve_layers, stage_info
from fewshot_core.device import resolve_device
from fewshot_core.backbones.preprocess import preprocessing_record
from fewshot_core.backbones.weights import resolve_weights
from fewshot_core.data.imageio import CONVERSION_RULES
from fewshot_core.errors import FsadError
from fewshot_core.features.extract import iter_embeddings
from fewshot_core.features.patch import PATCH_SIZE, patch_dim_of

# Bump when the feature computation changes, so old partitions are never silently reused.
STORE_VERSION = 1
_TMP_PREFIX = ".tmp-"


def dataset_fingerprint(records) -> str:
    """sha256 over the sorted (image_id, file size) pairs: same images -> same partition."""
    digest = hashlib.sha256()
    for image_id, path in sorted((r.image_id, str(r.path)) for r in records):
        try:
            size = os.stat(path).st_size
        except OSError:
            raise FsadError(f"{path}: image listed in the dataset is missing; re-read the dataset folder") from None
        digest.update(f"{image_id}\0{size}\n".encode())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


def partition_key(category: str, backbone: str, weights_sha: str, image_size: int, layers, patch_dim,
                  fingerprint: str) -> str:
    spec = {"store_version": STORE_VERSION, "backbone": backbone, "weights_sha256": weights_sha,
            "image_size": int(image_size), "layers": [int(i) for i in layers], "patch_dim": patch_dim,
            "patch_size": PATCH_SIZE, "crop": False, "category": category, "dataset": fingerprint}
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(array: np.memmap) -> None:
    """Write the memmap's pages to the file and unmap them, so resident memory stays one batch deep.

    Without this the written pages stay in the process's RSS (as file-backed pages) until the build ends.
    """
    array.flush()
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)  # shared file mapping: data stays in the file, pages leave the RSS


class FeaturePartition:
    """Read access to one complete partition; arrays are memory-mapped, rows gathered on demand."""

    def __init__(self, path: str | Path, cache_hit: bool = False):
        self.path = Path(path)
        self.cache_hit = cache_hit  # True when ``FeatureStore.build`` found it already complete
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FsadError(f"{meta_file}: feature partition missing or incomplete; rebuild it with `fsad embed`")
        self.meta: dict = json.loads(meta_file.read_text())
        self.index: pd.DataFrame = pd.read_parquet(self.path / "index.parquet")
        self._rows = dict(zip(self.index["image_id"], self.index["row"].astype(int)))
        self._patch = np.load(self.path / "patch.npy", mmap_mode="r")
        self._global = np.load(self.path / "global.npy", mmap_mode="r")

    key = property(lambda self: self.meta["key"])
    image_ids = property(lambda self: list(self.index["image_id"]))
    grid = property(lambda self: tuple(self.meta["grid"]))
    stride = property(lambda self: int(self.meta["stride"]))
    image_size = property(lambda self: int(self.meta["image_size"]))
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


class FeatureStore:
    """Builds and opens partitions under ``root`` (default ``fewshot_core.paths.default_store_dir()``)."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from fewshot_core.paths import default_store_dir

            root = default_store_dir()
        self.root = Path(root)

    def open(self, key: str) -> FeaturePartition:
        return FeaturePartition(self.root / key)

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "meta.json").is_file())

    def key_for(self, dataset, backbone: str = DEFAULT_BACKBONE, image_size: int = 256, layers=None,
                weights="auto", patch_dim: int | None = None) -> str:
        """The partition key without computing anything (weights are hashed, not loaded)."""
        info = resolve_weights(backbone, weights)
        return partition_key(dataset.category, backbone, info.sha256, image_size,
                             resolve_layers(backbone, layers), patch_dim, dataset_fingerprint(dataset.records))

    def build(self, dataset, backbone: str = DEFAULT_BACKBONE, image_size: int = 256, layers=None,
              weights="auto", batch_size: int = 16, num_workers: int = 2, device=None, progress: bool = True,
              patch_dim: int | None = None) -> FeaturePartition:
        """Embed every image of ``dataset`` (train and test) once; reuse the partition when it exists."""
        records = list(dataset.records)
        if not records:
            raise FsadError(f"{dataset.root}: category {dataset.category!r} has no images; check the dataset folder")
        if int(image_size) < 32:
            raise FsadError(f"--image-size {image_size}: too small for a CNN backbone; use 32 or more (default 256)")
        if patch_dim is not None and int(patch_dim) < 1:
            raise FsadError(f"--patch-dim {patch_dim}: must be a positive number of dimensions (or omitted)")
        info = resolve_weights(backbone, weights)
        layers = resolve_layers(backbone, layers)
        fingerprint = dataset_fingerprint(records)
        key = partition_key(dataset.category, backbone, info.sha256, image_size, layers, patch_dim, fingerprint)
        final = self.root / key
        if (final / "meta.json").is_file():
            return FeaturePartition(final, cache_hit=True)
        device = resolve_device(device)

        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp(key)
        tmp = self.root / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = self._write(tmp, records, key, dataset, backbone, image_size, layers, info, fingerprint,
                               batch_size, num_workers, device, progress, patch_dim)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():  # not a concurrent build that finished first
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        part = FeaturePartition(final)
        assert part.meta["key"] == meta["key"]
        return part

    def _remove_stale_tmp(self, key: str) -> None:
        """Drop temp folders of this key left by builds whose process died (kill -9, power loss)."""
        for tmp in self.root.glob(f"{_TMP_PREFIX}{key}-*"):
            pid = tmp.name[len(_TMP_PREFIX) + len(key) + 1:].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, tmp: Path, records, key, dataset, backbone, image_size, layers, info, fingerprint,
               batch_size, num_workers, device, progress, patch_dim) -> dict:
        from tqdm.auto import tqdm

        extractor = create_extractor(backbone, layers, weights_info=info, device=device)
        n = len(records)
        patch_mm = global_mm = None
        started = time.perf_counter()
        bar = tqdm(total=n, unit="img", desc=f"embed {dataset.category}", disable=not progress)
        try:
            for start, patch, pooled in iter_embeddings(extractor, [r.path for r in records], image_size,
                                                         patch_dim, batch_size, num_workers):
                if patch_mm is None:  # shapes are known after the first batch
                    patch_mm = np.lib.format.open_memmap(tmp / "patch.npy", mode="w+", dtype=np.float16,
                                                         shape=(n,) + patch.shape[1:])
                    global_mm = np.lib.format.open_memmap(tmp / "global.npy", mode="w+", dtype=np.float16,
                                                          shape=(n,) + pooled.shape[1:])
                patch_mm[start:start + len(patch)] = patch
                global_mm[start:start + len(pooled)] = pooled
                _release(patch_mm)
                bar.update(len(patch))
            patch_mm.flush()
            global_mm.flush()
            grid, global_dim = patch_mm.shape[1:3], global_mm.shape[1]
        finally:
            bar.close()
            del patch_mm, global_mm  # close the memmaps before the folder is renamed
        seconds = time.perf_counter() - started

        index = pd.DataFrame({
            "image_id": [r.image_id for r in records], "row": np.arange(n, dtype=np.int64),
            "split": [r.split for r in records], "defect_type": [r.defect_type for r in records],
            "label": np.array([r.label for r in records], dtype=np.int8),
        })
        index.to_parquet(tmp / "index.parquet", index=False)
        infos = stage_info(backbone)
        channels = [int(infos[i]["num_chs"]) for i in layers]
        meta = {
            "key": key, "store_version": STORE_VERSION, "category": dataset.category, "n_images": n,
            "dataset_fingerprint": fingerprint, "backbone": backbone,
            "weights": info.to_dict(), "is_random": info.is_random,
            "image_size": int(image_size),
            "preprocessing": {**preprocessing_record(backbone, image_size, crop=False),
                              "reader": "fewshot_core.data.imageio.load_rgb", "rgb_conversion": CONVERSION_RULES},
            "layers": list(layers),
            "layer_info": [{"index": i, "module": infos[i].get("module"), "channels": c,
                            "stride": int(infos[i]["reduction"])} for i, c in zip(layers, channels)],
            "grid": [int(g) for g in grid], "stride": int(infos[layers[0]]["reduction"]),
            "patch_size": PATCH_SIZE, "patch_dim": patch_dim_of(channels, patch_dim),
            "patch_reduction": None if patch_dim is None else "adaptive_avg_pool per stage then over stack",
            "global_dim": int(global_dim), "global": "pooled pre-classifier features (timm forward_head pre_logits)",
            "dtype": "float16", "versions": _versions(),
            "build": {"device": str(device), "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3),
                      "batch_size": batch_size, "num_workers": num_workers,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        tmp_meta = tmp / "meta.json.part"
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, tmp / "meta.json")
        return meta
