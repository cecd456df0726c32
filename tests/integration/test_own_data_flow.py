"""Issue 8 end to end: a user's own folders (grayscale, two defect folders, no masks) through the CLI."""

from __future__ import annotations

import json

from _builders import build_folder_layout

from fewshot_core.cli import main


def _layout_flags(dirs) -> list[str]:
    flags = ["--good-dir", str(dirs["good_dir"]), "--test-good-dir", str(dirs["test_good_dir"])]
    for d in dirs["defect_dirs"]:
        flags += ["--defect-dir", str(d)]
    return flags + ["--category", "part"]


def test_image_level_folders_validate_embed_and_evaluate(tmp_path, capsys):
    dirs = build_folder_layout(tmp_path / "own", n_good=6, defects={"scratch": 3, "dent": 3}, test_good=3,
                               size=48, mode="L")
    flags = _layout_flags(dirs)
    store = ["--store", str(tmp_path / "store"), "--image-size", "64", "--num-workers", "0"]

    assert main(["data", "validate", *flags]) == 0
    assert "image-level" in capsys.readouterr().out

    assert main(["embed", *flags, *store, "--no-progress"]) == 0
    assert "built" in capsys.readouterr().out
    assert main(["embed", *flags, *store, "--no-progress"]) == 0
    assert "cache hit" in capsys.readouterr().out

    assert main(["evaluate", *flags, *store, "--method", "patchcore", "--shots", "2", "--seeds", "0", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert 0.0 <= row["image_auroc"] <= 1.0
    # pixel metrics are absent for an image-level dataset: not zero, not NaN
    assert not any(key.startswith("pixel_") or key == "aupro" for key in row)


def test_root_and_layout_flags_together_is_one_line_error(tmp_path, capsys):
    dirs = build_folder_layout(tmp_path / "own", n_good=2, defects={"scratch": 1}, size=32)
    code = main(["embed", str(tmp_path), "--good-dir", str(dirs["good_dir"]), "--defect-dir",
                 str(dirs["defect_dirs"][0])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "exactly one of ROOT" in err
