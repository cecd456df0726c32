"""The Dagster UI line `fsad run` prints carries the settings that chose the sweep's data, so the UI loads the
same sweep (not the synthetic default) against the same home."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from pipelines.cli import dagster_ui_command
from pipelines.config import SweepConfig


def _env(command: str) -> dict:
    words = shlex.split(command)
    return dict(w.split("=", 1) for w in words[:words.index(next(w for w in words if "=" not in w))])


def test_real_data_from_the_environment_is_named(tmp_path):
    home = tmp_path / "home dir"
    env = _env(dagster_ui_command(home, SweepConfig(), "/data/mvtec ad"))
    assert env == {"DAGSTER_HOME": str(home), "MVTEC_ROOT": "/data/mvtec ad"}


def test_a_sweep_file_is_named_and_the_tool_is_the_environments(tmp_path):
    cfg = SweepConfig(source_file=str(tmp_path / "sweep.yaml"))
    command = dagster_ui_command(tmp_path, cfg)
    assert _env(command) == {"DAGSTER_HOME": str(tmp_path), "FSAD_SWEEP_CONFIG": str(tmp_path / "sweep.yaml")}
    assert str(Path(sys.executable).parent / "dagster") in command  # runs without the venv on PATH
