"""GLASS (Chen et al., ECCV 2024): gradient-ascent global + Perlin local anomaly synthesis.

Frozen backbone patch features pass a linear feature adaptor; a small MLP discriminator scores each
patch (sigmoid: 1 = anomalous). Per training step, on a batch of normal images:

* normal features: adaptor(features(image)) -> label 0;
* global anomaly synthesis (GAS): normal features + Gaussian noise (σ = ``noise``), pushed for ``ascent_steps``
  steps along the normalised gradient of the discriminator's loss on them (gradient *ascent*: towards
  what the discriminator still calls normal) and, every 5 steps, projected back into the shell
  r ≤ ‖g − f‖ ≤ 2r around their normal feature (truncated projection, the manifold variant) -> label 1;
* local anomaly synthesis (LAS): the image with a texture (DTD folder or generated) blended in through a
  Perlin mask restricted to the foreground; patches under the mask -> 1, elsewhere -> 0, trained with a
  focal loss on the hardest ``p`` fraction.

Inference: discriminator score per patch, upsampled to the image and smoothed (σ = 4); image score = max.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_core.backbones import TRAINED_DETECTOR_BACKBONE
from fewshot_core.methods.components.anomaly_map import gaussian_blur
from fewshot_core.methods.components.backbone_features import backbone_extractor, patch_embed
from fewshot_core.methods.components.defectmaker import foreground_mask
from fewshot_core.methods.components.images import normalize
from fewshot_core.methods.components.perlin import TextureSource, perlin_mask
from fewshot_core.methods.components.training import TrainLoop, autocast, cpu_state, seeded
from fewshot_core.methods.trained import TrainedDetector


class Discriminator(nn.Module):
    """GLASS/SimpleNet discriminator: (Linear, BN, LeakyReLU) × (layers − 1), Linear -> sigmoid."""

    def __init__(self, dim: int, hidden: int = 1024, layers: int = 2):
        super().__init__()
        body, d = [], dim
        for _ in range(layers - 1):
            body += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            d = hidden
        self.body = nn.Sequential(*body)
        self.tail = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.tail(self.body(x)))


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on probabilities (mean over elements)."""
    prob = prob.clamp(1e-6, 1 - 1e-6)
    pt = torch.where(target > 0.5, prob, 1 - prob)
    return (-(1 - pt) ** gamma * torch.log(pt)).mean()


class GLASS(TrainedDetector):
    name = "glass"
    version = 3  # 3: the one save format (manifest + tensors), parameters in __init__

    def __init__(self, image_size: int = 256,  # paper: 288
                 steps: int = 300,  # optimiser steps (paper: 640 epochs of <= 392 images)
                 batch_size: int = 4,  # paper: 8
                 lr: float = 1e-4,  # adaptor (Adam); discriminator 2·lr (AdamW), as the reference code
                 embed_dim: int | None = None,  # None: concatenated backbone channels; else PatchCore-style pooling
                 dsc_hidden: int = 1024,
                 dsc_layers: int = 2,
                 # GAS constants are the reference's absolute values, tuned there for WideResNet-50 features.
                 # Lite0 patch features are larger: with ``standardize`` the features are divided by their RMS
                 # spread on the support (one scalar), which puts noise and radius back on the scale they
                 # were tuned for.
                 standardize: bool = True,
                 noise: float = 0.015,
                 ascent_steps: int = 20,
                 ascent_lr: float = 0.001,
                 radius: float = 0.5,  # shell [r, 2r] of the truncated projection (reference: 0.5, manifold case)
                 p: float = 0.5,  # hard-sample fraction for the focal loss
                 focal_gamma: float = 2.0,
                 use_foreground: bool = True,  # LAS masks restricted to a foreground estimate (objects)
                 texture_dir: str | None = None,  # DTD images folder; None: generated textures
                 backbone: str = TRAINED_DETECTOR_BACKBONE,
                 backbone_layers: tuple[int, ...] | None = None,  # None: the feature store default (stride 8 + 16)
                 backbone_weights: str = "auto",
                 smoothing_sigma: float = 4.0,
                 time_budget_s: float | None = 540.0,
                 seed: int = 0):
        self.image_size = image_size
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.embed_dim = embed_dim
        self.dsc_hidden = dsc_hidden
        self.dsc_layers = dsc_layers
        self.standardize = standardize
        self.noise = noise
        self.ascent_steps = ascent_steps
        self.ascent_lr = ascent_lr
        self.radius = radius
        self.p = p
        self.focal_gamma = focal_gamma
        self.use_foreground = use_foreground
        self.texture_dir = texture_dir
        self.backbone = backbone
        self.backbone_layers = backbone_layers
        self.backbone_weights = backbone_weights
        self.smoothing_sigma = smoothing_sigma
        self.time_budget_s = time_budget_s
        self.seed = seed

    def _setup(self) -> None:
        """The frozen backbone (its feature size and grid probed once) and the texture source."""
        self.extractor_, self.backbone_info_ = backbone_extractor(self.backbone, self.backbone_layers,
                                                                  self.backbone_weights, self.device_)
        self.extractor_ = self.extractor_.to(self.device_).eval()
        for p in self.extractor_.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device_))
        self.dim_, self.grid_ = probe.shape[1], tuple(probe.shape[-2:])
        self.textures_ = TextureSource(self.texture_dir)

    def _build(self) -> None:
        """Fresh adaptor + discriminator (inside the fit's seeded scope: the initial weights follow the seed)."""
        self.adaptor_ = nn.Linear(self.dim_, self.dim_).to(self.device_)
        self.scale_ = torch.ones((), device=self.device_)
        self.discriminator_ = Discriminator(self.dim_, self.dsc_hidden, self.dsc_layers).to(self.device_)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen backbone patch features [n, d, h, w]."""
        with autocast(self.device_, self.runtime.amp):
            feats = self.extractor_(normalize(x, self.backbone_info_["mean"], self.backbone_info_["std"]))
        return patch_embed([f.float() for f in feats], out_dim=self.embed_dim)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x).permute(0, 2, 3, 1).reshape(-1, self.dim_) / self.scale_

    # ------------------------------------------------------------------ local anomaly synthesis
    def _synthesize(self, imgs: np.ndarray, fgs: list[np.ndarray], rng: np.random.Generator):
        """LAS on uint8 images [b,h,w,3] -> (aug float [b,3,h,w] in [0,1], patch mask [b*h'*w'] of 0/1)."""
        out, masks = [], []
        for img, fg in zip(imgs, fgs):
            m = perlin_mask(img.shape[:2], rng) & fg
            if m.sum() == 0:
                m = perlin_mask(img.shape[:2], rng)
            tex = self.textures_.sample(img.shape[0], rng).astype(np.float32)
            beta = float(np.clip(rng.normal(0.5, 0.1), 0.2, 0.8))  # image share inside the mask
            im = img.astype(np.float32)
            aug = np.where(m[..., None], beta * im + (1 - beta) * tex, im)
            out.append(aug / 255.0)
            masks.append(m.astype(np.float32))
        aug = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
        mask = torch.from_numpy(np.stack(masks))[:, None]
        # patch label: 1 where at least a quarter of its cell of the feature grid is masked
        mask_s = (F.adaptive_avg_pool2d(mask, self.grid_) > 0.25).float().flatten()
        return aug, mask_s

    # ------------------------------------------------------------------ training
    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        self._build()
        device, amp = self.device_, self.runtime.amp
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        imgs_u8 = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        fgs = [foreground_mask(im) if self.use_foreground else np.ones(im.shape[:2], bool) for im in imgs_u8]
        if self.standardize:  # one scalar: the RMS deviation of the support's patch features from their mean
            with torch.no_grad():
                f = torch.cat([self._flat(x[i:i + 8]) for i in range(0, len(x), 8)])
                self.scale_ = (f - f.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6)
        proj_opt = torch.optim.Adam(self.adaptor_.parameters(), lr=self.lr, weight_decay=1e-5)
        dsc_opt = torch.optim.AdamW(self.discriminator_.parameters(), lr=2 * self.lr)
        loop = TrainLoop(self.steps, self.time_budget_s, desc="glass", progress=self.runtime.progress)
        self.adaptor_.train()
        self.discriminator_.train()
        bce = nn.BCELoss()
        for _ in loop:
            idx = torch.randint(len(x), (self.batch_size,), generator=gen).numpy()
            aug, mask_s = self._synthesize(imgs_u8[idx], [fgs[i] for i in idx], rng)
            mask_s = mask_s.to(device)
            with autocast(device, amp):
                true_feats = self.adaptor_(self._flat(x[idx])).float()
                fake_feats = self.adaptor_(self._flat(aug.to(device))).float()

            # GAS: noise + gradient ascent with truncated projection (manifold variant)
            noise = torch.randn(true_feats.shape, generator=gen).to(device) * self.noise
            gaus = (true_feats.detach() + noise).requires_grad_(True)
            for step in range(self.ascent_steps + 1):
                scores = self.discriminator_(torch.cat([true_feats, gaus]))
                true_scores, gaus_scores = scores[: len(true_feats)], scores[len(true_feats):]
                true_loss = bce(true_scores, torch.zeros_like(true_scores))
                gaus_loss = bce(gaus_scores, torch.ones_like(gaus_scores))
                if step == self.ascent_steps:
                    break
                grad = torch.autograd.grad(gaus_loss, [gaus], retain_graph=False)[0]
                with torch.no_grad():
                    gaus = gaus + self.ascent_lr * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
                    if (step + 1) % 5 == 0:
                        h = gaus - true_feats.detach()
                        h_norm = h.norm(dim=1, keepdim=True)
                        alpha = h_norm.clamp(self.radius, 2 * self.radius)
                        gaus = true_feats.detach() + alpha / (h_norm + 1e-10) * h
                gaus = gaus.detach().requires_grad_(True)
            bce_loss = true_loss + gaus_loss

            # LAS: focal loss on the hardest p fraction of the augmented image's patches
            fake_scores = self.discriminator_(fake_feats).squeeze(1)
            if self.p > 0:
                dist = (fake_scores.detach() - mask_s) ** 2
                keep = dist >= torch.quantile(dist, self.p)
                fs, ms = fake_scores[keep], mask_s[keep]
            else:
                fs, ms = fake_scores, mask_s
            f_loss = focal_loss(fs, ms, self.focal_gamma)
            loss = bce_loss + f_loss
            proj_opt.zero_grad(set_to_none=True)
            dsc_opt.zero_grad(set_to_none=True)
            loss.backward()
            proj_opt.step()
            dsc_opt.step()
            with torch.no_grad():
                p_true = (true_scores < 0.5).float().mean().item()
                p_fake = (gaus_scores >= 0.5).float().mean().item()
            loop.log(loss=loss.item(), bce=bce_loss.item(), focal=f_loss.item(), p_true=p_true, p_fake=p_fake)
        self.adaptor_.eval()
        self.discriminator_.eval()
        return {**loop.summary(), "textures": self.textures_.description, "feature_dim": self.dim_,
                "feature_scale": float(self.scale_), "grid": list(self.grid_),
                "backbone": {k: self.backbone_info_[k] for k in ("name", "layers", "weights")}}

    def _score(self, x):
        n = len(x)
        with autocast(self.device_, self.runtime.amp):
            s = self.discriminator_(self.adaptor_(self._flat(x))).float()
        patch = s.reshape(n, 1, *self.grid_)
        maps = F.interpolate(patch, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.smoothing_sigma)
        return patch.flatten(1).max(1).values, maps

    # ------------------------------------------------------------------ persistence
    def get_state(self) -> dict:
        return {**super().get_state(), "tensors": {"adaptor": cpu_state(self.adaptor_),
                                                   "discriminator": cpu_state(self.discriminator_),
                                                   "scale": self.scale_.detach().cpu()}}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        with seeded(self.seed, self.device_):  # module init draws from the RNG; keep the caller's
            self._build()
        tensors = state["tensors"]
        self.adaptor_.load_state_dict(tensors["adaptor"])
        self.discriminator_.load_state_dict(tensors["discriminator"])
        self.scale_ = tensors["scale"].to(self.device_)
        self.adaptor_.eval()
        self.discriminator_.eval()
