"""Derived MVTec-layout categories, written to a cache folder: harder variants of a category one has.

* ``posed_copy``: every image (train and test alike) under its own seeded rigid-plus-scale motion:
  rotation by any angle, a translation and a scale change; each mask gets the identical transform
  (nearest-neighbour, so it stays binary). It turns a category whose parts always lie the same way into
  one whose parts lie at random poses, as screws and nuts do on a conveyor.
* ``tall_copy``: each image as one panel of a tall strip of good images (aspect 1 : panels), its mask in
  its panel: a non-square category whose thin defects a square resize squashes.
* ``small_defect_copy``: the good images and only the defect images whose mask covers at most
  ``max_area`` of the image, so image-level detection hinges on a few patches.

Both write into a hidden temporary folder beside the target and rename it into place when complete,
with a ``derived.json`` record (source fingerprint + settings); a call with the same source and settings
reuses the folder, anything else rebuilds it. The source is only read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_core.atomic import atomic_write_text, replace_dir
from fewshot_core.errors import FsadError

DERIVED_VERSION = 1
RECORD = "derived.json"


def _rng(*keys) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 32, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def _fingerprint(dataset) -> str:
    digest = hashlib.sha256()
    for r in sorted(dataset.records, key=lambda r: r.image_id):
        digest.update(f"{r.image_id}\0{os.stat(r.path).st_size}\0{r.mask_path is not None}\n".encode())
    return digest.hexdigest()[:16]


def pose_for(seed: int, image_id: str, max_shift: float, scale_range: tuple[float, float]) -> dict:
    """The seeded pose of one image: angle (degrees, any), shift (fraction of the size, x and y), scale."""
    rng = _rng(seed, "pose", image_id)
    return {"angle": float(rng.uniform(0.0, 360.0)), "shift": [float(v) for v in rng.uniform(-max_shift, max_shift, 2)],
            "scale": float(rng.uniform(*scale_range))}


def _affine(pose: dict, size: int) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output pixel -> input pixel) of rotate+scale about the centre, then shift."""
    c = size / 2.0
    th = math.radians(pose["angle"])
    s = pose["scale"]
    tx, ty = (v * size for v in pose["shift"])
    cos, sin = math.cos(th) / s, math.sin(th) / s
    # inverse of x' = c + t + s R (x - c): x = c + R^T (x' - c - t) / s
    ox, oy = -(c + tx), -(c + ty)
    return (cos, sin, c + cos * ox + sin * oy, -sin, cos, c - sin * ox + cos * oy)


def transform_pair(image: Image.Image, mask: Image.Image | None, pose: dict, size: int):
    """(image, mask) at ``size`` px under ``pose``; the mask follows the image exactly (nearest)."""
    coeffs = _affine(pose, size)
    img = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    out = img.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if mask is None:
        return out, None
    m = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
    m = m.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST, fillcolor=0)
    return out, m.point(lambda v: 255 if v >= 128 else 0)


def _mask_name(dataset, rec) -> str:
    return Path(rec.mask_path).name if rec.mask_path is not None else f"{Path(rec.path).stem}_mask.png"


def _relative(dataset, rec) -> Path:
    return Path(rec.path).relative_to(Path(dataset.root) / dataset.category).with_suffix(".png")


def _build(target: Path, record: dict, write) -> Path:
    """Reuse ``target`` when its record matches, else write it through a temporary folder and rename."""
    target = Path(target)
    rec_path = target / RECORD
    if rec_path.is_file():
        try:
            if json.loads(rec_path.read_text()) == record:
                return target
        except (OSError, json.JSONDecodeError):
            pass
    elif target.exists():
        raise FsadError(f"{target}: exists but was not written by fsad's derived-data builder; "
                        "choose another cache folder or move it away")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        atomic_write_text(tmp / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, compress_level=1)


def posed_copy(dataset, out_root, name: str | None = None, seed: int = 0, size: int = 512,
               max_shift: float = 0.08, scale_range: tuple[float, float] = (0.85, 1.15)) -> Path:
    """Write ``out_root/<name>`` (default ``<category>_posed``): every image of ``dataset`` at ``size`` px
    under its own seeded pose (``pose_for``), masks transformed identically. Returns the category folder."""
    from fewshot_core.data.imageio import load_rgb

    name = name or f"{dataset.category}_posed"
    record = {"version": DERIVED_VERSION, "kind": "posed", "source": str(Path(dataset.root) / dataset.category),
              "fingerprint": _fingerprint(dataset), "seed": int(seed), "size": int(size),
              "max_shift": float(max_shift), "scale_range": [float(v) for v in scale_range]}

    def write(tmp: Path) -> None:
        for rec in dataset.records:
            pose = pose_for(seed, rec.image_id, max_shift, scale_range)
            mask = Image.open(rec.mask_path) if rec.mask_path is not None else None
            img, m = transform_pair(load_rgb(rec.path), mask, pose, size)
            rel = _relative(dataset, rec)
            _save(img, tmp / rel)
            if m is not None:
                _save(m, tmp / "ground_truth" / rel.parent.name / _mask_name(dataset, rec))

    return _build(Path(out_root) / name, record, write)


def mask_area(rec) -> float:
    """Fraction of the image a record's mask covers (0 without a mask)."""
    if rec.mask_path is None:
        return 0.0
    return float((np.asarray(Image.open(rec.mask_path).convert("L")) >= 128).mean())


def small_defect_copy(dataset, out_root, name: str | None = None, max_area: float = 0.03, size: int = 512) -> Path:
    """Write ``out_root/<name>`` (default ``<category>_small``) at ``size`` px: all good images and the
    defect images whose mask covers at most ``max_area`` of the image."""
    from fewshot_core.data.imageio import load_rgb

    name = name or f"{dataset.category}_small"
    record = {"version": DERIVED_VERSION, "kind": "small_defects", "source": str(Path(dataset.root) / dataset.category),
              "fingerprint": _fingerprint(dataset), "max_area": float(max_area), "size": int(size)}
    kept = [r for r in dataset.records if r.label == 0 or (r.mask_path is not None and mask_area(r) <= max_area)]
    if not any(r.label == 1 for r in kept):
        raise FsadError(f"{dataset.root}/{dataset.category}: no defect mask covers <= {max_area:.1%} of its image; "
                        "raise max_area")

    def write(tmp: Path) -> None:
        for rec in kept:
            mask = Image.open(rec.mask_path) if rec.mask_path is not None else None
            img, m = transform_pair(load_rgb(rec.path), mask, {"angle": 0.0, "shift": [0.0, 0.0], "scale": 1.0}, size)
            rel = _relative(dataset, rec)
            _save(img, tmp / rel)
            if m is not None:
                _save(m, tmp / "ground_truth" / rel.parent.name / _mask_name(dataset, rec))

    return _build(Path(out_root) / name, record, write)


def tall_copy(dataset, out_root, name: str | None = None, seed: int = 0, panels: int = 3, width: int = 256) -> Path:
    """Write ``out_root/<name>`` (default ``<category>_tall``): every image of ``dataset`` as one panel of a
    tall strip of ``panels`` square panels (``width`` px each; the others are seeded good images of the same
    split, never test images in a train strip), its mask in its panel. A stand-in for tall surface images
    (a strip of steel or a commutator): a square resize squashes the strip, and thin defects with it."""
    from fewshot_core.data.imageio import load_rgb

    if panels < 2:
        raise FsadError(f"tall_copy: panels={panels}; a strip needs at least 2 panels")
    name = name or f"{dataset.category}_tall"
    record = {"version": DERIVED_VERSION, "kind": "tall", "source": str(Path(dataset.root) / dataset.category),
              "fingerprint": _fingerprint(dataset), "seed": int(seed), "panels": int(panels), "width": int(width)}
    fillers = {split: [r for r in dataset.records if r.split == split and r.label == 0] for split in ("train", "test")}
    if any(len(v) < panels for v in fillers.values()):
        raise FsadError(f"{dataset.root}/{dataset.category}: tall_copy needs at least {panels} good images per split")

    def panel(path) -> Image.Image:
        return load_rgb(path).convert("RGB").resize((width, width), Image.Resampling.BILINEAR)

    def write(tmp: Path) -> None:
        for rec in dataset.records:
            rng = _rng(seed, "tall", rec.image_id)
            pool = [r for r in fillers[rec.split] if r.image_id != rec.image_id]
            others = [pool[i] for i in rng.choice(len(pool), panels - 1, replace=False)]
            slot = int(rng.integers(panels))
            strip = Image.new("RGB", (width, width * panels))
            mask = Image.new("L", (width, width * panels), 0) if rec.mask_path is not None else None
            for i, src in enumerate(others[:slot] + [rec] + others[slot:]):
                strip.paste(panel(src.path), (0, i * width))
            if mask is not None:
                m = Image.open(rec.mask_path).convert("L").resize((width, width), Image.Resampling.NEAREST)
                mask.paste(m.point(lambda v: 255 if v >= 128 else 0), (0, slot * width))
            rel = _relative(dataset, rec)
            _save(strip, tmp / rel)
            if mask is not None:
                _save(mask, tmp / "ground_truth" / rel.parent.name / _mask_name(dataset, rec))

    return _build(Path(out_root) / name, record, write)
