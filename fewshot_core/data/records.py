"""The image record: one row of a dataset, whatever layout it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

GOOD = "good"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a category.

    ``image_id`` is stable across machines and re-reads: ``<category>/<split>/<defect_type>/<stem>``.
    ``label`` is 0 for good, 1 for anomalous. ``mask_path`` is None for good images and for
    image-level categories (datasets without pixel masks).
    """

    image_id: str
    category: str
    split: str  # "train" | "test"
    defect_type: str  # "good" or the defect folder name
    label: int
    path: Path
    mask_path: Path | None = None

    @property
    def is_good(self) -> bool:
        return self.label == 0

    def to_row(self) -> dict:
        row = asdict(self)
        row["path"] = str(self.path)
        row["mask_path"] = None if self.mask_path is None else str(self.mask_path)
        return row


def make_image_id(category: str, split: str, defect_type: str, stem: str) -> str:
    return f"{category}/{split}/{defect_type}/{stem}"
