"""Every service `up` starts asks for its secret: PostgreSQL, Redis and the MLflow server are started here on
127.0.0.1 by the profile's own start functions (Debian's packages), probed without and with the secrets of
`<home>/secrets.env`, and stopped by their pids."""

from __future__ import annotations

import base64
import glob
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.placement.credentials import ALL_KEYS

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def services():
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("redis-server") is None:
        pytest.skip("PostgreSQL or redis-server not installed (apt-get install -y postgresql redis-server)")
    for module in ("psycopg2", "redis"):
        pytest.importorskip(module, reason=f"{module} not installed (pip install -e '.[cluster]')")
    from pipelines.deploy import local
    from pipelines.placement.profile import load_profile

    # not under pytest's tmp folder: that one is private to root and the postgres user must reach its data
    base = Path(tempfile.mkdtemp(prefix="fsad-auth-", dir="/tmp"))
    base.chmod(0o755)
    profile = base / "profile.yaml"
    profile.write_text(f"ports: {{postgres: {_free_port()}, redis: {_free_port()}, mlflow: {_free_port()}, "
                       f"webserver: {_free_port()}}}\nshared_root: shared\n")
    with pytest.MonkeyPatch.context() as mp:
        for key in (*ALL_KEYS, "PGPASSWORD", "MLFLOW_TRACKING_URI"):
            mp.delenv(key, raising=False)
        prof = load_profile(profile, base / "home")
        for sub in ("run", "logs"):
            (prof.home / sub).mkdir(parents=True, exist_ok=True)
        secrets, _ = local.ensure_secrets(prof.home)
        try:
            local.start_postgres(prof, secrets)
            local.start_redis(prof, secrets)
            yield {"prof": prof, "secrets": secrets, "local": local, "mp": mp}
        finally:
            local.down(prof, log=lambda _m: None)
            shutil.rmtree(base, ignore_errors=True)


def test_postgres_refuses_connections_without_the_password(services):
    import psycopg2

    prof, secrets = services["prof"], services["secrets"]
    port, data = prof.ports["postgres"], prof.home / "postgres"
    for user in ("postgres", "fsad"):
        for host in ("127.0.0.1", str(data)):  # TCP and the local socket
            with pytest.raises(psycopg2.OperationalError, match="password"):
                psycopg2.connect(host=host, port=port, user=user, dbname="postgres")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=port, user="fsad", dbname="dagster", password="guess")
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="fsad", dbname="dagster",
                            password=secrets["FSAD_POSTGRES_PASSWORD"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False,)  # the services' role cannot run programs on the server
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("COPY (SELECT 1) TO PROGRAM 'id'")
    finally:
        conn.close()


def test_dagster_instance_reads_the_password_from_the_environment(services):
    prof, local, mp = services["prof"], services["local"], services["mp"]
    local.write_instance(prof)
    assert services["secrets"]["FSAD_POSTGRES_PASSWORD"] not in (prof.dagster_home / "dagster.yaml").read_text()
    mp.setenv("FSAD_POSTGRES_PASSWORD", services["secrets"]["FSAD_POSTGRES_PASSWORD"])
    local.apply_pool_limits(prof)  # opens the instance on PostgreSQL and writes the pool limits
    import dagster as dg

    with dg.DagsterInstance.from_config(str(prof.dagster_home)) as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1


def test_redis_refuses_clients_without_the_password_and_the_lease_uses_it(services):
    import redis

    from pipelines.deploy.step_lease import StepLease

    prof = services["prof"]
    # what redis-cli sends: plain commands, no AUTH
    with socket.create_connection(("127.0.0.1", prof.ports["redis"]), timeout=10) as conn:
        conn.sendall(b"KEYS *\r\nLPUSH cpu injected\r\n")
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += conn.recv(4096)
    assert replies.split(b"\r\n")[:2] == [b"-NOAUTH Authentication required."] * 2
    stranger = redis.Redis(host="127.0.0.1", port=prof.ports["redis"], protocol=2)
    with pytest.raises(redis.exceptions.AuthenticationError, match="Authentication required"):
        stranger.keys("*")
    conf = prof.home / "redis" / "redis.conf"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    store = redis.Redis.from_url(prof.broker_url)
    assert StepLease(store, "t1:step").run(lambda: ["done"]) == ["done"]
    assert store.get("fsad:done:t1:step") == b'["done"]'


@pytest.fixture(scope="module")
def mlflow_server(services):
    pytest.importorskip("flask_wtf", reason="flask-wtf not installed (MLflow's basic-auth app; pip install -e "
                                            "'.[cluster]')")
    prof, local = services["prof"], services["local"]
    local.start_mlflow(prof, local._python_env(prof, None), services["secrets"])
    return prof


def _status(url: str, method: str = "GET", data: bytes | None = None, auth: tuple | None = None) -> int:
    req = urllib.request.Request(url, data=data, method=method)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_refuses_requests_without_the_account(services, mlflow_server, tmp_path):
    prof, secrets = mlflow_server, services["secrets"]
    uri = prof.mlflow_uri
    put = f"{uri}/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/model/python_model.pkl"
    assert _status(put, "PUT", b"x") == 401
    assert _status(f"{uri}/api/2.0/mlflow/runs/search", "POST", b"{}") == 401
    assert _status(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", auth=("fsad", "guess")) == 401
    assert not list((prof.shared_root / "mlflow-artifacts").rglob("python_model.pkl"))
    # the clients' account (MLflow reads it from the environment) logs runs and artifacts
    from fewshot_core.tracking.runs import Tracker

    mp = services["mp"]
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        mp.setenv(key, secrets[key])
    tracker = Tracker(uri)
    run = tracker.log_evaluation("auth", "run-a", "x", {}, {"m": 1.0}, artifacts={"notes.txt": "hello"})
    assert [r.info.run_id for r in tracker.evaluation_runs("auth")] == [run]
    assert list((prof.shared_root / "mlflow-artifacts").rglob("notes.txt"))


def test_mlflow_checks_the_password_once_not_per_request_and_runs_no_job_runner(services, mlflow_server):
    """Before: every request paid a full password-hash check (the server was the busiest process of a cluster
    sweep), and the server started MLflow's job runner with its consumer processes, which fsad never uses."""
    from _procs import group_cpu_s, mlflow_job_runners
    from werkzeug.security import check_password_hash, generate_password_hash

    prof, secrets, local = mlflow_server, services["secrets"], services["local"]
    pgid = local.read_pid(prof, "mlflow")
    assert mlflow_job_runners(pgid) == []
    url = f"{prof.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    account = (secrets["MLFLOW_TRACKING_USERNAME"], secrets["MLFLOW_TRACKING_PASSWORD"])
    assert _status(url, auth=account) == 200  # the first request checks the password
    digest = generate_password_hash("x")  # the hash MLflow stores (werkzeug's default method)
    start = time.process_time()
    for _ in range(3):
        check_password_hash(digest, "x")
    hash_s = (time.process_time() - start) / 3
    n, before = 20, group_cpu_s(pgid)
    assert all(_status(url, auth=account) == 200 for _ in range(n))
    spent = group_cpu_s(pgid) - before
    assert spent < n * hash_s / 2, (spent, hash_s)
