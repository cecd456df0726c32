"""Data stage: the dataset on disk (synthetic, local MVTec AD, or downloaded) and its Parquet manifest."""


from pathlib import Path

import dagster as dg
import pandas as pd

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.data.download import download_mvtec
from fewshot_core.data.layouts import LayoutConfig
from fewshot_core.data.manifest import build_manifest
from fewshot_core.data.synth import generate
from fewshot_core.data.validate import validate
from fewshot_core.errors import FsadError
from fewshot_core.paths import shared_mvtec_root
from pipelines.config import SweepConfig
from pipelines.metadata import md_table
from pipelines.partitions import CATEGORY


def resolve_data(cfg: SweepConfig) -> tuple[Path, str]:
    """(root, source) for the configured data; ``auto`` is MVTEC_ROOT when set, else synthetic."""
    source = cfg.resolved_source()
    if source == "synthetic":
        return Path(cfg.data_root or cfg.resolved_work_dir() / "synthetic"), source
    if source == "download":
        return Path(cfg.data_root or cfg.resolved_work_dir() / "mvtec_ad"), source
    if source == "layout":  # several folders; the first layout file's folder stands for them in messages
        return Path(cfg.data_layouts[0]).parent, source
    root = Path(cfg.data_root) if cfg.data_root else shared_mvtec_root()
    if root is None or not root.exists():
        raise FsadError(f"{cfg.source_file or 'MVTEC_ROOT'}: MVTec AD root {root} not found; set MVTEC_ROOT or "
                        "data.root to a folder holding <category>/train/good")
    return root, source


def layouts(cfg: SweepConfig) -> dict:
    """Category name -> ``LayoutConfig`` for ``data.source: layout`` (users' own folders)."""
    found = [LayoutConfig.from_yaml(Path(f)) for f in cfg.data_layouts or []]
    by_name = {lc.name: lc for lc in found}
    if len(by_name) != len(found):
        raise FsadError(f"{cfg.source_file}: data.layouts declare the same name twice; give each layout its own name")
    return by_name


def source_for(cfg: SweepConfig, category: str):
    """What ``fewshot_core.data.load_dataset`` reads ``category`` from: its layout, or the MVTec root."""
    if cfg.data_source == "layout":
        return layouts(cfg)[category]
    return resolve_data(cfg)[0]


def categories(cfg: SweepConfig, root: Path) -> list[str]:
    """The configured categories, or every category found under the root (or declared by the layouts)."""
    if cfg.data_source == "layout":
        names = list(layouts(cfg))
        return [c for c in names if c in cfg.categories] if cfg.categories else names
    if cfg.categories:
        return list(cfg.categories)

    found = list_categories(root)
    if not found:
        raise FsadError(f"{root}: no categories (<category>/train/good) found; point data.root at an MVTec-layout "
                        "folder or list data.categories")
    return found


def load_category(cfg: SweepConfig, category: str):
    return load_dataset(source_for(cfg, category), category)


def manifest_problems(cfg: SweepConfig, manifest: pd.DataFrame) -> list[str]:
    """The library validator's problems for every category, plus disagreements with the manifest."""
    problems: list[str] = []
    for cat, rows in manifest.groupby("category"):
        report = validate(source_for(cfg, str(cat)), str(cat))
        problems += report.problems
        counts = report.counts.get(str(cat), {})
        expected = sum(n for split in ("train", "test") for n in counts.get(split, {}).values())
        if expected != len(rows):
            problems.append(f"{cat}: manifest has {len(rows)} images, the folder {expected}")
        defects = rows[rows["label"] == 1]
        masked = defects["mask_path"].notna()
        if masked.any() and not masked.all():
            problems.append(f"{cat}: {int((~masked).sum())} defect images without a mask")
        missing = [p for p in defects["mask_path"].dropna() if not Path(p).is_file()]
        if missing:
            problems.append(f"{cat}: {len(missing)} mask files missing, e.g. {missing[0]}")
    return problems


def build_data_assets(cfg: SweepConfig):
    @dg.asset(group_name="data", kinds={"python"},
              description="The image folders: synthetic (default), a local MVTec AD copy (MVTEC_ROOT) or a download. "
                          "Registers each category as a partition of the downstream assets.")
    def dataset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        root, source = resolve_data(cfg)
        if source == "synthetic":
            s = cfg.synth
            generate(root, categories=int(s["categories"]), seed=int(s["seed"]), size=int(s["size"]),
                     n_train=int(s["n_train"]), n_test_good=int(s["n_test_good"]),
                     n_test_per_defect=int(s["n_test_per_defect"]))
        elif source == "download":
            download_mvtec(root, cfg.categories, progress=False)
        cats = categories(cfg, root)
        known = set(context.instance.get_dynamic_partitions(CATEGORY.name))
        if new := [c for c in cats if c not in known]:
            context.instance.add_dynamic_partitions(CATEGORY.name, new)
        # A category whose folder is gone (renamed, deleted) would fail every range run: unregister it.
        # Its past materialisations stay in the event log and its MLflow runs are untouched.

        present = set(cats) | (set(list_categories(root)) if source != "layout" and root.is_dir() else set())
        for stale in sorted(known - present):
            context.instance.delete_dynamic_partition(CATEGORY.name, stale)
            context.log.warning(f"category {stale!r} no longer under {root}: removed from the partitions")
        context.log.info(f"{source} data at {root}: {', '.join(cats)}")
        return dg.MaterializeResult(metadata={"root": dg.MetadataValue.path(str(root)), "source": source,
                                              "categories": ", ".join(cats), "new partitions": len(new),
                                              "removed partitions": ", ".join(sorted(known - present)) or "none"})

    @dg.asset(deps=[dataset], group_name="data", io_manager_key="table_io", kinds={"pandas", "parquet"},
              description="One row per image (id, split, defect type, label, path, mask, size) of every category.")
    def image_manifest(context: dg.AssetExecutionContext) -> pd.DataFrame:
        root, _ = resolve_data(cfg)
        datasets = [load_dataset(source_for(cfg, c), c) for c in categories(cfg, root)]
        df = build_manifest(datasets)
        counts = df.groupby(["category", "split", "label"]).size().rename("images").reset_index()
        context.add_output_metadata({
            "categories": len(datasets),
            "image-level categories (no masks)": ", ".join(d.category for d in datasets if not d.has_masks) or "none",
            "counts": dg.MetadataValue.md(md_table(counts.to_dict("records"))),
        })
        return df

    @dg.asset_check(asset=image_manifest, blocking=True,
                    description="Blocking: the manifest matches a fresh validation of the folders (fsad data "
                                "validate): no problems such as a mask whose size differs from its image, same "
                                "image counts, every defect image of a masked category has its mask. A failure "
                                "stops the chain: nothing downstream is computed from bad data.")
    def manifest_validates(image_manifest: pd.DataFrame) -> dg.AssetCheckResult:
        problems = manifest_problems(cfg, image_manifest)
        return dg.AssetCheckResult(passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
                                   description=problems[0] if problems else None, metadata={
            "images": len(image_manifest), "problems": len(problems),
            "first problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems[:20]) or "none")})

    return [dataset, image_manifest, manifest_validates]

