"""IO managers: Parquet tables and ``.npz`` array stores, one file per asset partition, written atomically.

Both accept the outputs of single-run backfills (one step covering many partitions): the asset then returns
``{partition_key: value}``, each value lands in its own partition file and each partition's materialisation
carries its own file's metadata (path, row count), never the batch's. Reading a partitioned upstream
from an unpartitioned asset returns only the partitions that were materialised, so a report can be built
from a partial sweep.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from fewshot_core.atomic import atomic_write


class _PartitionedFiles(dg.ConfigurableIOManager):
    base_dir: str
    suffix: str = ""

    def _path(self, asset_key: dg.AssetKey, partition_key: str | None) -> Path:
        path = Path(self.base_dir).joinpath(*asset_key.path)
        if partition_key is not None:
            path = path.joinpath(*str(partition_key).split("|"))
        return path.with_name(path.name + self.suffix)

    def _write(self, path: Path, obj) -> dict:
        raise NotImplementedError

    def _read(self, path: Path):
        raise NotImplementedError

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        if not context.has_asset_partitions:
            meta = self._write(self._path(context.asset_key, None), obj)
            context.add_output_metadata({k: v for k, v in meta.items() if v is not None})
            return
        keys = list(context.asset_partition_keys)
        if len(keys) == 1 and not (isinstance(obj, dict) and set(obj) == set(keys)):
            obj = {keys[0]: obj}
        if not isinstance(obj, dict) or not set(obj) <= set(keys):
            raise TypeError(f"{context.asset_key.to_user_string()}: a multi-partition step must return "
                            f"{{partition_key: value}} for its partitions")
        for key, value in obj.items():
            meta = {k: v for k, v in self._write(self._path(context.asset_key, key), value).items() if v is not None}
            if len(keys) == 1:
                context.add_output_metadata(meta)
            else:  # a single-run backfill: each partition's event carries its own path and row count
                context.step_context.add_asset_metadata(meta, asset_key=context.asset_key, partition_key=key)

    def load_input(self, context: dg.InputContext):
        key = context.asset_key
        if not context.has_asset_partitions:
            return self._read(self._path(key, None))
        keys = list(context.asset_partition_keys)
        found = {k: self._path(key, k) for k in keys}
        found = {k: p for k, p in found.items() if p.exists()}
        if len(keys) == 1 and context.has_partition_key and context.partition_key == keys[0]:
            if not found:
                raise FileNotFoundError(f"{self._path(key, keys[0])}: partition not materialised yet")
            return self._read(found[keys[0]])
        if len(found) < len(keys):
            context.log.info(f"{key.to_user_string()}: {len(found)} of {len(keys)} partitions materialised")
        return {k: self._read(p) for k, p in found.items()}


class ParquetIOManager(_PartitionedFiles):
    """pandas DataFrames as Parquet; a partitioned upstream read by an unpartitioned asset is concatenated."""

    suffix: str = ".parquet"

    def _write(self, path: Path, obj: pd.DataFrame) -> dict:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"ParquetIOManager stores pandas DataFrames, got {type(obj).__name__}")
        atomic_write(path, lambda tmp: obj.to_parquet(tmp, index=False))
        return {"path": dg.MetadataValue.path(str(path)), "dagster/row_count": len(obj)}

    def _read(self, path: Path) -> pd.DataFrame:
        return pd.read_parquet(path)

    def load_input(self, context: dg.InputContext):
        value = super().load_input(context)
        if isinstance(value, dict):  # many partitions: one table
            frames = [v for v in value.values() if len(v)]
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return value


class ArrayStoreIOManager(_PartitionedFiles):
    """``dict[str, ndarray]`` as compressed ``.npz`` (memory banks, prototypes)."""

    suffix: str = ".npz"

    def _write(self, path: Path, obj: dict) -> dict:
        arrays = {k: np.asarray(v) for k, v in obj.items()}

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)

        atomic_write(path, write)
        return {"path": dg.MetadataValue.path(str(path)),
                "arrays": ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())}

    def _read(self, path: Path) -> dict:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
