"""Banks stage: per backbone, one support bank per category x setting (``fewshot_core.evaluation.support``):
the support images' patch features and embeddings, and the class prototypes of the supervised settings.

Every evaluation of a setting fits on its bank, so the methods that share a support (PatchCore, kNN, LDKNN
on ``oc-k4-s0``; ProtoNet and PatchCore-as-classifier on ``sup-g3b1-bin-s0``) share one cached bank, and
the lineage reads embeddings -> memory banks and prototypes -> evaluations.
"""


import dagster as dg

from fewshot_core.evaluation.support import build_support_bank
from fewshot_core.settings import Setting
from pipelines.assets.data import load_category
from pipelines.config import SweepConfig
from pipelines.partitions import embeddings_for_evaluation, keys_of, setting_backfill_policy, setting_partitions
from pipelines.placement.steps import CPU_POOL, step_placement
from pipelines.resources import DeviceResource, FeatureStoreResource


def bank_key(backbone: str) -> dg.AssetKey:
    return dg.AssetKey(["memory_banks", backbone.replace("-", "_")])


def bank_setting_keys(cfg: SweepConfig) -> list[str]:
    """Every setting some method of the sweep runs, in grid order."""
    wanted = {s.key for spec in cfg.method_specs() for s in cfg.settings_for(spec)}
    return [s.key for s in cfg.all_settings() if s.key in wanted]


def build_banks_assets(cfg: SweepConfig, embeddings_asset) -> list[dg.AssetsDefinition]:
    keys = bank_setting_keys(cfg)
    if not keys:
        return []
    return [_banks_asset(cfg, embeddings_asset, backbone, keys) for backbone in cfg.backbones]


def _banks_asset(cfg: SweepConfig, embeddings_asset, backbone: str, keys: list[str]) -> dg.AssetsDefinition:
    @dg.asset(key=bank_key(backbone), partitions_def=setting_partitions(keys), group_name="banks",
              deps=[dg.AssetDep(embeddings_asset, partition_mapping=embeddings_for_evaluation(backbone, keys))],
              io_manager_key="array_io", backfill_policy=setting_backfill_policy(keys), kinds={"numpy"},
              **step_placement(CPU_POOL),
              description=f"Support banks ({backbone}): per category x setting, the support images' patch features "
                          "and embeddings (+ class prototypes for supervised settings) every method of that "
                          "setting fits on.")
    def memory_banks(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                     device: DeviceResource) -> dict:
        out, parts = {}, {}
        for p in keys_of(context):
            if p["category"] not in parts:
                ds = load_category(cfg, p["category"])
                parts[p["category"]] = (ds, feature_store.build(ds, backbone, device.resolve()))
            ds, part = parts[p["category"]]
            bank = build_support_bank(ds, part, Setting.parse(p["setting"]))
            out[p["key"]] = bank
            meta = {"support images": len(bank["support_ids"]), "feature key": part.key,
                    "patch bank": " x ".join(map(str, bank["support_patches"].shape))}
            if "prototypes" in bank:
                meta["prototypes"] = len(bank["prototypes"])
            context.add_asset_metadata(meta, partition_key=p["key"])
        return out if len(out) > 1 else next(iter(out.values()))

    return memory_banks
