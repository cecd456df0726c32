"""Full-data model stage: per category, one feature-based detector fitted on every good training image, the
production candidate beside the few-shot champion. It is registered as ``fsad-<category>@full-data`` (one
library call: ``fewshot_core.models.publish.publish_full_data``); its MLflow run reports the threshold set
from the training images alone and what that threshold gives on the test split.
"""

import dagster as dg

from pipelines.assets.data import load_category
from pipelines.config import SweepConfig
from pipelines.partitions import CATEGORY
from pipelines.placement.steps import CPU_POOL, step_placement
from pipelines.resources import DeviceResource, FeatureStoreResource, MlflowTracking

FULL_DATA_KEY = dg.AssetKey(["full_data_model"])


def build_full_data_asset(cfg: SweepConfig, embeddings_asset) -> dg.AssetsDefinition | None:
    if cfg.full_data is None:
        return None
    backbone, method = cfg.full_data_backbone(), cfg.full_data["method"]
    params = dict(cfg.full_data.get("params") or {})

    @dg.asset(key=FULL_DATA_KEY, partitions_def=CATEGORY, group_name="models", kinds={"mlflow"},
              deps=[dg.AssetDep(embeddings_asset, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                  partition_dimension_name="category"))],
              backfill_policy=dg.BackfillPolicy.single_run(), **step_placement(CPU_POOL),
              description=f"{method} on every good training image of the category ({backbone}), registered as "
                          "fsad-<category>@full-data; threshold from the training images alone.")
    def full_data_model(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                        device: DeviceResource, mlflow: MlflowTracking) -> dg.MaterializeResult:
        from fewshot_core.models.publish import publish_full_data  # torch, mlflow: the code location loads without them

        tracker = mlflow.tracker()
        for category in context.partition_keys:
            ds = load_category(cfg, category)
            part = feature_store.build(ds, backbone, device.resolve())
            out = publish_full_data(tracker, mlflow.experiment, context.run.run_id, ds, part, method, params,
                                    runtime=device.runtime(None),
                                    tags=mlflow.step_tags(context, category))
            metrics = {k: float(v) for k, v in out["metrics"].items() if v == v}
            context.log.info(f"full-data {method} {category}: v{out['version']} "
                             + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                         if k in ("image_auroc", "balanced_accuracy", "threshold")))
            context.add_asset_metadata(
                {**metrics, "model": out["model_uri"], "registered": f"fsad-{category} v{out['version']}",
                 "threshold rule": out["threshold"].rule, "feature key": part.key,
                 "MLflow run": dg.MetadataValue.url(tracker.run_url(out["run_id"]))}, partition_key=category)
        return dg.MaterializeResult()

    return full_data_model
