"""``fsad data`` sub-commands: output, exit codes, no tracebacks; download/synth wiring."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from _builders import build_folder_layout, build_mvtec_category
from fewshot_core.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.shared_data
def test_validate_real_bottle(capsys, mvtec_root):
    code, out, _ = run(capsys, "data", "validate", mvtec_root, "--category", "bottle")
    assert code == 0
    lines = {" ".join(line.split()) for line in out.splitlines()}
    for expected in ["train/good 209", "test/good 20", "test/broken_large 20", "test/broken_small 22",
                     "test/contamination 21", "masks 63"]:
        assert expected in lines, out


def _linked_copy(src: Path, dst: Path, skip: set[str]) -> None:
    """Symlink every file of ``src`` into ``dst`` (same tree) except the relative paths in ``skip``."""
    for dirpath, _, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if str(rel / f) not in skip:
                (dst / rel / f).symlink_to(Path(dirpath) / f)


@pytest.mark.shared_data
def test_broken_bottle_copy_two_problems(capsys, mvtec_root, tmp_path):
    truncated, deleted = "test/broken_small/005.png", "ground_truth/contamination/010_mask.png"
    cat = tmp_path / "mvtec" / "bottle"
    _linked_copy(mvtec_root / "bottle", cat, {truncated, deleted})
    data = (mvtec_root / "bottle" / truncated).read_bytes()
    (cat / truncated).write_bytes(data[: len(data) // 2])
    code, out, err = run(capsys, "data", "validate", tmp_path / "mvtec", "--category", "bottle")
    assert code == 2
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert any(str(cat / truncated) in line and "cannot read image" in line for line in lines)
    assert any(str(cat / "test/contamination/010.png") in line and "no mask" in line for line in lines)
    assert "2 problems" in err


def test_validate_image_level_and_json(capsys, tmp_path):
    build_mvtec_category(tmp_path, "part", masks=False, defects={"scratch": 2})
    code, out, _ = run(capsys, "data", "validate", tmp_path)
    assert code == 0 and "image-level: no masks" in out
    code, out, _ = run(capsys, "data", "validate", tmp_path, "--json")
    rep = json.loads(out)
    assert code == 0 and rep["ok"] and rep["counts"]["part"]["test"] == {"good": 2, "scratch": 2}
    assert rep["notes"] == {"part": "image-level: no masks"}


def test_validate_layout_flags_and_yaml(capsys, tmp_path):
    build_folder_layout(tmp_path, n_good=5, defects={"scratch": 2, "dent": 1})
    code, out, _ = run(capsys, "data", "validate", "--good-dir", tmp_path / "ok", "--defect-dir",
                       tmp_path / "nok/scratch", "--defect-dir", tmp_path / "nok/dent", "--category", "mine")
    assert code == 0 and out.startswith("mine: 8 images, 0 masks (image-level: no masks)")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("good_dir: ok\ndefect_dirs: [nok/scratch, nok/dent]\nmask_dir: masks\n")
    code, out, err = run(capsys, "data", "validate", "--layout-config", cfg, "--json")
    rep = json.loads(out)
    assert code == 2 and len(rep["problems"]) == 1 and "mask folder not found" in rep["problems"][0]


def test_user_errors_exit_2_one_line(capsys, tmp_path):
    for argv in (["data", "validate", tmp_path / "missing"], ["data", "validate"],
                 ["data", "manifest", tmp_path / "missing", tmp_path / "m.parquet"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("fsad: error:")


def test_manifest_command(capsys, tmp_path):
    build_mvtec_category(tmp_path / "root", "a")
    build_mvtec_category(tmp_path / "root", "b", masks=False)
    out_path = tmp_path / "m.parquet"
    code, out, _ = run(capsys, "data", "manifest", tmp_path / "root", out_path)
    assert code == 0 and "11 images" not in out and "22 images (2 categories)" in out
    df = pd.read_parquet(out_path)
    assert len(df) == 22 and set(df.category) == {"a", "b"} and (df.width == 32).all()
    code, _, _ = run(capsys, "data", "manifest", tmp_path / "root", out_path, "--category", "b")
    assert code == 0 and set(pd.read_parquet(out_path).category) == {"b"}
    build_folder_layout(tmp_path / "own", n_good=5)
    code, out, _ = run(capsys, "data", "manifest", "--good-dir", tmp_path / "own/ok",
                       "--defect-dir", tmp_path / "own/nok/dent", out_path)
    assert code == 0 and len(pd.read_parquet(out_path)) == 7


def test_download_and_synth_are_wired(capsys, tmp_path, monkeypatch):
    calls = []
    fake_dl = types.ModuleType("fewshot_core.data.download")
    fake_dl.download_mvtec = lambda root, categories=None: calls.append(("dl", root, categories))
    fake_synth = types.ModuleType("fewshot_core.data.synth")
    fake_synth.generate = lambda root, **kw: calls.append(("synth", root, kw)) or ["c0", "c1"]
    monkeypatch.setitem(sys.modules, "fewshot_core.data.download", fake_dl)
    monkeypatch.setitem(sys.modules, "fewshot_core.data.synth", fake_synth)
    assert run(capsys, "data", "download", tmp_path)[0] == 0
    assert run(capsys, "data", "download", tmp_path, "--category", "bottle", "cable", "--category", "grid")[0] == 0
    code, out, _ = run(capsys, "data", "synth", tmp_path, "--categories", "2", "--seed", "3", "--size", "64")
    assert code == 0 and "c0, c1" in out
    assert calls == [
        ("dl", tmp_path, None),
        ("dl", tmp_path, ["bottle", "cable", "grid"]),
        ("synth", tmp_path, {"categories": 2, "seed": 3, "size": 64}),
    ]
