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
from pipelines.assets.full_data import build_full_data_asset
from pipelines.assets.reports import build_report_assets
from pipelines.automation import automation_sensor, with_automation
from pipelines.checks import build_table_checks
from pipelines.config import SweepConfig, load_config
from pipelines.io_managers import ArrayStoreIOManager, ParquetIOManager
from pipelines.placement.profile import selection as deploy_selection
from pipelines.resources import DeviceResource, FeatureStoreResource, MlflowTracking
from pipelines.schedules import build_nightly
from pipelines.sensors import build_new_images_sensor
from pipelines.sweep_claim import check_loaded_home


def build_definitions(cfg: SweepConfig | None = None) -> dg.Definitions:
    cfg = cfg or load_config()
    # FSAD_PROFILE picks the executor and, off the embedded default, the shared folder every worker sees
    profile = deploy_selection()
    if profile.shared_root is not None and not cfg.work_dir:
        cfg.work_dir = str(profile.shared_root / cfg.name)  # assets read resolved_work_dir() themselves
    work = cfg.resolved_work_dir()
    extra_resources = {}
    if profile.shared_root is not None:  # step outputs of the default IO manager must outlive the worker
        extra_resources["io_manager"] = dg.FilesystemIOManager(base_dir=str(work / "dagster_io"))
    dataset, image_manifest, manifest_check = build_data_assets(cfg)
    embeddings = build_embeddings_asset(cfg, image_manifest)
    banks = build_banks_assets(cfg, embeddings)
    full_data = [a for a in [build_full_data_asset(cfg, embeddings)] if a is not None]
    evaluations = build_evaluation_assets(cfg, embeddings)
    benchmark_table, benchmark_summary, html_report = build_report_assets(cfg, evaluations)
    champion = build_champion_asset(cfg, html_report)
    embeddings_job = dg.define_asset_job("embeddings_job", selection=dg.AssetSelection.assets(embeddings),
                                         description="Embeddings for requested backbone x category partitions.")
    nightly_job, nightly_schedule = build_nightly(lambda: build_definitions(cfg))
    return dg.Definitions(
        assets=with_automation([dataset, image_manifest, embeddings, *banks, *full_data, *evaluations, benchmark_table,
                                benchmark_summary, html_report, champion]),
        asset_checks=[manifest_check, *build_table_checks(benchmark_table)],
        jobs=[embeddings_job, nightly_job],
        schedules=[nightly_schedule],
        sensors=[build_new_images_sensor(cfg, embeddings_job), automation_sensor()],
        resources={
            "feature_store": FeatureStoreResource(root=str(work / "features"), image_size=cfg.resolved_image_size(),
                                                    aspect=str(cfg.aspect)),
            "mlflow": MlflowTracking(experiment=cfg.name),
            "device": DeviceResource(device="auto", torch_threads=2),
            "table_io": ParquetIOManager(base_dir=str(work / "tables")),
            "array_io": ArrayStoreIOManager(base_dir=str(work / "arrays")),
            **extra_resources,
        },
        executor=profile.executor,  # embedded: in-process (pipelines/placement/profile.py says why)
    )


def _default_definitions() -> dg.Definitions:
    """What ``dagster dev`` loads: the configured sweep, refused against a home holding another's data."""
    cfg = load_config()
    check_loaded_home(cfg)
    return build_definitions(cfg)


defs = _default_definitions()
