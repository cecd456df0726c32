"""Dataset validation that reports every problem at once, one line each, naming the file.

Structure (missing folders, images without masks, masks without images) comes from the readers'
scans; here every image and mask is really decoded (truncated files only fail there) and mask
sizes are compared with their images. Decoding runs in a thread pool: Pillow releases the GIL.

Copies are found from two digests per image: the sha256 of the file's bytes (the content hash the
feature store keys partitions on) and the sha256 of its decoded pixels (the same picture saved again
in another encoding). A copy across the train and test splits is a problem: the model is fitted on the
very image it is then asked about, and the metrics lean optimistic (train/test leakage). Copies
inside a split are warnings: repeated support images make the few-shot episodes and the decision
threshold degenerate, repeated test images count twice.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fewshot_core.checksums import sha256_file
from fewshot_core.data.imageio import decode_digest, load_mask
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


@dataclass
class _Checked:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    digests: tuple[str, str] | None = None  # (sha256 of the file, sha256 of the pixels) when it decoded


def _check_record(rec: ImageRecord) -> _Checked:
    """Problems, warnings and digests of one image and its mask, decoding both fully."""
    try:
        size, pixels = decode_digest(rec.path)
        out = _Checked(digests=(sha256_file(rec.path), pixels))
    except (FsadError, OSError) as exc:
        return _Checked([str(exc) if isinstance(exc, FsadError) else f"{rec.path}: unreadable ({exc.strerror})"])
    if rec.mask_path is None:
        return out
    try:
        mask = load_mask(rec.mask_path)
    except FsadError as exc:
        out.problems.append(str(exc))
        return out
    if (problem := mask_size_problem(rec, size, (mask.shape[1], mask.shape[0]))) is not None:
        out.problems.append(problem)
    elif not mask.any():
        out.warnings.append(f"{rec.mask_path}: mask is empty (no defect pixel) for a defect image; check it")
    return out


def _split_name(rec: ImageRecord) -> str:
    return f"{rec.split}/{rec.defect_type}"


def copy_findings(records, digests) -> tuple[list[str], list[str]]:
    """(problems, warnings) about copies among ``records``: ``digests(record)`` gives the keys that identify
    an image's content (file sha256, pixel sha256; None when unknown). Copies across splits are problems
    (leakage), copies inside one split warnings; each copy is named once, with the image it repeats."""
    problems, warnings, first, named = [], [], {}, set()
    for rec in records:
        for what, key in zip(("byte-identical to", "the same pixels as"), digests(rec) or ()):
            if key is None:
                continue
            if (key, what) not in first:
                first[(key, what)] = rec
                continue
            orig = first[(key, what)]
            if rec.path in named:
                continue
            named.add(rec.path)
            if orig.split != rec.split:
                problems.append(f"{rec.path}: {what} {orig.path} ({_split_name(orig)} and {_split_name(rec)}: "
                                "train/test leakage, the model would be tested on an image it was fitted on); "
                                "remove one of them")
            elif rec.split == "train":
                warnings.append(f"{rec.path}: {what} {orig.path} (a repeated support image: few-shot episodes "
                                "and the decision threshold become degenerate); remove one of them")
            else:
                warnings.append(f"{rec.path}: {what} {orig.path} (a repeated test image counts twice in the "
                                "metrics); remove one of them")
    return problems, warnings


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
        copies, repeats = copy_findings(ds.records, lambda r: by_record[id(r)].digests)
        report.problems += scan.problems
        report.problems += [p for r in ds.records for p in by_record[id(r)].problems]
        report.problems += copies
        report.warnings += scan.warnings
        report.warnings += [w for r in ds.records for w in by_record[id(r)].warnings]
        report.warnings += repeats
        report.counts[ds.category] = _counts(scan)
        if not ds.has_masks:
            report.notes[ds.category] = IMAGE_LEVEL_NOTE
    return report
