"""Declarative automation: whatever updates the embeddings (the new-images sensor, a backfill in the UI)
carries on through the support banks, the full-data model and the evaluations to an updated report, with
no run launched by hand.

The condition fires only after an upstream *update*, never for partitions that are merely missing, so
starting ``dagster dev`` on a home that ``fsad run`` filled launches nothing. Updates made by a sweep's own
runs (tagged ``fsad/stage``) do not count: the sweep materialises its next stage itself. Data and
embeddings are never automated: the sensor and the nightly schedule decide when images are read.
"""

from __future__ import annotations

import dagster as dg

SWEEP_TAG = "fsad/stage"  # on every run of a sweep (fsad run, the cluster sweep, the nightly schedule)

# A dependency update counts unless a sweep made it: the sweep runs its own next stage, and the daemon's
# sensor launching that stage as well would evaluate every partition twice.
# any_new_update_has_run_tags() without a filter is "updated by some run", read on the same window as the tag
# test: on the first tick after one that saw an empty event log (a fresh instance), newly_updated() takes every
# materialisation as new while the tag tests see none, and a sweep's own update would count.
_UPDATED_OUTSIDE_A_SWEEP = (
    (dg.AutomationCondition.newly_updated()
     & dg.AutomationCondition.any_new_update_has_run_tags()
     & ~dg.AutomationCondition.all_new_updates_have_run_tags(tag_keys={SWEEP_TAG})
     & ~dg.AutomationCondition.executed_with_root_target())
    | dg.AutomationCondition.will_be_requested()
)

AFTER_UPSTREAM_UPDATES = (
    dg.AutomationCondition.any_deps_match(_UPDATED_OUTSIDE_A_SWEEP).with_label("any deps updated outside a sweep")
    .since_last_handled()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after upstream updates")

AUTOMATED_GROUPS = ("banks", "models", "evaluation", "reports")


def automated() -> dg.AssetSelection:
    return dg.AssetSelection.groups(*AUTOMATED_GROUPS)


def with_automation(assets: list) -> list:
    """``assets`` with the condition on every banks, full-data model, evaluation and report asset."""
    def apply(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.group_name in AUTOMATED_GROUPS:
            return spec.replace_attributes(automation_condition=AFTER_UPSTREAM_UPDATES)
        return spec

    return [a.map_asset_specs(apply) for a in assets]


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "downstream_of_new_images", target=automated(), default_status=dg.DefaultSensorStatus.RUNNING,
        description="Materialises banks, evaluations and the report after their upstream updates (new images "
                    "picked up by new_images_sensor, or embeddings materialised from the UI).")
