"""Reader for the MVTec AD folder layout, for the official categories and users' parts alike.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<good|defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png     (optional: absent = image-level)

Scanning collects every structural problem instead of stopping at the first, so ``validate`` can
report them all; ``load_category`` refuses a category that has any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fewshot_core.data.imageio import is_image_file, not_regular_message, special_file_kind
from fewshot_core.data.mask_sizes import require_consistent_masks
from fewshot_core.data.records import GOOD, ImageRecord, make_image_id
from fewshot_core.errors import FsadError

MASK_SUFFIX = "_mask"


@dataclass
class Dataset:
    """All images of one category, from whatever layout; records sorted by ``image_id``."""

    root: Path
    category: str
    records: list[ImageRecord]
    has_masks: bool  # False: image-level category, no pixel ground truth anywhere
    _index: dict[str, ImageRecord] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.records = sorted(self.records, key=lambda r: r.image_id)

    def __len__(self) -> int:
        return len(self.records)

    def train_good(self) -> list[ImageRecord]:
        return [r for r in self.records if r.split == "train" and r.label == 0]

    def test(self) -> list[ImageRecord]:
        return [r for r in self.records if r.split == "test"]

    def defect_types(self) -> list[str]:
        return sorted({r.defect_type for r in self.records if r.defect_type != GOOD})

    def by_id(self, image_id: str) -> ImageRecord:
        if self._index is None:
            self._index = {r.image_id: r for r in self.records}
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"{image_id!r} is not an image of {self.category} ({self.root})") from None


@dataclass
class CategoryScan:
    """A category as found on disk plus everything wrong with it (one line per problem)."""

    dataset: Dataset
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    orphan_masks: list[Path] = field(default_factory=list)

    def raise_if_problems(self, hint: str) -> Dataset:
        if self.problems:
            more = len(self.problems) - 1
            extra = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
            raise FsadError(f"{self.problems[0]}{extra}; run `{hint}` to list every problem")
        return self.dataset


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda p: p.name)


def list_images(folder: Path, problems: list[str], warnings: list[str]) -> list[Path]:
    """Image files directly in ``folder``; other files and sub-folders become warnings."""
    images: list[Path] = []
    stems: dict[str, Path] = {}
    for p in _entries(folder):
        if p.is_dir():
            warnings.append(f"{p}: unexpected sub-folder, ignored")
        elif not is_image_file(p):
            warnings.append(f"{p}: not an image file, ignored")
        elif (kind := special_file_kind(p)) is not None:
            problems.append(not_regular_message(p, kind))
        elif p.stem in stems:
            problems.append(f"{p}: same name as {stems[p.stem].name} (image ids use the file stem); rename one")
        else:
            stems[p.stem] = p
            images.append(p)
    return images


def split_class_warnings(records, where) -> list[str]:
    """The test split lacks good or defect images: image AUROC and F1 cannot be computed (they are then
    absent from every row, not zero); one line naming ``where`` (the test folder, or the category)."""
    labels = {r.label for r in records if r.split == "test"}
    if not labels:
        return []
    if 1 not in labels:
        return [f"{where}: no defect images in test; anomaly metrics need at least one"]
    if 0 not in labels:
        return [f"{where}: no good images in test; image metrics (AUROC, F1) need at least one"]
    return []


def mask_key(mask: Path, suffix: str = MASK_SUFFIX) -> str:
    """The image stem a mask belongs to: ``000_mask.png`` -> ``000``."""
    stem = mask.stem
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def list_categories(root: Path) -> list[str]:
    """Category folders under an MVTec-layout root (folders holding ``train/`` or ``test/``)."""
    root = Path(root)
    if not root.is_dir():
        raise FsadError(f"{root}: dataset root not found; pass the folder that holds the category folders")
    if (root / "train").is_dir() or (root / "test").is_dir():
        raise FsadError(
            f"{root}: this is a category folder, not a dataset root; pass {root.parent} with --category {root.name}"
        )
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        and ((p / "train").is_dir() or (p / "test").is_dir() or (p / "ground_truth").is_dir())
    )


def scan_category(root: Path, category: str) -> CategoryScan:
    root = Path(root).expanduser().absolute()
    cat_dir = root / category
    if not cat_dir.is_dir():
        known = list_categories(root) if root.is_dir() else []
        raise FsadError(f"{cat_dir}: category not found; available: {', '.join(known) or 'none'}")
    problems: list[str] = []
    warnings: list[str] = []
    records: list[ImageRecord] = []
    gt_dir = cat_dir / "ground_truth"
    has_masks = gt_dir.is_dir()

    for p in _entries(cat_dir):
        if p.is_dir() and p.name not in ("train", "test", "ground_truth") and not p.name.startswith("."):
            warnings.append(f"{p}: unexpected folder in category, ignored")
        # loose files at category level (MVTec ships license.txt / readme.txt) are fine

    train_dir, test_dir = cat_dir / "train", cat_dir / "test"
    if not (train_dir / GOOD).is_dir():
        problems.append(f"{train_dir / GOOD}: missing train/good folder; put the good training images there")
    else:
        for p in _entries(train_dir):
            if p.name != GOOD:
                warnings.append(f"{p}: only train/good is read in the MVTec layout, ignored")
        imgs = list_images(train_dir / GOOD, problems, warnings)
        if not imgs:
            problems.append(f"{train_dir / GOOD}: no images in train/good; add the good training images")
        records += [
            ImageRecord(make_image_id(category, "train", GOOD, p.stem), category, "train", GOOD, 0, p) for p in imgs
        ]

    test_types: dict[str, list[Path]] = {}
    if not test_dir.is_dir():
        problems.append(f"{test_dir}: missing test folder; add test/good and one folder per defect type")
    else:
        for p in _entries(test_dir):
            if p.is_dir():
                test_types[p.name] = list_images(p, problems, warnings)
            else:
                warnings.append(f"{p}: file outside a test/<type> folder, ignored")
        if not any(test_types.values()):
            problems.append(f"{test_dir}: no test images; add test/good and one folder per defect type")

    orphans: list[Path] = []
    masks_by_type: dict[str, dict[str, Path]] = {}
    if has_masks:
        for gt_type in _entries(gt_dir):
            if not gt_type.is_dir():
                warnings.append(f"{gt_type}: file outside a ground_truth/<defect> folder, ignored")
                continue
            if gt_type.name == GOOD:
                warnings.append(f"{gt_type}: masks for good images are not used, ignored")
                continue
            masks: dict[str, Path] = {}
            for m in list_images(gt_type, problems, warnings):
                key = mask_key(m)
                if key in masks:
                    problems.append(f"{m}: second mask for image {key!r} (also {masks[key].name}); keep one")
                else:
                    masks[key] = m
            if gt_type.name not in test_types:
                if masks:
                    problems.append(
                        f"{gt_type}: {len(masks)} masks but no test/{gt_type.name} folder; add the images or remove the masks"
                    )
                    orphans += masks.values()
                continue
            masks_by_type[gt_type.name] = masks

    for defect, imgs in test_types.items():
        is_good = defect == GOOD
        masks = masks_by_type.get(defect, {})
        if has_masks and not is_good and imgs and defect not in masks_by_type:
            problems.append(
                f"{gt_dir / defect}: mask folder missing for {len(imgs)} images in test/{defect}; add the masks "
                f"(<stem>{MASK_SUFFIX}.png), or remove ground_truth/ to use {category} as image-level"
            )
        stems = set()
        for p in imgs:
            stems.add(p.stem)
            mask = None
            if has_masks and not is_good and defect in masks_by_type:
                mask = masks.get(p.stem)
                if mask is None:
                    problems.append(
                        f"{p}: defect image has no mask (expected {gt_dir / defect / (p.stem + MASK_SUFFIX)}.png); add it"
                    )
            records.append(
                ImageRecord(make_image_id(category, "test", defect, p.stem), category, "test", defect,
                            0 if is_good else 1, p, mask)
            )
        for key, m in masks.items():
            if key not in stems:
                problems.append(f"{m}: mask without image (no test/{defect}/{key}.*); remove it or add the image")
                orphans.append(m)

    if not records:  # one clear line instead of one per missing folder
        problems = [f"{cat_dir}: empty category (no images in train/ or test/); add images or remove the folder"]
    elif test_types:
        warnings += split_class_warnings(records, test_dir)
    dataset = Dataset(root=root, category=category, records=records, has_masks=has_masks)
    return CategoryScan(dataset, problems, warnings, orphans)


def load_category(root: Path, category: str) -> Dataset:
    """The category's records; raises ``FsadError`` if its folder structure has any problem or a mask's
    size differs from its image's (header reads only)."""
    hint = f"fsad data validate {Path(root)} --category {category}"
    return require_consistent_masks(scan_category(root, category).raise_if_problems(hint), hint)
