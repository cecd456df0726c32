"""Embeddings stage: one feature-store partition per backbone x category (patch and global features).

The feature store is the cache: a partition that is already complete on disk is opened, not recomputed,
so re-materialising this asset (or every evaluation that depends on it) costs no forward pass.
"""


import time

import dagster as dg

from pipelines.assets.data import load_category
from pipelines.config import SweepConfig
from pipelines.metadata import md_table
from pipelines.partitions import embedding_partitions, keys_of
from pipelines.resources import DeviceResource, FeatureStoreResource


def build_embeddings_asset(cfg: SweepConfig, dataset_asset) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=embedding_partitions(cfg), deps=[dataset_asset], group_name="features",
              backfill_policy=dg.BackfillPolicy.single_run(), kinds={"pytorch"},
              description="PatchCore patch features and global embeddings of every image of a category, "
                          "in the on-disk feature store (reused when complete).")
    def embeddings(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                   device: DeviceResource) -> dg.MaterializeResult:
        rows = []
        for p in keys_of(context):
            start = time.perf_counter()
            part = feature_store.build(load_category(cfg, p["category"]), p["backbone"], device.resolve())
            hit = bool(getattr(part, "cache_hit", False))
            rows.append({"partition": p["key"], "store key": part.key, "images": len(part), "cache hit": hit,
                         "grid": "x".join(map(str, part.grid)), "patch dim": part.patch_dim,
                         "seconds": round(time.perf_counter() - start, 2)})
            context.log.info(f"{p['key']}: {'reused' if hit else 'built'} {part.key} ({len(part)} images)")
        weights = part.meta.get("weights", {}) if isinstance(part.meta.get("weights"), dict) else {}
        return dg.MaterializeResult(metadata={
            "partitions": len(rows),
            "cache hits": sum(r["cache hit"] for r in rows),
            "images": sum(r["images"] for r in rows),
            "store": dg.MetadataValue.path(feature_store.root),
            "weights": str(weights.get("source", part.meta.get("weights_source", ""))),
            "random weights": bool(part.is_random),
            "partitions built": dg.MetadataValue.md(md_table(rows)),
        })

    return embeddings

