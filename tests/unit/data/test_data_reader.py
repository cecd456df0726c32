"""MVTec-layout reader: records, ids, masks, image-level categories, real bottle, clear errors."""

from __future__ import annotations

import pytest

from _builders import build_mvtec_category, write_image
from fewshot_core.data import Dataset, list_categories, load_category, load_dataset
from fewshot_core.errors import FsadError


def test_records_of_a_custom_category(tmp_path):
    build_mvtec_category(tmp_path, "widget", n_train=4, n_test_good=2, defects={"scratch": 2, "dent": 3})
    ds = load_category(tmp_path, "widget")
    assert isinstance(ds, Dataset) and ds.category == "widget" and ds.has_masks
    assert ds.root == tmp_path.absolute()
    assert len(ds) == 11 and len(ds.train_good()) == 4 and len(ds.test()) == 7
    assert ds.defect_types() == ["dent", "scratch"]
    ids = [r.image_id for r in ds.records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    r = ds.by_id("widget/test/dent/002")
    assert (r.split, r.defect_type, r.label) == ("test", "dent", 1)
    assert r.path == tmp_path.absolute() / "widget/test/dent/002.png"
    assert r.mask_path == tmp_path.absolute() / "widget/ground_truth/dent/002_mask.png"
    assert all(x.mask_path is None for x in ds.records if x.label == 0)
    assert all(x.label == 0 and x.split == "train" for x in ds.train_good())
    with pytest.raises(KeyError):
        ds.by_id("widget/test/dent/999")
    # stable across re-reads
    assert load_category(tmp_path, "widget").records == ds.records


def test_image_level_category_without_ground_truth(tmp_path):
    build_mvtec_category(tmp_path, "part", masks=False)
    ds = load_category(tmp_path, "part")
    assert not ds.has_masks
    assert all(r.mask_path is None for r in ds.records)
    assert {r.label for r in ds.test()} == {0, 1}


def test_missing_mask_is_an_error_when_ground_truth_exists(tmp_path):
    cat = build_mvtec_category(tmp_path, "widget")
    (cat / "ground_truth/scratch/001_mask.png").unlink()
    with pytest.raises(FsadError) as exc:
        load_category(tmp_path, "widget")
    msg = str(exc.value)
    assert "test/scratch/001.png" in msg and "fsad data validate" in msg and "\n" not in msg


def test_list_categories_and_source_errors(tmp_path):
    build_mvtec_category(tmp_path, "b_cat")
    build_mvtec_category(tmp_path, "a_cat", masks=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "bottle.sha256").write_text("x")
    assert list_categories(tmp_path) == ["a_cat", "b_cat"]
    with pytest.raises(FsadError, match="category folder, not a dataset root"):
        list_categories(tmp_path / "a_cat")
    with pytest.raises(FsadError, match="available: a_cat, b_cat"):
        load_category(tmp_path, "nope")
    with pytest.raises(FsadError, match="pick one with --category"):
        load_dataset(tmp_path)
    with pytest.raises(FsadError, match="not found"):
        list_categories(tmp_path / "missing")


def test_load_dataset_single_category_root(tmp_path):
    build_mvtec_category(tmp_path, "only")
    assert load_dataset(tmp_path).category == "only"
    assert load_dataset(str(tmp_path), "only").records == load_category(tmp_path, "only").records


def test_jpeg_and_mixed_extensions(tmp_path):
    build_mvtec_category(tmp_path, "j", ext=".JPG", masks=False)
    assert len(load_category(tmp_path, "j").records) == 11
    write_image(tmp_path / "j/train/good/000.png")  # same stem as 000.JPG: ids would collide
    with pytest.raises(FsadError, match="same name"):
        load_category(tmp_path, "j")


@pytest.mark.shared_data
def test_real_bottle(mvtec_root):
    ds = load_category(mvtec_root, "bottle")
    assert ds.has_masks and len(ds.train_good()) == 209
    per = {}
    for r in ds.test():
        per[r.defect_type] = per.get(r.defect_type, 0) + 1
    assert per == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    masks = [r.mask_path for r in ds.records if r.mask_path is not None]
    assert len(masks) == 63 and all(m.is_file() and m.name.endswith("_mask.png") for m in masks)
    assert ds.defect_types() == ["broken_large", "broken_small", "contamination"]
    assert ds.by_id("bottle/test/contamination/000").mask_path.name == "000_mask.png"
