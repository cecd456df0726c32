"""Mask sizes against their images, read from headers only: cheap enough for every dataset load, so a
mask of another size is refused before it is silently resized into wrong pixel metrics. The readers
(``mvtec``, ``layouts``) call ``require_consistent_masks``; ``validate`` reports the same lines."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from fewshot_core.data.imageio import image_size
from fewshot_core.data.records import ImageRecord
from fewshot_core.errors import FsadError


def mask_size_problem(rec: ImageRecord, image_wh: tuple[int, int], mask_wh: tuple[int, int]) -> str | None:
    """The validator's line for a mask whose size differs from its image's (both as (width, height))."""
    if tuple(mask_wh) == tuple(image_wh):
        return None
    return (f"{rec.mask_path}: mask is {mask_wh[0]}x{mask_wh[1]} but its image {rec.path.name} is "
            f"{image_wh[0]}x{image_wh[1]}; resize the mask to the image")


def mask_size_problems(dataset, workers: int | None = None) -> list[str]:
    """One validator line per mask of ``dataset`` whose size differs from its image's.

    Reads headers only (no pixel decoding), so loaders can afford it on every load: a mismatched mask
    would otherwise be resized silently and give wrong pixel metrics."""
    masked = [r for r in dataset.records if r.mask_path is not None]
    if not masked:
        return []

    def check(rec: ImageRecord) -> str | None:
        try:
            return mask_size_problem(rec, image_size(rec.path), image_size(rec.mask_path))
        except FsadError as exc:  # unreadable header: the validator's line for that file
            return str(exc)

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for p in pool.map(check, masked) if p is not None]


def require_consistent_masks(dataset, hint: str | None = None):
    """``dataset`` if every mask matches its image's size, else ``FsadError`` with the validator's first
    line (for the CLI, ``load_dataset``, and the pipeline's blocking data check)."""
    problems = mask_size_problems(dataset)
    if problems:
        more = len(problems) - 1
        extra = f" (+{more} more problem{'s' if more > 1 else ''})" if more else ""
        hint = hint or f"fsad data validate {dataset.root} --category {dataset.category}"
        raise FsadError(f"{problems[0]}{extra}; run `{hint}` to list every problem")
    return dataset
