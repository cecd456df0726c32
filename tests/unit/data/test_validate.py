"""Validation: every problem at once, one line each naming the file; counts; image-level notes."""

from __future__ import annotations

import pytest
from PIL import Image

from _builders import build_folder_layout, build_mvtec_category, write_mask
from fewshot_core.data import LayoutConfig
from fewshot_core.data.validate import IMAGE_LEVEL_NOTE, validate
from fewshot_core.errors import FsadError


def test_clean_category_counts(tmp_path):
    build_mvtec_category(tmp_path, "widget", n_train=4, n_test_good=2, defects={"scratch": 2, "dent": 3})
    rep = validate(tmp_path)
    assert rep.ok and rep.problems == [] and rep.warnings == []
    assert rep.counts == {"widget": {"train": {"good": 4}, "test": {"good": 2, "dent": 3, "scratch": 2}, "masks": 5}}
    assert rep.notes == {}


def test_image_level_category_is_valid(tmp_path):
    build_mvtec_category(tmp_path, "part", masks=False)
    rep = validate(tmp_path, "part")
    assert rep.ok and rep.notes == {"part": IMAGE_LEVEL_NOTE} and rep.counts["part"]["masks"] == 0
    assert IMAGE_LEVEL_NOTE in rep.format_counts()


def test_every_problem_reported_at_once(tmp_path):
    cat = build_mvtec_category(tmp_path, "w", n_train=4, defects={"scratch": 3, "dent": 2}, size=32)
    good = cat / "train/good/000.png"
    trunc = cat / "train/good/001.png"
    trunc.write_bytes(good.read_bytes()[:200])
    empty = cat / "test/good/000.png"
    empty.write_bytes(b"")
    (cat / "ground_truth/scratch/000_mask.png").unlink()
    write_mask(cat / "ground_truth/scratch/001_mask.png", size=(16, 16))  # wrong size
    write_mask(cat / "ground_truth/dent/007_mask.png")  # mask without image
    (cat / "test/dent/notes.txt").write_text("stray")
    rep = validate(tmp_path, "w")
    assert not rep.ok
    expected = {
        "train/good/001.png": "cannot read image",
        "test/good/000.png": "0 bytes",
        "test/scratch/000.png": "no mask",
        "ground_truth/scratch/001_mask.png": "16x16 but its image 001.png is 32x32",
        "ground_truth/dent/007_mask.png": "mask without image",
    }
    assert len(rep.problems) == len(expected), rep.problems
    for where, what in expected.items():
        [line] = [p for p in rep.problems if where in p]
        assert what in line and "\n" not in line and line.startswith(str(tmp_path))
    assert any("notes.txt: not an image file" in w for w in rep.warnings)
    assert rep.counts["w"]["masks"] == 4


def test_structural_problems(tmp_path):
    cat = build_mvtec_category(tmp_path, "nogood")
    for p in (cat / "train/good").iterdir():
        p.unlink()
    (cat / "train/good").rmdir()
    (tmp_path / "empty/train/good").mkdir(parents=True)
    (tmp_path / "empty/test").mkdir()
    cat2 = build_mvtec_category(tmp_path, "nomaskdir", defects={"scratch": 2, "dent": 2})
    for p in (cat2 / "ground_truth/dent").iterdir():
        p.unlink()
    (cat2 / "ground_truth/dent").rmdir()
    rep = validate(tmp_path)
    assert sorted(rep.counts) == ["empty", "nogood", "nomaskdir"]
    assert len(rep.problems) == 3, rep.problems
    assert any("nogood/train/good: missing train/good" in p for p in rep.problems)
    assert any("empty: empty category" in p for p in rep.problems)
    assert any("nomaskdir/ground_truth/dent: mask folder missing for 2 images" in p for p in rep.problems)


def test_layout_grayscale_two_defect_folders(tmp_path):
    dirs = build_folder_layout(tmp_path, n_good=6, defects={"scratch": 2, "dent": 1}, mode="L", masks="nested")
    cfg = LayoutConfig(good_dir=dirs["good_dir"], defect_dirs=dirs["defect_dirs"], mask_dir=dirs["mask_dir"], name="g")
    rep = validate(cfg)
    assert rep.ok, rep.problems
    assert rep.counts["g"] == {"train": {"good": 5}, "test": {"good": 1, "dent": 1, "scratch": 2}, "masks": 3}
    img = next((tmp_path / "nok/dent").iterdir())
    Image.new("L", (8, 8)).save(img)  # now smaller than its mask
    rep = validate(cfg)
    assert len(rep.problems) == 1 and "dent_00_mask.png: mask is 32x32" in rep.problems[0]


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "L"])
def test_non_rgb_datasets_validate_and_read_as_rgb(tmp_path, mode):
    from fewshot_core.data import load_category
    from fewshot_core.data.imageio import load_rgb

    build_mvtec_category(tmp_path, "m", n_train=2, n_test_good=1, defects={"d": 1}, mode=mode)
    assert validate(tmp_path).ok
    for r in load_category(tmp_path, "m").records:
        img = load_rgb(r.path)
        assert img.mode == "RGB" and img.size == (32, 32)


def test_empty_mask_is_a_warning(tmp_path):
    cat = build_mvtec_category(tmp_path, "w", defects={"d": 1})
    write_mask(cat / "ground_truth/d/000_mask.png", box=(0, 0, 0, 0))
    rep = validate(tmp_path)
    assert rep.ok and len(rep.warnings) == 1 and "000_mask.png: mask is empty" in rep.warnings[0]


def test_unusable_source_raises(tmp_path):
    with pytest.raises(FsadError, match="not found"):
        validate(tmp_path / "missing")
    with pytest.raises(FsadError, match="no category folders"):
        validate(tmp_path)


def test_loading_refuses_a_mask_whose_size_differs_with_the_validators_line(tmp_path, capsys):
    """Before: `fsad data validate` refused it, but loading (evaluate, the pipeline) resized the mask
    silently and reported pixel metrics on it."""
    from fewshot_core.cli import main
    from fewshot_core.data import load_dataset
    from fewshot_core.data.validate import mask_size_problems

    build_mvtec_category(tmp_path, "widget", defects={"scratch": 2}, size=32)
    write_mask(tmp_path / "widget" / "ground_truth" / "scratch" / "001_mask.png", (32, 24))
    line = validate(tmp_path, "widget").problems
    assert len(line) == 1 and "001_mask.png: mask is 32x24 but its image 001.png is 32x32" in line[0]
    with pytest.raises(FsadError) as err:
        load_dataset(tmp_path, "widget")
    assert str(err.value).startswith(line[0]) and "fsad data validate" in str(err.value)
    from fewshot_core.data.layouts import scan_source

    assert mask_size_problems(scan_source(tmp_path, "widget")[0].dataset) == line
    assert main(["evaluate", str(tmp_path), "--category", "widget", "--method", "knn", "--shots", "1",
                 "--seeds", "0", "--image-size", "32", "--weights", "random", "--num-workers", "0"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().splitlines() == [f"fsad: error: {err.value}"]


def test_layout_loading_refuses_a_mismatched_mask(tmp_path):
    from fewshot_core.data import load_dataset

    dirs = build_folder_layout(tmp_path, n_good=4, defects={"dent": 1}, masks="nested")
    cfg = LayoutConfig(good_dir=dirs["good_dir"], defect_dirs=dirs["defect_dirs"], mask_dir=dirs["mask_dir"], name="g")
    load_dataset(cfg)
    write_mask(tmp_path / "masks" / "dent" / "dent_00_mask.png", 16)
    with pytest.raises(FsadError, match="dent_00_mask.png: mask is 16x16 but its image dent_00.png is 32x32"):
        load_dataset(cfg)
