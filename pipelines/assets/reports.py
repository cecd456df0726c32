"""Report stage: the per-seed benchmark table (Parquet, with each row's time per image end to end), its summary
over seeds (mean with a bootstrap CI or, below five seeds, the range; Parquet), and the self-contained HTML
report: which model to deploy, every setting's errors and speed, the four research questions and the
anomaly-map gallery."""


from pathlib import Path

import dagster as dg
import pandas as pd

from fewshot_core.models.champion import ChampionCriterion
from fewshot_core.reports import aggregate, plots, render_report, write_report
from fewshot_core.reports.gallery import report_gallery
from fewshot_core.reports.timing import add_timings, embed_rates, machine
from fewshot_core.schema import HEADLINE, METRICS, Protocol
from fewshot_core.tracking.ui import mlflow_ui_url
from pipelines.config import SweepConfig
from pipelines.metadata import md_png
from pipelines.resources import FeatureStoreResource, MlflowTracking


def report_path(cfg: SweepConfig) -> Path:
    return cfg.resolved_work_dir() / "report" / "report.html"


def build_report_assets(cfg: SweepConfig, evaluation_assets: list[dg.AssetsDefinition]):
    ins = {f"eval_{i}": dg.AssetIn(key=a.key) for i, a in enumerate(evaluation_assets)}

    @dg.asset(ins=ins, group_name="reports", io_manager_key="table_io", kinds={"pandas", "parquet"},
              description="One row per method x category x setting x seed with every metric, its MLflow run id "
                          "(the latest materialisation of each evaluation partition) and its time per image end "
                          "to end: backbone (the feature store's build rate) + scoring.")
    def benchmark_table(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                        **tables: pd.DataFrame) -> pd.DataFrame:
        frames = [t for t in tables.values() if isinstance(t, pd.DataFrame) and len(t)]
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(rows) and "feature_key" in rows:
            rows = add_timings(rows, embed_rates(feature_store.root, rows["feature_key"].unique()))
        meta: dict = {"rows": len(rows)}
        if len(rows):
            meta["methods"] = ", ".join(sorted(rows["method"].unique()))
            for protocol, group in rows.groupby("protocol"):  # each protocol's headline metric (the schema's)
                metric = HEADLINE.get(protocol)
                if metric in group and group[metric].notna().any():
                    meta[f"headline: {protocol} {METRICS[metric].label} (mean)"] = float(group[metric].mean())
        context.add_output_metadata(meta)
        return rows

    @dg.asset(group_name="reports", io_manager_key="table_io", kinds={"pandas", "parquet"},
              description="Mean over seeds per method x category x setting with its interval: a 95% percentile "
                          "bootstrap from five seeds on, else the min-max range (column interval says which).")
    def benchmark_summary(context: dg.AssetExecutionContext, benchmark_table: pd.DataFrame) -> pd.DataFrame:
        agg = aggregate(benchmark_table)
        meta: dict = {"groups": len(agg)}
        oc = agg[agg["protocol"] == Protocol.ONECLASS] if len(agg) else agg
        if len(oc) and "image_auroc_mean" in oc:
            best = oc.sort_values("image_auroc_mean", ascending=False).iloc[0]
            meta["best one-class image AUROC"] = float(best["image_auroc_mean"])
            meta["best one-class setting"] = f"{best['method']} {best['category']} {best['setting']}"
            meta["AUROC vs shots"] = dg.MetadataValue.md(md_png(plots.metric_vs_shots(oc, "image_auroc"),
                                                                 "image AUROC vs shots"))
        context.add_output_metadata(meta)
        return agg

    @dg.asset(group_name="reports", kinds={"html"},
              description="Self-contained HTML report: which model to deploy, errors and time per image of "
                          "every setting, four research questions, anomaly-map gallery, every number linked to its "
                          "MLflow run.")
    def html_report(context: dg.AssetExecutionContext, benchmark_table: pd.DataFrame,
                    benchmark_summary: pd.DataFrame, mlflow: MlflowTracking,
                    feature_store: FeatureStoreResource) -> dg.MaterializeResult:
        tracker = mlflow.tracker()
        gallery = report_gallery(benchmark_table, tracker.artifact_bytes)
        keys = benchmark_table["feature_key"].unique() if "feature_key" in benchmark_table else []
        rates = embed_rates(feature_store.root, keys)
        info = {"sweep": cfg.name, "config": cfg.source_file or "embedded default",
                "machine": machine() + " (the host that wrote this report; under fsad run, the one that timed "
                                       "the runs)",
                "backbone embedding": "; ".join(f"{k}: {v['images_per_s']:.1f} images/s on {v['device']}"
                                                for k, v in sorted(rates.items())) or "unknown",
                "backbones": ", ".join(cfg.backbones), "image size": cfg.image_size_note(),
                "MLflow tracking URI": tracker.tracking_uri, "MLflow experiment": mlflow.experiment,
                "MLflow UI (links)": mlflow_ui_url(),
                "Dagster run": context.run.run_id}
        text = render_report(benchmark_table, benchmark_summary, gallery, title=f"fsad report: {cfg.name}", info=info,
                             criterion=ChampionCriterion(**cfg.champion))  # the champion asset's criterion
        path = write_report(report_path(cfg), text)
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(path)),
                                              "size (kB)": round(len(text) / 1024, 1),
                                              "gallery images": len(gallery),
                                              "rows": len(benchmark_table)})

    return [benchmark_table, benchmark_summary, html_report]
