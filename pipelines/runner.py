"""Materialise the whole sweep in-process, stage by stage (``fsad run`` and the nightly schedule).

Dagster runs one partitions definition per run, so the sweep is a short sequence of runs on the same
instance: data -> embeddings (all backbone x category partitions in one run) -> support banks (every
category x setting) -> the full-data model per category -> one run per group
of evaluation assets sharing a partitions definition -> the report tables and HTML. Partitioned stages use
single-run backfills (a partition-range run), so a sweep costs a handful of runs, not one per partition.
Every run is recorded in the instance and shows in the UI like a backfill launched there.
"""

from __future__ import annotations

import time
from collections import defaultdict

import dagster as dg

from fewshot_core.errors import FsadError
from pipelines.automation import SWEEP_TAG

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def _all_assets(defs: dg.Definitions) -> list:
    return [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]


def _all_definitions(defs: dg.Definitions) -> list:
    """Assets plus the stand-alone asset checks, so a run of an asset also runs the checks on it."""
    return _all_assets(defs) + list(defs.asset_checks or [])


def stages(defs: dg.Definitions) -> list[tuple[str, list[dg.AssetsDefinition]]]:
    """Ordered (name, assets) groups; assets of a group share one partitions definition (or none)."""
    assets = _all_assets(defs)
    by_group: dict[str, list] = defaultdict(list)
    for a in assets:
        by_group[a.group_names_by_key[a.key]].append(a)
    out = [("data", by_group["data"]), ("features", by_group["features"]), ("banks", by_group["banks"]),
           ("models", by_group["models"])]
    evals: dict[str, list] = defaultdict(list)
    for a in by_group["evaluation"]:
        evals[str(a.partitions_def)].append(a)
    out += [(f"evaluation {i + 1}/{len(evals)}", group) for i, group in enumerate(evals.values())]
    out.append(("reports", by_group["reports"]))
    return [(name, group) for name, group in out if group]


def run_sweep(defs: dg.Definitions, instance: dg.DagsterInstance, log=print, tags: dict | None = None,
              quiet: bool = False) -> list[dict]:
    """Run every stage; raise FsadError naming the failed stage. Returns one summary dict per run.

    ``quiet`` silences Dagster's console logger (the full event log stays in the instance)."""
    everything = _all_definitions(defs)
    resources = defs.resources
    summaries = []
    # quiet: the failure reason is re-raised below in one line; the full event log stays in the instance
    run_config = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}} if quiet else None
    for name, group in stages(defs):
        run_tags = {SWEEP_TAG: name, **(tags or {})}
        pdef = group[0].partitions_def
        if pdef is not None:
            keys = pdef.get_partition_keys(dynamic_partitions_store=instance)
            if not keys:
                raise FsadError(f"stage {name}: no partitions (no categories registered); run the data stage first")
            run_tags.update({RANGE_START: keys[0], RANGE_END: keys[-1]})
        start = time.perf_counter()
        log(f"[{name}] {len(group)} asset(s)" + (f", {len(keys)} partition(s)" if pdef is not None else ""))
        selection = dg.AssetSelection.assets(*[a.key for a in group])
        result = dg.materialize(everything, selection=selection, resources=resources, instance=instance,
                                tags=run_tags, raise_on_error=False, run_config=run_config)
        seconds = time.perf_counter() - start
        summaries.append({"stage": name, "run_id": result.run_id, "success": result.success, "seconds": seconds})
        if not result.success:
            raise FsadError(f"stage {name}: Dagster run {result.run_id} failed ({_failure_reason(result)}); "
                            "fix that, or open the run in `dagster dev` for the step logs")
        log(f"[{name}] done in {seconds:.1f}s (run {result.run_id[:8]})")
    return summaries


def _failed_blocking_check(result) -> str | None:
    """A failed blocking check's first problem (a data validation stopping the chain), if one failed."""
    for event in result.all_events:
        if event.event_type_value != "ASSET_CHECK_EVALUATION":
            continue
        evaluation = event.event_specific_data
        if not evaluation.passed and getattr(evaluation, "blocking", False):
            detail = getattr(evaluation, "description", None) or "see its metadata in the Dagster UI"
            return (f"blocking check {evaluation.check_name} on {evaluation.asset_key.to_user_string()} "
                    f"failed: {detail}")
    return None


def _failure_reason(result) -> str:
    """A failed blocking check's problem, else the first failed step's own error message (a user error
    reads as its one line), else the event's."""
    if (check := _failed_blocking_check(result)) is not None:
        return check
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None and error.cause is not None and "dagster" in (error.cls_name or "").lower():
                error = error.cause  # unwrap Dagster's "Error occurred while executing..." wrappers
            text = (error.message if error is not None else event.message) or ""
            if error is not None and error.cls_name and text.startswith(f"{error.cls_name}: "):
                text = text[len(error.cls_name) + 2:]
            text = text.replace("fewshot_core.errors.FsadError: ", "")
            return f"step {event.step_key}: {text.strip().splitlines()[0] if text.strip() else 'failed'}"
    failure = next((e for e in result.all_events if e.is_failure), None)
    return failure.message.splitlines()[0] if failure is not None and failure.message else "see the Dagster UI"
