"""Evaluation stage: one asset per method (and backbone), partitioned by category x setting.

Each partition is one few-shot episode (the setting key fixes protocol, shots, good:bad ratio, label mode
and seed). Features come from the feature store (a cache hit: the embeddings asset built them); each
partition logs a new nested MLflow run with params, metrics and artifacts (ROC curve, anomaly-map examples
or confusion matrix, the fitted bank or model) and returns one table row carrying that run's id.
"""


import json
import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from fewshot_core import tracking
from pipelines.assets.data import load_category
from pipelines.config import ONECLASS, MethodSpec, Setting, SweepConfig, image_method_names, supervised_method_names
from pipelines.partitions import embeddings_for_evaluation, keys_of, setting_partitions
from pipelines.resources import DeviceResource, FeatureStoreResource, MlflowTracking

METRICS_IN_UNIT_RANGE = "metrics_in_unit_range"
SUPPORT_QUERY_DISJOINT = "support_query_disjoint"
GALLERY_IMAGES = 4


def evaluation_key(backbone: str, spec: MethodSpec) -> dg.AssetKey:
    return dg.AssetKey(["evaluation", backbone.replace("-", "_"), spec.id.replace("-", "_")])


def build_evaluation_assets(cfg: SweepConfig, embeddings_asset) -> list[dg.AssetsDefinition]:
    return [_evaluation_asset(cfg, embeddings_asset, backbone, spec)
            for backbone in cfg.backbones for spec in cfg.method_specs()]


def _evaluation_asset(cfg: SweepConfig, embeddings_asset, backbone: str, spec: MethodSpec):
    if spec.protocol == ONECLASS:
        settings = cfg.oneclass_settings()
    else:  # one-class methods under the supervised protocol: binary settings only (they cannot name defects)
        settings = [s for s in cfg.supervised_settings()
                    if s.label_mode == "binary" or spec.method in supervised_method_names()]
    keys = [s.key for s in settings]
    key = evaluation_key(backbone, spec)

    @dg.asset(
        key=key, partitions_def=setting_partitions(keys), group_name="evaluation", io_manager_key="table_io",
        deps=[dg.AssetDep(embeddings_asset, partition_mapping=embeddings_for_evaluation(
            backbone, keys, all_categories=_needs_other_categories(spec)))],
        backfill_policy=dg.BackfillPolicy.single_run(), kinds={"mlflow"},
        check_specs=[dg.AssetCheckSpec(METRICS_IN_UNIT_RANGE, asset=key,
                                       description="every metric in [0, 1] and the headline metric not NaN"),
                     dg.AssetCheckSpec(SUPPORT_QUERY_DISJOINT, asset=key,
                                       description="no image is both support and query")],
        description=f"{spec.id} ({spec.protocol}, {backbone}, params {spec.params or 'default'}): one episode per "
                    "category x setting, logged as a nested MLflow run.",
        metadata={"method": spec.method, "params": json.dumps(spec.params), "backbone": backbone},
    )
    def _eval(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource, device: DeviceResource,
              mlflow: MlflowTracking):
        tracker = mlflow.tracker()
        exp_id = tracker.experiment_id(mlflow.experiment)
        out, bad_metrics, overlaps, parts, cache = {}, [], [], {}, {}
        for p in keys_of(context):
            if p["category"] not in parts:  # one dataset scan and one store look-up per category and step
                ds = load_category(cfg, p["category"])
                parts[p["category"]] = (ds, feature_store.build(ds, backbone, device.resolve()))
            ds, part = parts[p["category"]]
            if _needs_other_categories(spec) and "meta_pool" not in cache:
                cache["meta_pool"] = _meta_pool(cfg, context, backbone, feature_store, device)
            row, overlap = _evaluate_partition(cfg, context, backbone, spec, p, ds, part, tracker, mlflow.experiment,
                                               cache)
            row["mlflow_experiment_id"] = exp_id
            out[p["key"]] = pd.DataFrame([row])
            bad_metrics += [f"{p['key']}: {m}={v}" for m, v in _metrics_of(row).items()
                            if not (np.isfinite(v) and 0.0 <= v <= 1.0)]
            headline = "image_auroc" if spec.protocol == ONECLASS else "balanced_accuracy"
            if headline not in row or not np.isfinite(row[headline]):
                bad_metrics.append(f"{p['key']}: {headline} missing")
            if overlap:
                overlaps.append(f"{p['key']}: {overlap} shared images")
        table = pd.concat(out.values(), ignore_index=True)
        headline = "image_auroc" if spec.protocol == ONECLASS else "balanced_accuracy"
        meta = {"rows": len(table), f"mean {headline}": float(table[headline].mean()) if headline in table else None,
                "MLflow runs": ", ".join(table["mlflow_run_id"])}
        yield dg.Output(out if len(out) > 1 else next(iter(out.values())),
                        metadata={k: v for k, v in meta.items() if v is not None})
        yield dg.AssetCheckResult(check_name=METRICS_IN_UNIT_RANGE, passed=not bad_metrics, asset_key=key,
                                  metadata={"problems": dg.MetadataValue.md("\n".join(bad_metrics) or "none")})
        yield dg.AssetCheckResult(check_name=SUPPORT_QUERY_DISJOINT, passed=not overlaps, asset_key=key,
                                  metadata={"problems": dg.MetadataValue.md("\n".join(overlaps) or "none")})

    return _eval


def _needs_other_categories(spec: MethodSpec) -> bool:
    """CAML without a published checkpoint meta-trains on the *other* categories' cached embeddings."""
    return spec.method == "caml" and not spec.params.get("checkpoint")


def _meta_pool(cfg, context, backbone, feature_store, device) -> dict:
    """Every registered category's (dataset, features) for CAML's meta-training pool; the method itself
    leaves the evaluated category out (and refuses a model that saw it)."""
    from fewshot_core.evaluation.meta_pool import pool_from_partitions
    from pipelines.partitions import CATEGORY

    pairs = []
    for category in context.instance.get_dynamic_partitions(CATEGORY.name):
        ds = load_category(cfg, category)
        pairs.append((ds, feature_store.build(ds, backbone, device.resolve())))
    return pool_from_partitions(pairs, source="sweep categories")


def _metrics_of(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k in _METRIC_NAMES or k.startswith("recall_")}


def _evaluate_partition(cfg, context, backbone, spec: MethodSpec, p: dict, ds, part, tracker,
                        experiment, cache: dict) -> tuple[dict, int]:
    setting = Setting.parse(p["setting"])
    if setting.protocol == ONECLASS:
        lib_row, artifacts, episode = _run_oneclass(cfg, ds, part, spec, setting, cache)
    else:
        lib_row, artifacts, episode = _run_supervised(cfg, ds, part, spec, setting, cache)
    metrics = {k: float(v) for k, v in lib_row.items() if k in _METRIC_NAMES or k.startswith("recall_")}
    overlap = len(set(episode.support_ids) & set(episode.query_ids))
    fit_s = float(lib_row.get("fit_s", np.nan))
    score_s = float(lib_row.get("score_s", lib_row.get("predict_s", np.nan)))
    params = {"method": spec.method, "method_id": spec.id, "backbone": backbone, "category": p["category"],
              "protocol": setting.protocol, "shots": setting.k_good, "k_good": setting.k_good,
              "k_bad": setting.k_bad, "ratio": f"{setting.k_good}:{setting.k_bad}",
              "label_mode": setting.label_mode or "", "seed": setting.seed, "image_size": part.image_size,
              "feature_key": part.key, "weights_random": part.is_random, "episode_id": lib_row.get("episode_id"),
              "method_params": lib_row.get("params", "{}"), "n_support": len(episode.support_ids),
              "n_query": len(episode.query_ids)}
    tags = {tracking.PARTITION_TAG: p["key"], tracking.ASSET_TAG: context.asset_key.to_user_string(),
            "fsad.setting": setting.key, "fsad.method": spec.id, "fsad.category": p["category"]}
    run_id = tracker.log_evaluation(experiment, context.run.run_id, f"{spec.id}|{p['category']}|{setting.key}",
                                    params, {**metrics, "fit_seconds": fit_s, "score_seconds": score_s},
                                    tags, artifacts)
    gallery = None
    if "plots/anomaly_maps.png" in artifacts:  # kept beside the tables for the HTML report
        gallery = cfg.resolved_work_dir() / "gallery" / spec.id / p["category"] / f"{setting.key}.png"
        gallery.parent.mkdir(parents=True, exist_ok=True)
        gallery.write_bytes(artifacts["plots/anomaly_maps.png"])
    row = {"method": spec.id, "method_name": spec.method, "backbone": backbone, "category": p["category"],
           "protocol": setting.protocol, "setting": setting.name, "setting_key": setting.key,
           "shots": setting.k_good, "k_good": setting.k_good, "k_bad": setting.k_bad,
           "label_mode": setting.label_mode, "distance": spec.params.get("distance"), "seed": setting.seed,
           "partition_key": p["key"], "mlflow_run_id": run_id, "dagster_run_id": context.run.run_id,
           "n_support": len(episode.support_ids), "n_query": len(episode.query_ids),
           "fit_seconds": fit_s, "score_seconds": score_s, "feature_key": part.key,
           "gallery_png": None if gallery is None else str(gallery), **metrics}
    context.log.info(f"{spec.id} {p['key']}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                         if k in ("image_auroc", "pixel_auroc", "balanced_accuracy")))
    return row, overlap


_METRIC_NAMES = {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro", "accuracy",
                 "balanced_accuracy", "macro_f1", "auroc"}


def _run_oneclass(cfg, ds, part, spec: MethodSpec, setting: Setting, cache: dict):
    """The library's episode, with its details (fitted model, scores, maps) handed back for the artifacts:
    the ROC curve, the anomaly-map gallery and the fitted bank describe exactly the logged run."""
    from fewshot_core.data.imageio import load_mask, load_rgb
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.methods.anomaly_map import to_image_maps
    from fewshot_core.reports import plots

    ep = sample_oneclass(ds, setting.k_good, setting.seed)
    size = part.image_size
    records = [ds.by_id(i) for i in ep.query_ids]
    labels = np.array([r.label for r in records])
    model_files: dict = {}
    details: dict = {}
    if spec.method in image_method_names():  # trained on the support images, not on the store
        from fewshot_core.methods.training import run_image_episode

        row = run_image_episode(ds, ep, spec.method, spec.params, mask_size=size, details=details, cache=cache,
                                artifact_dir=cfg.resolved_work_dir() / "artifacts")
        scores, patch_maps = details["image_scores"], details["anomaly_maps"]
        folder = getattr(details["model"], "artifact_path", None)
        if folder is not None and Path(folder).is_dir():
            model_files = {f"model/{f.name}": f for f in sorted(Path(folder).iterdir()) if f.is_file()}
    else:
        row = run_oneclass_episode(ds, part, ep, spec.method, spec.params, mask_size=size, cache=cache,
                                   details=details)
        scores, patch_maps = details["image_scores"], details["patch_maps"]
        with tempfile.TemporaryDirectory() as tmp:
            folder = details["model"].save(Path(tmp) / "model")
            model_files = {f"model/{f.name}": f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}
    artifacts = {"plots/roc_curve.png": plots.roc_curve_png(labels, scores, f"{spec.id} {ds.category} {setting.key}")}
    # Gallery: the two highest-scored anomalous images, the highest-scored good one, the lowest anomalous.
    order = np.argsort(-scores)
    bad = [int(i) for i in order if labels[i] == 1]
    good = [int(i) for i in order if labels[i] == 0]
    pick = list(dict.fromkeys(bad[:2] + good[:1] + bad[-1:]))[:GALLERY_IMAGES]
    if pick:
        # trained detectors return smoothed image-level maps already: only rescale those
        maps = to_image_maps(patch_maps[pick], size, sigma=0 if spec.method in image_method_names() else 4.0)
        items = [{"image": np.asarray(load_rgb(records[i].path).convert("RGB").resize((size, size))), "map": m,
                  "mask": load_mask(records[i].mask_path, size) if records[i].mask_path else None,
                  "caption": f"{records[i].defect_type} s={scores[i]:.2f}"} for i, m in zip(pick, maps)]
        artifacts["plots/anomaly_maps.png"] = plots.anomaly_gallery(items, f"{spec.id} · {ds.category} · {setting.key}")
    artifacts.update(model_files)
    artifacts["episode.json"] = json.dumps({"episode_id": ep.episode_id, "support_ids": ep.support_ids,
                                            "query_ids": ep.query_ids, "labels": labels.tolist(),
                                            "scores": [float(s) for s in scores]}, indent=1)
    return row, artifacts, ep


def _run_supervised(cfg, ds, part, spec: MethodSpec, setting: Setting, cache: dict):
    from fewshot_core.episodes import sample_supervised
    from fewshot_core.evaluation.supervised import run_supervised_episode
    from fewshot_core.reports import plots

    ep = sample_supervised(ds, setting.k_good, setting.k_bad, setting.seed, setting.label_mode, pool="test")
    from fewshot_core.runtime import Runtime

    meta_pool = cache.get("meta_pool") if _needs_other_categories(spec) else None
    row = run_supervised_episode(ds, part, ep, spec.method, dict(spec.params), cache=cache, meta_pool=meta_pool,
                                 runtime=Runtime(artifact_dir=cfg.resolved_work_dir() / "artifacts"))
    classes = json.loads(row["classes"])
    artifacts = {"plots/confusion_matrix.png": plots.confusion_matrix_png(
        json.loads(row["confusion"]), classes, f"{spec.id} {ds.category} {setting.key}")}
    artifacts["episode.json"] = json.dumps({"episode_id": ep.episode_id, "classes": classes,
                                            "support_ids": ep.support_ids, "support_labels": ep.support_labels,
                                            "query_ids": ep.query_ids, "query_labels": ep.query_labels,
                                            "confusion": json.loads(row["confusion"]),
                                            "fit_info": json.loads(row.get("info", "{}"))}, indent=1)
    return row, artifacts, ep
