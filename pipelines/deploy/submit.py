"""Run the configured sweep on the cluster profile: the same stages as ``fsad run`` (``pipelines/runner.py``),
each submitted to the webserver as one run of the implicit asset job with a partition range; the daemon's run
queue launches it, its steps go to the Celery workers, and a failed run is retried by the daemon (run retries)
before the next stage starts.
"""

from __future__ import annotations

import time

import dagster as dg

from fewshot_core.errors import FsadError
from pipelines.automation import SWEEP_TAG
from pipelines.placement.profile import ClusterProfile
from pipelines.runner import RANGE_END, RANGE_START, stages

ROOT_RUN_TAG = "dagster/root_run_id"
WILL_RETRY_TAG = "dagster/will_retry"
_DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _client(prof: ClusterProfile):
    from dagster_graphql import DagsterGraphQLClient  # its GraphQL client: only `sweep` submits

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


def category_ranges(pdef, keys: list[str]) -> list[tuple[str, str, int]]:
    """(first key, last key, count) of each contiguous run of ``keys`` that shares one category.

    A partition-range run covers the keys between its ends in the definition's own order, so only
    contiguous runs can be one run each; with the category dimension first they are one per category."""
    dims = [d.name for d in getattr(pdef, "partitions_defs", [])]
    if "category" not in dims:
        return [(keys[0], keys[-1], len(keys))]
    at = dims.index("category")
    groups: list[list[str]] = []
    for key in keys:
        if groups and groups[-1][0].split("|")[at] == key.split("|")[at]:
            groups[-1].append(key)
        else:
            groups.append([key])
    return [(g[0], g[-1], len(g)) for g in groups]


def run_sweep_on_cluster(prof: ClusterProfile, defs: dg.Definitions, instance: dg.DagsterInstance, log=print,
                         tags: dict | None = None, stage_timeout: float = 6 * 3600,
                         per_category: bool = True) -> list[dict]:
    """Submit every stage in order and wait for each; raise FsadError naming the failed stage.

    ``per_category``: a partitioned stage is one run per category (all submitted at once), so the run queue,
    the pools and the workers see categories x assets steps instead of one step per asset."""
    client = _client(prof)
    summaries = []
    for name, group in stages(defs):
        pdef = group[0].partitions_def
        ranges: list[tuple[str, str, int] | None] = [None]
        if pdef is not None:
            keys = pdef.get_partition_keys(dynamic_partitions_store=instance)
            if not keys:
                raise FsadError(f"stage {name}: no partitions (no categories registered); run the data stage first")
            ranges = category_ranges(pdef, keys) if per_category else [(keys[0], keys[-1], len(keys))]
        start = time.perf_counter()
        log(f"[{name}] {len(group)} asset(s)" + (f", {sum(r[2] for r in ranges)} partition(s) in {len(ranges)} "
                                                 "run(s)" if pdef is not None else "") + " submitted")
        submitted = []
        for rng in ranges:
            run_tags = {SWEEP_TAG: name, **(tags or {})}
            if rng is not None:
                run_tags.update({RANGE_START: rng[0], RANGE_END: rng[1]})
            try:
                submitted.append(client.submit_job_execution(
                    "__ASSET_JOB", repository_location_name="fsad", repository_name="__repository__",
                    tags=run_tags, asset_selection=[a.key for a in group]))
            except Exception as exc:  # the client wraps GraphQL and connection errors alike
                raise FsadError(f"stage {name}: the webserver at {prof.host}:{prof.ports['webserver']} refused the "
                                f"run ({str(exc).splitlines()[0]}); is the profile up (`python -m pipelines.deploy "
                                "up`)?") from None
        finals = [wait_for_chain(instance, run_id, stage_timeout) for run_id in submitted]
        seconds = time.perf_counter() - start
        for run_id, final in zip(submitted, finals):
            summaries.append({"stage": name, "run_id": final.run_id, "root_run_id": run_id,
                              "success": final.status == dg.DagsterRunStatus.SUCCESS, "seconds": seconds})
        if failed := [f for f in finals if f.status != dg.DagsterRunStatus.SUCCESS]:
            raise FsadError(f"stage {name}: Dagster run {failed[0].run_id} ended {failed[0].status.value}; open it "
                            f"in the webserver (http://{prof.host}:{prof.ports['webserver']}/runs/{failed[0].run_id})")
        log(f"[{name}] done in {seconds:.1f}s ({len(finals)} run(s))")
    return summaries
