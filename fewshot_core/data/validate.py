"""Dataset validation that reports every problem at once, one line each, naming the file.

Structure (missing folders, images without masks, masks without images) comes from the readers'
scans; here every image and mask is really decoded (truncated files only fail there) and mask
sizes are compared with their images. Decoding runs in a thread pool: Pillow releases the GIL.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fewshot_core.data.imageio import image_size, load_mask, verify_image
from fewshot_core.data.layouts import scan_source
from fewshot_core.data.mvtec import CategoryScan
from fewshot_core.data.records import ImageRecord
from fewshot_core.errors import FsadError

IMAGE_LEVEL_NOTE = "image-level: no masks"


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)  # errors: the data cannot be used as is
    warnings: list[str] = field(default_factory=list)  # ignored files and doubtful data
    counts: dict[str, dict] = field(default_factory=dict)  # category -> {split: {defect: n}, "masks": n}
    notes: dict[str, str] = field(default_factory=dict)  # category -> e.g. "image-level: no masks"

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "counts": self.counts,
                "notes": self.notes}

    def format_counts(self) -> str:
        lines = []
        for cat, c in self.counts.items():
            n_images = sum(n for split in ("train", "test") for n in c.get(split, {}).values())
            lines.append(f"{cat}: {n_images} images, {c['masks']} masks" + (f" ({self.notes[cat]})" if cat in self.notes else ""))
            for split in ("train", "test"):
                for defect, n in c.get(split, {}).items():
                    lines.append(f"  {split + '/' + defect:<30} {n:>5}")
            lines.append(f"  {'masks':<30} {c['masks']:>5}")
        return "\n".join(lines)


def mask_size_problem(rec: ImageRecord, image_wh: tuple[int, int], mask_wh: tuple[int, int]) -> str | None:
    """The validator's line for a mask whose size differs from its image's (both as (width, height))."""
    if tuple(mask_wh) == tuple(image_wh):
        return None
    return (f"{rec.mask_path}: mask is {mask_wh[0]}x{mask_wh[1]} but its image {rec.path.name} is "
            f"{image_wh[0]}x{image_wh[1]}; resize the mask to the image")


def mask_size_problems(dataset, workers: int | None = None) -> list[str]:
    """One validator line per mask of ``dataset`` whose size differs from its image's.

    Reads headers only (no pixel decoding), so loaders can afford it on every load: a mismatched mask
    would otherwise be resized silently and give wrong pixel metrics."""
    masked = [r for r in dataset.records if r.mask_path is not None]
    if not masked:
        return []

    def check(rec: ImageRecord) -> str | None:
        try:
            return mask_size_problem(rec, image_size(rec.path), image_size(rec.mask_path))
        except FsadError as exc:  # unreadable header: the validator's line for that file
            return str(exc)

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for p in pool.map(check, masked) if p is not None]


def require_consistent_masks(dataset, hint: str | None = None):
    """``dataset`` if every mask matches its image's size, else ``FsadError`` with the validator's first
    line (for the CLI, ``load_dataset``, and the pipeline's blocking data check)."""
    problems = mask_size_problems(dataset)
    if problems:
        more = len(problems) - 1
        extra = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
        hint = hint or f"fsad data validate {dataset.root} --category {dataset.category}"
        raise FsadError(f"{problems[0]}{extra}; run `{hint}` to list every problem")
    return dataset


def _check_record(rec: ImageRecord) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one image and its mask, decoding both fully."""
    try:
        size = verify_image(rec.path)
    except FsadError as exc:
        return [str(exc)], []
    if rec.mask_path is None:
        return [], []
    try:
        mask = load_mask(rec.mask_path)
    except FsadError as exc:
        return [str(exc)], []
    if (problem := mask_size_problem(rec, size, (mask.shape[1], mask.shape[0]))) is not None:
        return [problem], []
    if not mask.any():
        return [], [f"{rec.mask_path}: mask is empty (no defect pixel) for a defect image; check it"]
    return [], []


def _counts(scan: CategoryScan) -> dict:
    per = Counter((r.split, r.defect_type) for r in scan.dataset.records)
    counts: dict = {}
    for split in ("train", "test"):
        defects = sorted((d for s, d in per if s == split), key=lambda d: (d != "good", d))
        if defects:
            counts[split] = {d: per[(split, d)] for d in defects}
    counts["masks"] = sum(r.mask_path is not None for r in scan.dataset.records)
    return counts


def validate(source, category: str | None = None, workers: int | None = None) -> ValidationReport:
    """Check a dataset (MVTec root, layout YAML or ``LayoutConfig``), optionally one category only.

    Raises ``FsadError`` only when the source itself is unusable (root or category not found);
    everything inside the dataset becomes a line of the report.
    """
    scans = scan_source(source, category)
    report = ValidationReport()
    records = [r for s in scans for r in s.dataset.records]
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(_check_record, records))  # order kept: stable report
    by_record = dict(zip((id(r) for r in records), decoded))
    for scan in scans:
        ds = scan.dataset
        report.problems += scan.problems
        report.problems += [p for r in ds.records for p in by_record[id(r)][0]]
        report.warnings += scan.warnings
        report.warnings += [w for r in ds.records for w in by_record[id(r)][1]]
        report.counts[ds.category] = _counts(scan)
        if not ds.has_masks:
            report.notes[ds.category] = IMAGE_LEVEL_NOTE
    return report
