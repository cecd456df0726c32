"""Nightly rerun of the default sweep, through the same staged runner as ``fsad run``."""


import dagster as dg

from pipelines.runner import run_sweep


def build_nightly(defs_factory) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    @dg.op(description="Materialise the whole configured sweep: data, features, every evaluation, the report.")
    def run_default_sweep(context: dg.OpExecutionContext) -> None:
        run_sweep(defs_factory(), context.instance, log=context.log.info,
                  tags={"fsad/triggered_by": context.run_id})

    @dg.job(description="The whole default sweep as staged runs (what `fsad run` does), for the nightly schedule.",
            tags={"fsad/kind": "sweep"})
    def nightly_sweep():
        run_default_sweep()

    schedule = dg.ScheduleDefinition(name="nightly_sweep_schedule", job=nightly_sweep, cron_schedule="0 2 * * *",
                                     default_status=dg.DefaultScheduleStatus.STOPPED,
                                     description="Reruns the default sweep every night at 02:00.")
    return nightly_sweep, schedule
