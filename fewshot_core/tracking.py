"""MLflow tracking with plain client calls: one experiment per sweep, one parent run per Dagster run,
one nested child run per evaluation partition.

Plain ``MlflowClient`` calls (no fluent ``mlflow.start_run`` state, no dagster-mlflow hook) so that several
assets of one Dagster run can log into the same parent without sharing process-global state, and a
re-materialised partition always gets a *new* child run instead of touching an old one.

The tracking URI defaults to a SQLite database in the Dagster home (``fewshot_core.paths.dagster_home``)
with artifacts beside it (``<home>/mlartifacts``); ``MLFLOW_TRACKING_URI`` points it at a server instead.

A local SQLite database is created aside and moved into place complete (``ensure_tracking_db``): MLflow
creates its tables in dozens of non-transactional migration steps, and a process killed among them used
to leave a half-migrated ``mlflow.db`` that every later run failed on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from fewshot_core.errors import FsadError
from fewshot_core.paths import dagster_home, source_checkout

PARENT_RUN_TAG = "mlflow.parentRunId"
KIND_TAG = "fsad.kind"  # "dagster-run" for parents, "evaluation" or "full-data" for children
DAGSTER_RUN_TAG = "dagster.run_id"
PARTITION_TAG = "dagster.partition_key"
ASSET_TAG = "dagster.asset_key"
CODE_VERSION_TAG = "fsad.code_version"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
STAGE_TAG = "fsad.stage"
# A re-materialised partition leaves its older runs behind: they carry "true", the latest "false", so
# ``tags.fsad.superseded = 'false'`` in the MLflow UI shows exactly the runs behind the current tables.
SUPERSEDED_TAG = "fsad.superseded"
SUPERSEDED_BY_TAG = "fsad.superseded_by"
# MLflow 3 opens an experiment without this tag in its GenAI (traces) view; fsad logs model evaluations.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MLFLOW_UI_ENV = "FSAD_MLFLOW_UI"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


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
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import _get_latest_schema_revision

    return frozenset(Base.metadata.tables), _get_latest_schema_revision()


def _db_state(db: Path) -> dict:
    """Tables, schema revision and how much user data an MLflow SQLite file holds (read-only)."""
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
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

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
    from fewshot_core.locking import file_lock
    from fewshot_core.outputs import require_writable

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
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

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
    from fewshot_core import __version__

    return __version__


# The environment of every MLflow server fsad starts (`fsad mlflow-ui`, the cluster profile): fsad submits no
# MLflow server jobs, so the server does not start its job runner and the consumer processes beside it.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_ui_url() -> str:
    """The MLflow UI address report links point at: ``FSAD_MLFLOW_UI`` when set, else 127.0.0.1:5000.

    ``fsad mlflow-ui`` serves on the same host and port by default, so the links and the server agree.
    """
    from urllib.parse import urlsplit

    from fewshot_core.errors import FsadError

    url = (os.environ.get(MLFLOW_UI_ENV) or DEFAULT_MLFLOW_UI).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FsadError(f"{MLFLOW_UI_ENV}={url!r}: not an http(s) address; set it like http://127.0.0.1:5000")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise FsadError(f"{MLFLOW_UI_ENV}={url!r}: bad port; set it like http://127.0.0.1:5000") from None
    return url


def mlflow_ui_host_port() -> tuple[str, int]:
    """(host, port) of ``mlflow_ui_url()``, the defaults of ``fsad mlflow-ui``."""
    from urllib.parse import urlsplit

    parts = urlsplit(mlflow_ui_url())
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


# MLflow's UI (3.x) opens every experiment in its GenAI view unless the link asks for the model-training one
UI_VIEW = "workflowType=machine_learning"


def run_url(experiment_id, run_id, ui_base: str | None = None) -> str:
    """The MLflow UI page of one run, in the UI's model-training view (runs, metrics, models)."""
    return f"{ui_base or mlflow_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def experiment_url(experiment_id, ui_base: str | None = None) -> str:
    """The MLflow UI page of one experiment's runs, in the model-training view."""
    return f"{ui_base or mlflow_ui_url()}/#/experiments/{experiment_id}?{UI_VIEW}"


def parent_run_name(experiment: str, stage: str | None, dagster_run_id: str) -> str:
    """``<sweep> · <stage>`` (e.g. ``fsad-default · evaluation 2/3``), the Dagster run's short id only when
    the stage is unknown."""
    return f"{experiment} · {stage}" if stage else f"{experiment} · dagster {dagster_run_id[:8]}"


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param value limit


class Tracker:
    """A thin wrapper over ``MlflowClient`` that knows the fsad run layout."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        ensure_tracking_db(self.tracking_uri)
        self.artifact_root = artifact_root or default_artifact_root(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)

    # -- experiments and parents -------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag was set
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by a concurrent step: read it back
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def parent_run(self, experiment: str, dagster_run_id: str, tags: Mapping[str, str] | None = None,
                   stage: str | None = None) -> str:
        """The parent run of one Dagster run, created on first use and found again afterwards; named by
        sweep (the experiment) and stage."""
        exp_id = self.experiment_id(experiment)
        found = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.`{DAGSTER_RUN_TAG}` = '{dagster_run_id}' and tags.`{KIND_TAG}` = 'dagster-run'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        all_tags = {KIND_TAG: "dagster-run", DAGSTER_RUN_TAG: dagster_run_id, CODE_VERSION_TAG: code_version()}
        if stage:
            all_tags[STAGE_TAG] = stage
        if (commit := git_commit()) is not None:
            all_tags[GIT_COMMIT_TAG] = commit
        all_tags.update(tags or {})
        run = self.client.create_run(exp_id, tags=all_tags,
                                     run_name=parent_run_name(experiment, stage, dagster_run_id))
        return run.info.run_id

    # -- evaluation children -----------------------------------------------------------------------
    def log_evaluation(
        self,
        experiment: str,
        dagster_run_id: str,
        run_name: str,
        params: Mapping[str, object],
        metrics: Mapping[str, float],
        tags: Mapping[str, str] | None = None,
        artifacts: Mapping[str, bytes | str | Path] | None = None,
        stage: str | None = None,
    ) -> str:
        """Create a new child run under the Dagster run's parent and log everything into it.

        Earlier runs of the same name and kind (the same method, category and setting: a re-materialised
        partition; or the same category's full-data model) are tagged superseded by the new one once it has
        finished.

        ``artifacts`` maps an artifact file name (``plots/roc.png``) to bytes, text, or a local path.
        Non-finite metrics are skipped (MLflow stores NaN, but a metric that could not be computed must be
        absent, not NaN). Returns the child run id.
        """
        from mlflow.entities import Metric, Param

        parent = self.parent_run(experiment, dagster_run_id, stage=stage)
        exp_id = self.experiment_id(experiment)
        all_tags = {KIND_TAG: "evaluation", PARENT_RUN_TAG: parent, DAGSTER_RUN_TAG: dagster_run_id,
                    CODE_VERSION_TAG: code_version(), SUPERSEDED_TAG: "false"}
        if (commit := git_commit()) is not None:
            all_tags[GIT_COMMIT_TAG] = commit
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            ms = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                  if v is not None and math.isfinite(float(v))]
            ps = [Param(k, _param_value(v)) for k, v in params.items()]
            for i in range(0, max(len(ms), len(ps), 1), 100):  # MLflow batch limits
                self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])
            if artifacts:
                self._log_artifacts(run_id, artifacts)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        self.client.set_terminated(parent, "FINISHED")  # keeps the parent's end time at its last child
        self._supersede(exp_id, run_name, run_id, all_tags[KIND_TAG])
        return run_id

    def _supersede(self, exp_id: str, run_name: str, latest: str, kind: str = "evaluation") -> None:
        """Tag every other current run of ``kind`` named ``run_name`` as superseded by ``latest``."""
        name = run_name.replace("'", "\\'")
        kind = kind.replace("'", "\\'")
        flt = (f"tags.`{KIND_TAG}` = '{kind}' and tags.`{SUPERSEDED_TAG}` = 'false' "
               f"and attributes.run_name = '{name}'")
        for run in self.client.search_runs([exp_id], filter_string=flt, max_results=1000):
            if run.info.run_id != latest:
                self.client.set_tag(run.info.run_id, SUPERSEDED_TAG, "true")
                self.client.set_tag(run.info.run_id, SUPERSEDED_BY_TAG, latest)

    def _log_artifacts(self, run_id: str, artifacts: Mapping[str, bytes | str | Path]) -> None:
        with tempfile.TemporaryDirectory(prefix="fsad-mlflow-") as tmp:
            for name, content in artifacts.items():
                if isinstance(content, Path):
                    self.client.log_artifact(run_id, str(content), artifact_path=_dirname(name))
                    continue
                local = Path(tmp) / name
                local.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    local.write_bytes(content)
                else:
                    local.write_text(content)
                self.client.log_artifact(run_id, str(local), artifact_path=_dirname(name))

    # -- reading back ------------------------------------------------------------------------------
    def evaluation_runs(self, experiment: str, dagster_run_id: str | None = None) -> list:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        flt = f"tags.`{KIND_TAG}` = 'evaluation'"
        if dagster_run_id:
            flt += f" and tags.`{DAGSTER_RUN_TAG}` = '{dagster_run_id}'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000,
                                           page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def artifact_bytes(self, run_id: str, path: str) -> bytes | None:
        """The content of one logged artifact file, or None when the run has no such file."""
        with tempfile.TemporaryDirectory(prefix="fsad-mlflow-") as tmp, no_progress_bars():
            try:
                local = self.client.download_artifacts(run_id, path, tmp)
            except Exception:  # MLflow raises its own, store-specific errors for a missing file
                return None
            return Path(local).read_bytes() if Path(local).is_file() else None

    def run_url(self, run_id: str, experiment_id: str | None = None, ui_base: str | None = None) -> str:
        if experiment_id is None:
            experiment_id = self.client.get_run(run_id).info.experiment_id
        return run_url(experiment_id, run_id, ui_base)


def _dirname(name: str) -> str | None:
    parent = str(Path(name).parent)
    return None if parent in ("", ".") else parent


def category_dataset(dataset):
    """The category's manifest as an MLflow dataset (name, digest over the records, source = its folder)."""
    import mlflow.data
    import pandas as pd

    frame = pd.DataFrame([r.to_row() for r in dataset.records]).sort_values("image_id", ignore_index=True)
    return mlflow.data.from_pandas(frame, source=str(Path(dataset.root).resolve()), name=dataset.category)


def log_dataset_input(tracker: "Tracker", run_id: str, dataset, context: str = "evaluation"):
    """Log the category's manifest as the run's dataset input (MLflow's Dataset column); returns it."""
    from mlflow.entities import DatasetInput, InputTag

    data = category_dataset(dataset)
    tracker.client.log_inputs(run_id, datasets=[DatasetInput(data._to_mlflow_entity(),
                                                             tags=[InputTag("mlflow.data.context", context)])])
    return data


@contextlib.contextmanager
def fluent_uri(tracking_uri: str):
    """MLflow's model logging reads the process-wide tracking URI: point it at ours for the call only.

    ``set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment; both are put back as
    they were (unset stays unset), or every later ``Tracker`` of this process would follow them."""
    import os

    import mlflow
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
