"""fsad's processes let OpenMP threads sleep between parallel regions, unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import fewshot_core, os; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_passive_by_default_and_the_users_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE"
    assert _policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
