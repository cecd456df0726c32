"""Repeated list values and out-of-range counts are refused by argparse in one line (exit 2), before any
work: a repeated seed used to repeat its row and skew mean ± std; ``--num-workers -1`` ended in a
``ValueError`` traceback from the data loader."""

from __future__ import annotations

import pytest

from fewshot_core.cli import build_parser


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    return errors[0]


EVAL = ["evaluate", "ROOT", "--category", "c", "--method", "knn", "--shots", "1"]


@pytest.mark.parametrize("argv, message", [
    (EVAL + ["--seeds", "0", "0", "1"], "argument --seeds: 0 given twice; give each value once"),
    (EVAL + ["--seeds", "-1"], "argument --seeds: -1: must be 0 or more"),
    (EVAL + ["--param", "k=1", "--param", "k=5"], "argument --param: key 'k' given twice"),
    (EVAL + ["--layers", "2,2"], "argument --layers: '2,2': stage 2 given twice"),
    (EVAL + ["--num-workers", "-1"], "argument --num-workers: -1: must be 0 or more (0 decodes images in-process)"),
    (EVAL + ["--mask-size", "0"], "argument --mask-size: 0: must be 1 or more"),
    (["embed", "ROOT", "--num-workers", "-1"], "argument --num-workers: -1: must be 0 or more"),
    (["embed", "ROOT", "--batch-size", "0"], "argument --batch-size: 0: must be 1 or more"),
    (["embed", "ROOT", "--layers", "1,3,1"], "stage 1 given twice"),
    (["data", "download", "ROOT", "--category", "bottle", "cable", "--category", "bottle"],
     "argument --category: bottle given twice"),
], ids=["seeds", "negative-seed", "param", "layers", "eval-workers", "mask-size", "embed-workers", "batch",
        "embed-layers", "download-categories"])
def test_bad_list_and_count_arguments_are_one_line_errors(argv, message, capsys):
    assert message in _refused(argv, capsys)


def test_distinct_values_still_parse():
    args = build_parser().parse_args(EVAL + ["--seeds", "2", "0", "1", "--param", "k=1", "--param", "index=ivf",
                                             "--num-workers", "0"])
    assert args.seeds == [2, 0, 1] and args.param == [("k", 1), ("index", "ivf")] and args.num_workers == 0
    assert build_parser().parse_args(EVAL).seeds == [0, 1, 2, 3, 4] and build_parser().parse_args(EVAL).param == []
    args = build_parser().parse_args(["data", "download", "R", "--category", "bottle", "--category", "cable"])
    assert args.category == ["bottle", "cable"]
    assert build_parser().parse_args(["data", "download", "R"]).category is None


# --- an argparse error is three short lines, not the whole usage block ---------------------------------------


@pytest.mark.parametrize("argv, usage, help_line", [
    (EVAL + ["--seeds", "0", "0"], "usage: fsad evaluate [ROOT] --method METHOD [options]", "see `fsad evaluate --help`"),
    (["evaluate", "ROOT", "--shots", "1"], "usage: fsad evaluate [ROOT] --method METHOD [options]",
     "see `fsad evaluate --help`"),
    (["data", "synth"], "usage: fsad data synth ROOT [options]", "see `fsad data synth --help`"),
    (["nosuchcommand"], "usage: fsad COMMAND", "see `fsad --help`"),
], ids=["bad-value", "missing-required", "missing-positional", "unknown-command"])
def test_an_argument_error_shows_a_short_usage_and_where_help_is(argv, usage, help_line, capsys):
    """argparse printed its full usage (18 lines for ``evaluate``) above the one line that matters."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [usage, lines[1], help_line] and "error:" in lines[1], lines


# --- a file where a folder belongs (and the reverse) is one line, not a traceback ----------------------------


def _one_line(capsys, argv) -> str:
    from fewshot_core.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusal of the value
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, err
    return errors[0]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("not a folder")
    return path


def test_out_naming_a_file_is_one_line(tmp_path, a_file, capsys):
    line = _one_line(capsys, ["predict", tmp_path, "--model", tmp_path / "m", "--out", a_file])
    assert f"{a_file} is a file, not a folder" in line
    line = _one_line(capsys, ["predict", tmp_path, "--model", tmp_path / "m", "--out", a_file / "sub"])
    assert f"{a_file / 'sub'}: {a_file} is a file, not a folder" in line


def test_synth_onto_a_file_is_one_line(a_file, capsys):
    assert f"{a_file} is a file, not a folder" in _one_line(capsys, ["data", "synth", a_file])


def test_manifest_onto_a_folder_is_one_line(tmp_path, capsys):
    from _builders import build_mvtec_category

    build_mvtec_category(tmp_path / "data", n_train=2, n_test_good=1, defects={"cut": 1})
    folder = tmp_path / "out"
    folder.mkdir()
    line = _one_line(capsys, ["data", "manifest", tmp_path / "data", folder])
    assert f"{folder} is a folder, not a file" in line


@pytest.mark.parametrize("command", ["embed", "evaluate", "store"])
def test_store_naming_a_file_is_one_line(command, tmp_path, a_file, capsys):
    argv = {"embed": ["embed", tmp_path, "--store", a_file],
            "evaluate": ["evaluate", tmp_path, "--method", "knn", "--shots", "1", "--store", a_file],
            "store": ["store", "verify", "--store", a_file]}[command]
    assert f"{a_file} is a file, not a folder" in _one_line(capsys, argv)


@pytest.mark.parametrize("variable, argv", [("FSAD_HOME", ["store", "verify"]),
                                            ("DAGSTER_HOME", ["mlflow-ui", "--port", "9"])])
def test_home_variable_naming_a_file_is_one_line(variable, argv, a_file, capsys, monkeypatch):
    monkeypatch.setenv(variable, str(a_file))
    assert f"{variable}={a_file} is a file, not a folder" in _one_line(capsys, argv)


def test_a_file_met_deeper_is_still_one_line(a_file, capsys, monkeypatch):
    """The CLI's safety net: a ``NotADirectoryError`` from anywhere names the file in one line."""
    from fewshot_core.cli import main, store

    monkeypatch.setattr(store, "run_verify", lambda args: (a_file / "inner").mkdir())
    code = main(["store", "verify"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"fsad: error: {a_file} is a file, not a folder", err
