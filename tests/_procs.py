"""What the processes of a process group are doing, read from /proc (tests that start servers)."""

from __future__ import annotations

import os
from pathlib import Path


def _group_members(pgid: int):
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            yield proc, fields


def group_commands(pgid: int) -> list[str]:
    """Command lines of the live processes of process group ``pgid``."""
    out = []
    for proc, _fields in _group_members(pgid):
        try:
            out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return out


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid``."""
    ticks = sum(int(f[11]) + int(f[12]) for _proc, f in _group_members(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


def mlflow_job_runners(pgid: int) -> list[str]:
    """MLflow's job runner and its consumers in the group (fsad's servers start none)."""
    return [c for c in group_commands(pgid) if "mlflow.server.jobs" in c or "huey" in c]
