"""timm backbones with resolved weights: the full model (for fine-tuning methods) and a frozen extractor."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_core.backbones.stages import resolve_layers
from fewshot_core.backbones.weights import RANDOM_SEED, WeightsInfo, load_weights, resolve_weights
from fewshot_core.device import resolve_device
from fewshot_core.errors import FsadError

from fewshot_core.backbones import DEFAULT_BACKBONE  # noqa: F401 (one definition, re-exported here)


def _size_kwargs(name: str) -> dict:
    """ViTs are built for one input size; let them take any (position embeddings resampled on the fly)."""
    # deferred: timm is heavy, and the code location loads this module without building a model
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    return {"dynamic_img_size": True} if cfg is not None and cfg.fixed_input_size else {}


def _timm_model(name: str, info: WeightsInfo) -> nn.Module:
    # deferred: timm is heavy, and the code location loads this module without building a model
    import timm

    try:
        if info.source == "timm":  # timm applies its own checkpoint filters to its downloads
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": info.path},
                                     **_size_kwargs(name))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # "random" weights are a seeded, reproducible init
            model = timm.create_model(name, pretrained=False, **_size_kwargs(name))
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise FsadError(f"{name}: unknown timm backbone; pick a name from timm.list_models()") from None
        raise
    load_weights(model, info)
    return model


def create_model(name: str = DEFAULT_BACKBONE, weights="auto", device=None,
                 weights_info: WeightsInfo | None = None) -> nn.Module:
    """The full timm model with resolved weights, in eval mode.

    Which weights those are is ``resolve_weights(name, weights)``; a caller that records them (a method's
    provenance) resolves them first and passes ``weights_info``, so the record and the model cannot differ.
    """
    info = weights_info or resolve_weights(name, weights)
    return _timm_model(name, info).eval().to(resolve_device(device))


class FeatureExtractor(nn.Module):
    """Frozen backbone returning the feature maps of the chosen stages (indices into ``model.feature_info``).

    Built on timm's ``forward_intermediates`` so one pass yields both the stage maps and the pooled
    pre-classifier embedding (``forward_with_global``).
    """

    def __init__(self, model: nn.Module, layers, name: str, weights: WeightsInfo):
        super().__init__()
        infos = [dict(f) for f in model.feature_info]
        self.layers = resolve_layers(name, layers)
        self.model = model
        self.name = name
        self.weights = weights
        self.feature_info = [infos[i] for i in self.layers]
        self.global_dim = int(getattr(model, "num_features", 0))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: BatchNorm statistics must never update
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(batch, indices=list(self.layers), intermediates_only=True,
                                                stop_early=True)

    def forward_with_global(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Stage maps and the pooled pre-classifier embedding [B, D] from a single forward pass."""
        final, maps = self.model.forward_intermediates(batch, indices=list(self.layers))
        return maps, self.model.forward_head(final, pre_logits=True)


def create_extractor(name: str = DEFAULT_BACKBONE, layers=None, weights="auto", device=None,
                     weights_info: WeightsInfo | None = None) -> FeatureExtractor:
    """Frozen feature extractor for ``name`` (default layers: stride 8 and 16 stages)."""
    info = weights_info or resolve_weights(name, weights)
    resolve_layers(name, layers)  # fail on bad layers before loading any weights
    model = _timm_model(name, info)
    if not hasattr(model, "forward_intermediates"):
        raise FsadError(f"{name}: this timm model has no forward_intermediates; choose another backbone")
    return FeatureExtractor(model, layers, name, info).to(resolve_device(device))
