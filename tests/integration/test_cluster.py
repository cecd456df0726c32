"""The cluster profile end to end on 127.0.0.1: `python -m pipelines.deploy up` starts PostgreSQL, Redis, the
MLflow server, the Dagster webserver and daemon and two Celery workers; the tiny sweep runs through them, and
in its middle the worker building the feature-store partition is killed by its pid (then started again, as an
operator would). The sweep must still finish with every partition exactly once and no partial files, and its
results must equal the in-process run. One cluster start and one sweep serve every test of the module.
Everything started is stopped at the end."""

from __future__ import annotations

import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from pipelines.deploy.events import step_workers

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
SWEEP = """\
name: tiny
data: {source: synthetic, synth: {categories: 1, size: 64, n_train: 6, n_test_good: 4, n_test_per_defect: 2}}
image_size: 64
oneclass: {shots: [1, 2], seeds: [0]}
supervised: {ratios: [[1, 1]], label_modes: [binary, multiclass], seeds: [0]}
methods:
  - {id: patchcore, method: patchcore}
  - {id: knn, method: knn}
  - {id: protonet-euclidean, method: protonet, params: {distance: euclidean}}
"""
# two settings per method: every stage, step and asset of the sweep, at the fewest partitions (each evaluation
# partition logs a run and a model to the MLflow server, the bulk of the sweep's time)
N_EVAL = 2 + 2 + 2
# Everything in a row that is a result rather than an id, a timing or a path
KEYS = ["method", "category", "setting_key"]
NOT_COMPARED = ("mlflow", "dagster", "seconds", "_at", "path", "time", "gallery", "host", "ms_per_image")


def _missing_services() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        return "PostgreSQL not installed (apt-get install -y postgresql)"
    if shutil.which("redis-server") is None:
        return "redis-server not installed (apt-get install -y redis-server)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started"
    for module in ("dagster_celery", "dagster_postgres", "dagster_graphql", "psycopg2", "redis", "flask_wtf"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (pip install -e '.[cluster]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.deploy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})})


@pytest.fixture(scope="module")
def cluster():
    if reason := _missing_services():
        pytest.skip(reason)
    from fewshot_core.processes import pid_alive
    from pipelines.deploy import local
    from pipelines.placement.profile import load_profile

    # not under pytest's tmp folder: that one is private to root and the postgres user must reach its data
    base = Path(tempfile.mkdtemp(prefix="fsad-cluster-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "home"
    sweep = base / "sweep.yaml"
    sweep.write_text(SWEEP)
    profile = base / "profile.yaml"
    # a short visibility timeout: the killed worker's step is handed to the other worker within seconds, and
    # every step longer than it is redelivered while still running (the step lease must keep it exactly once);
    # a short lease: the redelivered copy takes over from the killed worker seconds after its last renewal
    profile.write_text((ROOT / "deploy" / "cluster.yaml").read_text()
                       .replace("ports: {postgres: 55432, redis: 56379, mlflow: 55000, webserver: 53000}",
                                f"ports: {{postgres: {_free_port()}, redis: {_free_port()}, mlflow: {_free_port()}, "
                                f"webserver: {_free_port()}}}")
                       .replace("visibility_timeout_s: 10800, restore_interval_s: 10, lease_ttl_s: 60",
                                "visibility_timeout_s: 20, restore_interval_s: 2, lease_ttl_s: 9"))
    prof = load_profile(profile, home)
    assert (prof.visibility_timeout_s, prof.lease_ttl_s) == (20, 9), "deploy/cluster.yaml changed: fix the replace"
    args = ["--home", str(home), "--profile", str(profile)]
    started: dict[str, int] = {}
    try:
        out = _deploy("up", *args, "--sweep", str(sweep))
        started = {n: p for n, (p, _) in local.status(prof).items()}
        assert out.returncode == 0, out.stdout + out.stderr
        assert set(started) == {"postgres", "redis", "mlflow", "webserver", "daemon", "worker-w1", "worker-w2"}
        yield {"prof": prof, "sweep": sweep, "base": base, "args": args}
    finally:
        # and whatever the tests started since (a worker started again after its kill)
        started = {**started, **{f"{n} now": p for n, (p, _) in local.status(prof).items() if p}}
        down = _deploy("down", *args, timeout=300)
        left = [f"{n} ({p})" for n, p in started.items() if pid_alive(p)]
        if not left:
            shutil.rmtree(base, ignore_errors=True)
        assert down.returncode == 0 and not left, f"still running after down: {left}; {down.stdout}{down.stderr}"


@pytest.fixture(scope="module")
def instance(cluster, profile_env):  # the instance reads its PostgreSQL password from the environment
    import dagster as dg

    with dg.DagsterInstance.from_config(str(cluster["prof"].dagster_home)) as inst:
        yield inst


@pytest.fixture(scope="module")
def profile_env(cluster):
    """The environment the code location sees inside the profile, for building its definitions here."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in cluster["prof"].process_env(cluster["sweep"]).items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def baseline(cluster):
    """The same sweep in-process (the embedded default), in its own home and work dir."""
    from fewshot_core.cli import main

    home, work = cluster["base"] / "embedded_home", cluster["base"] / "embedded_work"
    config = cluster["base"] / "embedded.yaml"
    config.write_text(SWEEP + f"work_dir: {work}\n")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("FSAD_PROFILE", "FSAD_PROFILE_CONFIG", "MLFLOW_TRACKING_URI", "MVTEC_ROOT", "FSAD_SHARED_ROOT"):
            mp.delenv(key, raising=False)
        mp.setenv("DAGSTER_HOME", str(home))
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["run", "--config", str(config), "--dagster-home", str(home)]) == 0, out.getvalue()
    return pd.read_parquet(work / "tables" / "benchmark_table.parquet")


@pytest.fixture(scope="module")
def sweep(cluster, instance, profile_env):
    """The sweep on the cluster, with a worker lost on the way: the worker building the feature-store
    partition is SIGKILLed while its temp folder is being written; once the other worker has rebuilt the
    partition, the killed worker is started again, so the later stages have both workers."""
    from dataclasses import replace

    from pipelines.definitions import build_definitions
    from pipelines.deploy import local
    from pipelines.deploy.submit import run_sweep_on_cluster

    prof, work = cluster["prof"], _work(cluster)
    before = {r.run_id for r in instance.get_runs()}
    defs = build_definitions()
    result: dict = {}

    def go():
        try:
            result["runs"] = run_sweep_on_cluster(prof, defs, instance, log=lambda _m: None)
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    deadline = time.monotonic() + 900
    partial = []
    while not partial and time.monotonic() < deadline and thread.is_alive():
        partial = list((work / "features").glob(".tmp-*"))
        time.sleep(0.05)
    assert partial, f"the embeddings step never started building ({result})"
    new = [r.run_id for r in instance.get_runs() if r.run_id not in before]
    victim = next(w for w, steps in step_workers(instance, new).items() if "embeddings" in steps)
    os.kill(local.read_pid(prof, f"worker-{victim}"), signal.SIGKILL)

    # the other worker takes the step over and completes the partition; then the operator restarts the victim
    while time.monotonic() < deadline and thread.is_alive() and not _complete_partitions(work):
        time.sleep(0.2)
    left_at_restart = [p for p in partial if p.exists()]
    if thread.is_alive():
        local.start_workers(replace(prof, workers=[w for w in prof.workers if w["name"] == victim]),
                            local._python_env(prof, str(cluster["sweep"])))
    thread.join(timeout=1200)
    assert not thread.is_alive(), "sweep did not finish after the worker was killed"
    if "error" in result:
        raise result["error"]
    return {"runs": result["runs"], "victim": victim, "partial": partial, "left_at_restart": left_at_restart,
            "run_ids": [r.run_id for r in instance.get_runs() if r.run_id not in before], "defs": defs}


def _work(cluster) -> Path:
    return cluster["prof"].shared_root / "tiny"


def _complete_partitions(work: Path) -> list[Path]:
    """Finished feature-store partitions (beside them only the store's dot-entries: temp folders, locks)."""
    folder = work / "features"
    return [p for p in folder.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file()] \
        if folder.is_dir() else []


def _metric_frame(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in table.columns if c not in KEYS and not any(s in c for s in NOT_COMPARED)
            and not c.endswith("_s") and pd.api.types.is_numeric_dtype(table[c])]
    return table.sort_values(KEYS).reset_index(drop=True)[KEYS + sorted(cols)]


def _pg(prof, db: str):
    import psycopg2

    return psycopg2.connect(host=prof.host, port=prof.ports["postgres"], user="fsad", dbname=db,
                            password=prof.secrets["FSAD_POSTGRES_PASSWORD"])


def test_every_service_refuses_clients_without_its_secret(cluster):
    """What another local user could do before: psql without a password, redis-cli, an artifact upload."""
    import psycopg2
    import urllib.error
    import urllib.request

    prof = cluster["prof"]
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host=prof.host, port=prof.ports["postgres"], user="postgres", dbname="postgres")
    with socket.create_connection((prof.host, prof.ports["redis"]), timeout=10) as conn:
        conn.sendall(b"KEYS *\r\n")
        assert conn.recv(4096).startswith(b"-NOAUTH")
    put = urllib.request.Request(f"{prof.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/model/"
                                 "python_model.pkl", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(put, timeout=30)
    assert refused.value.code == 401
    out = _deploy("status", *cluster["args"])
    assert out.returncode == 0 and "secrets" in out.stdout, out.stdout + out.stderr


def test_steps_ran_in_both_workers_and_postgres_holds_runs_and_events(cluster, sweep, instance):
    from dagster._core.events import DagsterEventType

    runs = sweep["runs"]
    assert [r["stage"] for r in runs][:2] == ["data", "features"] and all(r["success"] for r in runs)
    workers = step_workers(instance, [r["run_id"] for r in runs])
    assert set(workers) == {"w1", "w2"}, workers
    # not only through the killed attempt: the stages other than the features one used both workers too
    others = step_workers(instance, [r["run_id"] for r in runs if r["stage"] != "features"])
    assert set(others) == {"w1", "w2"}, others
    steps = set().union(*workers.values())
    assert {"dataset", "embeddings", "benchmark_table"} <= steps and any(k.startswith("memory_banks") for k in steps)
    assert sum(k.startswith("evaluation__") for k in steps) == 3
    prof = cluster["prof"]
    with _pg(prof, "dagster") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id, status FROM runs")
            runs = dict(cur.fetchall())
            for r in sweep["runs"]:
                assert runs[r["run_id"]] == "SUCCESS"
                cur.execute("SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = %s "
                            "GROUP BY dagster_event_type", (r["run_id"],))
                events = dict(cur.fetchall())
                assert events.get(DagsterEventType.RUN_SUCCESS.value) == 1, events
                assert events.get(DagsterEventType.STEP_SUCCESS.value, 0) >= 1, events
            cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
            assert cur.fetchone()[0] >= N_EVAL


def test_the_daemon_launched_nothing_beside_the_sweep(cluster, sweep, instance):
    """The daemon's automation sensor runs in the profile; a sweep's own updates must not trigger it (it
    would evaluate every partition a second time, beside the sweep's evaluation stage)."""
    from pipelines.automation import SWEEP_TAG

    others = [(r.run_id[:8], dict(r.tags)) for r in instance.get_runs() if SWEEP_TAG not in r.tags]
    assert not others, others


def test_pools_and_queues_come_from_the_profile(cluster, sweep, instance):
    from dagster._core.events import DagsterEventType

    limits = {p: instance.event_log_storage.get_concurrency_info(p).slot_count for p in ("cpu", "gpu")}
    assert limits == cluster["prof"].pools
    queues = set()
    for r in sweep["runs"]:
        for rec in instance.all_logs(r["run_id"], of_type=DagsterEventType.ENGINE_EVENT):
            msg = rec.dagster_event.message or ""
            if msg.startswith("Submitting celery task"):
                queues.add(msg.rsplit('queue "', 1)[1].rstrip('".'))
    assert queues == {"cpu"}  # the tiny sweep has no GPU method


def test_mlflow_server_holds_every_evaluation_run(cluster, sweep):
    from fewshot_core.tracking.runs import Tracker

    prof = cluster["prof"]
    table = pd.read_parquet(_work(cluster) / "tables" / "benchmark_table.parquet")
    runs = Tracker(prof.mlflow_uri).evaluation_runs("tiny")
    assert len(runs) == N_EVAL and {r.info.run_id for r in runs} == set(table["mlflow_run_id"])
    assert all(r.info.status == "FINISHED" for r in runs)
    # the server's backend store is the profile's PostgreSQL database
    with _pg(prof, "mlflow") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid FROM runs WHERE lifecycle_stage = 'active'")
            assert set(table["mlflow_run_id"]) <= {row[0] for row in cur.fetchall()}
    artifacts = prof.shared_root / "mlflow-artifacts"
    assert any(artifacts.rglob("*.png")), "evaluation artifacts not under the configured artifact root"


def test_tables_equal_the_in_process_run(cluster, sweep, baseline):
    table = pd.read_parquet(_work(cluster) / "tables" / "benchmark_table.parquet")
    assert len(table) == len(baseline) == N_EVAL
    cluster_rows, embedded_rows = _metric_frame(table), _metric_frame(baseline)
    assert list(cluster_rows.columns) == list(embedded_rows.columns) and len(cluster_rows.columns) > len(KEYS) + 3
    pd.testing.assert_frame_equal(cluster_rows, embedded_rows, check_exact=False, rtol=1e-6, atol=1e-9)


def test_killed_worker_mid_sweep_still_finishes_every_partition_once(cluster, sweep, instance):
    """SIGKILL the worker building the feature-store partition: its step goes to the other worker, the sweep
    finishes, each partition is materialised once, and the killed build's temp folder is gone."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    from fewshot_core.tracking.runs import Tracker

    prof, work = cluster["prof"], _work(cluster)
    runs, victim, fault_runs, defs = sweep["runs"], sweep["victim"], sweep["run_ids"], sweep["defs"]
    assert all(r["success"] for r in runs)

    # the killed step ran again on the surviving worker, within the same sweep
    survivor = ({"w1", "w2"} - {victim}).pop()
    workers = step_workers(instance, fault_runs)
    assert "embeddings" in workers[victim] and "embeddings" in workers[survivor]

    # no partition lost or duplicated: each asset partition materialised exactly once in this sweep
    counts: dict[tuple, int] = {}
    for run_id in fault_runs:
        for rec in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            mat = rec.dagster_event.event_specific_data.materialization
            key = (mat.asset_key.to_user_string(), mat.partition)
            counts[key] = counts.get(key, 0) + 1
    assert counts and set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    for asset in defs.assets:
        if isinstance(asset, dg.AssetsDefinition) and asset.partitions_def is not None:
            keys = asset.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            assert {p for (a, p) in counts if a == asset.key.to_user_string()} == set(keys), asset.key
    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    assert len(table) == N_EVAL and not table.duplicated(KEYS).any()
    assert set(table["dagster_run_id"]) <= set(fault_runs)
    evaluation = [r for r in Tracker(prof.mlflow_uri).evaluation_runs("tiny") if
                  r.data.tags["dagster.run_id"] in fault_runs]
    assert sorted(r.info.run_id for r in evaluation) == sorted(table["mlflow_run_id"])

    # the killed build's partial files are gone (removed by the surviving worker, before the killed one was
    # started again), and the rebuilt partition is complete
    assert sweep["left_at_restart"] == [] and not any(p.exists() for p in sweep["partial"])
    assert not list(prof.shared_root.rglob(".tmp-*"))
    # beside it only the store's own dot-entries (per-key locks, the image hash cache)
    (complete,) = [p for p in (work / "features").iterdir() if not p.name.startswith(".")]
    assert (complete / "meta.json").is_file() and (complete / "patch.npy").is_file()
