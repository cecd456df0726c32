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

from fewshot_core.data.imageio import load_mask, verify_image
from fewshot_core.data.layouts import scan_source
from fewshot_core.data.mask_sizes import mask_size_problem, mask_size_problems, require_consistent_masks  # noqa: F401
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
