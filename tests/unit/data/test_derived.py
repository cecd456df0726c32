"""Derived categories: posed copies move masks with their images; small-defect copies filter by area."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot_core.data import load_dataset
from fewshot_core.data.derived import RECORD, mask_area, pose_for, posed_copy, small_defect_copy, transform_pair
from fewshot_core.errors import FsadError


def _category(root, size=64):
    """train/good x3, test/good x1, test/dent x2 with a bright square exactly where the mask is."""
    cat = root / "widget"
    rng = np.random.default_rng(0)
    boxes = {"000": (8, 8, 40, 40), "001": (30, 30, 36, 36)}
    for split, defect, stems in (("train", "good", ["000", "001", "002"]), ("test", "good", ["000"]),
                                 ("test", "dent", list(boxes))):
        for stem in stems:
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            if defect == "dent":
                x0, y0, x1, y1 = boxes[stem]
                arr[y0:y1, x0:x1] = 250
                m = np.zeros((size, size), np.uint8)
                m[y0:y1, x0:x1] = 255
                (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                Image.fromarray(m).save(cat / "ground_truth" / defect / f"{stem}_mask.png")
            (cat / split / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(cat / split / defect / f"{stem}.png")
    return load_dataset(root, "widget")


def test_pose_is_seeded_and_varied():
    a = pose_for(0, "widget/test/dent/000", 0.08, (0.85, 1.15))
    assert a == pose_for(0, "widget/test/dent/000", 0.08, (0.85, 1.15))
    assert a != pose_for(1, "widget/test/dent/000", 0.08, (0.85, 1.15))
    assert a != pose_for(0, "widget/test/dent/001", 0.08, (0.85, 1.15))


def test_transform_moves_mask_with_image():
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:26, 30:50] = 255
    mask = Image.fromarray((img[..., 0] > 0).astype(np.uint8) * 255)
    out, m = transform_pair(Image.fromarray(img), mask, {"angle": 33.0, "shift": [0.1, -0.05], "scale": 1.1}, 64)
    bright, mm = np.asarray(out)[..., 0] > 127, np.asarray(m) > 0
    assert set(np.unique(np.asarray(m))) <= {0, 255}
    assert (bright & mm).sum() / (bright | mm).sum() > 0.85  # the same region, up to edge resampling
    assert not np.array_equal(mm, np.asarray(mask) > 0)  # it did move


def test_posed_copy_layout_reuse_and_foreign_folder(tmp_path):
    ds = _category(tmp_path / "src")
    out = posed_copy(ds, tmp_path / "cache", seed=3, size=48)
    posed = load_dataset(tmp_path / "cache", out.name)
    assert out.name == "widget_posed" and len(posed.train_good()) == 3 and len(posed.test()) == 3
    assert posed.has_masks and (out / "ground_truth" / "dent" / "000_mask.png").is_file()
    stamp = (out / RECORD).stat().st_mtime_ns
    assert posed_copy(ds, tmp_path / "cache", seed=3, size=48) == out and (out / RECORD).stat().st_mtime_ns == stamp
    posed_copy(ds, tmp_path / "cache", seed=4, size=48)  # other settings: rebuilt
    assert (out / RECORD).stat().st_mtime_ns != stamp
    (tmp_path / "cache" / "foreign").mkdir()
    with pytest.raises(FsadError, match="not written by"):
        posed_copy(ds, tmp_path / "cache", name="foreign")


def test_small_defect_copy_keeps_only_small_masks(tmp_path):
    ds = _category(tmp_path / "src")
    areas = sorted(mask_area(r) for r in ds.test() if r.label)
    out = small_defect_copy(ds, tmp_path / "cache", max_area=0.05, size=64)
    small = load_dataset(tmp_path / "cache", out.name)
    assert areas[0] < 0.05 < areas[1]
    assert [r.image_id.split("/", 1)[1] for r in small.test() if r.label] == ["test/dent/001"]
    assert len(small.train_good()) == 3
    with pytest.raises(FsadError, match="max_area"):
        small_defect_copy(ds, tmp_path / "cache", name="none", max_area=0.001)
