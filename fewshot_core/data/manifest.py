"""The image manifest: one row per image (record fields + width/height) as a Parquet table."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from fewshot_core.atomic import atomic_write
from fewshot_core.data.imageio import image_size
from fewshot_core.data.mvtec import Dataset
from fewshot_core.errors import FsadError

COLUMNS = ["image_id", "category", "split", "defect_type", "label", "path", "mask_path", "width", "height"]


def build_manifest(datasets: Dataset | list[Dataset]) -> pd.DataFrame:
    """Records of one or several datasets; sizes come from image headers (no pixel decoding)."""
    if isinstance(datasets, Dataset):
        datasets = [datasets]
    records = [r for ds in datasets for r in ds.records]
    seen: set[str] = set()
    for r in records:
        if r.image_id in seen:
            raise FsadError(f"{r.path}: image id {r.image_id} appears twice; give the categories distinct names")
        seen.add(r.image_id)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        sizes = list(pool.map(lambda r: image_size(r.path), records))
    rows = [{**r.to_row(), "width": w, "height": h} for r, (w, h) in zip(records, sizes)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["label"] = df["label"].astype("int8")
    df[["width", "height"]] = df[["width", "height"]].astype("int32")
    df["mask_path"] = df["mask_path"].astype("string")
    for col in ("image_id", "category", "split", "defect_type", "path"):
        df[col] = df[col].astype("string")
    return df


def write_manifest(df: pd.DataFrame, out_path: Path) -> Path:
    """Write atomically: a temporary sibling, then ``os.replace`` (readers never see half a file)."""
    return atomic_write(out_path, lambda tmp: df.to_parquet(tmp, index=False, engine="pyarrow"))


def read_manifest(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise FsadError(f"{path}: manifest not found; write it with `fsad data manifest ROOT {path}`") from None
