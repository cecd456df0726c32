"""Derived categories: posed copies move masks with their images; small-defect copies filter by area."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_core.data import load_dataset
from fewshot_core.data.derived import (LOGICAL_KINDS, RECORD, framed, logical_copy, mask_area, part_copy, pose_for,
                                       posed_copy, small_defect_copy, transform_pair)
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


def _fixed_pose_part(root, n_train=6, size=64, plain=False):
    """A dark disc with a light stripe across it on a white background, always in the same place."""
    cat = root / "part"
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 <= 20 ** 2
    for split, stems in (("train", [f"{i:03d}" for i in range(n_train)]), ("test", ["000", "001"])):
        for stem in stems:
            arr = np.full((size, size, 3), 250, np.uint8)
            if not plain:
                arr[disc] = rng.integers(20, 60, (int(disc.sum()), 3), dtype=np.uint8)
                arr[disc & (abs(yy - 32) < 3)] = 140
            (cat / split / "good").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(cat / split / "good" / f"{stem}.png")
    return load_dataset(root, "part")


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_logical_copy_edits_held_out_images_where_the_masks_say(tmp_path):
    src = _fixed_pose_part(tmp_path / "src")
    out = logical_copy(src, tmp_path / "cache", seed=5, size=64, n_per_kind=1)
    ds = load_dataset(tmp_path / "cache", out.name)
    assert out.name == "part_logical" and len(ds.train_good()) == 2 and ds.has_masks
    assert sorted(ds.defect_types()) == sorted(LOGICAL_KINDS)
    def frame(path):  # the part at half the side on its own (noise-free) background
        return framed(Image.open(path), 64, 0.5, np.random.default_rng(0)).astype(int)

    originals = {Path(r.path).stem: frame(r.path) for r in src.train_good()}
    assert (originals["000"][:16] == 250).all() and (originals["000"][24:40, 24:40] < 100).any()
    for rec in ds.records:
        if rec.label == 0:  # good images only framed (train and test alike)
            ref = next(r for r in src.records if r.split == rec.split and Path(r.path).stem == Path(rec.path).stem)
            np.testing.assert_array_equal(_pixels(rec.path), frame(ref.path))
            continue
        assert Path(rec.path).stem not in {Path(r.path).stem for r in ds.train_good()}  # held out, not reused
        edited, mask = _pixels(rec.path), np.asarray(Image.open(rec.mask_path)) > 0
        changed = np.abs(edited - originals[Path(rec.path).stem]).max(-1) > 30
        assert 0.01 < mask.mean() < 0.6
        assert not changed[~mask].any()  # nothing changes outside the mask
        assert changed[mask].mean() > 0.3  # and the marked region did change
    again = logical_copy(src, tmp_path / "again", seed=5, size=64, n_per_kind=1)
    other = logical_copy(src, tmp_path / "other", seed=6, size=64, n_per_kind=1)
    files = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all(np.array_equal(_pixels(out / f), _pixels(again / f)) for f in files)  # seeded
    assert sorted(p.relative_to(other) for p in other.rglob("*.png")) != files or \
        any(not np.array_equal(_pixels(out / f), _pixels(other / f)) for f in files)


def test_logical_copy_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(FsadError, match="lower n_per_kind"):
        logical_copy(_fixed_pose_part(tmp_path / "few", n_train=4), tmp_path / "c1", n_per_kind=1)
    with pytest.raises(FsadError, match="no part found"):
        logical_copy(_fixed_pose_part(tmp_path / "plain", plain=True), tmp_path / "c2", n_per_kind=1)


def test_tall_copy_stacks_each_image_into_a_strip_with_its_mask_in_its_panel(synth_root, tmp_path):
    from fewshot_core.data import list_categories, load_dataset
    from fewshot_core.data.derived import tall_copy
    from fewshot_core.data.imageio import image_size, load_mask

    src = load_dataset(synth_root, list_categories(synth_root)[0])
    first = tall_copy(src, tmp_path, width=32)
    assert tall_copy(src, tmp_path, width=32) == first  # same source and settings: reused
    tall = load_dataset(tmp_path, first.name)
    assert len(tall.records) == len(src.records) and tall.has_masks
    for rec in tall.records:
        assert image_size(rec.path) == (32, 96)
    defect = next(r for r in tall.records if r.mask_path is not None)
    mask = load_mask(defect.mask_path)
    rows = np.nonzero(mask.any(axis=1))[0]
    assert mask.any() and rows.max() // 32 == rows.min() // 32  # the whole defect inside one panel


def _strips(root):
    """A surface category whose images are 96 x 32 strips (and one square), the defect a bright square."""
    cat = root / "strip"
    rng = np.random.default_rng(1)
    for split, defect, stem, shape in (("train", "good", "000", (32, 96)), ("train", "good", "001", (32, 96)),
                                       ("train", "good", "002", (64, 64)), ("test", "good", "000", (32, 96)),
                                       ("test", "dent", "000", (32, 96))):
        arr = rng.integers(90, 140, (*shape, 3), dtype=np.uint8)
        if defect == "dent":
            arr[10:20, 60:70] = 255
            m = np.zeros(shape, np.uint8)
            m[10:20, 60:70] = 255
            (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(cat / "ground_truth" / defect / f"{stem}_mask.png")
        (cat / split / defect).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(cat / split / defect / f"{stem}.png")
    return load_dataset(root, "strip")


def test_part_copy_poses_the_elongated_images_as_parts_with_their_masks(tmp_path):
    ds = _strips(tmp_path / "src")
    out = part_copy(ds, tmp_path / "cache", seed=2, size=128)
    parts = load_dataset(tmp_path / "cache", out.name)
    assert out.name == "strip_parts" and len(parts.train_good()) == 2 and len(parts.test()) == 2  # the square left
    (dent,) = [r for r in parts.records if r.label == 1]
    img = np.asarray(Image.open(dent.path).convert("L")).astype(int)
    mask = np.asarray(Image.open(dent.mask_path)) > 0
    assert mask.any() and img[mask].mean() > 200  # the defect moved with its part
    part = img > 60  # the strip, against the plain background (24)
    assert 0.1 < part.mean() < 0.5 and img[~part].max() <= 60
    ys, xs = np.nonzero(part)
    evals = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
    assert evals[1] > 4 * evals[0]  # still elongated (aspect 3), at its pose
    again = part_copy(ds, tmp_path / "cache", seed=2, size=128)
    assert again == out and np.array_equal(np.asarray(Image.open(dent.path).convert("L")), img.astype(np.uint8))
    with pytest.raises(FsadError, match="lower min_aspect"):
        part_copy(ds, tmp_path / "cache", name="none", min_aspect=4.0)
