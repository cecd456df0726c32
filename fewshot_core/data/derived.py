"""Derived MVTec-layout categories, written to a cache folder: harder variants of a category one has.

* ``posed_copy``: every image (train and test alike) under its own seeded rigid-plus-scale motion:
  rotation by any angle, a translation and a scale change; each mask gets the identical transform
  (nearest-neighbour, so it stays binary). It turns a category whose parts always lie the same way into
  one whose parts lie at random poses, as screws and nuts do on a conveyor.
* ``tall_copy``: each image as one panel of a tall strip of good images (aspect 1 : panels), its mask in
  its panel: a non-square category whose thin defects a square resize squashes.
* ``part_copy``: the elongated images of a surface category (aspect at least ``min_aspect``) as parts
  on a plain background at any pose: each image kept at its aspect, its long side ``part_scale`` of the
  canvas, then rotated by any angle, shifted and scaled like ``posed_copy``; its real defects and masks
  come along. A posed elongated part with real texture and real defects (a bar, a pin), where the
  generator's screw is the only other.
* ``small_defect_copy``: the good images and only the defect images whose mask covers at most
  ``max_area`` of the image, so image-level detection hinges on a few patches.
* ``logical_copy``: logical anomalies of a fixed-pose part on a plain background. Every image is first
  framed: shrunk to ``part_scale`` of the side and centred on a canvas of its own background, so plain
  background surrounds the part as it does a component on a board (a part that fills the frame has no
  background patch away from the border, and its absence would be novel texture, not a logical
  anomaly). A seeded share of the good training images is held out and edited into defect images: the
  whole part removed, a piece of it removed, a piece moved off its place, or the whole part shifted;
  removed areas take the background. Nothing on the part is damaged, only missing or misplaced, so a
  detector that looks at patches alone sees mostly normal texture. The other images are only framed.

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
from scipy import ndimage

from fewshot_core.atomic import atomic_write_text, replace_dir
from fewshot_core.data.imageio import load_rgb
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


def transform_pair(image: Image.Image, mask: Image.Image | None, pose: dict, size: int, fill: int = 0):
    """(image, mask) at ``size`` px under ``pose``; the mask follows the image exactly (nearest). What the
    motion uncovers takes grey ``fill`` (the mask: 0)."""
    coeffs = _affine(pose, size)
    img = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    out = img.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                        fillcolor=(fill,) * 3)
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


def _aspect(rec) -> float:
    with Image.open(rec.path) as img:
        return max(img.size) / min(img.size)


def part_copy(dataset, out_root, name: str | None = None, seed: int = 0, size: int = 384, min_aspect: float = 1.6,
              part_scale: float = 0.7, background: int = 24) -> Path:
    """Write ``out_root/<name>`` (default ``<category>_parts``): the images of ``dataset`` whose aspect is at
    least ``min_aspect`` (module docstring), each on a ``size`` px canvas of grey ``background`` at its
    own seeded pose (``pose_for``); masks follow exactly."""
    name = name or f"{dataset.category}_parts"
    record = {"version": DERIVED_VERSION, "kind": "parts", "source": str(Path(dataset.root) / dataset.category),
              "fingerprint": _fingerprint(dataset), "seed": int(seed), "size": int(size),
              "min_aspect": float(min_aspect), "part_scale": float(part_scale), "background": int(background)}
    kept = [r for r in dataset.records if _aspect(r) >= min_aspect]
    if not any(r.split == "train" for r in kept) or not any(r.label == 1 for r in kept):
        raise FsadError(f"{dataset.root}/{dataset.category}: too few images with aspect >= {min_aspect} for "
                        "part_copy (it needs good training images and defect images); lower min_aspect")

    def place(img: Image.Image, resample, colour):
        """``img`` at its aspect, its long side ``part_scale`` of the canvas, centred on a plain canvas."""
        w, h = img.size
        k = part_scale * size / max(w, h)
        part = img.resize((max(1, round(w * k)), max(1, round(h * k))), resample)
        canvas = Image.new(img.mode, (size, size), colour)
        canvas.paste(part, ((size - part.width) // 2, (size - part.height) // 2))
        return canvas

    def write(tmp: Path) -> None:
        for rec in kept:
            mask = Image.open(rec.mask_path).convert("L") if rec.mask_path is not None else None
            img, m = transform_pair(place(load_rgb(rec.path).convert("RGB"), Image.Resampling.BILINEAR,
                                          (background,) * 3),
                                    place(mask, Image.Resampling.NEAREST, 0) if mask is not None else None,
                                    pose_for(seed, rec.image_id, 0.08, (0.9, 1.1)), size, fill=background)
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


LOGICAL_KINDS = ("missing_part", "missing_piece", "misplaced_piece", "shifted_part")


def silhouette(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(object mask, background colour) of a part on a plain background: the background colour is the
    median of the border pixels; the object is the largest connected region farther from it than the
    two-means split of the colour distances, holes filled, grown by 1.5 % of the image side so a soft
    rim goes with the part."""
    img = rgb.astype(np.float32)
    ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(ring, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    t = float(dist.mean())
    for _ in range(50):
        lo, hi = dist[dist <= t], dist[dist > t]
        if not len(lo) or not len(hi):
            break
        t = 0.5 * (float(lo.mean()) + float(hi.mean()))
    labels, n = ndimage.label(ndimage.binary_opening(dist > t, iterations=2))
    if n == 0:
        return np.zeros(dist.shape, bool), bg
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(dist), labels, range(1, n + 1))))
    grow = max(1, round(0.015 * min(dist.shape)))
    return ndimage.binary_dilation(ndimage.binary_fill_holes(labels == largest), iterations=grow), bg


def _wedge(obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded piece of ``obj``: a sector (50-110 degrees) around the part's centroid, from a seeded
    inner radius (0-50 % of the part's reach) out to its rim."""
    yy, xx = np.nonzero(obj)
    cy, cx = yy.mean(), xx.mean()
    gy, gx = np.mgrid[:obj.shape[0], :obj.shape[1]]
    radius = np.hypot(gy - cy, gx - cx)
    angle = np.degrees(np.arctan2(gy - cy, gx - cx)) % 360.0
    a0, width = rng.uniform(0.0, 360.0), rng.uniform(50.0, 110.0)
    inside = ((angle - a0) % 360.0) <= width
    inner = rng.uniform(0.0, 0.5) * radius[obj].max()
    return obj & inside & (radius >= inner)


def _moved(arr: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``arr`` translated by (dy, dx) pixels, uncovered pixels set to ``fill``."""
    out = np.empty_like(arr)
    out[...] = fill
    h, w = arr.shape[:2]
    src = arr[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def logical_defect(rgb: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(edited image, mask) of one logical anomaly ``kind`` (``LOGICAL_KINDS``) on ``rgb`` [h, w, 3] uint8.
    The mask marks where the part is missing or wrongly present: the removed area, and for a moved
    piece or part both its old and its new place."""
    obj, bg = silhouette(rgb)
    h, w = obj.shape
    # removed areas take the background colour with the border's own pixel noise, not a flat fill
    ring = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)
    backdrop = np.clip(bg + rng.standard_normal((h, w, 3)) * ring.std(0), 0, 255).astype(np.uint8)
    out = rgb.copy()
    step = rng.uniform(0.2, 0.4) * 2.0 * np.sqrt(obj.sum() / np.pi)  # 20-40 % of the part's diameter
    theta = rng.uniform(0.0, 2 * np.pi)
    dy, dx = int(round(step * np.sin(theta))), int(round(step * np.cos(theta)))
    if kind == "missing_part":
        piece = obj
        out[piece] = backdrop[piece]
    elif kind == "missing_piece":
        piece = _wedge(obj, rng)
        out[piece] = backdrop[piece]
    elif kind == "misplaced_piece":
        old = _wedge(obj, rng)
        new = _moved(old, dy, dx, False)
        out[old] = backdrop[old]
        out[new] = _moved(rgb, dy, dx, 0)[new]
        piece = old | new
    elif kind == "shifted_part":
        new = _moved(obj, dy, dx, False)
        out = np.where(new[..., None], _moved(rgb, dy, dx, 0), backdrop)
        piece = obj | new
    else:
        raise ValueError(f"kind must be one of {LOGICAL_KINDS}, got {kind!r}")
    return out, piece


def framed(image: Image.Image, size: int, part_scale: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` shrunk to ``part_scale`` x ``size`` px and centred on a ``size`` px canvas of its
    background (the median border colour with the border's pixel noise) -> uint8 [size, size, 3]."""
    inner = max(1, round(size * part_scale))
    small = np.asarray(image.convert("RGB").resize((inner, inner), Image.Resampling.BILINEAR))
    ring = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]]).astype(np.float32)
    canvas = np.median(ring, axis=0) + rng.standard_normal((size, size, 3)) * ring.std(0)
    out = np.clip(canvas, 0, 255).astype(np.uint8)
    at = (size - inner) // 2
    out[at:at + inner, at:at + inner] = small
    return out


def logical_copy(dataset, out_root, name: str | None = None, seed: int = 0, size: int = 512,
                 n_per_kind: int = 10, part_scale: float = 0.5) -> Path:
    """Write ``out_root/<name>`` (default ``<category>_logical``) at ``size`` px, every image framed
    (``framed``, the part at ``part_scale`` of the side): the good images as they are, except
    ``n_per_kind`` x 4 seeded training images held out and turned into logical anomalies
    (``logical_defect``, one kind each), masks marking the changed region. The source's own defect
    images are left out: only logical anomalies are tested."""
    name = name or f"{dataset.category}_logical"
    record = {"version": DERIVED_VERSION, "kind": "logical", "source": str(Path(dataset.root) / dataset.category),
              "fingerprint": _fingerprint(dataset), "seed": int(seed), "size": int(size),
              "n_per_kind": int(n_per_kind), "part_scale": float(part_scale), "kinds": list(LOGICAL_KINDS)}
    if not 0.0 < part_scale <= 1.0:
        raise ValueError(f"part_scale must be in (0, 1], got {part_scale}")
    train = sorted(dataset.train_good(), key=lambda r: r.image_id)
    n_out = n_per_kind * len(LOGICAL_KINDS)
    if len(train) < n_out + 1:
        raise FsadError(f"{dataset.root}/{dataset.category}: {len(train)} train/good images, a logical copy "
                        f"holds out {n_out}; lower n_per_kind")
    held = _rng(seed, "logical-held-out").permutation(len(train))[:n_out]
    sources = {train[i].image_id: LOGICAL_KINDS[j % len(LOGICAL_KINDS)] for j, i in enumerate(sorted(held))}
    keep = [r for r in dataset.records if r.label == 0 and r.image_id not in sources]

    def frame(rec) -> np.ndarray:
        return framed(load_rgb(rec.path), size, part_scale, _rng(seed, "frame", rec.image_id))

    def write(tmp: Path) -> None:
        for rec in keep:
            _save(Image.fromarray(frame(rec)), tmp / _relative(dataset, rec))
        for rec in train:
            kind = sources.get(rec.image_id)
            if kind is None:
                continue
            edited, mask = logical_defect(frame(rec), kind, _rng(seed, "logical", rec.image_id))
            if not mask.any():
                raise FsadError(f"{rec.path}: no part found on a plain background; a logical copy needs a "
                                "fixed-pose object category")
            stem = Path(rec.path).stem
            _save(Image.fromarray(edited), tmp / "test" / kind / f"{stem}.png")
            _save(Image.fromarray(mask.astype(np.uint8) * 255), tmp / "ground_truth" / kind / f"{stem}_mask.png")

    return _build(Path(out_root) / name, record, write)
