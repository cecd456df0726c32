"""Start and stop the local version of the cluster profile: every service on the profile's host (127.0.0.1).

``up`` starts, in order: PostgreSQL (Debian's ``postgresql``; databases ``dagster`` and ``mlflow``), Redis
(``redis-server``; the Celery broker and result backend), the MLflow tracking server (PostgreSQL backend store,
artifacts served from ``<shared_root>/mlflow-artifacts``), the Dagster webserver and daemon (instance on
PostgreSQL, run queue, run retries, pool limits from the profile) and the profile's Celery workers. Each
process writes its pid to ``<home>/run/<name>.pid`` and its log to ``<home>/logs/<name>.log``; ``down`` stops
exactly those pids (their process groups: the webserver and daemon start code servers and run workers) and
PostgreSQL through ``pg_ctl``. Everything binds to the profile's host only.

Every service asks for a secret of ``<home>/secrets.env`` (``credentials.py``): PostgreSQL scram-sha-256 for
local and TCP connections, Redis ``requirepass``, MLflow its basic-auth app. No secret is put on a command
line (other local users can read those): they go through 0600 files and the processes' environment.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from fewshot_core.atomic import atomic_write_text
from fewshot_core.errors import FsadError
from fewshot_core.processes import pid_alive
from fewshot_core.tracking.store import SERVER_ENV
from pipelines.placement.credentials import ensure_secrets
from pipelines.placement.profile import CHECKOUT, POSTGRES_ROLE, POSTGRES_SCHEME, ClusterProfile

SERVICES_FILE = "services.json"


# -- helpers -------------------------------------------------------------------------------------------
def _run_dir(prof: ClusterProfile) -> Path:
    return prof.home / "run"


def _log(prof: ClusterProfile, name: str) -> Path:
    return prof.home / "logs" / f"{name}.log"


def _pid_file(prof: ClusterProfile, name: str) -> Path:
    return _run_dir(prof) / f"{name}.pid"


def _wait_port(host: str, port: int, what: str, prof: ClusterProfile, pid: int | None = None,
               timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not pid_alive(pid):
            raise FsadError(f"{what} exited at start; see {_log(prof, what)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise FsadError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s; see {_log(prof, what)}")


def _wait_http(url: str, what: str, prof: ClusterProfile, pid: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise FsadError(f"{what} exited at start; see {_log(prof, what)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise FsadError(f"{what} did not answer {url} within {timeout:.0f}s; see {_log(prof, what)}")


def _record(prof: ClusterProfile, name: str, pid: int) -> None:
    _pid_file(prof, name).write_text(f"{pid}\n")
    services = _services(prof)
    if name not in services:
        services.append(name)
    (_run_dir(prof) / SERVICES_FILE).write_text(json.dumps(services))


def _services(prof: ClusterProfile) -> list[str]:
    path = _run_dir(prof) / SERVICES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def read_pid(prof: ClusterProfile, name: str) -> int | None:
    path = _pid_file(prof, name)
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _spawn(prof: ClusterProfile, name: str, cmd: list[str], env: dict | None = None) -> int:
    """Start ``cmd`` in its own session (so ``down`` can stop it with its children), log to logs/<name>.log."""
    log = _log(prof, name).open("ab")
    proc = subprocess.Popen(cmd, cwd=CHECKOUT, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    _record(prof, name, proc.pid)
    return proc.pid


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    path = found[-1] if found else shutil.which(tool)
    if not path:
        raise FsadError(f"{tool}: PostgreSQL binaries not found; install them (`apt-get install -y postgresql`)")
    return path


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as Debian's ``postgres`` user then."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise FsadError("runuser not found; run `python -m pipelines.deploy up` as a non-root user instead")
    return ["runuser", "-u", "postgres", "--", *cmd]


def _python_env(prof: ClusterProfile, sweep: str | None) -> dict:
    env = prof.process_env(sweep)
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def instance_yaml(prof: ClusterProfile) -> dict:
    """``dagster.yaml`` of the profile: PostgreSQL storage, the run queue, run retries and monitoring."""
    return {
        # the password is read from the environment by each process: dagster.yaml holds no secret
        "storage": {"postgres": {"postgres_db": {
            "username": POSTGRES_ROLE, "password": {"env": "FSAD_POSTGRES_PASSWORD"}, "hostname": prof.host,
            "port": prof.ports["postgres"], "db_name": "dagster", "scheme": POSTGRES_SCHEME}}},
        "local_artifact_storage": {"module": "dagster._core.storage.root", "class": "LocalArtifactStorage",
                                   "config": {"base_dir": str(prof.shared_root / "dagster_storage")}},
        "compute_logs": {"module": "dagster._core.storage.local_compute_log_manager",
                         "class": "LocalComputeLogManager",
                         "config": {"base_dir": str(prof.shared_root / "dagster_storage" / "logs")}},
        "run_retries": {"enabled": prof.run_retries > 0, "max_retries": prof.run_retries,
                        "retry_on_asset_or_op_failure": True},
        # a run worker that died (machine lost, OOM) is marked failed, so run retries take it up
        "run_monitoring": {"enabled": True, "poll_interval_seconds": 5, "start_timeout_seconds": 600},
        # the queued run coordinator (Dagster's default) dequeues at most this many runs at once
        "concurrency": {"runs": {"max_concurrent_runs": prof.max_concurrent_runs},
                        "pools": {"granularity": "op", "default_limit": max(prof.pools.values())}},
        "telemetry": {"enabled": False},
    }


def write_instance(prof: ClusterProfile) -> Path:
    prof.dagster_home.mkdir(parents=True, exist_ok=True)
    path = prof.dagster_home / "dagster.yaml"
    header = "# Written by `python -m pipelines.deploy up` from the cluster profile; edit the profile, not this.\n"
    path.write_text(header + yaml.safe_dump(instance_yaml(prof), sort_keys=False))
    return path


def apply_pool_limits(prof: ClusterProfile) -> None:
    """The profile's pool limits on the instance (what ``dagster instance concurrency set`` does)."""
    import dagster as dg  # Dagster: status and down need none

    with dg.DagsterInstance.from_config(str(prof.dagster_home)) as instance:
        for pool, limit in prof.pools.items():  # per-pool limits live in the instance's storage, not dagster.yaml
            instance.event_log_storage.set_concurrency_slots(pool, limit)


# -- services ------------------------------------------------------------------------------------------
def _refuse_trust(data: Path) -> None:
    """A data folder from before the profile had passwords lets every local user in: never start it."""
    hba = data / "pg_hba.conf"
    lines = [ln.split() for ln in hba.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if any("trust" in fields for fields in lines):
        raise FsadError(f"{hba}: PostgreSQL trusts connections without a password (a data folder made before the "
                        f"cluster profile had secrets); move {data} away and run `up` again, which makes a new one")


def _initdb(prof: ClusterProfile, data: Path, admin_password: str) -> None:
    data.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    data.chmod(0o700)
    # --pwfile, not a command-line argument; the file lives only while initdb runs (the postgres user reads it)
    pwfile = _run_dir(prof) / "initdb.pw"
    atomic_write_text(pwfile, admin_password + "\n", mode=0o600)
    try:
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        out = subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres",
                                           "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                                           "--locale=C", "--no-sync"]), capture_output=True, text=True)
    finally:
        pwfile.unlink(missing_ok=True)
    if out.returncode != 0:
        raise FsadError(f"initdb {data} failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")


def start_postgres(prof: ClusterProfile, secrets: dict) -> None:
    data = prof.home / "postgres"
    if os.geteuid() == 0:
        for parent in [prof.home, *prof.home.parents]:
            if parent.stat().st_mode & 0o001 == 0:  # the postgres user must reach its data folder
                raise FsadError(f"{parent}: not searchable by the postgres user; chmod o+x it or choose "
                                "another --home")
    if not (data / "PG_VERSION").is_file():
        _initdb(prof, data, secrets["FSAD_POSTGRES_ADMIN_PASSWORD"])
    _refuse_trust(data)
    log = _log(prof, "postgres")
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    opts = f"-c listen_addresses={prof.host} -p {prof.ports['postgres']} -k {data} -c max_connections=200"
    out = subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w",
                                       "-t", "120", "start"]), capture_output=True, text=True)
    if out.returncode != 0:
        raise FsadError(f"PostgreSQL did not start on {prof.host}:{prof.ports['postgres']}; see {log}")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    _record(prof, "postgres", pid)
    import psycopg2  # optional (the cluster extra): only `up` connects

    try:
        conn = psycopg2.connect(host=prof.host, port=prof.ports["postgres"], user="postgres", dbname="postgres",
                                password=secrets["FSAD_POSTGRES_ADMIN_PASSWORD"])
    except psycopg2.OperationalError as exc:
        raise FsadError(f"PostgreSQL at {prof.host}:{prof.ports['postgres']} refused FSAD_POSTGRES_ADMIN_PASSWORD of "
                        f"{prof.home}/secrets.env ({str(exc).strip().splitlines()[-1]}); restore the file that "
                        f"created {data}, or move {data} away") from None
    conn.autocommit = True
    with conn.cursor() as cur:
        # the role the services use: owner of their databases, no superuser (no COPY ... TO PROGRAM)
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (POSTGRES_ROLE,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(f'{verb} ROLE "{POSTGRES_ROLE}" LOGIN NOSUPERUSER PASSWORD %s',
                    (secrets["FSAD_POSTGRES_PASSWORD"],))
        for db in ("dagster", "mlflow"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}" OWNER "{POSTGRES_ROLE}"')
    conn.close()


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_redis(prof: ClusterProfile, secrets: dict) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        raise FsadError("redis-server not found; install it (`apt-get install -y redis-server`)")
    work = prof.home / "redis"
    # the password in a 0600 config file, not in the command line every local user can list
    conf = atomic_write_text(work / "redis.conf", "\n".join([
        f"bind {prof.host}", f"port {prof.ports['redis']}", f"dir {_redis_quote(str(work))}", 'save ""',
        "appendonly no", "daemonize no", f"requirepass {_redis_quote(secrets['FSAD_REDIS_PASSWORD'])}", ""]),
        mode=0o600)
    pid = _spawn(prof, "redis", [exe, str(conf)])
    _wait_port(prof.host, prof.ports["redis"], "redis", prof, pid)


def mlflow_auth_config(prof: ClusterProfile) -> Path:
    """MLflow's basic-auth settings: users in a SQLite file under the home; nobody but the admin account the
    clients share (``MLFLOW_TRACKING_USERNAME``) may read or write anything."""
    folder = prof.home / "mlflow-auth"
    return atomic_write_text(folder / "basic_auth.ini", "\n".join([
        "[mlflow]", "default_permission = NO_PERMISSIONS", f"database_uri = sqlite:///{folder / 'basic_auth.db'}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        # a verified login is remembered for a minute: without it every request of a step pays a full
        # password-hash check, which made the server the busiest process of a sweep. The account is the
        # profile's generated one, changed only by a new `up`, which restarts the server and its cache.
        "auth_cache_ttl_seconds = 60", ""]), mode=0o600)


def _check_mlflow_login(prof: ClusterProfile, secrets: dict) -> None:
    """The clients' account must be the one the server's user store holds (it was made at its first start)."""
    token = base64.b64encode(f"{secrets['MLFLOW_TRACKING_USERNAME']}:{secrets['MLFLOW_TRACKING_PASSWORD']}"
                             .encode()).decode()
    req = urllib.request.Request(f"{prof.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Authorization": f"Basic {token}"})
    try:
        urllib.request.urlopen(req, timeout=30).close()
    except urllib.error.HTTPError as exc:
        raise FsadError(f"MLflow at {prof.mlflow_uri} refused the account of {prof.home}/secrets.env (HTTP "
                        f"{exc.code}); its user store {prof.home}/mlflow-auth was made with other secrets: move it "
                        "away and run `up` again") from None


def start_mlflow(prof: ClusterProfile, env: dict, secrets: dict) -> None:
    artifacts = prof.shared_root / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    server_env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(prof)),
                  # the admin account is created from these at the user store's first start
                  "MLFLOW_AUTH_ADMIN_USERNAME": secrets["MLFLOW_TRACKING_USERNAME"],
                  "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["MLFLOW_TRACKING_PASSWORD"],
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                  "PGPASSWORD": secrets["FSAD_POSTGRES_PASSWORD"], **SERVER_ENV}
    pid = _spawn(prof, "mlflow", [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                                  "--backend-store-uri", prof.postgres_url("mlflow"),
                                  "--serve-artifacts", "--artifacts-destination", artifacts.as_uri(),
                                  "--host", prof.host, "--port", str(prof.ports["mlflow"]), "--workers", "1"],
                 server_env)
    _wait_http(f"{prof.mlflow_uri}/health", "mlflow", prof, pid)  # /health is the one route without a login
    _check_mlflow_login(prof, secrets)


def start_dagster(prof: ClusterProfile, env: dict) -> None:
    workspace = str(CHECKOUT / "workspace.yaml")
    pid = _spawn(prof, "webserver", [sys.executable, "-m", "dagster_webserver", "-w", workspace, "-h", prof.host,
                                     "-p", str(prof.ports["webserver"])], env)
    _spawn(prof, "daemon", [sys.executable, "-m", "dagster._daemon", "run", "-w", workspace], env)
    _wait_http(f"http://{prof.host}:{prof.ports['webserver']}/server_info", "webserver", prof, pid)


def worker_command(prof: ClusterProfile, name: str, queues: list[str]) -> list[str]:
    # solo pool, one step at a time: the step runs in the worker process itself, so killing the worker's
    # pid stops its step, and a worker never competes with itself for the machine's cores
    return [sys.executable, "-m", "celery", "-A", "pipelines.deploy.celery_app", "worker", "-Q", ",".join(queues),
            "-n", f"{name}@%h", "--pool", "solo", "--concurrency", "1", "--loglevel", "INFO", "--without-gossip",
            "--without-mingle"]


def start_workers(prof: ClusterProfile, env: dict) -> None:
    from celery import Celery  # optional (the cluster extra): only `up` starts workers

    pids = {w["name"]: _spawn(prof, f"worker-{w['name']}", worker_command(prof, w["name"], w["queues"]), env)
            for w in prof.workers}
    app = Celery(broker=prof.broker_url, backend=prof.backend_url)
    host = socket.gethostname()
    wanted = {f"{name}@{host}" for name in pids}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for name, pid in pids.items():
            if not pid_alive(pid):
                raise FsadError(f"worker {name} exited at start; see {_log(prof, 'worker-' + name)}")
        replies = app.control.ping(timeout=2) or []
        if wanted <= {k for r in replies for k in r}:
            return
        time.sleep(1)
    raise FsadError(f"workers {', '.join(sorted(wanted))} did not answer a ping within 300s; see {prof.home}/logs")


def up(prof: ClusterProfile, sweep: str | None = None, log=print) -> None:
    """Start every service of the profile; on any failure stop what was started and raise."""
    for sub in ("run", "logs"):
        (prof.home / sub).mkdir(parents=True, exist_ok=True)
    if running := [n for n in _services(prof) if (p := read_pid(prof, n)) and pid_alive(p)]:
        raise FsadError(f"{prof.home}: services already running ({', '.join(running)}); stop them with "
                        f"`python -m pipelines.deploy down --home {prof.home}`")
    secrets, created = ensure_secrets(prof.home)
    if created:
        log(f"secrets in {prof.home / 'secrets.env'} (new, mode 0600)")
    (_run_dir(prof) / SERVICES_FILE).write_text("[]")
    prof.shared_root.mkdir(parents=True, exist_ok=True)
    env = _python_env(prof, sweep)
    os.environ.update({k: v for k, v in env.items() if k in secrets})  # this process opens the instance too
    try:
        log(f"postgresql on {prof.host}:{prof.ports['postgres']}")
        start_postgres(prof, secrets)
        log(f"redis-server on {prof.host}:{prof.ports['redis']}")
        start_redis(prof, secrets)
        write_instance(prof)
        apply_pool_limits(prof)
        log(f"mlflow server on {prof.mlflow_uri}")
        start_mlflow(prof, env, secrets)
        log(f"dagster webserver on http://{prof.host}:{prof.ports['webserver']} and daemon")
        start_dagster(prof, env)
        log(f"celery workers {', '.join(w['name'] + ' (' + ','.join(w['queues']) + ')' for w in prof.workers)}")
        start_workers(prof, env)
    except BaseException:
        down(prof, log=lambda _msg: None)
        raise


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group led by ``pid`` (its children too), SIGKILL what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.2)
        if not pid_alive(pid):
            break
    try:  # members of the group that outlived their leader (a code server ignoring SIGTERM)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def down(prof: ClusterProfile, log=print) -> list[str]:
    """Stop every service ``up`` recorded under the home, newest first; returns the names stopped."""
    stopped = []
    for name in reversed(_services(prof)):
        pid = read_pid(prof, name)
        if pid is None:
            continue
        if name == "postgres":
            data = prof.home / "postgres"
            if pid_alive(pid):
                subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60",
                                             "stop"]), capture_output=True)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        elif pid_alive(pid):
            stop_pid(pid)
        else:  # its children (code servers, run workers) may outlive a killed leader
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _pid_file(prof, name).unlink(missing_ok=True)
        stopped.append(name)
        log(f"stopped {name} (pid {pid})")
    (_run_dir(prof) / SERVICES_FILE).unlink(missing_ok=True)
    return stopped


def status(prof: ClusterProfile) -> dict[str, tuple[int | None, bool]]:
    return {name: (pid, pid is not None and pid_alive(pid)) for name in _services(prof)
            for pid in [read_pid(prof, name)]}
