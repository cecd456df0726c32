"""Run the configured sweep on the cluster profile: the same stages as ``fsad run`` (``pipelines/runner.py``),
each submitted to the webserver as one run of the implicit asset job with a partition range; the daemon's run
queue launches it, its steps go to the Celery workers, and a failed run is retried by the daemon (run retries)
before the next stage starts.
"""

from __future__ import annotations

import time

import dagster as dg

from fewshot_core.errors import FsadError
from pipelines.deploy.profile import ClusterProfile
from pipelines.runner import RANGE_END, RANGE_START, stages

ROOT_RUN_TAG = "dagster/root_run_id"
WILL_RETRY_TAG = "dagster/will_retry"
_DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _client(prof: ClusterProfile):
    from dagster_graphql import DagsterGraphQLClient

    return DagsterGraphQLClient(prof.host, port_number=prof.ports["webserver"])


def wait_for_chain(instance: dg.DagsterInstance, run_id: str, timeout: float, poll: float = 2.0) -> dg.DagsterRun:
    """The run's final outcome, following the daemon's retries of it (runs tagged with its root run id)."""
    deadline = time.monotonic() + timeout
    undecided_since = None
    while time.monotonic() < deadline:
        chain = [instance.get_run_by_id(run_id), *instance.get_runs(dg.RunsFilter(tags={ROOT_RUN_TAG: run_id}))]
        chain = sorted([r for r in chain if r is not None], key=lambda r: instance.get_run_record_by_id(
            r.run_id).create_timestamp)
        if any(r.status == dg.DagsterRunStatus.SUCCESS for r in chain):
            return next(r for r in chain if r.status == dg.DagsterRunStatus.SUCCESS)
        last = chain[-1]
        # a failed run the daemon has not decided on yet has no will_retry tag; wait for its decision
        if last.status in _DONE and last.tags.get(WILL_RETRY_TAG) == "false":
            return last
        if last.status == dg.DagsterRunStatus.CANCELED:
            return last
        if last.status == dg.DagsterRunStatus.FAILURE:  # run retries off: the tag may never come
            undecided_since = undecided_since or time.monotonic()
            if time.monotonic() - undecided_since > 60:
                return last
        time.sleep(poll)
    raise FsadError(f"Dagster run {run_id} did not finish within {timeout:.0f}s; open it in the webserver")


def run_sweep_on_cluster(prof: ClusterProfile, defs: dg.Definitions, instance: dg.DagsterInstance, log=print,
                         tags: dict | None = None, stage_timeout: float = 6 * 3600) -> list[dict]:
    """Submit every stage in order and wait for each; raise FsadError naming the failed stage."""
    client = _client(prof)
    summaries = []
    for name, group in stages(defs):
        run_tags = {"fsad/stage": name, **(tags or {})}
        pdef = group[0].partitions_def
        n_keys = None
        if pdef is not None:
            keys = pdef.get_partition_keys(dynamic_partitions_store=instance)
            if not keys:
                raise FsadError(f"stage {name}: no partitions (no categories registered); run the data stage first")
            run_tags.update({RANGE_START: keys[0], RANGE_END: keys[-1]})
            n_keys = len(keys)
        start = time.perf_counter()
        log(f"[{name}] {len(group)} asset(s)" + (f", {n_keys} partition(s)" if n_keys else "") + " submitted")
        try:
            run_id = client.submit_job_execution("__ASSET_JOB", repository_location_name="fsad",
                                                 repository_name="__repository__", tags=run_tags,
                                                 asset_selection=[a.key for a in group])
        except Exception as exc:  # the client wraps GraphQL and connection errors alike
            raise FsadError(f"stage {name}: the webserver at {prof.host}:{prof.ports['webserver']} refused the run "
                            f"({str(exc).splitlines()[0]}); is the profile up (`python -m pipelines.deploy up`)?")
        final = wait_for_chain(instance, run_id, stage_timeout)
        seconds = time.perf_counter() - start
        summaries.append({"stage": name, "run_id": final.run_id, "root_run_id": run_id,
                          "success": final.status == dg.DagsterRunStatus.SUCCESS, "seconds": seconds})
        if final.status != dg.DagsterRunStatus.SUCCESS:
            raise FsadError(f"stage {name}: Dagster run {final.run_id} ended {final.status.value}; open it in the "
                            f"webserver (http://{prof.host}:{prof.ports['webserver']}/runs/{final.run_id})")
        log(f"[{name}] done in {seconds:.1f}s (run {final.run_id[:8]})")
    return summaries
