"""Where MLflow reads and writes: the tracking URI, its artifact root, and the local SQLite database.

The tracking URI defaults to a SQLite database in the Dagster home (``fewshot_core.paths.dagster_home``)
with artifacts beside it (``<home>/mlartifacts``); ``MLFLOW_TRACKING_URI`` points it at a server instead.

A local SQLite database is created aside and moved into place complete (``ensure_tracking_db``): MLflow
creates its tables in dozens of non-transactional migration steps, and a process killed among them used
to leave a half-migrated ``mlflow.db`` that every later run failed on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

from fewshot_core.errors import FsadError
from fewshot_core.locking import file_lock
from fewshot_core.outputs import require_writable
from fewshot_core.paths import dagster_home

# The environment of every MLflow server fsad starts (`fsad mlflow-ui`, the cluster profile): fsad submits no
# MLflow server jobs, so the server does not start its job runner and the consumer processes beside it.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextlib.contextmanager
def no_progress_bars():
    """MLflow's artifact progress bars off (one per download: a report reads dozens) for the block."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def default_tracking_uri(home: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set (and non-empty), else ``sqlite:///<dagster_home>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    home = Path(home) if home is not None else dagster_home()
    return f"sqlite:///{home.resolve() / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a local SQLite database; a tracking server chooses its own (None)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None (a server, another database)."""
    if tracking_uri.startswith("sqlite:///"):
        rest = tracking_uri[len("sqlite:///"):]
        return Path(rest) if rest and rest != ":memory:" else None
    return None


@lru_cache(maxsize=1)
def _expected_schema() -> tuple[frozenset[str], str]:
    """(tables, alembic head revision) of the installed MLflow's tracking schema (parsing the migration
    scripts costs a moment: once per process)."""
    from mlflow.store.db.base_sql_model import Base  # mlflow: seconds to import; see the package docstring
    from mlflow.store.db.utils import _get_latest_schema_revision

    return frozenset(Base.metadata.tables), _get_latest_schema_revision()


def _db_state(db: Path) -> dict:
    """Tables, schema revision and how much user data an MLflow SQLite file holds (read-only)."""
    import sqlite3  # the help paths import this module for its URI helpers: no database driver there

    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
            revision = rows[0][0] if len(rows) == 1 else None
        count = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
        runs = count("SELECT COUNT(*) FROM runs") if "runs" in tables else 0
        experiments = count("SELECT COUNT(*) FROM experiments WHERE experiment_id != 0") if "experiments" in tables else 0
        default = bool(count("SELECT COUNT(*) FROM experiments WHERE experiment_id = 0")) if "experiments" in tables else False
    finally:
        con.close()
    return {"tables": tables, "revision": revision, "runs": runs, "experiments": experiments, "default": default}


def _is_complete(state: dict, tables: frozenset[str], head: str) -> bool:
    return tables <= state["tables"] and state["revision"] == head and state["default"]


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached engine for ``uri``: its pooled connections may point at a replaced file."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # mlflow: see the package docstring

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


def ensure_tracking_db(tracking_uri: str | None = None) -> Path | None:
    """Make sure a local SQLite tracking database exists with MLflow's complete schema.

    A missing database is built under a temporary name beside the target (tables, migrations, the
    default experiment) and moved in with ``os.replace``, so ``mlflow.db`` is either absent or complete,
    whatever happens meanwhile. A half-migrated database left by an interrupted first run (tables but
    not the final schema, and no runs) is moved aside to ``mlflow.db.broken-<time>`` and rebuilt; one
    that holds runs at an older schema is never touched: the error says how to upgrade it. Concurrent
    callers wait on a lock beside the database. Returns the database path (None for non-SQLite URIs).
    """
    uri = tracking_uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is None:
        return None
    db = db.absolute()
    tables, head = _expected_schema()
    if db.is_file() and _is_complete(_db_state(db), tables, head):
        return db  # the common case: no lock, no write (a read-only home can still be read)
    fix = "pass --dagster-home DIR or set MLFLOW_TRACKING_URI to a writable location"
    require_writable(db.parent, fix)
    with file_lock(db.with_name(db.name + ".lock")):
        for stale in db.parent.glob(f".{db.name}.*.building*"):  # from a process killed while building
            stale.unlink(missing_ok=True)
        if db.is_file():
            state = _db_state(db)
            if _is_complete(state, tables, head):
                return db  # built by another process while this one waited
            if state["runs"] or state["experiments"]:
                raise FsadError(
                    f"{db}: MLflow schema at revision {state['revision']}, this MLflow needs {head}; back the "
                    f"file up, then run `mlflow db upgrade sqlite:///{db}` (or point MLFLOW_TRACKING_URI elsewhere)")
            broken = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.replace(db, broken)
            print(f"fsad: {db} was half-created (a first run interrupted while MLflow created its tables) "
                  f"and holds no runs; moved it to {broken.name} and creating it anew", file=sys.stderr)
            _forget_engine(uri)
        _build_db(db, default_artifact_root(uri))
        _forget_engine(uri)
    return db


def _build_db(db: Path, artifact_root: str | None) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # mlflow: see the package docstring

    tmp = db.with_name(f".{db.name}.{os.getpid()}.building")
    tmp_uri = f"sqlite:///{tmp}"
    chatty = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [lg.level for lg in chatty]
    try:
        for lg in chatty:  # its "Creating initial MLflow database tables..." lines say nothing to a user here
            lg.setLevel(logging.WARNING)
        SqlAlchemyStore(tmp_uri, artifact_root)  # tables, every migration, the default experiment
        _forget_engine(tmp_uri)  # closes the connections: the file is whole before it moves
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, db)
        dir_fd = os.open(db.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except BaseException:
        _forget_engine(tmp_uri)
        for leftover in db.parent.glob(f"{tmp.name}*"):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        for lg, level in zip(chatty, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def fluent_uri(tracking_uri: str):
    """MLflow's model logging reads the process-wide tracking URI: point it at ours for the call only.

    ``set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment; both are put back as
    they were (unset stays unset), or every later ``Tracker`` of this process would follow them."""
    import mlflow  # mlflow: see the package docstring
    from mlflow.tracking._tracking_service import utils

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    before = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the module global and the variable
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
