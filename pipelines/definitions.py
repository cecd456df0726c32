"""The Dagster code location: ``defs`` for ``dagster dev -w workspace.yaml`` and ``fsad run``.

Everything is built from the sweep configuration (``pipelines/config.py``; ``FSAD_SWEEP_CONFIG`` points at a
YAML file), so partitions, evaluation assets and resources always agree with it.
"""

from __future__ import annotations

import warnings

import dagster as dg

# Single-run backfills and multi-partition mappings are marked beta; the pipeline relies on both on purpose.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

from pipelines.assets.banks import build_banks_assets
from pipelines.assets.champion import build_champion_asset
from pipelines.assets.data import build_data_assets
from pipelines.assets.embeddings import build_embeddings_asset
from pipelines.assets.evaluation import build_evaluation_assets
from pipelines.assets.reports import build_report_assets
from pipelines.automation import automation_sensor, with_automation
from pipelines.checks import build_table_checks
from pipelines.config import SweepConfig, load_config
from pipelines.io_managers import ArrayStoreIOManager, ParquetIOManager
from pipelines.resources import DeviceResource, FeatureStoreResource, MlflowTracking
from pipelines.schedules import build_nightly
from pipelines.sensors import build_new_images_sensor


def build_definitions(cfg: SweepConfig | None = None) -> dg.Definitions:
    cfg = cfg or load_config()
    work = cfg.resolved_work_dir()
    dataset, image_manifest, manifest_check = build_data_assets(cfg)
    embeddings = build_embeddings_asset(cfg, image_manifest)
    banks = build_banks_assets(cfg, embeddings)
    evaluations = build_evaluation_assets(cfg, embeddings)
    benchmark_table, benchmark_summary, html_report = build_report_assets(cfg, evaluations)
    champion = build_champion_asset(cfg, html_report)
    embeddings_job = dg.define_asset_job("embeddings_job", selection=dg.AssetSelection.assets(embeddings),
                                         description="Embeddings for requested backbone x category partitions.")
    nightly_job, nightly_schedule = build_nightly(lambda: build_definitions(cfg))
    return dg.Definitions(
        assets=with_automation([dataset, image_manifest, embeddings, *banks, *evaluations, benchmark_table,
                                benchmark_summary, html_report, champion]),
        asset_checks=[manifest_check, *build_table_checks(benchmark_table)],
        jobs=[embeddings_job, nightly_job],
        schedules=[nightly_schedule],
        sensors=[build_new_images_sensor(cfg, embeddings_job), automation_sensor()],
        resources={
            "feature_store": FeatureStoreResource(root=str(work / "features"), image_size=cfg.resolved_image_size()),
            "mlflow": MlflowTracking(experiment=cfg.name),
            "device": DeviceResource(device="auto", torch_threads=2),
            "table_io": ParquetIOManager(base_dir=str(work / "tables")),
            "array_io": ArrayStoreIOManager(base_dir=str(work / "arrays")),
        },
        # One process per run: the heavy imports (torch, timm) load once and 2-core machines are not
        # oversubscribed by a process per step.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
