"""The downstream condition on two toy partitioned assets: a sweep's own update never triggers it, also on a fresh
instance whose first tick saw an empty event log; any other run's update does."""

from __future__ import annotations

import dagster as dg
import pytest

from pipelines.automation import AFTER_UPSTREAM_UPDATES, SWEEP_TAG

PARTS = dg.StaticPartitionsDefinition(["x", "y"])


@dg.asset(partitions_def=PARTS)
def upstream() -> int:
    return 1


@dg.asset(partitions_def=PARTS, deps=[upstream], automation_condition=AFTER_UPSTREAM_UPDATES)
def downstream() -> int:
    return 1


DEFS = dg.Definitions(assets=[upstream, downstream])


def _update(instance, partition: str, tags: dict) -> None:
    assert dg.materialize([upstream, downstream], selection=[upstream.key], instance=instance,
                          partition_key=partition, tags=tags).success


def _requested(instance, cursor) -> tuple[set[str], object]:
    result = dg.evaluate_automation_conditions(defs=DEFS, instance=instance, cursor=cursor)
    keys = {p for r in result.results if r.key == downstream.key for p in r.true_subset.expensively_compute_partition_keys()}
    return keys, result.cursor


@pytest.mark.parametrize("first_tick_saw_events", [False, True])
def test_a_sweeps_update_requests_nothing_another_runs_update_does(first_tick_saw_events):
    with dg.instance_for_test() as instance:
        if first_tick_saw_events:
            _update(instance, "y", {SWEEP_TAG: "data"})
        requested, cursor = _requested(instance, None)
        assert requested == set()
        _update(instance, "x", {SWEEP_TAG: "features"})
        requested, cursor = _requested(instance, cursor)
        assert requested == set()  # before the guard, a fresh instance requested x here
        _update(instance, "x", {})
        requested, cursor = _requested(instance, cursor)
        assert requested == {"x"}
