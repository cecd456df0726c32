"""``fsad evaluate`` on questionable data: valid JSON when a metric cannot be computed, and the same
warnings ``fsad data validate`` gives for a test split without good or without defect images and for
copies across splits."""

from __future__ import annotations

import json
import shutil

import pytest

from _builders import build_mvtec_category
from fewshot_core.cli import main


def _evaluate(capsys, root, *extra):
    code = main(["evaluate", str(root), "--category", "w", "--method", "knn", "--shots", "2", "--seeds", "0",
                 "--weights", "random", "--image-size", "32", "--num-workers", "0", "--augment", "none",
                 "--store", str(root.parent / "store"), *extra])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in out + err, err
    return out, err


def test_json_of_an_only_good_test_split_is_valid_json_with_null(tmp_path, capsys):
    """Before: ``NaN`` tokens, which JSON parsers (``jq``, ``JSON.parse``, strict ``json.loads``) refuse."""
    build_mvtec_category(tmp_path / "d", "w", n_train=3, n_test_good=2, defects={})
    out, err = _evaluate(capsys, tmp_path / "d", "--json")
    rows = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert rows and rows[0]["balanced_accuracy"] is None and "image_auroc" not in rows[0]
    assert "warning: w: no defect images in test; anomaly metrics need at least one" in err


def test_an_only_defective_test_split_warns_like_an_only_good_one(tmp_path, capsys):
    """Before: the image metrics were silently absent."""
    build_mvtec_category(tmp_path / "d", "w", n_train=3, n_test_good=0, defects={"cut": 2})
    out, err = _evaluate(capsys, tmp_path / "d")
    assert "warning: w: no good images in test; image metrics (AUROC, F1) need at least one" in err
    assert "image_auroc" not in out


def test_a_copy_across_splits_is_warned_about(tmp_path, capsys):
    cat = build_mvtec_category(tmp_path / "d", "w", n_train=3, n_test_good=2, defects={"cut": 2})
    shutil.copy(cat / "train/good/000.png", cat / "test/good/100.png")
    _out, err = _evaluate(capsys, tmp_path / "d")
    warned = [line for line in err.splitlines() if "train/test leakage" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "byte-identical" in warned[0], err


def test_the_transductive_protocol_runs_from_fsad_evaluate(tmp_path, capsys):
    """``--protocol transductive --method musc``: the test images scored against each other, 0 or more shots."""
    build_mvtec_category(tmp_path / "data", "w", n_train=4, n_test_good=3, defects={"cut": 3})
    base = ["evaluate", str(tmp_path / "data"), "--category", "w", "--protocol", "transductive", "--method", "musc",
            "--seeds", "0", "--weights", "random", "--image-size", "32", "--num-workers", "0",
            "--store", str(tmp_path / "store"), "--json"]
    for shots in ("0", "2"):
        assert main(base + ["--shots", shots]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["protocol"] == "transductive" and row["shots"] == int(shots) and 0.0 <= row["image_auroc"] <= 1.0
    assert main(base + ["--shots", "full"]) == 2
    assert "0 or more good shots" in capsys.readouterr().err


def test_the_table_says_when_the_support_had_the_parts_registered(tmp_path, capsys):
    from fewshot_core.data.synth import generate

    (name,) = generate(tmp_path / "data", seed=0, size=128, n_train=8, n_test_good=4, n_test_per_defect=2,
                       kinds=("screw",))
    base = ["evaluate", str(tmp_path / "data"), "--category", name, "--method", "patchcore", "--shots", "4",
            "--seeds", "0", "--image-size", "128", "--num-workers", "0", "--store", str(tmp_path / "store")]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "parts registered (align=auto) in 1 of 1 seeds" in out and "--align none" in out
    assert main(base + ["--align", "none"]) == 0
    assert "parts registered" not in capsys.readouterr().out
