"""Evaluation stage: one asset per method (and backbone), partitioned by category x setting.

Each partition is one few-shot episode (the setting key fixes protocol, shots, good:bad ratio, label mode
and seed), computed by ``fewshot_core.evaluation.run.evaluate_setting``. This module only declares the
assets and records the result: each partition logs a new nested MLflow run (params, metrics, the ROC curve
or confusion matrix, the anomaly-map gallery, the fitted model, the episode) and returns one table row
carrying that run's id; its materialisation carries its own metrics, run link and path.
"""


import json
from typing import Any, NamedTuple

import dagster as dg
import numpy as np
import pandas as pd

from fewshot_core import schema
from fewshot_core.episode_cache import EpisodeCache
from fewshot_core.errors import FsadError
from fewshot_core.evaluation import meta_pool as pools
from fewshot_core.evaluation.options import EvalContext
from fewshot_core.evaluation.run import evaluate_setting
from fewshot_core.evaluation.support import BankedPartition
from fewshot_core.methods import registry
from fewshot_core.figures.gallery import GALLERY_ARTIFACT
from fewshot_core.settings import Setting
from pipelines.assets.banks import bank_key
from pipelines.assets.data import load_category
from pipelines.config import SweepConfig
from pipelines.methods import MethodSpec
from pipelines.partitions import (CATEGORY, embeddings_for_evaluation, keys_of, setting_backfill_policy,
                                  setting_partitions)
from pipelines.placement.steps import pool_for_method, step_placement
from pipelines.resources import DeviceResource, FeatureStoreResource, MlflowTracking

METRICS_IN_UNIT_RANGE = "metrics_in_unit_range"
SUPPORT_QUERY_DISJOINT = "support_query_disjoint"


def evaluation_key(backbone: str, spec: MethodSpec) -> dg.AssetKey:
    return dg.AssetKey(["evaluation", backbone.replace("-", "_"), spec.id.replace("-", "_")])


def headline_metric(protocol: str) -> str:
    return schema.HEADLINE[schema.Protocol(protocol)]


def build_evaluation_assets(cfg: SweepConfig, embeddings_asset) -> list[dg.AssetsDefinition]:
    return [_evaluation_asset(cfg, embeddings_asset, backbone, spec)
            for backbone in cfg.backbones for spec in cfg.method_specs()]


def _needs_meta_pool(spec: MethodSpec) -> bool:
    """Methods the registry marks as meta-trained on other categories, unless given a checkpoint."""
    return spec.entry.meta_pool and not spec.params.get("checkpoint")


def _evaluation_asset(cfg: SweepConfig, embeddings_asset, backbone: str, spec: MethodSpec):
    keys = [s.key for s in cfg.settings_for(spec)]
    key = evaluation_key(backbone, spec)
    headline = headline_metric(spec.protocol)

    @dg.asset(
        key=key, partitions_def=setting_partitions(keys), group_name="evaluation", io_manager_key="table_io",
        ins={"banks": dg.AssetIn(key=bank_key(backbone))},  # the setting's support bank, shared by its methods
        deps=[dg.AssetDep(embeddings_asset, partition_mapping=embeddings_for_evaluation(
            backbone, keys, all_categories=_needs_meta_pool(spec)))],
        backfill_policy=setting_backfill_policy(keys), kinds={"mlflow"},
        check_specs=[dg.AssetCheckSpec(METRICS_IN_UNIT_RANGE, asset=key,
                                       description="every metric in [0, 1] and the headline metric not NaN"),
                     dg.AssetCheckSpec(SUPPORT_QUERY_DISJOINT, asset=key,
                                       description="no image is both support and query")],
        description=f"{spec.id} ({spec.protocol}, {backbone}, params {spec.params or 'default'}): one episode per "
                    "category x setting, logged as a nested MLflow run.",
        metadata={"method": spec.method, "params": json.dumps(spec.params), "backbone": backbone},
        **step_placement(pool_for_method(spec.entry)),
    )
    def _eval(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource, device: DeviceResource,
              mlflow: MlflowTracking, banks: dict):
        tracker = mlflow.tracker()
        exp_id = tracker.experiment_id(mlflow.experiment)
        runtime = device.runtime(cfg.resolved_work_dir() / "artifacts")
        out, bad_metrics, overlaps, parts, caches, pool = {}, [], [], {}, {}, None
        if "support_ids" in banks:  # one partition: the IO manager hands over that bank itself
            banks = {keys_of(context)[0]["key"]: banks}
        for p in keys_of(context):
            category = p["category"]
            if category not in parts:  # one dataset scan, store look-up and cache per category and step
                ds = load_category(cfg, category)
                parts[category] = (ds, feature_store.build(ds, backbone, device.resolve()))
                caches[category] = EpisodeCache()
            ds, part = parts[category]
            params = dict(spec.params)
            if _needs_meta_pool(spec) and pool is None:
                pool = _meta_pool(cfg, context, backbone, feature_store, device, spec.meta_pool)
            setting = Setting.parse(p["setting"])
            if p["key"] not in banks:
                raise FsadError(f"{p['key']}: no support bank yet; materialise {bank_key(backbone).to_user_string()} "
                                "for this partition first (fsad run does)")
            result = evaluate_setting(ds, BankedPartition(part, banks[p["key"]]), spec.entry, setting, params,
                                      context=EvalContext(runtime=runtime, cache=caches[category], meta_pool=pool),
                                      title=f"{spec.id} · {category} · {setting.key}")
            row = _record(context, _Tracking(tracker, mlflow.experiment, exp_id),
                          _Partition(backbone, spec, p, setting), ds, part, result)
            out[p["key"]] = pd.DataFrame([row])
            metrics = result.metrics
            # NaN is allowed off the headline (e.g. no decision threshold from one good shot)
            bad_metrics += [f"{p['key']}: {m}={v}" for m, v in metrics.items()
                            if not (0 <= v <= 1) and (np.isfinite(v) or m == headline)]
            if headline not in metrics or not np.isfinite(metrics[headline]):
                bad_metrics.append(f"{p['key']}: {headline} missing")
            if result.overlap:
                overlaps.append(f"{p['key']}: {result.overlap} shared images")
            # this partition's own materialisation metadata, however many partitions the run covers
            context.add_asset_metadata(_partition_metadata(row, metrics, tracker, exp_id), partition_key=p["key"])
        yield dg.Output(out if len(out) > 1 else next(iter(out.values())))
        yield dg.AssetCheckResult(check_name=METRICS_IN_UNIT_RANGE, passed=not bad_metrics, asset_key=key,
                                  metadata={"problems": dg.MetadataValue.md("\n".join(bad_metrics) or "none")})
        yield dg.AssetCheckResult(check_name=SUPPORT_QUERY_DISJOINT, passed=not overlaps, asset_key=key,
                                  metadata={"problems": dg.MetadataValue.md("\n".join(overlaps) or "none")})

    return _eval


def _partition_metadata(row: dict, metrics: dict, tracker, exp_id: str) -> dict:
    meta = {m: float(v) for m, v in metrics.items() if np.isfinite(v)}
    meta.update({"MLflow run": dg.MetadataValue.url(tracker.run_url(row["mlflow_run_id"], exp_id)),
                 "mlflow_run_id": row["mlflow_run_id"], "n_support": row["n_support"], "n_query": row["n_query"],
                 "fit seconds": float(row["fit_seconds"])})
    return meta


def _meta_pool(cfg, context, backbone, feature_store, device, source: str | None):
    """The meta-training pool (``MetaPool``) the method spec asks for: the sweep's registered categories
    (generated ones when the sweep has a single category, e.g. bottle), generated categories, or another
    root's. The method itself leaves the evaluated category out (and refuses a model that saw it)."""
    from fewshot_core.features.store import EmbedCompute, FeatureSpec  # torch: the code location loads without it

    categories = context.instance.get_dynamic_partitions(CATEGORY.name)
    parsed = pools.parse_source(source or "categories", others="categories", where="sweep meta_pool")
    if parsed.kind == "others" and len(categories) < 2:
        parsed = pools.PoolSource("synthetic")
    compute = EmbedCompute(feature_store.batch_size, feature_store.num_workers, device.resolve())

    def sweep_categories():
        pairs = []
        for category in categories:
            ds = load_category(cfg, category)
            pairs.append((ds, feature_store.build(ds, backbone, device.resolve())))
        return pools.pool_from_partitions(pairs, source="sweep categories")

    return pools.build_pool(parsed, feature_store.store(), FeatureSpec(backbone, feature_store.image_size),
                            cfg.resolved_work_dir(), others=sweep_categories, compute=compute)


class _Tracking(NamedTuple):
    """Where a partition's run is logged: the tracker, the sweep's experiment by name and by id."""

    tracker: Any
    experiment: str
    experiment_id: str


class _Partition(NamedTuple):
    """One evaluation partition: its asset's backbone and method spec, its keys (``key``, ``category``,
    ``setting``) and the parsed setting."""

    backbone: str
    spec: MethodSpec
    keys: dict
    setting: Setting


def _record(context, log: _Tracking, where: _Partition, ds, part, result) -> dict:
    """Log the partition's MLflow run (with the fitted method as its MLflow Model) and return its table row."""
    # torch, mlflow: the code location loads without them
    from fewshot_core.models.publish import ModelRun, publish_model, publishable

    tracker, experiment, exp_id = log.tracker, log.experiment, log.experiment_id
    backbone, spec, p, setting = where.backbone, where.spec, where.keys, where.setting

    lib_row, episode, metrics = result.row, result.episode, result.metrics
    fit_s, score_s = result.fit_seconds, result.score_seconds
    params = {"method": spec.method, "method_id": spec.id, "backbone": backbone, "category": p["category"],
              "protocol": setting.protocol, "shots": setting.k_good, "k_good": setting.k_good,
              "k_bad": setting.k_bad, "ratio": f"{setting.k_good}:{setting.k_bad}",
              "label_mode": setting.label_mode or "", "seed": setting.seed, "image_size": part.image_size,
              "feature_key": part.key, "weights_random": part.is_random, "episode_id": lib_row.get("episode_id"),
              "method_params": lib_row.get("params", "{}"), "n_support": len(episode.support_ids),
              "n_query": len(episode.query_ids), "meta_pool": lib_row.get("meta_pool", ""),
              "align": lib_row.get("align", "")}  # what registration decided from the support (one-class)
    tags = {**MlflowTracking.step_tags(context, p["key"]), "fsad.setting": setting.key, "fsad.method": spec.id,
            "fsad.category": p["category"]}
    # a model logged as an MLflow Model is stored there once, not again among the run's plain artifacts
    artifacts = ({k: v for k, v in result.artifacts.items() if not k.startswith("model/")}
                 if publishable(result.model, setting.protocol) else result.artifacts)
    per_image = 1000.0 * score_s / len(episode.query_ids) if len(episode.query_ids) else np.nan
    run_id = tracker.log_evaluation(experiment, context.run.run_id, f"{spec.id}|{p['category']}|{setting.key}",
                                    params, {**metrics, "fit_seconds": fit_s, "score_seconds": score_s,
                                             "score_ms_per_image": per_image,
                                             "threshold": float(lib_row.get("threshold", np.nan))},
                                    tags, artifacts, stage=context.run.tags.get("fsad/stage")
                                    or context.asset_key.to_user_string())
    image_method = spec.entry.input_kind == registry.IMAGES
    fitted_on = part if result.partition is None else result.partition  # an aligned episode's own features
    published = publish_model(ModelRun(tracker, run_id, tags, f"{spec.id}-{p['category']}-{setting.key}"), ds,
                              result.model, episode.support_ids, setting.protocol,
                              partition=None if image_method else fitted_on,
                              threshold=result.threshold)
    shown = schema.SHOWN[schema.Protocol(setting.protocol)]
    context.log.info(f"{spec.id} {p['key']}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k in shown))
    identity = {"method": spec.id, "method_name": spec.method, "backbone": backbone, "category": p["category"],
                "protocol": str(setting.protocol), "setting": setting.name, "setting_key": setting.key,
                "shots": setting.k_good, "k_good": setting.k_good, "k_bad": setting.k_bad,
                "label_mode": setting.label_mode, "distance": spec.params.get("distance"), "seed": setting.seed,
                "partition_key": p["key"], "mlflow_run_id": run_id, "mlflow_experiment_id": exp_id,
                "dagster_run_id": context.run.run_id, "n_support": len(episode.support_ids),
                "n_query": len(episode.query_ids), **_support_counts(episode)}
    # every column declared in fewshot_core/schema.py: the episode row's metrics and carried details as
    # they are, its fit_s / score_s under the table's names
    return schema.table_row({
        **identity, **metrics, "fit_seconds": fit_s, "score_seconds": score_s,
        **{c: lib_row.get(c) for c in schema.CARRIED}, "meta_pool": lib_row.get("meta_pool") or None,
        "feature_key": part.key,
        "gallery_artifact": GALLERY_ARTIFACT if GALLERY_ARTIFACT in result.artifacts else None,
        "model_uri": published.get("model_uri"), "dataset_digest": published.get("dataset_digest")})


def _support_counts(episode) -> dict[str, int]:
    """Good and defective images in the support (the report labels settings by these, not by k per type)."""
    labels = getattr(episode, "support_labels", None)
    if labels is None:  # one-class: good shots only
        return {"n_support_good": len(episode.support_ids), "n_support_bad": 0}
    good = sum(1 for y in labels if int(y) == 0)
    return {"n_support_good": good, "n_support_bad": len(labels) - good}
