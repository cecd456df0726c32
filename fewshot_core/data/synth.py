"""Deterministic synthetic MVTec-layout dataset: textures and simple objects with exact defect masks.

Every image is rendered from its own seed, derived with SHA-256 from (seed, category, split, defect,
index), by numpy's Generator only; a defect image is its normal render with the defect painted into a
region, and the mask is exactly the set of pixels that differ from that normal render (every painted
pixel differs by at least ``MIN_DELTA`` grey levels in some channel). PNGs are written by a small
encoder with uncompressed deflate blocks, so the bytes do not depend on the zlib build: same arguments,
same files on any machine.

It is the offline default for the demo and the tests; real accuracy numbers need MVTec AD.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot_core.atomic import atomic_write_text, replace_dir
from fewshot_core.errors import FsadError

GENERATOR_VERSION = 1
MIN_DELTA = 12  # smallest change of a defect pixel, grey levels (so mask == changed pixels exactly)
MIN_AREA = 0.003  # smallest defect, as a fraction of the image (about 50 px at 128 px)
PARAMS_FILE = "synth.json"


# --------------------------------------------------------------------------------------------------
# Normal renders. Each returns (background, foreground, alpha, surface): the image is
# background * (1 - alpha) + foreground * alpha; "missing_part" reveals the background; the other
# defects are placed on ``surface`` (the object, or the whole texture).


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # float [S, S, 3], before quantisation
    background: np.ndarray  # what a removed piece reveals
    alpha: np.ndarray  # [S, S] foreground coverage
    surface: np.ndarray  # bool [S, S]: where surface defects go
    scale: float  # size / 128


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x); cached and read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Global gain and a gentle linear gradient: the pose/lighting variation of normal images."""
    yy, xx = _grid(size)
    gain = rng.uniform(0.85, 1.15)
    slope, phi = rng.uniform(0.0, 0.2), rng.uniform(0, 2 * np.pi)
    ramp = ((xx / size - 0.5) * np.cos(phi) + (yy / size - 0.5) * np.sin(phi)) * slope
    return (gain * (1.0 + ramp))[..., None]


def _rotated(rng: np.random.Generator, size: int, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    th = np.deg2rad(rng.uniform(-max_deg, max_deg))
    return xx * np.cos(th) + yy * np.sin(th), -xx * np.sin(th) + yy * np.cos(th)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean smooth random field (coarse normal noise, bilinearly upsampled): yarn/material irregularity."""
    coarse = rng.normal(0.0, 1.0, (cells + 1, cells + 1))
    knots = np.linspace(0, size, cells + 1)
    centres = np.arange(size) + 0.5
    rows = np.stack([np.interp(centres, knots, c) for c in coarse])  # along x, for each knot row
    return np.stack([np.interp(centres, knots, col) for col in rows.T], axis=1)  # along y


def _fabric(rng: np.random.Generator, size: int, palette: np.ndarray) -> Scene:
    s = size / 128
    u, v = _rotated(rng, size, 8.0)
    p = 9.0 * s * rng.uniform(0.9, 1.1)
    ph = rng.uniform(0, 2 * np.pi, 3)
    t = (
        0.5
        + 0.3 * np.sin(2 * np.pi * u / p + ph[0]) * np.sin(2 * np.pi * v / p + ph[1])
        + 0.08 * np.sin(2 * np.pi * (u + v) / (3 * p) + ph[2])
        + 0.08 * _smooth_field(rng, size, 6)
    )
    img = palette[0] * (0.55 + 0.9 * t)[..., None]
    ones = np.ones((size, size))
    return Scene(img, img, ones, ones > 0, s)


def _grid_texture(rng: np.random.Generator, size: int, palette: np.ndarray) -> Scene:
    s = size / 128
    u, v = _rotated(rng, size, 6.0)
    p = 16.0 * s * rng.uniform(0.93, 1.07)
    off = rng.uniform(0, p, 2)
    half = 1.6 * s

    def line(coord, o):
        d = np.abs(((coord + o) % p) - p / 2)
        return np.clip(half + 0.5 - d, 0.0, 1.0)

    alpha = np.maximum(line(u, off[0]), line(v, off[1]))
    yy, xx = _grid(size)
    mottling = 1.0 + 0.04 * np.sin(2 * np.pi * xx / (size * 0.7) + off[0]) * np.sin(2 * np.pi * yy / (size * 0.9))
    bg = palette[0] * mottling[..., None]
    fg = np.broadcast_to(palette[1], bg.shape)
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return Scene(img, bg, alpha, np.ones((size, size), bool), s)


def _disk(rng: np.random.Generator, size: int, palette: np.ndarray) -> Scene:
    s = size / 128
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    R = 0.34 * size * rng.uniform(0.94, 1.06)
    r = np.hypot(yy - cy, xx - cx)
    alpha = np.clip(R - r + 0.5, 0.0, 1.0)
    bg = np.broadcast_to(palette[0], (size, size, 3)).astype(np.float64)
    shade = 1.0 - 0.25 * (r / R) ** 2
    ring = 1.0 - 0.3 * np.clip(1.5 * s + 0.5 - np.abs(r - 0.58 * R), 0.0, 1.0)
    hub = 1.0 - 0.55 * np.clip(0.13 * R - r + 0.5, 0.0, 1.0)
    ang = rng.uniform(0, 2 * np.pi)  # pose: the marker's angle
    my, mx = cy + 0.8 * R * np.sin(ang), cx + 0.8 * R * np.cos(ang)
    marker = 1.0 - 0.45 * np.clip(0.07 * R - np.hypot(yy - my, xx - mx) + 0.5, 0.0, 1.0)
    hy, hx = cy - 0.35 * R, cx - 0.3 * R
    highlight = 0.18 * np.exp(-(((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * (0.25 * R) ** 2)))
    fg = palette[1] * (shade * ring * hub * marker + highlight)[..., None]
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return Scene(img, bg, alpha, alpha > 0.99, s)


def _capsule(rng: np.random.Generator, size: int, palette: np.ndarray) -> Scene:
    s = size / 128
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    th = np.deg2rad(rng.uniform(-15, 15))
    a = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)  # along the axis
    b = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
    half, rad = 0.28 * size, 0.14 * size
    d = np.hypot(np.clip(np.abs(a) - half, 0.0, None), b)  # distance to the axis segment
    alpha = np.clip(rad - d + 0.5, 0.0, 1.0)
    bg = np.broadcast_to(palette[0], (size, size, 3)).astype(np.float64)
    left = np.clip(0.5 - a, 0.0, 1.0)[..., None]  # two-coloured shell, soft seam
    body = palette[1] * left + palette[2] * (1 - left)
    gloss = 0.12 * np.exp(-((b + 0.45 * rad) ** 2) / (2 * (0.2 * rad) ** 2))
    shade = 1.0 - 0.35 * np.clip(d / rad, 0.0, 1.0) ** 2 + gloss
    fg = body * shade[..., None]
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return Scene(img, bg, alpha, alpha > 0.99, s)


def _screw(rng: np.random.Generator, size: int, palette: np.ndarray) -> Scene:
    """An elongated threaded part (shaft + head) at a random pose: any angle, off-centre position.

    The hard case of few-shot inspection (MVTec AD's screw): the normal images differ by a rigid motion,
    so a support patch matches a test patch only at the same orientation, and defects are small.
    """
    s = size / 128
    yy, xx = _grid(size)
    th = rng.uniform(0, 2 * np.pi)
    half, rad = 0.27 * size * rng.uniform(0.96, 1.04), 0.045 * size
    reach = half + 0.09 * size  # keep the whole part inside the image
    cy, cx = size / 2 + rng.uniform(-1, 1, 2) * max(0.0, 0.5 * size - reach - 0.04 * size) * 0.6
    a = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)  # along the axis
    b = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
    d = np.hypot(np.clip(np.abs(a) - half, 0.0, None), b)
    shaft = np.clip(rad - d + 0.5, 0.0, 1.0)
    hr = 0.085 * size  # the head: a disk at the +axis end, with a slot across it
    hd = np.hypot(a - half, b)
    head = np.clip(hr - hd + 0.5, 0.0, 1.0)
    alpha = np.maximum(shaft, head)
    bg = palette[0] * (1.0 + 0.05 * _smooth_field(rng, size, 5))[..., None]
    pitch = 4.0 * s
    thread = 0.82 + 0.18 * np.cos(2 * np.pi * (a + rng.uniform(0, pitch)) / pitch + 0.6 * b / rad)
    shade = 1.0 - 0.4 * np.clip(np.abs(b) / rad, 0.0, 1.0) ** 2
    body = np.where(head > shaft, 1.0 - 0.25 * (hd / hr) ** 2, thread * shade)
    slot = (head > 0.5) & (np.abs(b) < 0.012 * size + 0.5) & (np.abs(a - half) < 0.7 * hr)
    body = np.where(slot, 0.45, body)
    fg = palette[1] * body[..., None]
    img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return Scene(img, bg, alpha, alpha > 0.99, s)


# --------------------------------------------------------------------------------------------------
# Defects: each returns (painted image, region); only pixels in the region change.


def _stroke(size: int, pts: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of a polyline given by dense points [n, 2] (y, x)."""
    out = np.zeros((size, size), bool)
    lo = np.clip(np.floor(pts.min(0) - radius - 1), 0, size).astype(int)
    hi = np.clip(np.ceil(pts.max(0) + radius + 2), 0, size).astype(int)
    if np.any(hi <= lo):
        return out
    yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float64) + 0.5
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    out[lo[0] : hi[0], lo[1] : hi[1]] = d2.min(-1) <= radius**2
    return out


def _densify(nodes: np.ndarray, step: float = 0.5) -> np.ndarray:
    pts = [nodes[0]]
    for a, b in zip(nodes[:-1], nodes[1:]):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / step)))
        pts.extend(a + (b - a) * (np.arange(1, n + 1) / n)[:, None])
    return np.asarray(pts)


def _spot(rng: np.random.Generator, scene: Scene, margin: float = 0.12) -> np.ndarray:
    """A random point on the surface, away from the image border."""
    size = scene.surface.shape[0]
    m = int(margin * size)
    inner = np.zeros_like(scene.surface)
    inner[m : size - m, m : size - m] = True
    ys, xs = np.nonzero(scene.surface & inner)
    i = rng.integers(len(ys))
    return np.array([ys[i] + 0.5, xs[i] + 0.5])


def _ellipse(size: int, c: np.ndarray, ry: float, rx: float, th: float) -> np.ndarray:
    yy, xx = _grid(size)
    dy, dx = yy - c[0], xx - c[1]
    a = dx * np.cos(th) + dy * np.sin(th)
    b = -dx * np.sin(th) + dy * np.cos(th)
    return (a / rx) ** 2 + (b / ry) ** 2 <= 1.0


def _noise(rng: np.random.Generator, shape, sigma: float = 4.0) -> np.ndarray:
    return rng.normal(0.0, sigma, shape)


def _scratch(rng, scene: Scene):
    size, s = scene.surface.shape[0], scene.scale
    p0 = _spot(rng, scene)
    ang = rng.uniform(0, np.pi)
    length = rng.uniform(0.22, 0.4) * size
    d = np.array([np.sin(ang), np.cos(ang)])
    p1, p2 = p0 - d * length / 2, p0 + d * length / 2
    bend = p0 + np.array([-d[1], d[0]]) * rng.uniform(-0.12, 0.12) * length
    t = np.linspace(0, 1, 96)[:, None]
    pts = (1 - t) ** 2 * p1 + 2 * (1 - t) * t * bend + t**2 * p2
    region = _stroke(size, pts, 1.4 * s) & scene.surface
    painted = 0.45 * scene.image + 0.55 * 238.0
    return painted, region


def _crack(rng, scene: Scene):
    size, s = scene.surface.shape[0], scene.scale
    p = _spot(rng, scene)
    ang = rng.uniform(0, 2 * np.pi)
    nodes = [p]
    for _ in range(int(rng.integers(10, 15))):
        ang += rng.normal(0, 0.45)
        p = p + 3.0 * s * np.array([np.sin(ang), np.cos(ang)])
        nodes.append(p)
    branch = [nodes[len(nodes) // 2]]
    ang_b = ang + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    for _ in range(5):
        ang_b += rng.normal(0, 0.4)
        branch.append(branch[-1] + 3.0 * s * np.array([np.sin(ang_b), np.cos(ang_b)]))
    region = _stroke(size, _densify(np.asarray(nodes)), 1.2 * s) | _stroke(size, _densify(np.asarray(branch)), 0.9 * s)
    region &= scene.surface
    painted = 0.35 * scene.image
    return painted, region


def _hole(rng, scene: Scene):
    size = scene.surface.shape[0]
    r = rng.uniform(0.035, 0.07) * size
    region = _ellipse(size, _spot(rng, scene), r * rng.uniform(0.75, 1.0), r, rng.uniform(0, np.pi))
    region &= scene.surface
    painted = np.array([24.0, 21.0, 19.0]) + _noise(rng, scene.image.shape)
    return painted, region


CONTAMINANTS = np.array([[95.0, 60.0, 25.0], [50.0, 115.0, 45.0], [215.0, 160.0, 40.0], [30.0, 30.0, 30.0]])


def _contamination(rng, scene: Scene):
    size = scene.surface.shape[0]
    c = _spot(rng, scene)
    region = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 4))):
        cb = c + rng.uniform(-0.1, 0.1, 2) * size
        for _ in range(4):
            c_i = cb + rng.uniform(-0.03, 0.03, 2) * size
            region |= _ellipse(size, c_i, *(rng.uniform(0.015, 0.04, 2) * size), 0.0)
    region &= scene.surface
    colour = CONTAMINANTS[rng.integers(len(CONTAMINANTS))]
    painted = 0.35 * scene.image + 0.65 * colour + _noise(rng, scene.image.shape, 3.0)
    return painted, region


TINTS = np.array([[1.3, 0.8, 0.7], [0.7, 1.25, 0.8], [0.75, 0.85, 1.3]])


def _color_shift(rng, scene: Scene):
    size = scene.surface.shape[0]
    ry, rx = rng.uniform(0.08, 0.15, 2) * size
    region = _ellipse(size, _spot(rng, scene), ry, rx, rng.uniform(0, np.pi)) & scene.surface
    painted = scene.image * TINTS[rng.integers(len(TINTS))] + 10.0
    return painted, region


def _missing_part(rng, scene: Scene):
    """A piece of the foreground is gone: the background shows through (only where it looks different)."""
    size = scene.surface.shape[0]
    fg = scene.alpha > 0.5
    if fg.all():  # no background to reveal
        raise ValueError("missing_part needs a scene with background")
    # centre on the foreground's edge, so a bite comes out of the object / a grid segment breaks
    edge = fg & ~np.roll(fg, 1, 0) | fg & ~np.roll(fg, -1, 0) | fg & ~np.roll(fg, 1, 1) | fg & ~np.roll(fg, -1, 1)
    m = int(0.12 * size)
    edge[:m], edge[-m:], edge[:, :m], edge[:, -m:] = False, False, False, False
    ys, xs = np.nonzero(edge)
    i = rng.integers(len(ys))
    c = np.array([ys[i] + 0.5, xs[i] + 0.5])
    r = rng.uniform(0.09, 0.15) * size
    region = _ellipse(size, c, r * rng.uniform(0.7, 1.0), r, rng.uniform(0, np.pi)) & fg
    return scene.background, region


DEFECTS: dict[str, Callable] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "contamination": _contamination,
    "color_shift": _color_shift,
    "missing_part": _missing_part,
}


@dataclass(frozen=True)
class Kind:
    name: str
    render: Callable[[np.random.Generator, int, np.ndarray], Scene]
    palette: tuple[tuple[float, float, float], ...]
    defects: tuple[str, ...]


# Textures first, then objects; categories beyond len(KINDS) cycle with recoloured palettes.
KINDS = (
    Kind("fabric", _fabric, ((70, 100, 150),), ("scratch", "hole", "contamination", "color_shift")),
    Kind("disk", _disk, ((42, 44, 50), (180, 180, 190)), ("crack", "missing_part", "contamination", "color_shift")),
    Kind("grid", _grid_texture, ((200, 190, 170), (60, 60, 72)), ("crack", "hole", "missing_part", "scratch")),
    Kind("capsule", _capsule, ((35, 60, 45), (185, 50, 50), (228, 218, 195)),
         ("crack", "contamination", "color_shift", "missing_part")),
)


# Kinds asked for by name only (``generate(kinds=...)``), so the default plan above stays as it is.
EXTRA_KINDS = {
    "screw": Kind("screw", _screw, ((128, 124, 118), (196, 198, 204)),
                  ("scratch", "hole", "contamination", "missing_part")),
}


def category_plan(categories: int, kinds=None) -> list[tuple[str, Kind, np.ndarray]]:
    """(name, kind, palette) per category: ``kinds`` (names of ``KINDS`` or ``EXTRA_KINDS``) gives one
    ``synth_<kind>`` category each; otherwise ``categories`` of the default cycle."""
    if kinds:
        known = {k.name: k for k in KINDS} | EXTRA_KINDS
        bad = [k for k in kinds if k not in known]
        if bad:
            raise FsadError(f"synth kinds {bad}: unknown; choose from {', '.join(sorted(known))}")
        return [(f"synth_{k}", known[k], np.asarray(known[k].palette, dtype=np.float64)) for k in kinds]
    return _default_plan(categories)


def _default_plan(categories: int) -> list[tuple[str, Kind, np.ndarray]]:
    """(name, kind, palette) for ``categories`` categories: synth_fabric, synth_disk, ..., synth_fabric2."""
    plan = []
    for i in range(categories):
        kind, variant = KINDS[i % len(KINDS)], i // len(KINDS)
        palette = np.asarray(kind.palette, dtype=np.float64)
        if variant:  # recolour: rotate the channels, so each variant looks different
            palette = np.roll(palette, variant, axis=1)
        name = f"synth_{kind.name}" + (str(variant + 1) if variant else "")
        plan.append((name, kind, palette))
    return plan


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A Generator from the seed and string keys, through SHA-256 (Python's hash() is salted)."""
    digest = hashlib.sha256("\x1f".join((str(seed),) + keys).encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def _quantise(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_sample(
    kind: Kind, palette: np.ndarray, size: int, seed: int, key: tuple[str, ...], defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Render one image: (image uint8 [S,S,3], its defect-free render, mask bool [S,S] or None)."""
    rng_normal, rng_defect = (_rng(seed, *key, part) for part in ("normal", "defect"))
    palette = palette * rng_normal.uniform(0.95, 1.05, palette.shape)  # batch-to-batch colour drift
    scene = kind.render(rng_normal, size, palette)
    light = _lighting(rng_normal, size)
    noise = _noise(rng_normal, (size, size, 3), 4.0)
    lit = Scene(scene.image * light + noise, scene.background * light + noise, scene.alpha, scene.surface, scene.scale)
    normal = _quantise(lit.image)
    if defect is None:
        return normal, normal, None
    # A defect clipped to the surface can come out tiny (a crack that walked off the disk): redraw.
    min_area = MIN_AREA * size * size
    for _ in range(50):
        painted, region = DEFECTS[defect](rng_defect, lit)
        if region.sum() >= min_area:
            break
    out = normal.copy()
    out[region] = _quantise(np.broadcast_to(painted, normal.shape))[region]
    # Guarantee every region pixel visibly changed, so the mask is exactly the changed pixels.
    diff = np.abs(out.astype(np.int16) - normal).max(-1)
    weak = region & (diff < MIN_DELTA)
    base = normal[weak].astype(np.int16)
    out[weak] = np.where(base < 128, base + MIN_DELTA, base - MIN_DELTA).astype(np.uint8)
    return out, normal, region


# --------------------------------------------------------------------------------------------------
# Deterministic PNG (stored deflate blocks: no compressor whose output could vary by build)


def png_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    rows = np.concatenate([np.zeros((h, 1), np.uint8), arr.reshape(h, -1)], axis=1).tobytes()  # filter 0
    blocks = []
    for start in range(0, len(rows), 65535):
        chunk = rows[start : start + 65535]
        final = 1 if start + 65535 >= len(rows) else 0
        blocks.append(struct.pack("<BHH", final, len(chunk), len(chunk) ^ 0xFFFF) + chunk)
    idat = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(rows))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Writing


def _expected_files(name: str, kind: Kind, n_train: int, n_test_good: int, n_test_per_defect: int) -> list[str]:
    files = [f"train/good/{i:03d}.png" for i in range(n_train)]
    files += [f"test/good/{i:03d}.png" for i in range(n_test_good)]
    for d in kind.defects:
        files += [f"test/{d}/{i:03d}.png" for i in range(n_test_per_defect)]
        files += [f"ground_truth/{d}/{i:03d}_mask.png" for i in range(n_test_per_defect)]
    return files


def _foreign_files(target: Path, kind: Kind, old: dict) -> list[str]:
    """Files under the category folder ``target`` that the generator did not write with its recorded
    settings ``old`` (files a user added): replacing the folder would delete them."""
    try:
        counts = (int(old["n_train"]), int(old["n_test_good"]), int(old["n_test_per_defect"]))
        own = set(_expected_files(target.name, kind, *counts))
    except (KeyError, TypeError, ValueError):  # a record this version cannot read: nothing is known to be ours
        own = set()
    found = (p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir())
    return sorted(f for f in found if f not in own)


def _write_category(folder: Path, name: str, kind: Kind, palette, size, seed, n_train, n_test_good, n_per_defect):
    jobs = [("train", "good", i) for i in range(n_train)] + [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", d, i) for d in kind.defects for i in range(n_per_defect)]
    for split, defect, i in jobs:
        img, _, mask = render_sample(
            kind, palette, size, seed, (name, split, defect, str(i)), None if defect == "good" else defect
        )
        out = folder / split / defect
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{i:03d}.png").write_bytes(png_bytes(img))
        if mask is not None:
            gt = folder / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            (gt / f"{i:03d}_mask.png").write_bytes(png_bytes(mask.astype(np.uint8) * 255))


README = """Synthetic MVTec-layout anomaly detection data, written by fsad (fewshot_core.data.synth).

Every image here is computer-generated: procedural textures (fabric, grid) and simple objects (disk,
capsule) with painted defects (scratch, crack, hole, contamination, colour shift, missing part) and
exact pixel masks. No photograph and no part of MVTec AD is contained. Generator version {version};
settings: {params}.

Licence: CC0 1.0 (public domain dedication); use it freely.

It exists so the pipeline can run and be tested offline. Results on it say nothing about real
inspection accuracy: benchmark on MVTec AD (`fsad data download ROOT`) or your own parts.
"""


def generate(
    root,
    categories: int = 2,
    seed: int = 0,
    size: int = 128,
    n_train: int = 20,
    n_test_good: int = 8,
    n_test_per_defect: int = 6,
    kinds=None,
) -> list[str]:
    """Write ``categories`` synthetic categories under ``root`` (or one per name in ``kinds``, e.g.
    ``("screw",)``); return their names.

    Each category is rendered into a temporary folder beside its target and moved into place with
    ``os.replace``. A category already written with the same settings is skipped; one written by this
    generator with other settings is replaced, unless it holds a file the generator did not write there
    (that one would be lost); a folder of the same name not written by it is an error.
    """
    root = Path(root)
    for label, value, low in (("categories", categories, 1), ("size", size, 32), ("n_train", n_train, 1),
                              ("n_test_good", n_test_good, 1), ("n_test_per_defect", n_test_per_defect, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise FsadError(f"{root}: synth {label}={value!r} is invalid; use an integer >= {low}")
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / PARAMS_FILE
    try:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    except (OSError, json.JSONDecodeError):
        record = {}
    record = record.get("categories", {}) if isinstance(record, dict) else {}

    names = []
    for name, kind, palette in category_plan(categories, kinds):
        params = {"version": GENERATOR_VERSION, "seed": int(seed), "size": int(size), "n_train": int(n_train),
                  "n_test_good": int(n_test_good), "n_test_per_defect": int(n_test_per_defect)}
        target = root / name
        expected = _expected_files(name, kind, n_train, n_test_good, n_test_per_defect)
        if target.exists():
            if name not in record:
                raise FsadError(
                    f"{target}: exists but was not written by the synthetic generator; "
                    "choose another ROOT or move the folder away"
                )
            if record[name] == params and all((target / f).is_file() for f in expected):
                names.append(name)
                continue
            if foreign := _foreign_files(target, kind, record[name]):
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise FsadError(f"{target / foreign[0]}{more}: not written by the synthetic generator, and "
                                f"regenerating {name} would delete it; move it out of {target} or choose another ROOT")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            _write_category(tmp, name, kind, palette, size, seed, n_train, n_test_good, n_test_per_defect)
            replace_dir(tmp, target)  # an existing one is ours and stale: swapped out, then deleted
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record[name] = params
        atomic_write_text(record_path, json.dumps({"categories": record}, indent=2, sort_keys=True) + "\n")
        names.append(name)

    summary = f"categories={categories}, seed={seed}, size={size}, n_train={n_train}, " \
              f"n_test_good={n_test_good}, n_test_per_defect={n_test_per_defect}"
    readme = README.format(version=GENERATOR_VERSION, params=summary)
    if not (root / "README.txt").is_file() or (root / "README.txt").read_text() != readme:
        atomic_write_text(root / "README.txt", readme)
    return names
