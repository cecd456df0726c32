"""One sweep per home and per MLflow experiment: other data is refused in one line, never mixed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot_core.errors import FsadError
from pipelines.config import SweepConfig
from pipelines.sweep_claim import CLAIM, check_experiment, check_home, check_loaded_home, identity

ROOT = Path(__file__).resolve().parents[3]


def _ident(**over) -> dict:
    return {**identity(SweepConfig(name="s"), "/data/mvtec", "mvtec"), **over}


def test_a_home_is_claimed_once_and_refuses_other_data(tmp_path):
    check_home(tmp_path, _ident(), write=True)
    assert json.loads((tmp_path / CLAIM).read_text()) == _ident()
    check_home(tmp_path, _ident())  # the same sweep again: fine
    with pytest.raises(FsadError) as exc:
        check_home(tmp_path, _ident(data="synthetic", root="/w/synthetic", image_size=112))
    message = str(exc.value)
    assert "\n" not in message and "synthetic data" in message and "--dagster-home" in message


def test_an_experiment_is_tagged_and_refuses_other_data(tmp_path):
    from fewshot_core.tracking.runs import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_experiment(tracker, _ident())
    check_experiment(tracker, _ident())
    with pytest.raises(FsadError, match="another name"):
        check_experiment(tracker, _ident(root="/other"))


def test_dagster_dev_refuses_a_sweep_against_a_home_claimed_for_another(tmp_path, monkeypatch):
    monkeypatch.delenv("MVTEC_ROOT", raising=False)
    check_home(tmp_path, _ident(), write=True)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with pytest.raises(FsadError, match="holds sweep 's' on mvtec data"):
        check_loaded_home(SweepConfig(work_dir=str(tmp_path / "work")))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "fresh"))
    check_loaded_home(SweepConfig(work_dir=str(tmp_path / "work")))  # an unclaimed home: loads


def test_fsad_run_into_a_home_of_another_sweep_stops_before_any_stage(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / CLAIM).write_text(json.dumps(_ident()))
    env = {k: v for k, v in os.environ.items() if k not in ("MVTEC_ROOT", "FSAD_SWEEP_CONFIG", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "fewshot_core", "run", "--dagster-home", str(home)], cwd=ROOT,
                          env={**env, "FSAD_HOME": str(tmp_path / "work")}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "holds sweep 's' on mvtec data" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "work" / "tables").exists()


def test_generated_data_is_one_benchmark_wherever_it_is_written(tmp_path):
    """Two work folders regenerate the same synthetic images: one sweep, whichever folder; other generator
    settings are other data."""
    first = identity(SweepConfig(name="s"), tmp_path / "a" / "synthetic", "synthetic")
    check_home(tmp_path, first, write=True)
    check_home(tmp_path, identity(SweepConfig(name="s"), tmp_path / "b" / "synthetic", "synthetic"))
    other = SweepConfig(name="s")
    other.synth = {**other.synth, "seed": 12345}
    with pytest.raises(FsadError, match="synthetic data generated"):
        check_home(tmp_path, identity(other, tmp_path / "a" / "synthetic", "synthetic"))
