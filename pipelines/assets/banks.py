"""Banks stage: per backbone x category, the full-shot PatchCore memory bank (coreset of every training
patch) and class prototypes of the global embeddings, stored as ``.npz`` arrays.

These are the deployable "all good data" models next to the few-shot episodes: the evaluation assets build
their own per-episode banks from the same cached features, so this stage never feeds the query images of a
few-shot episode into a support set.
"""


import json

import dagster as dg
import numpy as np

from pipelines.assets.data import load_category
from pipelines.config import SweepConfig
from pipelines.partitions import embedding_partitions, keys_of
from pipelines.resources import DeviceResource, FeatureStoreResource


def build_banks_asset(cfg: SweepConfig, embeddings_asset) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=embedding_partitions(cfg), deps=[embeddings_asset], group_name="features",
              io_manager_key="array_io", backfill_policy=dg.BackfillPolicy.single_run(), kinds={"numpy"},
              description="Full-shot PatchCore memory bank (greedy coreset of all training patches) and class "
                          "prototypes (mean global embedding: good from train, each defect type from test).")
    def memory_banks(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                     device: DeviceResource) -> dict:
        from fewshot_core.methods import create

        out, sizes = {}, []
        for p in keys_of(context):
            ds = load_category(cfg, p["category"])
            part = feature_store.build(ds, p["backbone"], device.resolve())
            train = [r.image_id for r in ds.train_good()]
            bank = create("patchcore", coreset_ratio=0.1, min_bank=1000).fit(part.patch(train))
            classes, protos = ["good"], [part.global_(train).mean(0)]
            for defect in ds.defect_types():
                ids = [r.image_id for r in ds.test() if r.defect_type == defect]
                if ids:
                    classes.append(defect)
                    protos.append(part.global_(ids).mean(0))
            state = {f"patchcore_{k}": v for k, v in bank.get_state()["arrays"].items()}
            out[p["key"]] = {**state, "prototypes": np.stack(protos).astype(np.float32),
                             "prototype_classes": np.array(classes),
                             "feature_key": np.array(part.key),
                             "patchcore_params": np.array(json.dumps(bank.get_params()))}
            sizes.append(f"{p['key']}: bank {bank.bank_.shape[0]} of {len(train) * np.prod(part.grid)} patches, "
                         f"{len(classes)} prototypes")
        context.add_output_metadata({"banks": dg.MetadataValue.md("\n".join(f"- {s}" for s in sizes))})
        return out if len(out) > 1 else next(iter(out.values()))

    return memory_banks
