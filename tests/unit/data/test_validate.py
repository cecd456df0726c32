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


# --- copies: train/test leakage and repeated support images ---------------------------------------------------


def test_a_train_image_copied_into_test_is_reported_as_leakage(tmp_path):
    """Before: nothing said, and bottle's AUROC moved 0.953 -> 0.920 with one copied image."""
    import shutil

    cat = build_mvtec_category(tmp_path, "w", n_train=4, n_test_good=2, defects={"cut": 2})
    shutil.copy(cat / "train/good/000.png", cat / "test/good/100.png")
    rep = validate(tmp_path, "w")
    assert not rep.ok and len(rep.problems) == 1, rep.problems
    line = rep.problems[0]
    assert "byte-identical" in line and "train/test leakage" in line
    assert str(cat / "train/good/000.png") in line and str(cat / "test/good/100.png") in line


def test_a_reencoded_copy_across_splits_is_found_by_its_pixels(tmp_path):
    cat = build_mvtec_category(tmp_path, "w", n_train=3, n_test_good=1, defects={"cut": 1})
    Image.open(cat / "train/good/001.png").save(cat / "test/good/copy.bmp")  # other bytes, same picture
    rep = validate(tmp_path, "w")
    assert len(rep.problems) == 1 and "the same pixels as" in rep.problems[0], rep.problems
    assert "train/test leakage" in rep.problems[0]


def test_repeated_support_images_are_a_warning(tmp_path):
    import shutil

    cat = build_mvtec_category(tmp_path, "w", n_train=3, n_test_good=1, defects={"cut": 1})
    for name in ("001.png", "002.png"):
        shutil.copy(cat / "train/good/000.png", cat / "train/good" / name)
    rep = validate(tmp_path, "w")
    assert rep.ok, rep.problems
    repeated = [w for w in rep.warnings if "byte-identical" in w]
    assert len(repeated) == 2 and all("repeated support image" in w for w in repeated), rep.warnings


def test_the_manifest_check_reports_leakage(tmp_path):
    """The pipeline's blocking data check runs the same validation."""
    import shutil

    from pipelines.assets.data import manifest_problems
    from pipelines.config import load_config

    cat = build_mvtec_category(tmp_path / "data", "w", n_train=3, n_test_good=1, defects={"cut": 1})
    shutil.copy(cat / "train/good/000.png", cat / "test/good/100.png")
    cfg = load_config(None)
    cfg.data_source, cfg.data_root = "mvtec", str(tmp_path / "data")
    from fewshot_core.data import load_dataset
    from fewshot_core.data.manifest import build_manifest

    problems = manifest_problems(cfg, build_manifest(load_dataset(tmp_path / "data", "w")))
    assert any("train/test leakage" in p for p in problems), problems


# --- the test split lacks one class ------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["defect", "good"])
def test_a_test_split_without_one_class_is_a_warning(missing, tmp_path):
    """Only good test images were warned about; only defective ones left the image metrics silently absent."""
    if missing == "defect":
        build_mvtec_category(tmp_path, "w", n_train=3, n_test_good=2, defects={})
        expected = "no defect images in test; anomaly metrics need at least one"
    else:
        build_mvtec_category(tmp_path, "w", n_train=3, n_test_good=0, defects={"cut": 2})
        expected = "no good images in test; image metrics (AUROC, F1) need at least one"
    rep = validate(tmp_path, "w")
    assert rep.ok and [w for w in rep.warnings if "in test" in w] == [f"{tmp_path / 'w' / 'test'}: {expected}"]


# --- a FIFO named like an image ------------------------------------------------------------------------------


def test_a_fifo_among_the_images_is_a_problem_not_a_hang(tmp_path):
    """``open`` on a FIFO waits for a writer forever: validate, evaluate and the manifest hung."""
    import os
    import subprocess
    import sys

    build_mvtec_category(tmp_path, "w", n_train=3, n_test_good=1, defects={"cut": 1})
    fifo = tmp_path / "w" / "train" / "good" / "pipe.png"
    os.mkfifo(fifo)
    code = ("import sys; from fewshot_core.cli import main; sys.exit(main(sys.argv[1:]))")
    for argv in (["data", "validate", str(tmp_path)], ["data", "manifest", str(tmp_path), str(tmp_path / "m.parquet")],
                 ["evaluate", str(tmp_path), "--method", "knn", "--shots", "1", "--store", str(tmp_path / "s")]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{fifo}: not a regular file (a FIFO" in proc.stdout + proc.stderr
