"""Report stage: the per-seed benchmark table (Parquet), its mean ± 95% bootstrap summary (Parquet), and the
self-contained HTML report with the four research-question sections and the anomaly-map gallery."""


from pathlib import Path

import dagster as dg
import pandas as pd

from fewshot_core.reports import aggregate, plots, render_report, write_report
from fewshot_core.reports.gallery import report_gallery
from fewshot_core.tracking import mlflow_ui_url
from pipelines.config import SweepConfig
from pipelines.metadata import md_png
from pipelines.resources import MlflowTracking


def report_path(cfg: SweepConfig) -> Path:
    return cfg.resolved_work_dir() / "report" / "report.html"


def build_report_assets(cfg: SweepConfig, evaluation_assets: list[dg.AssetsDefinition]):
    ins = {f"eval_{i}": dg.AssetIn(key=a.key) for i, a in enumerate(evaluation_assets)}

    @dg.asset(ins=ins, group_name="reports", io_manager_key="table_io", kinds={"pandas", "parquet"},
              description="One row per method x category x setting x seed with every metric and its MLflow run id "
                          "(the latest materialisation of each evaluation partition).")
    def benchmark_table(context: dg.AssetExecutionContext, **tables: pd.DataFrame) -> pd.DataFrame:
        frames = [t for t in tables.values() if isinstance(t, pd.DataFrame) and len(t)]
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        meta: dict = {"rows": len(rows)}
        if len(rows):
            meta["methods"] = ", ".join(sorted(rows["method"].unique()))
            oc = rows[rows["protocol"] == "oneclass"]
            sup = rows[rows["protocol"] == "supervised"]
            if len(oc) and "image_auroc" in oc:
                meta["headline: one-class image AUROC (mean)"] = float(oc["image_auroc"].mean())
            if len(sup) and "balanced_accuracy" in sup:
                meta["headline: supervised balanced accuracy (mean)"] = float(sup["balanced_accuracy"].mean())
        context.add_output_metadata(meta)
        return rows

    @dg.asset(group_name="reports", io_manager_key="table_io", kinds={"pandas", "parquet"},
              description="Mean and 95% percentile-bootstrap interval over seeds per method x category x setting.")
    def benchmark_summary(context: dg.AssetExecutionContext, benchmark_table: pd.DataFrame) -> pd.DataFrame:
        agg = aggregate(benchmark_table)
        meta: dict = {"groups": len(agg)}
        oc = agg[agg["protocol"] == "oneclass"] if len(agg) else agg
        if len(oc) and "image_auroc_mean" in oc:
            best = oc.sort_values("image_auroc_mean", ascending=False).iloc[0]
            meta["best one-class image AUROC"] = float(best["image_auroc_mean"])
            meta["best one-class setting"] = f"{best['method']} {best['category']} {best['setting']}"
            meta["AUROC vs shots"] = dg.MetadataValue.md(md_png(plots.metric_vs_shots(oc, "image_auroc"),
                                                                 "image AUROC vs shots"))
        context.add_output_metadata(meta)
        return agg

    @dg.asset(group_name="reports", kinds={"html"},
              description="Self-contained HTML report: four research questions, anomaly-map gallery, every "
                          "number linked to its MLflow run.")
    def html_report(context: dg.AssetExecutionContext, benchmark_table: pd.DataFrame,
                    benchmark_summary: pd.DataFrame, mlflow: MlflowTracking) -> dg.MaterializeResult:
        tracker = mlflow.tracker()
        gallery = report_gallery(benchmark_table, tracker.artifact_bytes)
        info = {"sweep": cfg.name, "config": cfg.source_file or "embedded default",
                "backbones": ", ".join(cfg.backbones), "image size": cfg.image_size_note(),
                "MLflow tracking URI": tracker.tracking_uri, "MLflow experiment": mlflow.experiment,
                "MLflow UI (links)": mlflow_ui_url(),
                "Dagster run": context.run.run_id}
        text = render_report(benchmark_table, benchmark_summary, gallery, title=f"fsad report: {cfg.name}", info=info)
        path = write_report(report_path(cfg), text)
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(path)),
                                              "size (kB)": round(len(text) / 1024, 1),
                                              "gallery images": len(gallery),
                                              "rows": len(benchmark_table)})

    return [benchmark_table, benchmark_summary, html_report]
