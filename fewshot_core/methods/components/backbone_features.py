"""Backbone features for the detectors that train on images: a frozen extractor and PatchCore's patch
aggregation, the same ones the feature store uses."""

from __future__ import annotations

from typing import Sequence

import torch

from fewshot_core.backbones import create_extractor, preprocess_config
from fewshot_core.features.patch import patch_features


def backbone_extractor(name: str, layers: Sequence[int] | None, weights: str = "auto",
                       device: torch.device | str | None = None) -> tuple[torch.nn.Module, dict]:
    """Frozen ``fewshot_core.backbones`` extractor (offline ImageNet weights; "random" for tests) + a description.

    ``layers=None`` takes the feature store's default (the stride-8 and stride-16 stages).
    """
    model = create_extractor(name, layers=layers, weights=weights, device=device)
    cfg = preprocess_config(name)
    return model, {"name": name, "layers": list(model.layers), "weights": model.weights.to_dict(),
                   "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def patch_embed(feature_maps: Sequence[torch.Tensor], out_dim: int | None = None) -> torch.Tensor:
    """Stage maps -> PatchCore patch features [n, d, h, w] (the feature store's own aggregation)."""
    return patch_features(list(feature_maps), patch_dim=out_dim).permute(0, 3, 1, 2)
