"""What the event log of the cluster profile says about where and how long steps ran (tests, benchmark)."""

from __future__ import annotations

from dataclasses import dataclass

from dagster._core.events import DagsterEventType

WORKER_EVENT = "in celery worker"  # dagster-celery's engine event when a worker starts a step
SUBMIT_EVENT = "Submitting celery task"


@dataclass
class StepTiming:
    run_id: str
    step_key: str
    worker: str | None
    submitted: float | None  # executor handed the step to the broker
    picked_up: float | None  # a worker started it (the last pick-up when a step was handed out twice)
    started: float | None  # STEP_START (code location loaded in the worker)
    finished: float | None  # STEP_SUCCESS / STEP_FAILURE
    partitions: int  # asset partitions it materialised

    @property
    def seconds(self) -> float | None:
        return None if self.started is None or self.finished is None else self.finished - self.started

    @property
    def overhead(self) -> float | None:
        """From a worker's pick-up to the step's start (loading the code location and the plan): the fixed
        cost of a step beyond its own work. Waiting for a free worker is not counted."""
        return None if self.picked_up is None or self.started is None else self.started - self.picked_up

    @property
    def queued(self) -> float | None:
        return None if self.submitted is None or self.picked_up is None else self.picked_up - self.submitted


def step_timings(instance, run_ids) -> list[StepTiming]:
    out = []
    for run_id in run_ids:
        steps: dict[str, StepTiming] = {}
        for rec in instance.all_logs(run_id):
            ev = rec.dagster_event
            if ev is None or ev.step_key is None:
                continue
            t = steps.setdefault(ev.step_key, StepTiming(run_id, ev.step_key, None, None, None, None, None, 0))
            kind = ev.event_type
            if kind == DagsterEventType.ENGINE_EVENT and (ev.message or "").startswith(SUBMIT_EVENT):
                t.submitted = t.submitted or rec.timestamp
            elif kind == DagsterEventType.ENGINE_EVENT and WORKER_EVENT in (ev.message or ""):
                t.picked_up = rec.timestamp
                t.worker = str(ev.engine_event_data.metadata["Celery worker"].value).split("@")[0]
            elif kind == DagsterEventType.STEP_START:
                t.started = rec.timestamp
            elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                t.finished = rec.timestamp
            elif kind == DagsterEventType.ASSET_MATERIALIZATION:
                t.partitions += 1
        out += steps.values()
    return out


def step_workers(instance, run_ids) -> dict[str, set[str]]:
    """Celery worker name -> keys of the steps it started (every pick-up, including a killed one)."""
    out: dict[str, set[str]] = {}
    for run_id in run_ids:
        for rec in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
            ev = rec.dagster_event
            if ev is not None and WORKER_EVENT in (ev.message or ""):
                worker = str(ev.engine_event_data.metadata["Celery worker"].value).split("@")[0]
                out.setdefault(worker, set()).add(ev.step_key)
    return out
