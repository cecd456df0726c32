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
