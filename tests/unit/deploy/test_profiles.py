"""Deployment profiles without any service: profile selection, the executors the code location builds (checked
by Dagster's own config system), pools and queue tags, the generated instance config, the Helm values against
the chart's value names, and the cleanup helpers the workers run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.errors import FsadError

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture
def clean_env(monkeypatch):
    from pipelines.placement.credentials import ALL_KEYS

    for key in ("FSAD_PROFILE", "FSAD_PROFILE_CONFIG", "FSAD_CLUSTER_HOME", "FSAD_SHARED_ROOT", "FSAD_CLUSTER_HOST",
                *ALL_KEYS):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.fixture
def client_secrets(monkeypatch):
    """The worker app reads the profile (and so its secrets) when imported."""
    from pipelines.placement.credentials import CLIENT_KEYS

    for key in CLIENT_KEYS:
        monkeypatch.setenv(key, f"test-{key.lower()}")


def _defs(tmp_path, methods="[{id: patchcore, method: patchcore}]"):
    from pipelines.config import load_config
    from pipelines.definitions import build_definitions

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"name: t\ndata: {{source: synthetic}}\nmethods: {methods}\nwork_dir: {tmp_path / 'work'}\n")
    return build_definitions(load_config(cfg))


def _process(schema, config):
    from dagster._config import process_config

    result = process_config(schema.config_type, config)
    assert result.success, [e.message for e in result.errors]
    return result.value


def test_embedded_stays_the_in_process_default(clean_env, tmp_path):
    import dagster as dg

    assert _defs(tmp_path).executor is dg.in_process_executor
    clean_env.setenv("FSAD_PROFILE", "Embedded")
    assert _defs(tmp_path).executor is dg.in_process_executor
    clean_env.setenv("FSAD_PROFILE", "swarm")
    with pytest.raises(FsadError, match="FSAD_PROFILE='swarm'.*embedded, cluster, k8s"):
        _defs(tmp_path)


def test_cluster_executor_config_is_accepted_by_dagster(clean_env, tmp_path):
    from dagster_celery import celery_executor

    from pipelines.placement.credentials import ensure_secrets
    from pipelines.placement.profile import load_profile

    secrets, _ = ensure_secrets(tmp_path / "home")
    prof = load_profile(ROOT / "deploy" / "cluster.yaml", tmp_path / "home")
    value = _process(celery_executor.config_schema, prof.executor_config())
    password = secrets["FSAD_REDIS_PASSWORD"]
    assert value["broker"] == f"redis://:{password}@127.0.0.1:56379/0" and value["backend"].endswith(":56379/1")
    assert value["config_source"]["task_acks_late"] is True
    assert prof.pools == {"cpu": 2, "gpu": 1} and [w["name"] for w in prof.workers] == ["w1", "w2"]
    clean_env.setenv("FSAD_PROFILE", "cluster")
    clean_env.setenv("FSAD_CLUSTER_HOME", str(tmp_path / "home"))
    defs = _defs(tmp_path)
    assert defs.executor.name == "fsad_celery"
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "fsad_celery"
    import dagster as dg

    assert dg.validate_run_config(job, {})  # the configured executor resolves with no run config at all


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "unknown key"),
    ("ports: {postgres: 99999}\n", "ports.postgres 99999"),
    ("ports: {smtp: 25}\n", "ports must map"),
    ("pools: {cpu: 2}\n", "pools must give cpu and gpu"),
    ("workers: [{name: a, queues: [tpu]}]\n", "queue\\(s\\) tpu"),
    ("workers: [{name: a, queues: [cpu]}, {name: a, queues: [gpu]}]\n", "must be unique"),
    ("celery: {visibility_timeout_s: 0}\n", "visibility_timeout_s must be an integer >= 1"),
    ("celery: {lease_ttl_s: 2}\n", "lease_ttl_s must be an integer >= 3"),
    ("host: [unclosed\n", "not valid YAML"),
])
def test_bad_cluster_profile_names_the_file_and_the_fix(clean_env, tmp_path, text, message):
    from pipelines.placement.profile import load_profile

    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(FsadError, match=message) as exc:
        load_profile(path, tmp_path)
    assert str(path) in str(exc.value) and ";" in str(exc.value)


def test_the_step_lease_ttl_comes_from_the_profile(clean_env, tmp_path):
    """How long a dead worker's step waits before another worker takes it over is the profile's to set."""
    from pipelines.placement.profile import load_profile

    assert load_profile(ROOT / "deploy" / "cluster.yaml", tmp_path).lease_ttl_s == 60
    path = tmp_path / "cluster.yaml"
    path.write_text("celery: {lease_ttl_s: 9}\n")
    assert load_profile(path, tmp_path).lease_ttl_s == 9


def test_missing_profile_file_is_one_line(clean_env, tmp_path):
    from pipelines.placement.profile import load_profile

    with pytest.raises(FsadError, match="cluster profile not found; set FSAD_PROFILE_CONFIG"):
        load_profile(tmp_path / "nope.yaml")


def test_gpu_methods_go_to_the_gpu_pool_and_queue_the_rest_to_cpu(clean_env, tmp_path):
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    defs = _defs(tmp_path, "[{id: patchcore, method: patchcore}, {id: efficientad, method: efficientad}, "
                           "{id: pmf, method: pmf}]")
    nodes = {n.name: n for n in defs.resolve_implicit_global_asset_job_def().graph.node_defs}
    placed = {name: (n.pool, n.tags.get("dagster-celery/queue")) for name, n in nodes.items() if n.pool}
    assert placed == {"embeddings": ("cpu", "cpu"), f"memory_banks__{DEFAULT_BACKBONE}": ("cpu", "cpu"),
                      "full_data_model": ("cpu", "cpu"),
                      f"evaluation__{DEFAULT_BACKBONE}__patchcore": ("cpu", "cpu"),
                      f"evaluation__{DEFAULT_BACKBONE}__efficientad": ("gpu", "gpu"),
                      f"evaluation__{DEFAULT_BACKBONE}__pmf": ("gpu", "gpu")}
    gpu = UserDefinedDagsterK8sConfig.from_dict(
        json.loads(nodes[f"evaluation__{DEFAULT_BACKBONE}__efficientad"].tags["dagster-k8s/config"]))
    assert gpu.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    cpu = UserDefinedDagsterK8sConfig.from_dict(
        json.loads(nodes[f"evaluation__{DEFAULT_BACKBONE}__patchcore"].tags["dagster-k8s/config"]))
    assert "limits" not in cpu.container_config["resources"]


def test_k8s_executor_config_is_accepted_by_dagster(clean_env, tmp_path):
    import dagster as dg
    from dagster_k8s import k8s_job_executor

    from pipelines.placement.profile import load_k8s_executor_config

    config = load_k8s_executor_config(K8S / "executor.yaml")
    value = _process(k8s_job_executor.config_schema, config)
    assert value["job_namespace"] == "fsad" and value["retries"] == {"enabled": {}}
    clean_env.setenv("FSAD_PROFILE", "k8s")
    with pytest.raises(FsadError, match="FSAD_SHARED_ROOT is not set"):
        _defs(tmp_path)
    clean_env.setenv("FSAD_SHARED_ROOT", str(tmp_path / "shared"))
    clean_env.setenv("FSAD_PROFILE_CONFIG", str(K8S / "executor.yaml"))
    job = _defs(tmp_path).resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "fsad_k8s" and dg.validate_run_config(job, {})


def test_cluster_instance_config_is_accepted_by_dagster(clean_env, tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    from pipelines.deploy.local import write_instance
    from pipelines.placement.profile import load_profile

    prof = load_profile(ROOT / "deploy" / "cluster.yaml", tmp_path / "home")
    write_instance(prof)
    config, _ = dagster_instance_config(str(prof.dagster_home))
    # the role that owns the databases, its password read from each process's environment, never the file
    assert config["storage"]["postgres"]["postgres_db"] == {
        "username": "fsad", "password": {"env": "FSAD_POSTGRES_PASSWORD"}, "hostname": "127.0.0.1", "port": 55432,
        "db_name": "dagster", "scheme": "postgresql+psycopg2"}
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": True}
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 4


# -- the Helm chart ----------------------------------------------------------------------------------------
# Value names of the official dagster chart that this file uses (its values.schema.json forbids unknown keys at
# these levels); a typo here would be rejected by `helm install`, so it must fail here first.
CHART_KEYS = {
    (): {"dagster-user-deployments", "runLauncher", "postgresql", "dagsterDaemon", "concurrency", "telemetry",
         "dagsterWebserver", "global", "computeLogManager", "imagePullSecrets", "generatePostgresqlPasswordSecret"},
    ("global",): {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName",
                  "dagsterInstanceConfigMap"},
    ("dagster-user-deployments",): {"enabled", "enableSubchart", "deployments", "imagePullSecrets"},
    ("runLauncher",): {"type", "config"},
    ("runLauncher", "config", "k8sRunLauncher"): {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
        "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
        "schedulerName", "securityContext", "runK8sConfig"},
    ("runLauncher", "config", "k8sRunLauncher", "runK8sConfig"): {
        "containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"},
    # existingSecret: passed on to the Bitnami PostgreSQL subchart (Dagster's schema lets unknown keys through here)
    ("postgresql",): {"enabled", "image", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                      "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service", "existingSecret"},
    ("dagsterDaemon",): {"enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps",
                         "envSecrets", "resources", "runMonitoring", "runRetries", "sensors", "schedules",
                         "volumeMounts", "volumes", "nodeSelector", "tolerations", "affinity"},
    ("dagsterDaemon", "runCoordinator"): {"enabled", "type", "config"},
    ("dagsterDaemon", "runCoordinator", "config", "queuedRunCoordinator"): {
        "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds", "dequeueNumWorkers",
        "dequeueUseThreads", "blockOpConcurrencyLimitedRuns"},
    ("concurrency",): {"enabled", "pools", "runs"},
    ("concurrency", "pools"): {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    ("concurrency", "runs"): {"maxConcurrentRuns", "tagConcurrencyLimits"},
}
DEPLOYMENT_KEYS = {"name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "port", "env", "envConfigMaps",
                   "envSecrets", "volumes", "volumeMounts", "includeConfigInLaunchedRuns", "resources",
                   "nodeSelector", "tolerations", "affinity", "labels", "annotations", "replicaCount"}


def _at(values: dict, path: tuple):
    for key in path:
        values = values[key]
    return values


def test_helm_values_use_the_charts_names_and_agree_with_the_code(tmp_path):
    from dagster._core.instance.config import validate_concurrency_config

    values = yaml.safe_load((K8S / "values.yaml").read_text())
    for path, allowed in CHART_KEYS.items():
        try:
            node = _at(values, path)
        except KeyError:
            continue
        assert isinstance(node, dict) and set(node) <= allowed, (path, set(node) - allowed)
    (dep,) = values["dagster-user-deployments"]["deployments"]
    assert set(dep) <= DEPLOYMENT_KEYS, set(dep) - DEPLOYMENT_KEYS
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    # the gRPC server loads the same module as workspace.yaml
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    args = dep["dagsterApiGrpcArgs"]
    assert args[args.index("--module-name") + 1] == workspace["module_name"]
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["FSAD_PROFILE"] == "k8s" and env["FSAD_PROFILE_CONFIG"].endswith("deploy/k8s/executor.yaml")
    # one shared claim everywhere: user code, run workers, step pods, the MLflow server
    claim = yaml.safe_load((K8S / "shared-pvc.yaml").read_text())["metadata"]["name"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    executor = yaml.safe_load((K8S / "executor.yaml").read_text())
    for vols, mounts in ((dep["volumes"], dep["volumeMounts"]), (launcher["volumes"], launcher["volumeMounts"])):
        assert {v["persistentVolumeClaim"]["claimName"] for v in vols} == {claim}
        assert {m["name"] for m in mounts} <= {v["name"] for v in vols}
        assert {m["mountPath"] for m in mounts} == {env["FSAD_SHARED_ROOT"]}
    assert {v["persistent_volume_claim"]["claim_name"] for v in executor["executor"]["volumes"]} == {claim}
    assert {m["mount_path"] for m in executor["executor"]["volume_mounts"]} == {env["FSAD_SHARED_ROOT"]}
    step_env = dict(e.split("=", 1) for e in executor["executor"]["env_vars"])
    assert step_env == env  # step pods see what the code server sees
    mlflow_docs = list(yaml.safe_load_all((K8S / "mlflow.yaml").read_text()))
    service = next(d for d in mlflow_docs if d["kind"] == "Service")
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}.fsad.svc.cluster.local:" \
                                         f"{service['spec']['ports'][0]['port']}"
    # the instance config the chart renders from `concurrency` is valid for Dagster
    conc = values["concurrency"]
    assert conc["enabled"] and "maxConcurrentRuns" not in \
        values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]  # Dagster refuses both
    validate_concurrency_config({"concurrency": {
        "pools": {"granularity": conc["pools"]["granularity"], "default_limit": conc["pools"]["defaultLimit"]},
        "runs": {"max_concurrent_runs": conc["runs"]["maxConcurrentRuns"]}}})
    assert set(executor["pools"]) == {"cpu", "gpu"}


def _literal_passwords(node, path=()):
    """(path, value) of every non-empty string under a key that names a password, secret or token."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and value and any(w in str(key).lower() for w in ("password", "token")):
                yield path + (key,), value
            yield from _literal_passwords(value, path + (key,))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, dict) and isinstance(item.get("value"), str) and any(
                    w in str(item.get("name", "")).lower() for w in ("password", "secret_key", "token")):
                yield path + (i,), item["value"]
            yield from _literal_passwords(item, path + (i,))


def test_k8s_files_ship_no_password_and_put_mlflow_behind_authentication():
    files = sorted(K8S.glob("*.yaml"))
    for path in files:
        text = path.read_text()
        assert "change-me" not in text.lower()
        for doc in yaml.safe_load_all(text):
            assert not list(_literal_passwords(doc)), (path.name, list(_literal_passwords(doc)))
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    # the chart makes no Secret of its own: Dagster's pods and the bundled database read the installer's Secret
    secret = values["global"]["postgresqlSecretName"]
    assert values["generatePostgresqlPasswordSecret"] is False and values["postgresql"]["existingSecret"] == secret
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "mlflow.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for c in [*pod["initContainers"], server] for e in c["env"]
            if "valueFrom" in e}
    assert refs == {secret}
    command = server["command"][-1]
    assert "--app-name basic-auth" in command and "${PGPASSWORD" not in command  # no password on the command line
    assert "default_permission = NO_PERMISSIONS" in docs["ConfigMap"]["data"]["basic_auth.ini"]
    # the server's admin account is the one every client pod gets as MLFLOW_TRACKING_USERNAME / _PASSWORD
    (auth,) = [e["secretRef"]["name"] for e in server["envFrom"]]
    (dep,) = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    executor = yaml.safe_load((K8S / "executor.yaml").read_text())["executor"]
    assert [e["name"] for e in dep["envSecrets"]] == [e["name"] for e in launcher["envSecrets"]] == [auth]
    assert executor["env_secrets"] == [auth]


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="no /bin/sh")
def test_k8s_mlflow_server_refuses_to_start_with_an_empty_account(tmp_path):
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "mlflow.yaml").read_text())}
    (server,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_USERNAME": "fsad", "MLFLOW_TRACKING_PASSWORD": ""}
    out = subprocess.run(server["command"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0 and "MLFLOW_TRACKING_PASSWORD: empty in Secret fsad-mlflow-auth" in out.stderr


def test_pools_command_sets_the_limits_of_a_profile_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipelines.deploy", "pools", "--profile", str(K8S / "executor.yaml")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2
        assert instance.event_log_storage.get_concurrency_info("cpu").slot_count == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: {gpu: 0}\n")
    out = subprocess.run([sys.executable, "-m", "pipelines.deploy", "pools", "--profile", str(bad)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("fsad deploy: error:") and "Traceback" not in out.stderr


# -- what the workers clean up ----------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_worker_removes_only_this_hosts_dead_temp_folders(tmp_path, client_secrets):
    from pipelines.deploy.celery_app import remove_dead_temp_files

    host = socket.gethostname()
    key = "synth_fabric-tf_efficientnet_lite0-64-0123456789abcdef"
    dead = tmp_path / "features" / f".tmp-{key}-{_dead_pid()}-1a2b3c4d@{host}"
    live = tmp_path / "features" / f".tmp-{key}-{os.getpid()}-1a2b3c4d@{host}"
    other = tmp_path / "features" / f".tmp-{key}-{_dead_pid()}-1a2b3c4d@another-host"
    legacy = tmp_path / "features" / f".tmp-{key}-{_dead_pid()}-1a2b3c4d"  # written before hosts were named
    for d in (dead, live, other, legacy):
        (d / "sub").mkdir(parents=True)
    assert sorted(remove_dead_temp_files(tmp_path)) == sorted([dead, legacy])
    assert live.exists() and other.exists() and not dead.exists() and not legacy.exists()


def test_superseded_mlflow_runs_of_a_step_are_deleted_with_their_artifacts(tmp_path, client_secrets):
    from fewshot_core.tracking.runs import Tracker
    from pipelines.deploy.celery_app import discard_mlflow_run, superseded_mlflow_runs
    from pipelines.resources import ASSET_TAG

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mine = tracker.log_evaluation("exp", "run-a", "x", {}, {"m": 1.0}, tags={ASSET_TAG: "evaluation/b/knn"},
                                  artifacts={"notes.txt": "partial"})
    tracker.log_evaluation("exp", "run-a", "y", {}, {"m": 1.0}, tags={ASSET_TAG: "evaluation/b/patchcore"})
    tracker.log_evaluation("exp", "run-b", "z", {}, {"m": 1.0}, tags={ASSET_TAG: "evaluation/b/knn"})
    assert superseded_mlflow_runs(tracker, "run-a", ["evaluation__b__knn"]) == [mine]
    artifacts = Path(tracker.client.get_run(mine).info.artifact_uri.replace("file://", ""))
    assert (artifacts / "notes.txt").is_file()
    discard_mlflow_run(tracker, mine)
    assert not (artifacts / "notes.txt").exists()
    assert superseded_mlflow_runs(tracker, "run-a", ["evaluation__b__knn"]) == []  # deleted runs are not listed
    assert len(tracker.evaluation_runs("exp")) == 2
