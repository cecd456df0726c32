"""Streaming extraction: worker processes decode + resize images, the main process runs the backbone.

Batches come out as float16 numpy arrays so the caller can write them straight to a memmap; nothing
holds more than one batch of features in memory.
"""

from __future__ import annotations

import contextlib
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
    """Image files -> uint8 [3, S, S] tensors (decoded and resized inside DataLoader workers)."""

    def __init__(self, paths: Sequence[str | Path], image_size: int, interpolation: str = "bicubic",
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


@torch.inference_mode()
def embed_batch(extractor: FeatureExtractor, batch: torch.Tensor, normalize: Normalize,
                patch_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B, 3, S, S] -> (patch features [B, h, w, d], global embeddings [B, D]) as float32."""
    device = extractor.device
    x = normalize(batch.to(device, non_blocking=True))
    autocast = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        maps, pooled = extractor.forward_with_global(x)
    return patch_features([m.float() for m in maps], patch_dim), pooled.float()


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
