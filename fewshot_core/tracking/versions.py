"""The code version and git commit every MLflow run and deployed model is tagged with."""

from __future__ import annotations

import subprocess
from functools import lru_cache

from fewshot_core import __version__
from fewshot_core.paths import source_checkout


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The project's current commit, or None outside a git checkout (an installed wheel)."""
    checkout = source_checkout()
    if checkout is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def code_version() -> str:
    return __version__

