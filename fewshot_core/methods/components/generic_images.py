"""Generic (category-agnostic) training images: the offline stand-in for ImageNet.

EfficientAD distils its teacher on ImageNet and uses ImageNet images as the student's penalty, so that
the teacher describes *any* local structure (a defect too) and the student only learns to imitate it on
the normal images. Without internet there is no ImageNet here; this source gives random crops of:

* the images of a folder when one is given (ImageNet or DTD ``images/``: the paper's setting), else
* the photographs bundled with scikit-image (people, animals, coffee, rocket, coins, bricks, grass,
  gravel, text ... about twenty), at random scales, flips and turns, with colour jitter, and
* generated textures (``perlin.make_texture``) for a quarter of the draws.

None of them is an MVTec image, so a model trained on them never sees the evaluated category.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot_core.data.imageio import load_rgb
from fewshot_core.errors import FsadError
from fewshot_core.methods.components.perlin import make_texture

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# scikit-image's bundled pictures that are natural photographs or textures (not masks, charts or scans)
SKIMAGE_FILES = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
                 "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg",
                 "ihc.png", "logo.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg",
                 "text.png")


def _skimage_pictures() -> list[np.ndarray]:
    try:
        from skimage import data as skdata
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise FsadError("scikit-image is not installed; `pip install scikit-image` or pass a generic image folder") from exc
    folder = Path(skdata.__file__).parent
    pictures = [np.asarray(Image.open(folder / name).convert("RGB")) for name in SKIMAGE_FILES
                if (folder / name).exists()]
    if not pictures:  # pragma: no cover - a broken scikit-image install
        raise FsadError("scikit-image ships no sample pictures here; pass a generic image folder (ImageNet or DTD)")
    return pictures


class GenericImages:
    """Random ``size``-pixel crops of generic pictures as float tensors [n, 3, size, size] in [0, 1].

    Deterministic by the numpy ``rng`` that picks picture, crop, turn and colours; the pixel work runs
    in torch on ``device`` (the pictures and a pool of generated textures are held there once), so a GPU
    distillation step is not starved by image decoding on the CPU.
    """

    def __init__(self, folder: str | Path | None = None, texture_share: float = 0.25, max_files: int = 500,
                 texture_pool: int = 64):
        self.folder = Path(folder) if folder else None
        self.texture_share = float(texture_share)
        self.texture_pool = int(texture_pool)
        if self.folder is not None:
            if not self.folder.is_dir():
                raise FsadError(f"{self.folder}: generic image folder not found; pass an ImageNet/DTD folder or none")
            files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise FsadError(f"{self.folder}: no images inside; pass an ImageNet/DTD folder or none")
            self.files = files[:max_files]
        else:
            self.files = []
        self._pictures: dict = {}  # device -> list of uint8 [3, h, w] tensors
        self._textures: dict = {}  # (device, size) -> uint8 [pool, 3, size, size]

    @property
    def description(self) -> str:
        if self.files:
            return f"folder:{self.folder} ({len(self.files)} images) + generated textures"
        return f"scikit-image pictures ({len(SKIMAGE_FILES)}) + generated textures"

    def _load(self, device) -> list:
        key = str(device)
        if key not in self._pictures:
            if self.files:
                arrays = [np.asarray(load_rgb(f, max_side=512)) for f in self.files]
            else:
                arrays = _skimage_pictures()
            self._pictures[key] = [torch.from_numpy(np.array(a)).permute(2, 0, 1).to(device)
                                   for a in arrays]
        return self._pictures[key]

    def _texture_pool(self, size: int, device) -> torch.Tensor:
        key = (str(device), size)
        if key not in self._textures:
            rng = np.random.default_rng(12345)  # the pool is fixed; draws from it follow the caller's rng
            pool = np.stack([make_texture(size, rng) for _ in range(self.texture_pool)])
            self._textures[key] = torch.from_numpy(pool).permute(0, 3, 1, 2).to(device)
        return self._textures[key]

    def batch(self, n: int, size: int, rng: np.random.Generator, device="cpu") -> torch.Tensor:
        pictures = self._load(device)
        out = []
        for _ in range(n):
            if rng.random() < self.texture_share:
                img = self._texture_pool(size, device)[int(rng.integers(self.texture_pool))].float()
                img = torch.roll(img, tuple(int(v) for v in rng.integers(0, size, 2)), dims=(1, 2))
            else:
                pic = pictures[int(rng.integers(len(pictures)))]
                h, w = pic.shape[1:]
                # a square crop of 1/4 .. all of the shorter side (scale variety), resized to ``size``
                side = max(8, int(min(h, w) * rng.uniform(0.25, 1.0)))
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                img = F.interpolate(pic[None, :, y:y + side, x:x + side].float(), size=(size, size),
                                    mode="bilinear", antialias=True, align_corners=False)[0]
                # colour jitter: per-channel gain and an offset (the pictures are few; colours should not be)
                gain = torch.as_tensor(rng.uniform(0.7, 1.3, 3), dtype=torch.float32, device=img.device)
                img = img * gain[:, None, None] + float(rng.uniform(-25, 25))
            img = torch.rot90(img, int(rng.integers(4)), dims=(1, 2))
            if rng.random() < 0.5:
                img = img.flip(2)
            out.append(img)
        return (torch.stack(out) / 255.0).clamp(0, 1)


@functools.cache
def shared_generic_images(folder: str | None = None) -> GenericImages:
    """One source per folder and process: its pictures and texture pool are decoded once, not per fit."""
    return GenericImages(folder)
