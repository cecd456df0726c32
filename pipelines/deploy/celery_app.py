"""The Celery app the profile's workers run: dagster-celery's step task on the profile's Redis broker.

Start a worker with ``python -m pipelines.deploy worker --name NAME --queues cpu[,gpu]`` (it sets the
environment from the profile and runs ``celery -A pipelines.deploy.celery_app worker``). The settings come
from the same ``ClusterProfile.celery_settings()`` the executor in the run worker uses, so both agree.

Each step runs under a lease (``step_lease.py``), so a message the broker redelivers while its first
execution is still alive waits for that execution instead of running the step a second time. Before it
executes a step the worker removes what an earlier, killed attempt of that step left behind: feature-store
temp folders of dead processes on this host, and the MLflow runs (with their artifacts) that attempt logged
(the step re-evaluates every partition it covers, so they are superseded, never counted twice).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
from pathlib import Path

import redis
from celery.signals import worker_ready
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import unpack_value
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from fewshot_core.processes import pid_alive
from fewshot_core.tracking.runs import BATCH_TAG, KIND_TAG, Tracker
from pipelines.deploy.step_lease import StepLease, lease_name
from pipelines.placement.profile import load_profile
from pipelines.resources import ASSET_TAG

log = logging.getLogger("fsad.worker")
profile = load_profile()
app = make_app({"broker": profile.broker_url, "backend": profile.backend_url, "include": [],
                "config_source": profile.celery_settings()})


@functools.cache
def _lease_store():
    return redis.Redis.from_url(profile.broker_url)


class LeasedStep(app.Task):
    """dagster-celery's step task, run under the step's lease and after cleaning up a killed attempt."""

    def __call__(self, *args, **kwargs):
        run_id, step_keys = _step_of(kwargs)
        if run_id is None or not self.request.id:  # called in-process (eager): nothing to share
            return super().__call__(*args, **kwargs)

        def execute():
            _before_step(run_id, step_keys)
            return super(LeasedStep, self).__call__(*args, **kwargs)

        return StepLease(_lease_store(), lease_name(self.request.id, step_keys), ttl_s=profile.lease_ttl_s).run(execute)


execute_plan = create_task(app, base=LeasedStep)


def remove_dead_temp_files(root: Path) -> list[Path]:
    """Feature-store temp folders under ``root`` whose builder was a process of this host that no longer runs.

    They are named ``.tmp-<key>-<pid>-<random>[@<host>]``; another host's pids mean nothing here, so its
    folders are left to that host (a live build on a shared disk must never lose its folder)."""
    removed = []
    if not root.is_dir():
        return removed
    host = socket.gethostname()
    for tmp in root.rglob(".tmp-*"):
        name = tmp.name
        owner = name.rsplit("@", 1)[1] if "@" in name else host
        pid = name.rsplit("@", 1)[0].rsplit("-", 2)[-2] if name.count("-") >= 3 else ""
        if owner == host and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@worker_ready.connect
def _on_ready(**_kwargs) -> None:
    for path in remove_dead_temp_files(profile.shared_root):
        log.warning("removed %s (left by a dead process)", path)


def _step_of(kwargs: dict) -> tuple[str | None, list[str]]:
    try:
        args = unpack_value(kwargs["execute_step_args_packed"], as_type=ExecuteStepArgs)
    except Exception:  # not a step task: nothing to clean
        return None, []
    return args.run_id, list(args.step_keys_to_execute or [])


def superseded_mlflow_runs(tracker, dagster_run_id: str, step_keys: list[str]) -> list[str]:
    """MLflow evaluation runs an earlier attempt of these steps (same Dagster run) logged."""
    # Step keys of assets are their key path joined by "__"; the runs carry the key joined by "/".
    assets = {key.replace("__", "/") for key in step_keys}
    flt = (f"tags.`{KIND_TAG}` = 'evaluation' and tags.`{BATCH_TAG}` = '{dagster_run_id}'")
    exps = [e.experiment_id for e in tracker.client.search_experiments()]
    runs = tracker.client.search_runs(exps, filter_string=flt, max_results=5000) if exps else []
    return [r.info.run_id for r in runs if r.data.tags.get(ASSET_TAG) in assets]


def _before_step(run_id: str, step_keys: list[str]) -> None:
    for path in remove_dead_temp_files(profile.shared_root):
        log.warning("removed %s (left by a dead process)", path)
    if not any(k.startswith("evaluation__") for k in step_keys):
        return

    tracker = Tracker(os.environ.get("MLFLOW_TRACKING_URI") or profile.mlflow_uri)
    for mlflow_run in superseded_mlflow_runs(tracker, run_id, step_keys):
        discard_mlflow_run(tracker, mlflow_run)
        log.warning("deleted MLflow run %s of an earlier attempt of %s", mlflow_run, ", ".join(step_keys))


def discard_mlflow_run(tracker, mlflow_run: str) -> None:
    """Delete the run and its artifact files (a deleted run's artifacts would otherwise stay on the share)."""
    # mlflow: only when an earlier attempt of a step left a run behind
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    uri = tracker.client.get_run(mlflow_run).info.artifact_uri
    try:
        get_artifact_repository(uri, tracking_uri=tracker.tracking_uri).delete_artifacts()
    except Exception as exc:  # nothing logged yet, or a store that cannot delete: the run goes anyway
        log.warning("artifacts of MLflow run %s not deleted (%s)", mlflow_run, exc)
    tracker.client.delete_run(mlflow_run)
