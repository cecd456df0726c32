"""One owner for the working size: the default resolution and the "too small" check live in
``fewshot_core/sizes.py``; everything else reads them from there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fewshot_core.errors import FsadError
from fewshot_core.sizes import MIN_BACKBONE_SIZE, MIN_MASK_SIZE, WORKING_SIZE, check_size

PROJECT = Path(__file__).resolve().parents[3]
# A bare number given as a size default or compared as a minimum; a method's own size (methods/<name>.py:
# EfficientAD 128, GLASS 256, ...) is that method's parameter, not the working size.
BARE_SIZE = re.compile(r"\b(image_size|mask_size)\b\s*(:\s*int\s*)?=\s*\d+|default=256\b|< ?32\b|SIZE\w* = 256\b")


def test_the_working_size_and_its_minimum_are_written_once():
    found = []
    for path in sorted((PROJECT / "fewshot_core").rglob("*.py")) + sorted((PROJECT / "pipelines").rglob("*.py")):
        if path.name == "sizes.py" or path.parent.name == "methods":
            continue
        found += [f"{path.relative_to(PROJECT)}:{i}: {line.strip()}"
                  for i, line in enumerate(path.read_text().splitlines(), 1) if BARE_SIZE.search(line)]
    assert not found, "\n".join(found)


def test_one_too_small_check_names_the_setting_and_the_fix():
    assert check_size(WORKING_SIZE) == WORKING_SIZE
    with pytest.raises(FsadError, match=rf"^--image-size 16: too small for a CNN backbone; use {MIN_BACKBONE_SIZE} "
                                        rf"or more \(default {WORKING_SIZE}\)$"):
        check_size(16)
    from fewshot_core.evaluation.oneclass import mask_shape

    with pytest.raises(FsadError, match=f"mask size 4: too small; use {MIN_MASK_SIZE} or more"):
        mask_shape(4)


def test_mask_size_none_is_the_models_working_shape():
    from fewshot_core.evaluation.oneclass import mask_shape

    class Part:
        input_shape = (64, 128)

    assert mask_shape(None, Part(), model_size=None) == (64, 128)  # the features' working shape
    assert mask_shape(None, None, model_size=96) == (96, 96)  # a detector trained on images: its own size
    assert mask_shape(None) == (WORKING_SIZE, WORKING_SIZE)
    assert mask_shape(32, Part()) == (32, 64)  # a short side keeps the partition's aspect
