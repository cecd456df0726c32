"""MLflow layout: parent run per Dagster run, a new nested child per evaluation, tags, params, artifacts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fewshot_core.errors import FsadError
from fewshot_core.tracking.runs import (BATCH_TAG, CODE_VERSION_TAG, EXPERIMENT_KIND_TAG, KIND_TAG, PARENT_RUN_TAG,
                                        STAGE_TAG, SUPERSEDED_BY_TAG, SUPERSEDED_TAG, Tracker, parent_run_name)
from fewshot_core.tracking.store import _db_state, default_artifact_root, default_tracking_uri, ensure_tracking_db
from fewshot_core.tracking.ui import MLFLOW_UI_ENV, mlflow_ui_host_port, mlflow_ui_url, run_url
# The code location's step tags (pipelines/resources.py): any tag a caller passes travels with the run
PARTITION_TAG, ASSET_TAG = "dagster.partition_key", "dagster.asset_key"


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_default_uri_is_sqlite_under_dagster_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert default_artifact_root(uri) == (tmp_path / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"
    assert default_artifact_root("http://127.0.0.1:5000") is None


def test_children_nest_under_one_parent_per_dagster_run(tracker, tmp_path):
    bank = tmp_path / "bank.npz"
    bank.write_bytes(b"bank")
    ids = [
        tracker.log_evaluation("sweep", "dag-1", "knn|a|oc-k1-s0", {"method": "knn", "shots": 1},
                               {"image_auroc": 0.75, "pixel_auroc": math.nan},
                               {PARTITION_TAG: "a|oc-k1-s0", ASSET_TAG: "evaluation/knn"},
                               {"plots/roc.png": b"\x89PNG", "model/bank.npz": bank, "notes.txt": "x"}),
        tracker.log_evaluation("sweep", "dag-1", "knn|a|oc-k1-s1", {"method": "knn", "shots": 1},
                               {"image_auroc": 0.8}, {}),
        tracker.log_evaluation("sweep", "dag-2", "knn|a|oc-k1-s0", {"method": "knn", "shots": 1},
                               {"image_auroc": 0.7}, {}),
    ]
    assert len(set(ids)) == 3  # re-materialising a partition (dag-2) makes a new run
    runs = {r.info.run_id: r for r in tracker.evaluation_runs("sweep")}
    assert set(runs) == set(ids)
    first = runs[ids[0]]
    assert first.data.params == {"method": "knn", "shots": "1"}
    assert first.data.metrics == {"image_auroc": 0.75}  # NaN metric is absent, not stored
    assert first.data.tags[PARTITION_TAG] == "a|oc-k1-s0"
    assert first.data.tags[BATCH_TAG] == "dag-1"
    assert first.data.tags[CODE_VERSION_TAG]
    assert first.info.status == "FINISHED"
    parents = {runs[i].data.tags[PARENT_RUN_TAG] for i in ids}
    assert len(parents) == 2
    assert runs[ids[0]].data.tags[PARENT_RUN_TAG] == runs[ids[1]].data.tags[PARENT_RUN_TAG]
    parent = tracker.client.get_run(runs[ids[0]].data.tags[PARENT_RUN_TAG])
    assert parent.data.tags[KIND_TAG] == "dagster-run"
    arts = {a.path for a in tracker.client.list_artifacts(ids[0])}
    assert arts == {"plots", "model", "notes.txt"}
    assert [a.path for a in tracker.client.list_artifacts(ids[0], "model")] == ["model/bank.npz"]
    # The old run is untouched by later ones.
    assert tracker.client.get_run(ids[0]).data.metrics == {"image_auroc": 0.75}
    assert len(tracker.evaluation_runs("sweep", "dag-2")) == 1


def _serving(port: int) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
        return True
    except OSError:
        return False


def _start_mlflow_ui(tmp_path):
    """``fsad mlflow-ui`` on a store with one run, in a session of its own (so the test can clean up after
    it), once it answers: (process, port)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    Tracker(default_tracking_uri(home)).log_evaluation("ui-sweep", "dag-1", "r", {"method": "knn"},
                                                               {"image_auroc": 0.5})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_core", "mlflow-ui", "--port", str(port),
                             "--dagster-home", str(home)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not _serving(port):
        if proc.poll() is not None or time.time() > deadline:
            _stop_groups(proc, None)
            pytest.fail("fsad mlflow-ui exited" if proc.poll() is not None else "no answer within 120 s")
        time.sleep(1)
    return proc, port


def _stop_groups(proc, *pgids) -> None:
    """SIGTERM, then SIGKILL, to the process groups of ``proc`` and ``pgids`` until they are gone."""
    import os
    import signal
    import time

    for pgid in (proc.pid, *pgids):
        if pgid is None:
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            for _ in range(50):
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
    if proc.poll() is None:
        proc.wait(timeout=10)


def test_fsad_mlflow_ui_serves_the_pipeline_store_and_killing_it_stops_its_server(tmp_path):
    """`fsad mlflow-ui` starts MLflow on the SQLite store under the Dagster home, bound to 127.0.0.1; and
    ``fsad mlflow-ui & kill $!`` left the MLflow server serving the port: the signal now reaches it."""
    import json
    import os
    import signal
    import time
    import urllib.request

    from _procs import mlflow_job_runners

    proc, port = _start_mlflow_ui(tmp_path)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    server_pgid = os.getpgid(int(children[0])) if children else None
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                     data=json.dumps({"max_results": 10}).encode(),
                                     headers={"Content-Type": "application/json"})
        names = {e["name"] for e in json.loads(urllib.request.urlopen(req, timeout=10).read())["experiments"]}
        assert "ui-sweep" in names
        assert server_pgid is not None and mlflow_job_runners(server_pgid) == []  # fsad submits no MLflow jobs

        proc.send_signal(signal.SIGTERM)  # `kill $!`: fsad's pid alone, not its group
        code = proc.wait(timeout=60)
        deadline = time.time() + 30
        while _serving(port):
            assert time.time() < deadline, f"port {port} still served after fsad mlflow-ui was killed"
            time.sleep(0.5)
        assert code == 128 + signal.SIGTERM  # it stopped the server and then exited, as a killed command
    finally:
        _stop_groups(proc, server_pgid)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_older_full_data_runs_are_superseded_like_evaluation_runs(tracker):
    """Before: only ``fsad.kind = 'evaluation'`` runs were tagged, so every sweep's full-data run stayed current."""
    from fewshot_core.models.publish import FULL_DATA_KIND

    name = "patchcore|bottle|full-data"
    tags = {KIND_TAG: FULL_DATA_KIND}
    first = tracker.log_evaluation("sweep", "dag-1", name, {}, {}, tags, stage=FULL_DATA_KIND)
    evaluation = tracker.log_evaluation("sweep", "dag-1", name, {}, {})  # another kind: never supersedes it
    second = tracker.log_evaluation("sweep", "dag-2", name, {}, {}, tags, stage=FULL_DATA_KIND)
    get = lambda run_id: tracker.client.get_run(run_id).data.tags  # noqa: E731
    assert get(first)[SUPERSEDED_TAG] == "true" and get(first)[SUPERSEDED_BY_TAG] == second
    assert get(second)[SUPERSEDED_TAG] == "false"
    assert get(evaluation)[SUPERSEDED_TAG] == "false"


# --- the tracking database is created atomically ----------------------------------------------------


def _half_migrated(db):
    """The state a kill -9 during MLflow's first table creation leaves: the migration that creates
    ``trace_info`` ran its DDL (SQLite DDL is not transactional here) but its version stamp did not."""
    import sqlalchemy
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from mlflow.store.db.utils import _get_alembic_config

    url = f"sqlite:///{db}"
    config = _get_alembic_config(url)
    script = ScriptDirectory.from_config(config)
    creates = next(r for r in script.walk_revisions()
                   if "SqlTraceInfo.__tablename__" in Path(r.module.__file__).read_text()
                   and "op.create_table(\n        SqlTraceInfo.__tablename__" in Path(r.module.__file__).read_text())
    engine = sqlalchemy.create_engine(url)
    InitialBase.metadata.create_all(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, creates.revision)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = :r"), {"r": creates.down_revision})
    engine.dispose()


def test_half_migrated_database_is_moved_aside_and_rebuilt(tmp_path, capsys):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = tmp_path / "mlflow.db"
    _half_migrated(db)
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    with pytest.raises(Exception, match="already exists"):  # what every later run met before
        SqlAlchemyStore(f"sqlite:///{copy}", None)
    tracker = Tracker(f"sqlite:///{db}")
    run_id = tracker.log_evaluation("sweep", "dag-1", "knn|a|oc-k1-s0", {"method": "knn"}, {"image_auroc": 0.5})
    assert tracker.client.get_run(run_id).data.metrics == {"image_auroc": 0.5}
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1  # kept for inspection, not deleted
    assert "half-created" in capsys.readouterr().err
    assert not list(tmp_path.glob(".mlflow.db.*"))  # no temporary left


def test_database_with_runs_at_an_old_schema_is_never_replaced(tmp_path):
    import sqlite3

    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}")
    tracker.log_evaluation("sweep", "dag-1", "knn|a|oc-k1-s0", {"method": "knn"}, {"image_auroc": 0.5})
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'older'")
    before = db.read_bytes()
    with pytest.raises(FsadError, match="mlflow db upgrade"):
        ensure_tracking_db(f"sqlite:///{db}")
    assert db.read_bytes() == before and not list(tmp_path.glob("mlflow.db.broken-*"))


def test_leftover_of_a_killed_build_is_cleaned_and_the_database_built(tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / ".mlflow.db.12345.building").write_bytes(b"half")
    assert ensure_tracking_db(f"sqlite:///{db}") == db
    assert db.is_file() and not list(tmp_path.glob(".mlflow.db.*"))
    state = _db_state(db)
    assert state["default"] and state["runs"] == 0


def test_experiments_are_marked_model_training_for_mlflow_3(tracker):
    """MLflow 3 opens an experiment without ``mlflow.experimentKind`` in its GenAI view."""
    exp_id = tracker.experiment_id("kind")
    assert tracker.client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = tracker.client.create_experiment("made-before")  # an experiment from an older fsad: tagged on use
    assert tracker.experiment_id("made-before") == old
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_parent_runs_are_named_by_sweep_and_stage(tracker):
    child = tracker.log_evaluation("sweep", "0123456789abcdef", "knn|a|oc-k1-s0", {}, {"image_auroc": 0.5},
                                   stage="evaluation 2/3")
    parent = tracker.client.get_run(tracker.client.get_run(child).data.tags[PARENT_RUN_TAG])
    assert parent.info.run_name == "sweep · evaluation 2/3"
    assert parent.data.tags[STAGE_TAG] == "evaluation 2/3"
    assert "dagster-" not in parent.info.run_name
    assert parent_run_name("sweep", None, "0123456789abcdef") == "sweep · dagster 01234567"


def test_a_rematerialised_partition_supersedes_its_older_run(tracker):
    first = tracker.log_evaluation("sweep", "dag-1", "knn|a|oc-k1-s0", {}, {"image_auroc": 0.5})
    other = tracker.log_evaluation("sweep", "dag-1", "knn|a|oc-k1-s1", {}, {"image_auroc": 0.6})
    second = tracker.log_evaluation("sweep", "dag-2", "knn|a|oc-k1-s0", {}, {"image_auroc": 0.7})
    tags = {i: tracker.client.get_run(i).data.tags for i in (first, other, second)}
    assert tags[first][SUPERSEDED_TAG] == "true" and tags[first][SUPERSEDED_BY_TAG] == second
    assert tags[second][SUPERSEDED_TAG] == "false" and tags[other][SUPERSEDED_TAG] == "false"
    # The filter a user types in the MLflow UI shows exactly the current runs.
    exp = tracker.client.get_experiment_by_name("sweep").experiment_id
    current = tracker.client.search_runs([exp], f"tags.`{SUPERSEDED_TAG}` = 'false'")
    assert {r.info.run_id for r in current} == {other, second}


def test_mlflow_ui_address_is_one_setting(monkeypatch):
    from fewshot_core.errors import FsadError

    monkeypatch.delenv(MLFLOW_UI_ENV, raising=False)
    assert mlflow_ui_url() == "http://127.0.0.1:5000"
    assert mlflow_ui_host_port() == ("127.0.0.1", 5000)
    monkeypatch.setenv(MLFLOW_UI_ENV, "http://127.0.0.1:5123/")
    assert mlflow_ui_url() == "http://127.0.0.1:5123"
    assert mlflow_ui_host_port() == ("127.0.0.1", 5123)
    # the run in the UI's model-training view: MLflow 3's UI otherwise opens the GenAI one (traces, judges)
    assert run_url("3", "abc") == "http://127.0.0.1:5123/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv(MLFLOW_UI_ENV, "127.0.0.1:5000")
    with pytest.raises(FsadError, match="FSAD_MLFLOW_UI"):
        mlflow_ui_url()


def test_fsad_mlflow_ui_defaults_to_the_setting(monkeypatch, capsys, tmp_path):
    """`fsad mlflow-ui` without --port serves where report links point; a different --port says how to agree."""
    import argparse

    from pipelines import cli as run_cli

    calls = []
    monkeypatch.setattr(run_cli, "serve", lambda cmd, env=None: calls.append(cmd) or 0)
    monkeypatch.setenv(MLFLOW_UI_ENV, "http://127.0.0.1:5123")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argparse.Namespace(host=None, port=None, workers=1, dagster_home=None)
    assert run_cli.mlflow_ui_command(args) == 0
    cmd = calls[-1]
    assert cmd[cmd.index("--port") + 1] == "5123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "note:" not in capsys.readouterr().out
    run_cli.mlflow_ui_command(argparse.Namespace(host=None, port=5999, workers=1, dagster_home=None))
    assert calls[-1][calls[-1].index("--port") + 1] == "5999"
    assert "FSAD_MLFLOW_UI=http://127.0.0.1:5999" in capsys.readouterr().out
    # with a sweep's experiment in the store: its link, in the UI's model-training view
    exp = Tracker(default_tracking_uri(tmp_path / "home")).experiment_id("tiny")
    run_cli.mlflow_ui_command(argparse.Namespace(host=None, port=None, workers=1, dagster_home=None))
    out = capsys.readouterr().out
    assert f"  experiment 'tiny': http://127.0.0.1:5123/#/experiments/{exp}?workflowType=machine_learning" in out
    assert "'Default'" not in out
