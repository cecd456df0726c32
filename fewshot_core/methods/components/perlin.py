"""Perlin noise, the anomaly masks GLASS (after DRAEM) draws with it, and a texture maker.

GLASS's local anomaly synthesis overlays a texture on a normal image through a thresholded Perlin
mask. The textures come from DTD when a folder is given; offline, ``make_texture`` draws colourful
fractal-noise and stripe textures instead. Everything takes a ``numpy.random.Generator``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from fewshot_core.data.imageio import load_rgb
from fewshot_core.errors import FsadError


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient noise in about [-1, 1] with ``res`` lattice periods along each axis (any ``shape``)."""
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, ry, h, endpoint=False)
    xs = np.linspace(0, rx, w, endpoint=False)
    yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
    yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]

    def dot(oy, ox):
        g = grads[(yi + oy)[:, None], (xi + ox)[None, :]]
        return g[..., 0] * (yf - oy) + g[..., 1] * (xf - ox)

    u, v = _fade(xf), _fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.sqrt(2) * (top * (1 - v) + bottom * v)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0, max_scale: int = 6,
                threshold: float = 0.5, min_fraction: float = 0.002) -> np.ndarray:
    """Binary blob mask: Perlin noise with lattice 2^a × 2^b (a, b random in [min_scale, max_scale)), thresholded.

    Redrawn (a few times) until at least ``min_fraction`` of the pixels are set, so a synthetic anomaly
    always exists.
    """
    # The noise is smooth at the lattice scale (>= 8 px per period at 256 px), so it is drawn at half
    # resolution for large masks and upsampled bilinearly: 4x cheaper, the same blobs.
    work = (shape[0] // 2, shape[1] // 2) if min(shape) >= 128 else tuple(shape)
    for _ in range(20):
        sy = 2 ** int(rng.integers(min_scale, max_scale))
        sx = 2 ** int(rng.integers(min_scale, max_scale))
        noise = perlin_2d(work, (sy, sx), rng)
        noise = ndimage.rotate(noise, float(rng.uniform(-90, 90)), reshape=False, mode="reflect", order=1)
        if work != tuple(shape):
            noise = ndimage.zoom(noise, (shape[0] / work[0], shape[1] / work[1]), order=1)[: shape[0], : shape[1]]
        mask = noise > threshold
        if mask.mean() >= min_fraction:
            return mask
    # Very unlucky draws: fall back to a small disc at a random place (still a valid anomaly).
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= (max(shape) // 10) ** 2


def make_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random RGB texture (uint8 [size, size, 3]): fractal noise through a random palette, or stripes."""
    kind = int(rng.integers(0, 3))
    if kind == 0:  # fractal noise: octaves of Perlin noise
        field = np.zeros((size, size))
        for octave in range(4):
            res = 2 ** (octave + int(rng.integers(1, 3)))
            field += perlin_2d((size, size), (res, res), rng) / 2**octave
    elif kind == 1:  # oriented stripes with noisy phase (woven / scratched look)
        yy, xx = np.mgrid[:size, :size] / size
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(4, 24)
        phase = perlin_2d((size, size), (4, 4), rng) * rng.uniform(0.5, 3)
        field = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    else:  # speckle: smoothed white noise
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(0.5, 3))
    field = (field - field.min()) / (np.ptp(field) + 1e-8)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    rgb = c0[None, None, :] * (1 - field[..., None]) + c1[None, None, :] * field[..., None]
    rgb += rng.normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


class TextureSource:
    """Textures for local anomaly synthesis: a DTD-like image folder when given, else ``make_texture``."""

    def __init__(self, folder: str | Path | None = None, pool_size: int = 64):
        self.folder = Path(folder) if folder else None
        self.files: list[Path] = []
        # Drawing a texture costs more than a training step's features on a GPU: keep up to ``pool_size``
        # textures per size (generated or decoded once) and vary each use by a random flip/turn/shift.
        self.pool_size = int(pool_size)
        self._pool: dict[tuple[int, int], np.ndarray] = {}
        if self.folder is not None:
            if not self.folder.is_dir():
                raise FsadError(f"{self.folder}: texture folder not found; pass a DTD 'images' folder or none")
            exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
            self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in exts)
            if not self.files:
                raise FsadError(f"{self.folder}: no texture images inside; pass a DTD 'images' folder or none")

    @property
    def description(self) -> str:
        return f"folder:{self.folder} ({len(self.files)} images)" if self.files else "generated (perlin.make_texture)"

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        n = len(self.files) if self.files else self.pool_size
        key = (size, int(rng.integers(min(n, self.pool_size)) if self.files else rng.integers(self.pool_size)))
        if key not in self._pool:
            self._pool[key] = self._draw(size, rng, key[1])
        tex = self._pool[key]
        tex = np.rot90(tex, int(rng.integers(4)))
        if rng.random() < 0.5:
            tex = tex[:, ::-1]
        return np.ascontiguousarray(np.roll(tex, tuple(rng.integers(0, size, 2)), axis=(0, 1)))

    def _draw(self, size: int, rng: np.random.Generator, index: int) -> np.ndarray:
        if not self.files:
            return make_texture(size, rng)
        # with more files than the pool, each pool slot holds a random file
        path = self.files[index] if len(self.files) <= self.pool_size else self.files[int(rng.integers(len(self.files)))]
        img = load_rgb(path)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.rotate(float(rng.uniform(-90, 90)))
        return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
