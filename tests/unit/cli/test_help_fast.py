"""`fsad --help` and every sub-command's --help build their parsers without importing torch (seconds saved
on every look at the options)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROBE = """
import sys
from fewshot_core.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "timm", "dagster", "mlflow", "faiss") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["embed", "--help"], ["predict", "--help"],
                                  ["data", "--help"], ["store", "--help"], ["run", "--help"], ["mlflow-ui", "--help"]])
def test_help_imports_no_heavy_library(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "usage:" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY", proc.stdout.splitlines()[-1]
