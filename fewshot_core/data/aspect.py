"""The aspect ratio a category's images are embedded at, read from image headers only.

Industrial cameras give one category one image shape; the median over the good training images names it
(a stray crop does not move it), and ``backbones.preprocess.working_shape`` turns it into the backbone's
input shape. Only train images are read, so the choice never depends on the test split.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fewshot_core.data.imageio import image_size
from fewshot_core.errors import FsadError

AUTO, SQUARE = "auto", "square"


def category_aspect(dataset, workers: int | None = None) -> float:
    """Median height / width of ``dataset``'s good training images (all its images when it has none)."""
    records = list(dataset.train_good()) or list(dataset.records)
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sizes = list(pool.map(lambda r: image_size(r.path), records))
    return float(np.median([h / w for w, h in sizes]))


def resolve_aspect(dataset, aspect) -> float:
    """``aspect``: ``"auto"`` (the category's own, ``category_aspect``), ``"square"`` (1.0, every image
    squashed to a square as before) or a positive height / width ratio."""
    if aspect is None or aspect == AUTO:
        return category_aspect(dataset)
    if aspect == SQUARE:
        return 1.0
    try:
        value = float(aspect)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise FsadError(f"--aspect {aspect!r}: use 'auto' (the category's images), 'square', or a height/width "
                        f"ratio such as 2.5")
    return value
