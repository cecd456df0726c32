"""The Dagster home of ``fsad run`` and ``fsad mlflow-ui``: resolved, checked and initialised once.

Dagster creates its SQLite storages (runs, event log index, schedules) on first use, and MLflow its
tracking tables; neither is safe when two processes do it at the same moment on a fresh home (one dies
with ``IntegrityError`` or "table ... already exists"). ``prepare_home`` does all of it under a lock
file in the home, so a second ``fsad run`` waits for the first's initialisation and then reuses it.
"""

from __future__ import annotations

import os
import sys
from importlib.resources import files
from pathlib import Path

from fewshot_core.atomic import atomic_write_bytes
from fewshot_core.locking import file_lock
from fewshot_core.outputs import require_writable
from fewshot_core.paths import dagster_home
from fewshot_core.tracking.store import default_tracking_uri, ensure_tracking_db

LOCK_NAME = ".fsad-init.lock"
FIX = "pass --dagster-home DIR (or set DAGSTER_HOME) to a writable folder"


def instance_template() -> bytes:
    """The packaged ``dagster.yaml`` (storage and run-queue settings) every fsad home starts from."""
    return files("pipelines").joinpath("templates", "dagster.yaml").read_bytes()


def resolve_home(explicit: str | os.PathLike | None = None) -> Path:
    """``--dagster-home``, else ``DAGSTER_HOME``, else ``./dagster_home`` (absolute)."""
    return Path(explicit).expanduser().resolve() if explicit else dagster_home().resolve()


def _copy_template(home: Path) -> None:
    """Same storage and run-queue settings in every home; written whole or not at all."""
    target = home / "dagster.yaml"
    if not target.exists():
        atomic_write_bytes(target, instance_template(), mode=0o644)


def _init_instance(home: Path) -> None:
    """Open the home's Dagster instance once and touch each storage, which creates its tables."""
    import dagster as dg  # Dagster: fsad run --help and mlflow-ui need none

    before = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)  # the template's storage settings read it
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.get_runs(limit=1)  # run storage
            instance.get_dynamic_partitions("fsad_init_probe")  # event log storage
            instance.all_instigator_state()  # schedule storage
    finally:
        if before is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = before


def prepare_home(explicit: str | os.PathLike | None = None, *, instance: bool = True,
                 tracking_uri: str | None = None, tracking: bool = True) -> Path:
    """Resolve the home, check it is writable, and initialise it under the home's lock.

    ``instance``: create Dagster's storages; ``tracking``: create the MLflow SQLite database
    (``tracking_uri``, default ``<home>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set). Safe to call
    from several processes at once: the later ones wait, then find everything made.
    """
    home = resolve_home(explicit)
    require_writable(home, FIX)
    say = lambda: print(f"fsad: waiting for another fsad process to finish initialising {home}",  # noqa: E731
                        file=sys.stderr, flush=True)
    with file_lock(home / LOCK_NAME, on_wait=say):
        _copy_template(home)
        if instance:
            _init_instance(home)
        if tracking:
            ensure_tracking_db(tracking_uri or default_tracking_uri(home))
    return home
