"""The working size: the one owner of the default image resolution and of the "too small" check.

``WORKING_SIZE`` is the short side images are embedded and compared at unless a caller says otherwise
(the resolution the methods' papers report at: PatchCore, EfficientAD, ...). The store, the CLI, the
pipeline and the mask shape all read it from here. A method's own input size is its ``input_size``
(``methods/base.py``); the aspect-kept shape around a short side is ``backbones.preprocess.working_shape``.
Imports nothing heavy: ``fsad --help`` reads the default.
"""

from __future__ import annotations

from fewshot_core.errors import FsadError

WORKING_SIZE = 256
MIN_BACKBONE_SIZE = 32  # below it a CNN's deepest stage has no spatial extent left
MIN_MASK_SIZE = 8  # below it a mask holds no defect


def check_size(size, what: str = "--image-size", minimum: int = MIN_BACKBONE_SIZE,
               why: str = "too small for a CNN backbone") -> int:
    """``size`` as an int, or a one-line FsadError naming ``what`` and the smallest accepted value."""
    if int(size) < minimum:
        raise FsadError(f"{what} {size}: {why}; use {minimum} or more (default {WORKING_SIZE})")
    return int(size)
