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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_core.methods.defectmaker import foreground_mask
from fewshot_core.methods.perlin import TextureSource, perlin_mask
from fewshot_core.methods.training import (
    TrainedDetector,
    TrainLoop,
    autocast,
    backbone_extractor,
    cpu_state,
    gaussian_blur,
    normalize,
    patch_embed,
)


@dataclass
class GLASSConfig:
    image_size: int = 256  # paper: 288
    steps: int = 300  # optimiser steps (paper: 640 epochs of ≤392 images)
    batch_size: int = 4  # paper: 8
    lr: float = 1e-4  # adaptor (Adam); discriminator 2·lr (AdamW), as the reference code
    embed_dim: int | None = None  # None: concatenated backbone channels; else PatchCore-style pooling
    dsc_hidden: int = 1024
    dsc_layers: int = 2
    # GAS constants are the reference's absolute values, tuned there for WideResNet-50 features. Lite0 patch
    # features are larger (norm ~60, nearest-neighbour distance ~10 on bottle): with ``standardize`` the
    # features are divided by their RMS spread on the support (one scalar), which puts noise and radius
    # back on the scale they were tuned for.
    standardize: bool = True
    noise: float = 0.015
    ascent_steps: int = 20
    ascent_lr: float = 0.001
    radius: float = 0.5  # shell [r, 2r] of the truncated projection (reference code: 0.5 for the manifold case)
    p: float = 0.5  # hard-sample fraction for the focal loss
    focal_gamma: float = 2.0
    use_foreground: bool = True  # LAS masks restricted to a foreground estimate (objects)
    texture_dir: str | None = None  # DTD images folder; None: generated textures
    backbone: str = "tf_efficientnet_lite0"
    backbone_layers: tuple[int, ...] | None = None  # None: the feature store default (stride 8 + 16)
    backbone_weights: str = "auto"
    smoothing_sigma: float = 4.0
    time_budget_s: float | None = 540.0
    device: str | None = None
    amp: bool = True
    progress: bool = True
    threads: int | None = None
    score_batch: int = 8


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
    version = 2

    def __init__(self, config: GLASSConfig | None = None, artifact_dir=None, **overrides):
        config = config or GLASSConfig(**overrides)
        super().__init__(config, artifact_dir)
        c = config
        self.extractor, self.backbone_info = backbone_extractor(c.backbone, c.backbone_layers, c.backbone_weights, self.device)
        self.extractor = self.extractor.to(self.device).eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, c.image_size, c.image_size, device=self.device))
        self.dim, self.grid = probe.shape[1], tuple(probe.shape[-2:])
        self._build()
        self.textures = TextureSource(c.texture_dir)

    def _build(self) -> None:
        """Fresh adaptor + discriminator (again after seeding, so the initial weights follow the seed)."""
        self.adaptor = nn.Linear(self.dim, self.dim).to(self.device)
        self.scale = torch.ones((), device=self.device)
        self.discriminator = Discriminator(self.dim, self.config.dsc_hidden, self.config.dsc_layers).to(self.device)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen backbone patch features [n, d, h, w]."""
        with autocast(self.device, self.config.amp):
            feats = self.extractor(normalize(x, self.backbone_info["mean"], self.backbone_info["std"]))
        return patch_embed([f.float() for f in feats], out_dim=self.config.embed_dim)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x).permute(0, 2, 3, 1).reshape(-1, self.dim) / self.scale

    # ------------------------------------------------------------------ local anomaly synthesis
    def _synthesize(self, imgs: np.ndarray, fgs: list[np.ndarray], rng: np.random.Generator):
        """LAS on uint8 images [b,h,w,3] -> (aug float [b,3,h,w] in [0,1], patch mask [b*h'*w'] of 0/1)."""
        out, masks = [], []
        for img, fg in zip(imgs, fgs):
            m = perlin_mask(img.shape[:2], rng) & fg
            if m.sum() == 0:
                m = perlin_mask(img.shape[:2], rng)
            tex = self.textures.sample(img.shape[0], rng).astype(np.float32)
            beta = float(np.clip(rng.normal(0.5, 0.1), 0.2, 0.8))  # image share inside the mask
            im = img.astype(np.float32)
            aug = np.where(m[..., None], beta * im + (1 - beta) * tex, im)
            out.append(aug / 255.0)
            masks.append(m.astype(np.float32))
        aug = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
        mask = torch.from_numpy(np.stack(masks))[:, None]
        # patch label: 1 where at least a quarter of its cell of the feature grid is masked
        mask_s = (F.adaptive_avg_pool2d(mask, self.grid) > 0.25).float().flatten()
        return aug, mask_s

    # ------------------------------------------------------------------ training
    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        c = self.config
        self._build()
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        imgs_u8 = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        fgs = [foreground_mask(im) if c.use_foreground else np.ones(im.shape[:2], bool) for im in imgs_u8]
        if c.standardize:  # one scalar: the RMS deviation of the support's patch features from their mean
            with torch.no_grad():
                f = torch.cat([self._flat(x[i:i + 8]) for i in range(0, len(x), 8)])
                self.scale = (f - f.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6)
        proj_opt = torch.optim.Adam(self.adaptor.parameters(), lr=c.lr, weight_decay=1e-5)
        dsc_opt = torch.optim.AdamW(self.discriminator.parameters(), lr=2 * c.lr)
        loop = TrainLoop(c.steps, c.time_budget_s, desc="glass", progress=c.progress)
        self.adaptor.train()
        self.discriminator.train()
        bce = nn.BCELoss()
        for _ in loop:
            idx = torch.randint(len(x), (c.batch_size,), generator=gen).numpy()
            aug, mask_s = self._synthesize(imgs_u8[idx], [fgs[i] for i in idx], rng)
            mask_s = mask_s.to(self.device)
            with autocast(self.device, c.amp):
                true_feats = self.adaptor(self._flat(x[idx])).float()
                fake_feats = self.adaptor(self._flat(aug.to(self.device))).float()

            # GAS: noise + gradient ascent with truncated projection (manifold variant)
            noise = torch.randn(true_feats.shape, generator=gen).to(self.device) * c.noise
            gaus = (true_feats.detach() + noise).requires_grad_(True)
            for step in range(c.ascent_steps + 1):
                scores = self.discriminator(torch.cat([true_feats, gaus]))
                true_scores, gaus_scores = scores[: len(true_feats)], scores[len(true_feats):]
                true_loss = bce(true_scores, torch.zeros_like(true_scores))
                gaus_loss = bce(gaus_scores, torch.ones_like(gaus_scores))
                if step == c.ascent_steps:
                    break
                grad = torch.autograd.grad(gaus_loss, [gaus], retain_graph=False)[0]
                with torch.no_grad():
                    gaus = gaus + c.ascent_lr * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
                    if (step + 1) % 5 == 0:
                        h = gaus - true_feats.detach()
                        h_norm = h.norm(dim=1, keepdim=True)
                        alpha = h_norm.clamp(c.radius, 2 * c.radius)
                        gaus = true_feats.detach() + alpha / (h_norm + 1e-10) * h
                gaus = gaus.detach().requires_grad_(True)
            bce_loss = true_loss + gaus_loss

            # LAS: focal loss on the hardest p fraction of the augmented image's patches
            fake_scores = self.discriminator(fake_feats).squeeze(1)
            if c.p > 0:
                dist = (fake_scores.detach() - mask_s) ** 2
                keep = dist >= torch.quantile(dist, c.p)
                fs, ms = fake_scores[keep], mask_s[keep]
            else:
                fs, ms = fake_scores, mask_s
            f_loss = focal_loss(fs, ms, c.focal_gamma)
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
        self.adaptor.eval()
        self.discriminator.eval()
        return {**loop.summary(), "textures": self.textures.description, "feature_dim": self.dim,
                "feature_scale": float(self.scale),
                "grid": list(self.grid)}

    def _score(self, x):
        n = len(x)
        with autocast(self.device, self.config.amp):
            s = self.discriminator(self.adaptor(self._flat(x))).float()
        patch = s.reshape(n, 1, *self.grid)
        maps = F.interpolate(patch, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.config.smoothing_sigma)
        return patch.flatten(1).max(1).values, maps

    def _state(self) -> dict:
        return {"adaptor": cpu_state(self.adaptor), "discriminator": cpu_state(self.discriminator),
                "scale": self.scale.detach().cpu()}

    def _load_state(self, state: dict) -> None:
        self.adaptor.load_state_dict(state["adaptor"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.scale = state["scale"].to(self.device)
        self.adaptor.eval()
        self.discriminator.eval()

    def _extra_meta(self) -> dict:
        return {"backbone": self.backbone_info}
