"""PatchCore patch features: checked against PatchCore's own unfold/pool formulation, not against themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot_core.backbones import create_extractor
from fewshot_core.backbones.preprocess import Normalize
from fewshot_core.features import embed_batch, local_aggregate, patch_features

torch.set_num_threads(2)


def _unfold_mean(fmap: torch.Tensor, k: int = 3) -> torch.Tensor:
    """PatchCore's PatchMaker: unfold k x k neighbourhoods (zero padded), then average each patch."""
    b, c, h, w = fmap.shape
    cols = F.unfold(fmap, kernel_size=k, padding=k // 2, stride=1)  # [B, C*k*k, h*w]
    return cols.reshape(b, c, k * k, h, w).mean(2)


def test_local_aggregate_equals_patchcore_unfold_mean():
    fmap = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(local_aggregate(fmap), _unfold_mean(fmap), atol=1e-6)
    # a corner sees only 4 of its 9 neighbours; the zero padding counts (as with unfold)
    ones = torch.ones(1, 1, 4, 4)
    assert local_aggregate(ones)[0, 0, 0, 0].item() == pytest.approx(4 / 9)


def test_patch_features_concat_upsampled_coarse_stage():
    g = torch.Generator().manual_seed(1)
    fine, coarse = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    out = patch_features([fine, coarse])
    assert tuple(out.shape) == (2, 8, 8, 10)
    assert torch.allclose(out[..., :4], _unfold_mean(fine).permute(0, 2, 3, 1), atol=1e-6)
    up = F.interpolate(_unfold_mean(coarse), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out[..., 4:], up.permute(0, 2, 3, 1), atol=1e-6)


def test_patch_dim_reduction_follows_patchcore_preprocessing_and_aggregator():
    g = torch.Generator().manual_seed(2)
    fine, coarse = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 8, 2, 2, generator=g)
    out = patch_features([fine, coarse], patch_dim=4)
    assert tuple(out.shape) == (1, 2, 2, 4)
    a = local_aggregate(fine).permute(0, 2, 3, 1).numpy()  # 4 channels: pooled to 4 = unchanged
    b = local_aggregate(coarse).permute(0, 2, 3, 1).numpy()
    b4 = b.reshape(1, 2, 2, 4, 2).mean(-1)  # 8 -> 4: means of channel pairs
    stacked = np.concatenate([a, b4], axis=-1)  # [.., 8] -> aggregator pools to 4: pairs again
    expected = stacked.reshape(1, 2, 2, 4, 2).mean(-1)
    assert np.allclose(out.numpy(), expected, atol=1e-6)
    # the first half of the output comes from the fine stage only: each stage keeps an equal share
    assert np.allclose(out.numpy()[..., :2], a.reshape(1, 2, 2, 2, 2).mean(-1), atol=1e-6)


def test_embed_batch_on_lite0_gives_grid_at_stride_8_and_changes_with_content():
    ext = create_extractor("tf_efficientnet_lite0")
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    patch, pooled = embed_batch(ext, batch, norm)
    assert tuple(patch.shape) == (2, 8, 8, 152) and tuple(pooled.shape) == (2, 1280)
    assert torch.isfinite(patch).all() and torch.isfinite(pooled).all()
    assert not torch.allclose(patch[0], patch[1])
    # the global embedding is the model's own pre-logits: the classifier applied to it gives the logits
    x = norm(batch)
    with torch.inference_mode():
        logits = ext.model(x)
    assert torch.allclose(ext.model.get_classifier()(pooled), logits, atol=1e-4)
