"""``fsad run`` and ``fsad mlflow-ui`` come from ``pipelines`` through the ``fsad.commands`` entry-point
group, so loading the library and its CLI loads no Dagster (the import graph itself: test_architecture)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow  # imports torch, timm, mlflow, ...
@pytest.mark.timeout(300)
def test_importing_every_library_module_and_the_cli_loads_no_dagster():
    code = ("import importlib, pkgutil, sys, fewshot_core\n"
            "for m in pkgutil.walk_packages(fewshot_core.__path__, 'fewshot_core.'):\n"
            "    if m.name != 'fewshot_core.__main__': importlib.import_module(m.name)\n"
            "from fewshot_core.cli import _COMMAND_MODULES\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('dagster', 'pipelines'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-2000:]


def test_run_and_mlflow_ui_are_registered_from_the_pipeline_package():
    from importlib.metadata import entry_points

    from fewshot_core.cli import ENTRY_POINT_GROUP, build_parser

    assert [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)] == ["pipelines.cli:register"]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "mlflow-ui", "evaluate", "embed"} <= set(sub.choices)
    assert sub.choices["run"].get_default("func").__module__ == "pipelines.cli"
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points."fsad.commands"]' in text and 'pipelines = "pipelines.cli:register"' in text


def test_the_instance_template_ships_as_package_data(tmp_path, monkeypatch):
    from pipelines.cli import instance_template, prepare_home

    text = (ROOT / "pyproject.toml").read_text()
    assert 'pipelines = ["templates/*.yaml"]' in text
    monkeypatch.chdir(tmp_path)  # nothing found through the checkout or the working directory
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = prepare_home(None)
    assert home == tmp_path / "dagster_home"
    assert (home / "dagster.yaml").read_bytes() == instance_template() and b"max_concurrent_runs" in instance_template()


def test_a_stale_install_without_the_entry_points_says_how_to_fix_it(monkeypatch, capsys):
    import fewshot_core.cli as cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e ." in err[0] and "fsad.commands" in err[0]
