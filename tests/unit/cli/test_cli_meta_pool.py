"""``fsad evaluate --method caml``: the meta-training pool is chosen on the command line (the root's other
categories by default, generated categories for a one-category root such as bottle) and each row says
which pool it learnt from, never the evaluated category."""

from __future__ import annotations

import json

import pytest

from _builders import build_mvtec_category
from fewshot_core.cli import main

QUICK = ["--param", 'train={"steps": 2, "episodes_per_step": 1, "time_budget_s": 60}']


def _run(capsys, *args) -> list[dict]:
    code = main(["evaluate", *args, "--protocol", "supervised", "--method", "caml", "--k-good", "1", "--k-bad", "1",
                 "--seeds", "0", "--image-size", "32", "--num-workers", "0", "--json", *QUICK])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
    multi = tmp_path / "multi"
    for name in ("alpha", "beta", "gamma"):
        build_mvtec_category(multi, name, n_train=4, n_test_good=3, defects={"scratch": 3, "dent": 3})
    single = tmp_path / "single"
    build_mvtec_category(single, "solo", n_train=4, n_test_good=3, defects={"scratch": 3, "dent": 3})
    return multi, single, tmp_path


def test_default_pool_is_the_other_categories_of_the_root(roots, capsys):
    multi, _, tmp = roots
    (row,) = _run(capsys, str(multi), "--category", "alpha", "--store", str(tmp / "store"))
    assert row["meta_pool"].endswith("beta, gamma") and "alpha" not in row["meta_pool"]
    assert sorted(json.loads(row["info"])["trained_on"]) == ["beta", "gamma"]


def test_one_category_root_meta_trains_on_generated_categories(roots, capsys):
    _, single, tmp = roots
    (row,) = _run(capsys, str(single), "--category", "solo", "--store", str(tmp / "store"),
                  "--meta-pool", "synthetic:2")
    assert row["meta_pool"].startswith("synthetic (2 generated")
    assert "solo" not in json.loads(row["info"])["trained_on"]


def test_another_root_and_bad_sources(roots, capsys):
    multi, single, tmp = roots
    (row,) = _run(capsys, str(single), "--category", "solo", "--store", str(tmp / "store"),
                  "--meta-pool", str(multi))
    assert row["meta_pool"].endswith("alpha, beta, gamma")
    for bad, words in (("root", "no category besides"), ("synthetic:0", "synthetic:N"), ("nowhere", "existing")):
        code = main(["evaluate", str(single), "--category", "solo", "--protocol", "supervised", "--method", "caml",
                     "--k-good", "1", "--k-bad", "1", "--seeds", "0", "--image-size", "32", "--num-workers", "0",
                     "--store", str(tmp / "store"), "--meta-pool", bad, *QUICK])
        assert code == 2 and words in capsys.readouterr().err
