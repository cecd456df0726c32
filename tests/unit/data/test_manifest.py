"""Parquet manifest: record fields + header sizes, atomic idempotent writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _builders import build_mvtec_category, write_image
from fewshot_core.data import load_category
from fewshot_core.data.manifest import COLUMNS, build_manifest, read_manifest, write_manifest
from fewshot_core.errors import FsadError


def test_manifest_rows_and_sizes(tmp_path, monkeypatch):
    build_mvtec_category(tmp_path, "a", size=32)
    build_mvtec_category(tmp_path, "b", masks=False, defects={"x": 1})
    write_image(tmp_path / "a/train/good/wide.png", (40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(tmp_path / "a/train/good/rot.jpg", exif=exif.tobytes())
    datasets = [load_category(tmp_path, "a"), load_category(tmp_path, "b")]

    def no_decode(self, *a, **k):
        raise AssertionError("manifest must read sizes from headers, not decode pixels")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    df = build_manifest(datasets)
    monkeypatch.undo()
    assert list(df.columns) == COLUMNS
    assert len(df) == sum(len(d) for d in datasets) == 13 + 7
    assert df["image_id"].is_unique
    row = df.set_index("image_id").loc["a/train/good/wide"]
    assert (row.width, row.height) == (40, 24)
    row = df.set_index("image_id").loc["a/train/good/rot"]
    assert (row.width, row.height) == (10, 30)  # EXIF-upright, as load_rgb returns it
    assert df.loc[df.label == 1, "mask_path"].notna().sum() == 5
    assert df.loc[df.category == "b", "mask_path"].isna().all()
    assert df.loc[df.label == 0, "mask_path"].isna().all()
    assert build_manifest(datasets[1]).equals(df[df.category == "b"].reset_index(drop=True))


def test_write_is_atomic_and_idempotent(tmp_path):
    build_mvtec_category(tmp_path, "a")
    df = build_manifest(load_category(tmp_path, "a"))
    out = tmp_path / "out" / "m.parquet"
    write_manifest(df, out)
    first = out.read_bytes()
    write_manifest(df, out)
    assert out.read_bytes() == first
    assert [p.name for p in out.parent.iterdir()] == ["m.parquet"]  # no temp file left
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, df)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    build_mvtec_category(tmp_path, "a")
    df = build_manifest(load_category(tmp_path, "a"))
    out = write_manifest(df, tmp_path / "m.parquet")
    before = out.read_bytes()

    def boom(self, path, **kw):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError):
        write_manifest(df.head(1), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_duplicate_ids_and_missing_manifest(tmp_path):
    build_mvtec_category(tmp_path, "a")
    ds = load_category(tmp_path, "a")
    with pytest.raises(FsadError, match="appears twice"):
        build_manifest([ds, ds])
    with pytest.raises(FsadError, match="fsad data manifest"):
        read_manifest(tmp_path / "none.parquet")


@pytest.mark.shared_data
def test_real_bottle_manifest(mvtec_root):
    df = build_manifest(load_category(mvtec_root, "bottle"))
    assert len(df) == 292 and (df.width == 900).all() and (df.height == 900).all()
    assert df.mask_path.notna().sum() == 63
