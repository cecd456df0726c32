"""REB's DefectMaker (§3.1.1): synthetic defects = shape × fill, fused into the salient region.

Shapes: rectangle, Bézier scar (a thick Bézier curve inside a long thin rotated box), Bézier clump
(a closed Bézier blob, eroded and broken into pieces). Fills: random noise (a random mean colour with a
random fluctuation range) and cut-paste (a region cut from another image of the category). The defect
is placed inside a foreground estimate (a saliency model when a TorchScript path is given) and either
pasted or blended with a random weight. The returned mask is exactly the set of pixels the defect
was written to. The 3 × 2 combinations are classes 1..6 of the self-supervised task; class 0 is normal.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage

from fewshot_core.errors import FsadError

SHAPES = ("rectangle", "bezier_scar", "bezier_clump")
FILLS = ("noise", "cutpaste")
CLASSES = ("normal",) + tuple(f"{s}+{f}" for s in SHAPES for f in FILLS)  # 7 classes


def class_index(shape: str, fill: str) -> int:
    return 1 + SHAPES.index(shape) * len(FILLS) + FILLS.index(fill)


def bezier(points: np.ndarray, n: int = 64) -> np.ndarray:
    """Points of the Bézier curve with control ``points`` [k, 2] (Bernstein form), [n, 2]."""
    k = len(points) - 1
    t = np.linspace(0, 1, n)[:, None]
    coeff = [comb(k, i) * t**i * (1 - t) ** (k - i) for i in range(k + 1)]
    return sum(c * p for c, p in zip(coeff, points))


def foreground_mask(image: np.ndarray, min_fraction: float = 0.05, max_fraction: float = 0.95,
                    max_border: float = 0.2) -> np.ndarray:
    """Simple object/background split: distance from the border colour, Otsu-thresholded, cleaned up.

    Returns all-True for textures, as REB does for texture categories: a "foreground" that reaches more
    than ``max_border`` of the image border, or covers almost everything/nothing, is no object.
    """
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.linalg.norm(img - np.median(border, axis=0), axis=-1)
    dist = ndimage.gaussian_filter(dist, 2)
    hist, edges = np.histogram(dist, bins=64)
    # Otsu: threshold maximising between-class variance
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0, mu = np.cumsum(p), np.cumsum(p * centres)
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0) + 1e-12)
    thr = centres[int(np.argmax(between))]
    fg = dist > thr
    on_border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]]).mean()
    fg = ndimage.binary_opening(fg, iterations=2)
    fg = ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=3))
    frac = fg.mean()
    if frac < min_fraction or frac > max_fraction or on_border > max_border or np.ptp(dist) < 10:
        return np.ones(image.shape[:2], dtype=bool)
    return fg


class SaliencyModel:
    """A TorchScript saliency network: float [1,3,H,W] in [0,1] -> map [1,1,H',W'] (logits or probabilities)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FsadError(f"{path}: saliency model not found; pass a TorchScript file or leave it unset")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise FsadError(f"{path}: not a TorchScript model ({exc}); export it with torch.jit.save") from exc

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            out = self.model(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        out = F.interpolate(out.float().reshape(1, 1, *out.shape[-2:]), size=image.shape[:2], mode="bilinear")
        sal = out[0, 0].numpy()
        if sal.min() < 0 or sal.max() > 1:
            sal = 1 / (1 + np.exp(-sal))
        fg = sal > 0.5
        return fg if fg.mean() > 0.01 else np.ones(image.shape[:2], dtype=bool)


@dataclass
class DefectMakerConfig:
    area_ratio: tuple[float, float] = (0.005, 0.05)  # defect area / foreground area (CutPaste-like)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)  # rectangles
    scar_width: tuple[int, int] = (2, 8)  # px at 256 (scaled with the image size)
    blend_probability: float = 0.5  # paste vs blend
    blend_weight: tuple[float, float] = (0.5, 0.9)  # defect weight when blending
    noise_range: tuple[float, float] = (10.0, 80.0)  # ± fluctuation of the random-noise fill


class DefectMaker:
    """Draws REB defects into uint8 RGB images. ``make`` returns (image, mask, label)."""

    def __init__(self, config: DefectMakerConfig | None = None, saliency_model: str | Path | None = None):
        self.config = config or DefectMakerConfig()
        self.saliency = SaliencyModel(saliency_model) if saliency_model else None

    def foreground(self, image: np.ndarray) -> np.ndarray:
        return self.saliency(image) if self.saliency is not None else foreground_mask(image)

    # ---- shapes: bool masks of the full image size, centred at (cy, cx)
    def _size(self, fg_area: float, rng) -> tuple[float, float]:
        area = rng.uniform(*self.config.area_ratio) * fg_area
        aspect = np.exp(rng.uniform(np.log(self.config.aspect_ratio[0]), np.log(self.config.aspect_ratio[1])))
        return np.sqrt(area * aspect), np.sqrt(area / aspect)  # (w, h)

    def shape_mask(self, shape: str, hw: tuple[int, int], centre: tuple[int, int], fg_area: float,
                   rng: np.random.Generator) -> np.ndarray:
        h, w = hw
        cy, cx = centre
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        scale = max(h, w) / 256
        if shape == "rectangle":
            bw, bh = self._size(fg_area, rng)
            draw.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=1)
        elif shape == "bezier_scar":
            # control points spread along a long thin rotated box; the curve is drawn thick
            length = rng.uniform(0.1, 0.35) * min(h, w)
            theta = rng.uniform(0, np.pi)
            u = np.array([np.cos(theta), np.sin(theta)])
            v = np.array([-u[1], u[0]])
            t = np.sort(rng.uniform(-0.5, 0.5, 4)) * length
            off = rng.uniform(-0.08, 0.08, 4) * length
            ctrl = np.array([cx, cy]) + t[:, None] * u + off[:, None] * v
            pts = [tuple(p) for p in bezier(ctrl, 48)]
            width = max(1, int(round(rng.integers(*self.config.scar_width) * scale)))
            draw.line(pts, fill=1, width=width, joint="curve")
        elif shape == "bezier_clump":
            bw, bh = self._size(fg_area, rng)
            r = np.sqrt(bw * bh) / 1.5
            # closed blob: Bézier segments through points on a jittered circle
            k = int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = r * rng.uniform(0.5, 1.2, k)
            ring = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
            outline = []
            for i in range(k):
                a, b = ring[i], ring[(i + 1) % k]
                mid = (a + b) / 2 + rng.normal(0, r * 0.3, 2)
                outline.extend(tuple(p) for p in bezier(np.stack([a, mid, b]), 16))
            draw.polygon(outline, fill=1)
        else:
            raise FsadError(f"DefectMaker: unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
        mask = np.asarray(canvas, dtype=bool)
        if shape == "bezier_clump" and mask.sum() > 16:
            # erode, then break into a clump of pieces with a random-noise cut
            eroded = ndimage.binary_erosion(mask, iterations=int(rng.integers(0, 2)) + 1)
            holes = ndimage.gaussian_filter(rng.standard_normal((h, w)), max(1.0, 2 * scale)) > rng.uniform(0, 0.15)
            pieces = eroded & ~holes
            if pieces.sum() >= 0.1 * mask.sum():
                mask = pieces
        return mask

    # ---- fills: uint8 [h, w, 3] the size of the image
    def fill(self, fill: str, image: np.ndarray, donors: list[np.ndarray] | None,
             rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        if fill == "noise":
            mean = rng.uniform(0, 255, 3)
            spread = rng.uniform(*self.config.noise_range)
            out = mean[None, None] + rng.uniform(-spread, spread, (h, w, 3))
            return np.clip(out, 0, 255).astype(np.uint8)
        if fill == "cutpaste":
            src = image if not donors else donors[int(rng.integers(len(donors)))]
            if src.shape[:2] != (h, w):
                src = np.asarray(Image.fromarray(src).resize((w, h), Image.BILINEAR))
            # shift the donor so a different region lands under the defect
            dy, dx = int(rng.integers(-h // 3, h // 3 + 1)), int(rng.integers(-w // 3, w // 3 + 1))
            out = np.roll(src, (dy, dx), axis=(0, 1))
            if rng.random() < 0.5:  # CutPaste's colour jitter on the patch
                out = np.clip(out.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30), 0, 255)
            return out.astype(np.uint8)
        raise FsadError(f"DefectMaker: unknown fill {fill!r}; use one of {', '.join(FILLS)}")

    def make(self, image: np.ndarray, rng: np.random.Generator, shape: str | None = None, fill: str | None = None,
             donors: list[np.ndarray] | None = None, fg: np.ndarray | None = None,
             blend: bool | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """One defective copy of ``image`` (uint8 [h,w,3]); ``mask`` = the pixels the defect was written to."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        h, w = image.shape[:2]
        shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
        fill = fill or FILLS[int(rng.integers(len(FILLS)))]
        fg = self.foreground(image) if fg is None else fg
        ys, xs = np.nonzero(fg)
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(10):  # a shape clipped away entirely by the foreground is redrawn
            i = int(rng.integers(len(ys)))
            mask = self.shape_mask(shape, (h, w), (int(ys[i]), int(xs[i])), float(fg.sum()), rng) & fg
            if mask.sum() >= 4:
                break
        if mask.sum() == 0:  # degenerate foreground: fall back to a 3x3 square at the centre
            mask[h // 2 - 1: h // 2 + 2, w // 2 - 1: w // 2 + 2] = True
        patch = self.fill(fill, image, donors, rng)
        blend = (rng.random() < self.config.blend_probability) if blend is None else blend
        out = image.copy()
        if blend:
            beta = rng.uniform(*self.config.blend_weight)
            mixed = beta * patch[mask].astype(np.float32) + (1 - beta) * image[mask].astype(np.float32)
            out[mask] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
        else:
            out[mask] = patch[mask]
        return out, mask, class_index(shape, fill)

    def batch(self, images: list[np.ndarray], rng: np.random.Generator, n: int,
              fgs: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """``n`` samples for the 7-class task, classes drawn uniformly (class 0 = an untouched image)."""
        out, masks, labels = [], [], []
        for _ in range(n):
            idx = int(rng.integers(len(images)))
            label = int(rng.integers(len(CLASSES)))
            img = images[idx]
            if label == 0:
                out.append(img)
                masks.append(np.zeros(img.shape[:2], dtype=bool))
            else:
                shape, fill = CLASSES[label].split("+")
                donors = [im for j, im in enumerate(images) if j != idx] or None
                fg = fgs[idx] if fgs is not None else None
                d, m, lab = self.make(img, rng, shape=shape, fill=fill, donors=donors, fg=fg)
                assert lab == label
                out.append(d)
                masks.append(m)
            labels.append(label)
        return out, masks, np.asarray(labels, dtype=np.int64)
