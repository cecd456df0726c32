"""Embeddings stage: one feature-store partition per backbone x category (patch and global features).

The feature store is the cache: a partition that is already complete on disk is opened, not recomputed,
so re-materialising this asset (or every evaluation that depends on it) costs no forward pass.
"""


import time

import dagster as dg

from pipelines.assets.data import load_category
from pipelines.config import SweepConfig
from pipelines.partitions import embedding_partitions, keys_of
from pipelines.placement.steps import CPU_POOL, step_placement
from pipelines.resources import DeviceResource, FeatureStoreResource


def build_embeddings_asset(cfg: SweepConfig, image_manifest) -> dg.AssetsDefinition:
    # on the manifest, whose blocking check gates this asset: features are never built from invalid data
    @dg.asset(partitions_def=embedding_partitions(cfg), deps=[image_manifest], group_name="features",
              backfill_policy=dg.BackfillPolicy.single_run(), kinds={"pytorch"},
              **step_placement(CPU_POOL),
              description="PatchCore patch features and global embeddings of every image of a category, "
                          "in the on-disk feature store (reused when complete).")
    def embeddings(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                   device: DeviceResource) -> dg.MaterializeResult:
        for p in keys_of(context):
            start = time.perf_counter()
            part = feature_store.build(load_category(cfg, p["category"]), p["backbone"], device.resolve())
            hit = bool(getattr(part, "cache_hit", False))
            context.log.info(f"{p['key']}: {'reused' if hit else 'built'} {part.key} ({len(part)} images)")
            weights = part.meta.get("weights", {}) if isinstance(part.meta.get("weights"), dict) else {}
            context.add_asset_metadata({
                "store key": part.key, "images": len(part), "cache hit": hit,
                "grid": "x".join(map(str, part.grid)), "patch dim": part.patch_dim,
                "image size": part.image_size, "input shape": "x".join(map(str, part.input_shape)), "seconds": round(time.perf_counter() - start, 2),
                "path": dg.MetadataValue.path(str(part.path)),
                "weights": str(weights.get("source", part.meta.get("weights_source", ""))),
                "random weights": bool(part.is_random)}, partition_key=p["key"])
        return dg.MaterializeResult()

    return embeddings

