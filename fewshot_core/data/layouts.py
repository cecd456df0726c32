"""Datasets declared by a small config instead of the MVTec layout (users' own parts).

A YAML file (paths relative to the file) or the equivalent CLI flags:

    name: widget                 # category name (default: the YAML file's stem)
    good_dir: ok/train           # good training images
    test_good_dir: ok/test       # optional; otherwise `holdout` of good_dir goes to test, chosen by seed
    defect_dirs: [nok/scratch, nok/dent]   # each folder name is a defect type (or a mapping type: folder)
    mask_dir: masks              # optional; mask of <type>/<stem>.* is <mask_dir>[/<type>]/<stem><mask_suffix>.*
    mask_suffix: _mask
    holdout: 0.2
    seed: 0

Either form yields the same ``Dataset`` as the MVTec reader. ``load_dataset`` accepts an MVTec root,
a YAML path or a ``LayoutConfig``; ``add_layout_arguments``/``source_from_args`` give every command
the same flags.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fewshot_core.data.imageio import is_image_file
from fewshot_core.data.mvtec import (
    MASK_SUFFIX,
    CategoryScan,
    Dataset,
    list_categories,
    list_images,
    mask_key,
    scan_category,
)
from fewshot_core.data.mask_sizes import require_consistent_masks
from fewshot_core.data.mvtec import load_category
from fewshot_core.data.records import GOOD, ImageRecord, make_image_id
from fewshot_core.errors import FsadError

DEFAULT_HOLDOUT = 0.2
_KEYS = ("name", "good_dir", "test_good_dir", "defect_dirs", "mask_dir", "mask_suffix", "holdout", "seed")


@dataclass
class LayoutConfig:
    good_dir: Path
    defect_dirs: dict[str, Path]  # defect type -> folder
    name: str = "custom"
    test_good_dir: Path | None = None
    mask_dir: Path | None = None
    mask_suffix: str = MASK_SUFFIX
    holdout: float = DEFAULT_HOLDOUT
    seed: int = 0
    base: Path = field(default_factory=Path.cwd)  # relative paths resolve against this
    origin: str = "flags"  # where it came from, for messages

    def __post_init__(self):
        if isinstance(self.defect_dirs, (list, tuple)):
            self.defect_dirs = _defects_from_list(self.defect_dirs, self.origin)
        self.base = Path(self.base).expanduser().absolute()
        fix = lambda p: None if p is None else (self.base / Path(p).expanduser())  # noqa: E731
        self.good_dir = fix(self.good_dir)
        self.test_good_dir = fix(self.test_good_dir)
        self.mask_dir = fix(self.mask_dir)
        self.defect_dirs = {str(k): fix(v) for k, v in self.defect_dirs.items()}
        if GOOD in self.defect_dirs:
            raise FsadError(f"{self.origin}: a defect folder is named {GOOD!r}; rename it or pass it as test_good_dir")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise FsadError(f"{self.origin}: holdout {self.holdout} out of range; use a fraction in [0, 1)")
        if not self.name or "/" in self.name:
            raise FsadError(f"{self.origin}: invalid name {self.name!r}; use a plain category name")

    @classmethod
    def from_yaml(cls, path: Path) -> LayoutConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FsadError(f"{path}: layout config not found; check the path") from None
        except (OSError, yaml.YAMLError) as exc:
            reason = str(exc).replace("\n", " ")
            raise FsadError(f"{path}: cannot read layout config ({reason}); fix the YAML") from None
        if not isinstance(data, dict):
            raise FsadError(f"{path}: layout config must be a mapping with keys {', '.join(_KEYS)}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise FsadError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}")
        for key in ("good_dir", "defect_dirs"):
            if not data.get(key):
                raise FsadError(f"{path}: missing {key!r}; add it (see docs in fewshot_core/data/layouts.py)")
        defects = data["defect_dirs"]
        if isinstance(defects, str):
            defects = [defects]
        if not isinstance(defects, (list, dict)):
            raise FsadError(f"{path}: defect_dirs must be a list of folders or a mapping type: folder")
        try:
            return cls(
                good_dir=Path(data["good_dir"]),
                defect_dirs=defects,
                name=str(data.get("name") or path.stem),
                test_good_dir=data.get("test_good_dir"),
                mask_dir=data.get("mask_dir"),
                mask_suffix=str(data["mask_suffix"]) if data.get("mask_suffix") is not None else MASK_SUFFIX,
                holdout=float(data.get("holdout", DEFAULT_HOLDOUT)),
                seed=int(data.get("seed", 0)),
                base=path.parent,
                origin=str(path),
            )
        except (TypeError, ValueError) as exc:
            raise FsadError(f"{path}: invalid value ({exc}); fix the YAML") from None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "good_dir": str(self.good_dir),
            "test_good_dir": None if self.test_good_dir is None else str(self.test_good_dir),
            "defect_dirs": {k: str(v) for k, v in self.defect_dirs.items()},
            "mask_dir": None if self.mask_dir is None else str(self.mask_dir),
            "mask_suffix": self.mask_suffix,
            "holdout": self.holdout,
            "seed": self.seed,
        }


def _defects_from_list(dirs, origin: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        if d.name in out:
            raise FsadError(f"{origin}: two defect folders named {d.name!r}; give types explicitly (type: folder)")
        out[d.name] = d
    return out


def holdout_split(images: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split good images into (train, test). The choice hashes seed + file name, so it does not depend
    on the library version or machine, and adding files leaves the others where they were."""
    if fraction <= 0 or len(images) < 2:
        return list(images), []
    n_test = min(max(1, round(fraction * len(images))), len(images) - 1)
    rank = sorted(images, key=lambda p: hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest())
    held = set(rank[:n_test])
    return [p for p in images if p not in held], [p for p in images if p in held]


def scan_layout(cfg: LayoutConfig) -> CategoryScan:
    problems: list[str] = []
    warnings: list[str] = []
    records: list[ImageRecord] = []
    name = cfg.name

    def folder(path: Path, what: str) -> list[Path]:
        if not path.is_dir():
            problems.append(f"{path}: {what} folder not found; fix the path in {cfg.origin}")
            return []
        imgs = list_images(path, problems, warnings)
        if not imgs:
            problems.append(f"{path}: no images in the {what} folder; add images or fix the path in {cfg.origin}")
        return imgs

    good = folder(cfg.good_dir, "good")
    if cfg.test_good_dir is not None:
        train_good, test_good = good, folder(cfg.test_good_dir, "test good")
    else:
        train_good, test_good = holdout_split(good, cfg.holdout, cfg.seed)
        if good and not test_good:
            warnings.append(f"{cfg.good_dir}: no good test images (holdout {cfg.holdout}); image AUROC needs some")
    records += [ImageRecord(make_image_id(name, "train", GOOD, p.stem), name, "train", GOOD, 0, p) for p in train_good]
    records += [ImageRecord(make_image_id(name, "test", GOOD, p.stem), name, "test", GOOD, 0, p) for p in test_good]

    masks: dict[tuple[str | None, str], Path] = {}  # (defect type or None for flat, image stem) -> mask
    has_masks = cfg.mask_dir is not None
    if has_masks:
        if not cfg.mask_dir.is_dir():
            problems.append(f"{cfg.mask_dir}: mask folder not found; fix mask_dir in {cfg.origin} or drop it")
        else:
            for p in sorted(cfg.mask_dir.iterdir(), key=lambda p: p.name):
                if p.is_dir() and p.name not in cfg.defect_dirs:
                    warnings.append(f"{p}: mask sub-folder matches no defect type, ignored")
                elif p.is_dir():
                    for m in list_images(p, problems, warnings):
                        masks[(p.name, mask_key(m, cfg.mask_suffix))] = m
                elif is_image_file(p):  # flat mask folder: <mask_dir>/<stem><suffix>.*
                    masks[(None, mask_key(p, cfg.mask_suffix))] = p
                else:
                    warnings.append(f"{p}: not an image file, ignored")

    used: set[Path] = set()
    flat_owner: dict[str, Path] = {}
    for defect, path in cfg.defect_dirs.items():
        for p in folder(path, f"defect ({defect})"):
            mask = None
            if has_masks and cfg.mask_dir.is_dir():
                mask = masks.get((defect, p.stem)) or masks.get((None, p.stem))
                if mask is None:
                    problems.append(
                        f"{p}: defect image has no mask (expected {cfg.mask_dir}/[{defect}/]{p.stem}{cfg.mask_suffix}.png); "
                        "add it or drop mask_dir to use the data as image-level"
                    )
                elif mask.parent == cfg.mask_dir:
                    if p.stem in flat_owner:
                        problems.append(
                            f"{mask}: ambiguous mask, {p} and {flat_owner[p.stem]} share the name; "
                            f"put masks in {cfg.mask_dir}/<defect type>/ folders"
                        )
                    flat_owner[p.stem] = p
                if mask is not None:
                    used.add(mask)
            records.append(ImageRecord(make_image_id(name, "test", defect, p.stem), name, "test", defect, 1, p, mask))
    orphans = sorted(set(masks.values()) - used)
    for m in orphans:
        problems.append(f"{m}: mask without image (no defect image {mask_key(m, cfg.mask_suffix)}.*); remove it")

    dirs = [cfg.good_dir, *cfg.defect_dirs.values()] + [d for d in (cfg.test_good_dir, cfg.mask_dir) if d]
    root = Path(os.path.commonpath([str(d) for d in dirs]))
    dataset = Dataset(root=root, category=name, records=records, has_masks=has_masks)
    return CategoryScan(dataset, problems, warnings, orphans)


def load_layout(cfg: LayoutConfig) -> Dataset:
    hint = f"fsad data validate --layout-config {cfg.origin}" if cfg.origin != "flags" else "fsad data validate <same flags>"
    return require_consistent_masks(scan_layout(cfg).raise_if_problems(hint), hint)


# --- sources: an MVTec root, a YAML file, or a LayoutConfig ------------------------------------------


def _as_source(source):
    if isinstance(source, LayoutConfig):
        return source
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml"):
        return LayoutConfig.from_yaml(path)
    return path


def scan_source(source, category: str | None = None) -> list[CategoryScan]:
    """Scans of every category a source holds (or just ``category``)."""
    src = _as_source(source)
    if isinstance(src, LayoutConfig):
        if category is not None and category != src.name:
            raise FsadError(f"{src.origin}: declares category {src.name!r}, not {category!r}; drop --category or fix name")
        return [scan_layout(src)]
    cats = [category] if category is not None else list_categories(src)
    if not cats:
        raise FsadError(f"{src}: no category folders (<category>/train/good); check the dataset root")
    return [scan_category(src, c) for c in cats]


def load_dataset(source, category: str | None = None) -> Dataset:
    """One category from an MVTec root (``category`` needed unless the root holds one) or a layout config."""
    src = _as_source(source)
    if isinstance(src, LayoutConfig):
        if category is not None and category != src.name:
            raise FsadError(f"{src.origin}: declares category {src.name!r}, not {category!r}; drop --category or fix name")
        return load_layout(src)
    if category is None:
        cats = list_categories(src)
        if len(cats) != 1:
            raise FsadError(f"{src}: holds {len(cats)} categories ({', '.join(cats) or 'none'}); pick one with --category")
        category = cats[0]

    return load_category(src, category)


def load_datasets(source, category: str | None = None) -> list[Dataset]:
    """Every category of a source (or only ``category``); raises on the first category with problems."""
    src = _as_source(source)
    if isinstance(src, LayoutConfig) or category is not None:
        return [load_dataset(src, category)]
    return [load_dataset(src, c) for c in list_categories(src)]


# --- argparse: the same data flags on every command ---------------------------------------------------


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags declaring a non-MVTec dataset; use with a positional ROOT given ``nargs='?'``."""
    g = parser.add_argument_group("own data layout (instead of an MVTec ROOT)")
    g.add_argument("--layout-config", metavar="FILE.yaml", help="YAML declaring the folders (keys: name, good_dir, test_good_dir, defect_dirs, mask_dir, mask_suffix, holdout, seed)")
    g.add_argument("--good-dir", metavar="DIR", help="folder of good training images")
    g.add_argument("--test-good-dir", metavar="DIR", help="folder of good test images (default: hold out a share)")
    g.add_argument("--defect-dir", metavar="DIR", action="append", default=None,
                   help="folder of defect images, its name is the defect type (repeatable)")
    g.add_argument("--mask-dir", metavar="DIR", help="folder of masks (optional; none = image-level)")
    g.add_argument("--mask-suffix", default=None, help=f"mask name = image stem + suffix (default {MASK_SUFFIX!r})")
    g.add_argument("--holdout", type=float, default=None,
                   help=f"share of good images held out for test without --test-good-dir (default {DEFAULT_HOLDOUT})")
    # not --seed: evaluate/embed use --seed for episodes
    g.add_argument("--holdout-seed", type=int, default=None, help="seed of the hold-out choice (default 0)")


_FLAG_ATTRS = ("good_dir", "test_good_dir", "defect_dir", "mask_dir", "mask_suffix", "holdout", "holdout_seed")


def source_from_args(args: argparse.Namespace, root_attr: str = "root"):
    """An MVTec root ``Path`` or a ``LayoutConfig`` from parsed flags; one form only."""
    root = getattr(args, root_attr, None)
    config = getattr(args, "layout_config", None)
    flags = [a for a in _FLAG_ATTRS if getattr(args, a, None) is not None]
    given = [x for x, on in (("ROOT", root), ("--layout-config", config), ("--good-dir ...", flags)) if on]
    if len(given) != 1:
        what = " and ".join(given) if given else "nothing"
        raise FsadError(f"data source: got {what}; pass exactly one of ROOT, --layout-config FILE or --good-dir/--defect-dir")
    if root:
        return Path(root)
    if config:
        return LayoutConfig.from_yaml(Path(config))
    if not args.good_dir or not args.defect_dir:
        raise FsadError("data source: --good-dir and at least one --defect-dir are needed to declare a layout")
    dirs = [Path(args.good_dir).expanduser().absolute()] + [Path(d).expanduser().absolute() for d in args.defect_dir]
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    name = getattr(args, "category", None) or (common.name if common.name and common not in dirs else "custom")
    return LayoutConfig(
        good_dir=Path(args.good_dir),
        defect_dirs=[Path(d) for d in args.defect_dir],
        name=name,
        test_good_dir=args.test_good_dir,
        mask_dir=args.mask_dir,
        mask_suffix=MASK_SUFFIX if args.mask_suffix is None else args.mask_suffix,
        holdout=DEFAULT_HOLDOUT if args.holdout is None else args.holdout,
        seed=0 if args.holdout_seed is None else args.holdout_seed,
        origin="flags",
    )


def dataset_from_args(args: argparse.Namespace, root_attr: str = "root") -> Dataset:
    """The one ``Dataset`` a command's flags name: ROOT + ``--category``, ``--layout-config`` or layout flags.

    With a layout, ``--category`` (if the command has it) must match the layout's name or is its name.
    """
    source = source_from_args(args, root_attr)
    category = getattr(args, "category", None)
    if isinstance(source, LayoutConfig) and source.origin == "flags":
        category = None  # already used as the layout's name
    return load_dataset(source, category)
