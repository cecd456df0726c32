"""The fsad-vs-anomalib benchmark's own parts (benchmarks/vs_anomalib.py): no anomalib needed."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pytest

from fewshot_core.data import load_category
from fewshot_core.episodes import sample_oneclass
from fewshot_core.errors import FsadError
from tests._builders import build_mvtec_category


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("vs_anomalib")


def test_support_root_holds_only_the_episode_support_and_the_whole_test_split(bench, tmp_path):
    build_mvtec_category(tmp_path / "src", "widget", n_train=6, defects={"scratch": 2, "dent": 1})
    dataset = load_category(tmp_path / "src", "widget")
    episode = sample_oneclass(dataset, 2, seed=3)

    root = bench.support_root(dataset, episode, tmp_path / "copy")
    copy = load_category(root, "widget")

    assert sorted(r.image_id for r in copy.train_good()) == sorted(episode.support_ids)
    assert sorted(r.image_id for r in copy.test()) == sorted(episode.query_ids)
    originals = {r.image_id: r for r in dataset.records}
    for record in copy.records:  # the very files fsad reads (no symlinks: anomalib skips them), masks alike
        assert not record.path.is_symlink()
        assert record.path.read_bytes() == originals[record.image_id].path.read_bytes()
        source_mask = originals[record.image_id].mask_path
        assert (record.mask_path is None) == (source_mask is None)
        if source_mask is not None:
            assert record.mask_path.read_bytes() == source_mask.read_bytes()


def test_support_root_refuses_a_used_folder(bench, tmp_path):
    build_mvtec_category(tmp_path / "src", "widget", n_train=3)
    dataset = load_category(tmp_path / "src", "widget")
    episode = sample_oneclass(dataset, 1, seed=0)
    bench.support_root(dataset, episode, tmp_path / "copy")
    with pytest.raises(FsadError, match="already exists"):
        bench.support_root(dataset, episode, tmp_path / "copy")


def _row(setting, fsad_s, anomalib_s, fsad_auc=0.99, anomalib_auc=None):
    return {"setting": setting, "fsad": {"seconds": fsad_s, "image_auroc": fsad_auc},
            "anomalib": {"seconds": anomalib_s, "image_auroc": anomalib_auc}}


def test_table_gives_ratio_per_setting_and_the_worst_against_the_bar(bench):
    table = bench.format_table([_row("oc-k1-s0", 4.0, 40.0, 1.0, 0.98765), _row("oc-k2-s0", 8.0, 20.0)])
    lines = table.splitlines()
    assert lines[0].startswith("| setting | fsad s | anomalib s | ratio |")
    assert lines[2] == "| oc-k1-s0 | 4.0 | 40.0 | 10.00x | 1.0000 | 0.9877 |"
    assert lines[3] == "| oc-k2-s0 | 8.0 | 20.0 | 2.50x | 0.9900 | - |"
    assert lines[-1] == "worst ratio over the grid: 2.50x (misses the 10x bar)"
    assert bench.format_table([_row("oc-k1-s0", 1.0, 12.0)]).endswith("12.00x (meets the 10x bar)")


def test_table_adds_the_stored_views_columns_when_measured(bench):
    row = _row("oc-k16-s0", 20.0, 40.0, 1.0, 1.0)
    row["fsad"]["stored_seconds"] = 8.0
    lines = bench.format_table([row, _row("oc-k1-s0", 4.0, 40.0)]).splitlines()
    assert lines[0] == ("| setting | fsad s | fsad s, views stored | anomalib s | ratio | ratio, views stored | "
                        "fsad image AUROC | anomalib image AUROC |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| oc-k16-s0 | 20.0 | 8.0 | 40.0 | 2.00x | 5.00x | 1.0000 | 1.0000 |"
    assert lines[3] == "| oc-k1-s0 | 4.0 | - | 40.0 | 10.00x | - | 0.9900 | - |"
    assert lines[-1] == "worst ratio over the grid: 2.00x (misses the 10x bar); views stored: 5.00x"


def test_missing_or_broken_anomalib_python_is_one_line_naming_the_fix(bench, tmp_path, capsys):
    with pytest.raises(FsadError, match="no anomalib python given.*--anomalib-python"):
        bench.check_anomalib_python(None)
    with pytest.raises(FsadError, match="no such file.*pip install anomalib"):
        bench.check_anomalib_python(str(tmp_path / "nope" / "python"))
    if importlib.util.find_spec("anomalib") is None:  # the project's own interpreter: no anomalib, by design
        with pytest.raises(FsadError, match="cannot import anomalib.*--anomalib-python"):
            bench.check_anomalib_python(sys.executable)

    assert bench.main(["--anomalib-python", str(tmp_path / "python")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --anomalib-python") and "venv" in err[0]


def test_default_grid_is_the_sweeps_oneclass_grid(bench):
    from pipelines.config import SweepConfig

    assert bench.default_grid() == (SweepConfig().shots, SweepConfig().oneclass_seeds)


def test_grid_gives_both_sides_the_samplers_support_and_alternates_who_goes_first(bench, tmp_path):
    from fewshot_core.settings import ONECLASS, Setting

    build_mvtec_category(tmp_path / "src", "widget", n_train=6)
    dataset = load_category(tmp_path / "src", "widget")
    settings = [Setting(ONECLASS, k, 0, s) for k in (1, 2) for s in (0, 1)]
    calls, seen = [], {}

    def fsad(setting):
        calls.append(("fsad", setting.key))
        return {"seconds": 1.0, "image_auroc": 1.0}

    def anomalib(setting, data_root, work):
        calls.append(("anomalib", setting.key))
        seen[setting.key] = sorted(r.image_id for r in load_category(data_root, "widget").train_good())
        return {"seconds": 5.0, "image_auroc": 0.9}

    kept = []
    rows = bench.run_grid(dataset, settings, fsad, anomalib, rows=kept)

    assert [r["setting"] for r in rows] == ["oc-k1-s0", "oc-k1-s1", "oc-k2-s0", "oc-k2-s1"]
    assert [r["first"] for r in rows] == ["fsad", "anomalib", "fsad", "anomalib"]
    assert [c[0] for c in calls] == ["fsad", "anomalib", "anomalib", "fsad"] * 2
    for row, setting in zip(rows, settings):
        drawn = list(sample_oneclass(dataset, setting.k_good, setting.seed).support_ids)
        assert seen[row["setting"]] == row["support"] == drawn
    assert len(rows[0]["support"]) == 1 and len(rows[2]["support"]) == 2
    assert rows is kept  # what a failure part-way leaves is still the caller's to print


def test_grid_child_runs_each_setting_as_fsad_evaluate_would_after_one_startup(bench, tmp_path, monkeypatch):
    """The in-process grid times each setting apart from the start-up, and its numbers are the CLI's."""
    from fewshot_core.cli import main as fsad_main

    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
    build_mvtec_category(tmp_path / "src", "widget", n_train=5, defects={"scratch": 2})
    out = bench.fsad_grid_child(tmp_path / "src", "widget", [(1, 0), (2, 1)])

    assert list(out[0]) == ["startup_s"] and len(out) == 3
    assert all(r["seconds"] > 0 and 0 <= r["image_auroc"] <= 1 for r in out[1:])
    for (shots, seed), timed in zip([(1, 0), (2, 1)], out[1:]):
        monkeypatch.setattr(sys, "stdout", io.StringIO())
        fsad_main(["evaluate", str(tmp_path / "src"), "--category", "widget", "--method", "patchcore",
                   "--shots", str(shots), "--seeds", str(seed), "--json"])
        row = json.loads(sys.stdout.getvalue())[0]
        monkeypatch.undo()
        monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
        assert timed["image_auroc"] == row["image_auroc"] and timed["pixel_auroc"] == row["pixel_auroc"]
