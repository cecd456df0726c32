"""Partitions. Dagster allows two dimensions per asset, so:

- embeddings: ``backbone`` x ``category``;
- support banks and evaluations: ``category`` x ``setting``, where the setting key
  (``fewshot_core.settings``) carries protocol, shots, good:bad ratio, label mode and seed (``oc-k4-s0``,
  ``sup-g10b1-bin-s0``); the backbone is part of the asset key (one evaluation asset per method and
  backbone, so one method's whole shot grid is one asset: "select all").

Setting keys are listed grid-major with the seed innermost, so the seeds of one setting are neighbours in
the UI's partition bar: one drag selects them, no typed filter. A run covers one contiguous key range;
the backfill policy says so (``setting_backfill_policy``), so the dialog's promise and the runs it
launches agree.

Categories are dynamic partitions: the ``dataset`` asset registers the configured ones and the new-images
sensor adds folders that appear later, so custom datasets need no code change.
"""

from __future__ import annotations

import dagster as dg

from pipelines.config import SweepConfig

CATEGORY = dg.DynamicPartitionsDefinition(name="category")


def embedding_partitions(cfg: SweepConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({"backbone": dg.StaticPartitionsDefinition(list(cfg.backbones)),
                                         "category": CATEGORY})


def setting_partitions(keys: list[str]) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({"category": CATEGORY, "setting": dg.StaticPartitionsDefinition(keys)})


def setting_backfill_policy(keys: list[str]) -> dg.BackfillPolicy:
    """At most one category's settings per run. A run covers a contiguous range of ``category|setting``
    keys, so a selection spanning categories needs a run per category anyway; the dialog then says
    "multiple runs, at most N partitions each", which is what it launches. ``fsad run`` still covers a
    whole stage in one range run."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=max(1, len(keys)))


def embeddings_for_evaluation(backbone: str, setting_keys: list[str],
                              all_categories: bool = False) -> dg.MultiPartitionMapping:
    """Evaluation (category, setting) depends on embeddings (backbone, category) of its own backbone only;
    with ``all_categories`` (meta-training on the other categories) on every category of that backbone."""
    mapping = {"backbone": dg.DimensionPartitionMapping(
        "setting", dg.StaticPartitionMapping({backbone: set(setting_keys)}))}
    if not all_categories:  # an unmapped dimension maps to all of its partitions
        mapping["category"] = dg.DimensionPartitionMapping("category", dg.IdentityPartitionMapping())
    return dg.MultiPartitionMapping(mapping)


def keys_of(context) -> list[dict[str, str]]:
    """The partitions one step covers (one, or many in a single-run backfill), as dimension dicts."""
    pdef = context.assets_def.partitions_def
    dims = [d.name for d in pdef.partitions_defs]
    out = []
    for key in context.partition_keys:
        values = str(key).split("|")
        out.append({"key": str(key), **dict(zip(dims, values))})
    return out
