"""Which deployment profile the code location runs under, and what that means for executor, pools and paths.

``FSAD_PROFILE`` selects it: ``embedded`` (or unset: the in-process default, unchanged), ``cluster`` (Celery
workers on Redis, PostgreSQL instance, MLflow server; settings in ``deploy/cluster.yaml`` or the file named by
``FSAD_PROFILE_CONFIG``) or ``k8s`` (the official Helm chart's ``k8s_job_executor``; ``deploy/k8s/executor.yaml``).
Everything here is plain configuration; the optional packages (dagster-celery, dagster-k8s) are imported only
when their profile is selected, so ``pip install -e .`` and ``fsad run`` never need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

from fewshot_core.errors import FsadError
from pipelines.placement.credentials import CLIENT_KEYS, load_secrets
from pipelines.placement.steps import CPU_POOL, GPU_POOL

PROFILE_ENV = "FSAD_PROFILE"
CONFIG_ENV = "FSAD_PROFILE_CONFIG"
HOME_ENV = "FSAD_CLUSTER_HOME"
SHARED_ENV = "FSAD_SHARED_ROOT"
PROFILES = ("embedded", "cluster", "k8s")
# The checkout holding deploy/ and workspace.yaml: every machine of the profile runs the code from one
CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_CLUSTER_CONFIG = CHECKOUT / "deploy" / "cluster.yaml"
DEFAULT_K8S_CONFIG = CHECKOUT / "deploy" / "k8s" / "executor.yaml"

POSTGRES_ROLE = "fsad"  # owner of the profile's databases; not a superuser
# SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; the extras bring psycopg2 (what dagster-postgres needs)
POSTGRES_SCHEME = "postgresql+psycopg2"


def profile_name() -> str:
    name = (os.environ.get(PROFILE_ENV) or "embedded").strip().lower()
    if name not in PROFILES:
        raise FsadError(f"{PROFILE_ENV}={name!r}: unknown deployment profile; use one of {', '.join(PROFILES)} "
                        "(unset = embedded)")
    return name


def _read_yaml(path: Path, what: str) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FsadError(f"{path}: {what} not found; set {CONFIG_ENV} to an existing file or unset it") from None
    except yaml.YAMLError as exc:
        raise FsadError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise FsadError(f"{path}: top level must be a mapping; see deploy/cluster.yaml")
    return raw


@dataclass
class ClusterProfile:
    """The ``cluster`` profile's settings (``deploy/cluster.yaml`` documents each key)."""

    path: Path
    home: Path
    host: str = "127.0.0.1"
    ports: dict = field(default_factory=lambda: {"postgres": 55432, "redis": 56379, "mlflow": 55000,
                                                  "webserver": 53000})
    shared_root: Path = Path("shared")
    pools: dict = field(default_factory=lambda: {CPU_POOL: 2, GPU_POOL: 1})
    workers: list = field(default_factory=lambda: [{"name": "w1", "queues": [CPU_POOL]},
                                                   {"name": "w2", "queues": [CPU_POOL, GPU_POOL]}])
    max_concurrent_runs: int = 4
    visibility_timeout_s: int = 10800
    restore_interval_s: int = 10
    lease_ttl_s: int = 60
    run_retries: int = 2
    step_retries: int = 1

    _secrets: dict | None = field(default=None, repr=False)

    # -- secrets (pipelines/placement/credentials.py) ------------------------------------------------------
    @property
    def secrets(self) -> dict[str, str]:
        """The client secrets (environment, else ``<home>/secrets.env``), read on first use."""
        if self._secrets is None:
            self._secrets = load_secrets(self.home, CLIENT_KEYS)
        return self._secrets

    # -- addresses ----------------------------------------------------------------------------------
    def _redis_url(self, db: int) -> str:
        password = quote(self.secrets["FSAD_REDIS_PASSWORD"], safe="")
        return f"redis://:{password}@{self.host}:{self.ports['redis']}/{db}"

    @property
    def broker_url(self) -> str:
        return self._redis_url(0)

    @property
    def backend_url(self) -> str:
        return self._redis_url(1)

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.ports['mlflow']}"

    def postgres_url(self, db: str) -> str:
        """Without the password (libpq takes it from ``PGPASSWORD``), so that no command line shows it."""
        return f"{POSTGRES_SCHEME}://{POSTGRES_ROLE}@{self.host}:{self.ports['postgres']}/{db}"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"

    @property
    def fsad_home(self) -> Path:
        """``FSAD_HOME`` of every process: the trained detectors' versioned artifacts live under it."""
        return self.shared_root / "fsad_home"

    # -- Celery ---------------------------------------------------------------------------------------
    def celery_settings(self) -> dict:
        """Settings shared by the executor (run worker) and the Celery workers; they must agree."""
        return {
            "task_default_queue": CPU_POOL,  # steps without a queue tag (data, reports) go to CPU workers
            # acknowledge after the step: a step whose worker died is redelivered, not lost
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,  # a busy worker holds no second step another worker could run
            "broker_connection_retry_on_startup": True,
            "broker_transport_options": {"visibility_timeout": int(self.visibility_timeout_s),
                                         "unacked_restore_interval": int(self.restore_interval_s),
                                         "unacked_restore_throttle": 1},
            "result_backend_transport_options": {"visibility_timeout": int(self.visibility_timeout_s)},
            "result_expires": 7 * 24 * 3600,
        }

    def executor_config(self) -> dict:
        return {"broker": self.broker_url, "backend": self.backend_url, "config_source": self.celery_settings(),
                "retries": {"enabled": {}} if self.step_retries > 0 else {"disabled": {}}}

    def executor(self):
        try:
            from dagster_celery import celery_executor
        except ImportError:
            raise FsadError(f"{PROFILE_ENV}=cluster needs dagster-celery; install it with "
                            "`pip install -e '.[cluster]'`") from None
        return celery_executor.configured(self.executor_config(), name="fsad_celery")

    def process_env(self, sweep_config: str | Path | None = None) -> dict[str, str]:
        """Environment of every process of the profile (webserver, daemon, run and Celery workers), the client
        secrets included: Dagster's instance reads its PostgreSQL password from it, MLflow's client its account."""
        env = {PROFILE_ENV: "cluster", CONFIG_ENV: str(self.path), HOME_ENV: str(self.home),
               SHARED_ENV: str(self.shared_root), "DAGSTER_HOME": str(self.dagster_home),
               "FSAD_HOME": str(self.fsad_home), "MLFLOW_TRACKING_URI": self.mlflow_uri, **self.secrets}
        if sweep_config:
            env["FSAD_SWEEP_CONFIG"] = str(Path(sweep_config).resolve())
        return env


def _int(path, raw, key, default, minimum=0) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FsadError(f"{path}: {key} must be an integer >= {minimum}, got {value!r}; fix it in the profile")
    return value


def load_profile(path: str | Path | None = None, home: str | Path | None = None) -> ClusterProfile:
    """The cluster profile from ``path`` (else ``FSAD_PROFILE_CONFIG``, else ``deploy/cluster.yaml``); ``home``
    (else ``FSAD_CLUSTER_HOME``, else ``./.cluster``) holds the local services' data, logs and pids."""
    path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CLUSTER_CONFIG).resolve()
    raw = _read_yaml(path, "cluster profile")
    known = {"host", "ports", "shared_root", "pools", "workers", "max_concurrent_runs", "celery", "run_retries",
             "step_retries"}
    if unknown := sorted(set(raw) - known):
        raise FsadError(f"{path}: unknown key(s) {', '.join(unknown)}; use only {', '.join(sorted(known))}")
    home = Path(home or os.environ.get(HOME_ENV) or Path.cwd() / ".cluster").resolve()
    prof = ClusterProfile(path=path, home=home)
    prof.host = str(os.environ.get("FSAD_CLUSTER_HOST") or raw.get("host", prof.host))
    ports = raw.get("ports") or {}
    if not isinstance(ports, dict) or set(ports) - set(prof.ports):
        raise FsadError(f"{path}: ports must map {', '.join(prof.ports)} to port numbers; fix `ports:`")
    for name, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise FsadError(f"{path}: ports.{name} {port!r} is not a port number; use 1-65535")
        prof.ports[name] = port
    shared = Path(os.path.expanduser(str(os.environ.get(SHARED_ENV) or raw.get("shared_root", "shared"))))
    prof.shared_root = (shared if shared.is_absolute() else home / shared).resolve()
    pools = raw.get("pools", prof.pools)
    if not isinstance(pools, dict) or not {CPU_POOL, GPU_POOL} <= set(pools) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pools.values()):
        raise FsadError(f"{path}: pools must give cpu and gpu a limit >= 1 (e.g. pools: {{cpu: 2, gpu: 1}}); "
                        "fix `pools:`")
    prof.pools = {str(k): int(v) for k, v in pools.items()}
    workers = raw.get("workers", prof.workers)
    if not isinstance(workers, list) or not all(isinstance(w, dict) and w.get("name") and w.get("queues")
                                                for w in workers):
        raise FsadError(f"{path}: workers must be a list of {{name: ..., queues: [cpu, gpu]}}; fix `workers:`")
    if bad := sorted({q for w in workers for q in w["queues"]} - set(prof.pools)):
        raise FsadError(f"{path}: worker queue(s) {', '.join(bad)} name no pool; use {', '.join(prof.pools)}")
    names = [str(w["name"]) for w in workers]
    if len(set(names)) != len(names):
        raise FsadError(f"{path}: worker names {names} must be unique; rename the duplicates")
    prof.workers = [{"name": str(w["name"]), "queues": [str(q) for q in w["queues"]]} for w in workers]
    prof.max_concurrent_runs = _int(path, raw, "max_concurrent_runs", prof.max_concurrent_runs, 1)
    celery = raw.get("celery") or {}
    prof.visibility_timeout_s = _int(path, celery, "visibility_timeout_s", prof.visibility_timeout_s, 1)
    prof.restore_interval_s = _int(path, celery, "restore_interval_s", prof.restore_interval_s, 1)
    prof.lease_ttl_s = _int(path, celery, "lease_ttl_s", prof.lease_ttl_s, 3)
    prof.run_retries = _int(path, raw, "run_retries", prof.run_retries)
    prof.step_retries = _int(path, raw, "step_retries", prof.step_retries)
    return prof


# -- k8s ------------------------------------------------------------------------------------------------
def load_k8s_executor_config(path: str | Path | None = None) -> dict:
    """The ``k8s_job_executor`` config (``deploy/k8s/executor.yaml`` or ``FSAD_PROFILE_CONFIG``)."""
    path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_K8S_CONFIG).resolve()
    raw = _read_yaml(path, "k8s executor config")
    return raw.get("executor", raw)


def k8s_executor(path: str | Path | None = None):
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise FsadError(f"{PROFILE_ENV}=k8s needs dagster-k8s; install it with `pip install -e '.[cluster]'` "
                        "(the Helm chart's user-code image must have it too)") from None
    return k8s_job_executor.configured(load_k8s_executor_config(path), name="fsad_k8s")


def read_pools(path: str | Path) -> dict[str, int]:
    """The ``pools:`` mapping of a profile file (cluster.yaml or k8s/executor.yaml): pool -> step limit."""
    path = Path(path).resolve()
    pools = _read_yaml(path, "profile").get("pools")
    if not isinstance(pools, dict) or not pools or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                       for v in pools.values()):
        raise FsadError(f"{path}: pools must map each pool to a limit >= 1 (e.g. pools: {{cpu: 2, gpu: 1}}); "
                        "fix `pools:`")
    return {str(k): int(v) for k, v in pools.items()}


# -- what the code location uses -------------------------------------------------------------------------
@dataclass
class Selection:
    """Executor and shared paths for ``pipelines/definitions.py``; ``shared_root`` None = the sweep's work dir."""

    name: str
    executor: object
    shared_root: Path | None = None


def selection() -> Selection:
    import dagster as dg  # Dagster: the launcher reads profiles without it

    name = profile_name()
    if name == "embedded":
        # One process per run: the heavy imports (torch, timm) load once and 2-core machines are not
        # oversubscribed by a process per step.
        return Selection(name, dg.in_process_executor)
    if name == "cluster":
        prof = load_profile()
        return Selection(name, prof.executor(), prof.shared_root)
    shared = os.environ.get(SHARED_ENV)
    if not shared:
        raise FsadError(f"{PROFILE_ENV}=k8s: {SHARED_ENV} is not set; set it to the shared volume's mount path "
                        "(deploy/k8s/values.yaml mounts it at /shared)")
    return Selection(name, k8s_executor(), Path(shared))
