"""Streaming extraction: worker processes decode + resize images, the main process runs the backbone.

Batches come out as float16 numpy arrays so the caller can write them straight to a memmap; nothing
holds more than one batch of features in memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from fewshot_core.backbones.models import FeatureExtractor
from fewshot_core.backbones.preprocess import Normalize, preprocess_config, resize_image, to_uint8_tensor
from fewshot_core.data.imageio import load_rgb
from fewshot_core.errors import FsadError
from fewshot_core.features.patch import patch_features


class ResizedImages(TorchDataset):
    """Image files -> uint8 [3, H, W] tensors, decoded and resized inside DataLoader workers (``image_size``:
    an int for a square, or the working (height, width) shape)."""

    def __init__(self, paths: Sequence[str | Path], image_size, interpolation: str = "bicubic",
                 crop: bool = False, crop_pct: float = 1.0):
        self.paths = [Path(p) for p in paths]
        self.image_size, self.interpolation, self.crop, self.crop_pct = image_size, interpolation, crop, crop_pct

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = resize_image(load_rgb(self.paths[i]), self.image_size, self.interpolation, self.crop, self.crop_pct)
        return to_uint8_tensor(img)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only decode; the cores belong to the forward pass


def image_loader(paths, backbone: str, image_size: int, batch_size: int = 16, num_workers: int = 2,
                 crop: bool = False, pin_memory: bool = False) -> DataLoader:
    cfg = preprocess_config(backbone)
    data = ResizedImages(paths, image_size, cfg["interpolation"], crop, cfg["crop_pct"])
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      worker_init_fn=_worker_init if num_workers else None, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)


# Inputs with a side above TILE_SIDE px are embedded in overlapping tiles of that side, so one forward pass
# never holds the activations of a whole high-resolution image (a 2048 px strip at 1:4 would take gigabytes).
# Each tile drops TILE_OVERLAP px at its inner edges, where its zero padding differs from the whole image;
# the kept cores tile the image exactly, so the stitched grid is the whole image's grid.
TILE_SIDE = 768
TILE_OVERLAP = 64


def tile_starts(length: int, tile: int | None = None, overlap: int | None = None) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` px (one tile when it fits)."""
    tile = TILE_SIDE if tile is None else tile
    overlap = TILE_OVERLAP if overlap is None else overlap
    if length <= tile:
        return [0]
    step = tile - 2 * overlap
    return list(range(0, length - tile, step)) + [length - tile]


def _features(extractor: FeatureExtractor, x: torch.Tensor, patch_dim: int | None):
    autocast = (torch.autocast("cuda", dtype=torch.float16) if extractor.device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        maps, pooled = extractor.forward_with_global(x)
    return patch_features([m.float() for m in maps], patch_dim), pooled.float()


def _tiled(extractor: FeatureExtractor, x: torch.Tensor, patch_dim: int | None):
    """The whole-image features of ``x`` [B, 3, H, W] stitched from tiles: each tile's core (its features
    away from inner seams) is written into the grid (the last tile along a side is aligned to the grid's
    end); the global embedding is the mean of the tiles' embeddings weighted by their cores' areas."""
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height), tile_starts(width)
    th, tw = min(TILE_SIDE, height), min(TILE_SIDE, width)
    out = pooled_sum = None
    weight = 0
    for r, top in enumerate(rows):
        for c, left in enumerate(cols):
            patch, pooled = _features(extractor, x[..., top:top + th, left:left + tw], patch_dim)
            gh, gw = patch.shape[1:3]
            sy, sx = th / gh, tw / gw  # tile pixels per grid cell along each side
            if out is None:
                full = (gh if len(rows) == 1 else math.ceil(height / sy), gw if len(cols) == 1 else math.ceil(width / sx))
                out = patch.new_zeros((x.shape[0], *full, patch.shape[-1]))
                pooled_sum = torch.zeros_like(pooled)
            oy = out.shape[1] - gh if r == len(rows) - 1 else round(top / sy)
            ox = out.shape[2] - gw if c == len(cols) - 1 else round(left / sx)
            y0 = 0 if r == 0 else round(TILE_OVERLAP / sy)  # first / last tiles keep the image's own border
            y1 = gh if r == len(rows) - 1 else gh - round(TILE_OVERLAP / sy)
            x0 = 0 if c == 0 else round(TILE_OVERLAP / sx)
            x1 = gw if c == len(cols) - 1 else gw - round(TILE_OVERLAP / sx)
            out[:, oy + y0:oy + y1, ox + x0:ox + x1] = patch[:, y0:y1, x0:x1]
            pooled_sum += pooled * ((y1 - y0) * (x1 - x0))
            weight += (y1 - y0) * (x1 - x0)
    return out, pooled_sum / weight


@torch.inference_mode()
def embed_batch(extractor: FeatureExtractor, batch: torch.Tensor, normalize: Normalize,
                patch_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B, 3, H, W] -> (patch features [B, h, w, d], global embeddings [B, D]) as float32;
    tiled above ``TILE_SIDE`` px (the store and a saved model's featurizer both come through here)."""
    x = normalize(batch.to(extractor.device, non_blocking=True))
    if max(x.shape[-2:]) > TILE_SIDE:
        return _tiled(extractor, x, patch_dim)
    return _features(extractor, x, patch_dim)


def iter_embeddings(extractor: FeatureExtractor, paths, image_size: int, patch_dim: int | None = None,
                    batch_size: int = 16, num_workers: int = 2, crop: bool = False
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first row, patch float16 [b, h, w, d], global float16 [b, D]) batch by batch, in path order."""
    cfg = preprocess_config(extractor.name)
    normalize = Normalize(cfg["mean"], cfg["std"])
    loader = image_loader(paths, extractor.name, image_size, batch_size, num_workers, crop,
                          pin_memory=extractor.device.type == "cuda")
    start = 0
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except FsadError as exc:  # re-raised from a worker with its traceback appended: keep the one line
            raise FsadError(_worker_message(str(exc))) from None
        patch, pooled = embed_batch(extractor, batch, normalize, patch_dim)
        yield start, patch.cpu().numpy().astype(np.float16), pooled.cpu().numpy().astype(np.float16)
        start += len(batch)


def _worker_message(message: str) -> str:
    tail = message.strip().splitlines()[-1]
    return tail.split("FsadError: ", 1)[1] if "FsadError: " in tail else tail
