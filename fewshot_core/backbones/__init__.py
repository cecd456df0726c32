"""Backbones: timm models with offline-first weight resolution and per-model preprocessing."""

from fewshot_core.backbones.models import (
    DEFAULT_BACKBONE,
    FeatureExtractor,
    create_extractor,
    create_model,
    resolve_device,
)
from fewshot_core.backbones.stages import default_layers, resolve_layers, stage_info
from fewshot_core.backbones.preprocess import build_transform, preprocess_config, preprocessing_record
from fewshot_core.backbones.weights import WeightsInfo, resolve_weights

__all__ = [
    "DEFAULT_BACKBONE",
    "FeatureExtractor",
    "WeightsInfo",
    "build_transform",
    "create_extractor",
    "create_model",
    "default_layers",
    "preprocess_config",
    "preprocessing_record",
    "resolve_device",
    "resolve_layers",
    "stage_info",
    "resolve_weights",
]
