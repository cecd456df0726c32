"""EfficientAD-S (Batzner et al., WACV 2024): PDN teacher, student and autoencoder.

* Teacher: the small patch description network (PDN). Loaded from a published ``teacher_small.pth``
  when ``teacher_path`` is given. Offline (``teacher="generic"``, the default) it is distilled here
  from the default pretrained backbone's patch features (PatchCore-style, ``out_channels`` wide) on
  generic images (``generic_images``: an ImageNet/DTD folder when given, else scikit-image's pictures
  and generated textures), like the paper's ImageNet distillation: once per configuration, cached as
  its own artifact and shared by every category and episode; it never sees MVTec images.
  ``teacher="support"`` distils on the support images instead (a teacher that only knows normal
  images extrapolates on defects the way the student does, so it detects less; kept for comparison).
* Student: a PDN with twice the channels; the first half mimics the teacher with the hard-feature loss
  (mean of the squared differences above their 0.999 quantile), the second half mimics the autoencoder.
  The paper's ImageNet penalty (student output on natural images pushed to zero) draws from the same
  generic images (``penalty="generic"``, or "none").
* Autoencoder: reconstructs the teacher's output from a 1×1 bottleneck; its difference to the student's
  second half is the logical (global) map.
* Maps are normalised with the 0.9 / 0.995 quantiles measured on held-out good images (10% of the
  support; with too few images, the support itself, recorded) and combined as 0.5·local + 0.5·logical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_core.errors import FsadError
from fewshot_core.methods.generic_images import GenericImages, shared_generic_images
from fewshot_core.methods.training import (
    TrainedDetector,
    TrainLoop,
    autocast,
    backbone_extractor,
    config_hash,
    cpu_state,
    normalize,
    patch_embed,
)

# Generic teachers distilled in this process: key -> (state, meta); the artifact store keeps them across runs.
_TEACHERS: dict[str, tuple[dict, dict]] = {}

# PDN inputs use ImageNet statistics (as the published teacher was trained).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pdn_small(out_channels: int = 384) -> nn.Sequential:
    """EfficientAD-S patch description network (receptive field 33 px, no padding)."""
    return nn.Sequential(
        nn.Conv2d(3, 128, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(128, 256, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 256, 3), nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4),
    )


def pdn_output_size(image_size: int) -> int:
    """Side of the PDN's output grid: conv4, pool2, conv4, pool2, conv3, conv4 without padding."""
    s = (image_size - 3) // 2
    s = (s - 3) // 2
    return s - 2 - 3


class AutoEncoder(nn.Module):
    """EfficientAD's autoencoder; decoder sizes scale with the image size (paper values at 256 px)."""

    def __init__(self, image_size: int, out_channels: int, out_size: int):
        super().__init__()
        if image_size % 32 or image_size < 64:
            raise FsadError(f"efficientad image_size={image_size}: must be a multiple of 32 and >= 64; use e.g. 128 or 256")
        act = nn.ReLU(inplace=True)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), act, nn.Conv2d(32, 32, 4, 2, 1), act,
            nn.Conv2d(32, 64, 4, 2, 1), act, nn.Conv2d(64, 64, 4, 2, 1), act,
            nn.Conv2d(64, 64, 4, 2, 1), act, nn.Conv2d(64, 64, image_size // 32),
        )
        sizes = [max(2, round(s * image_size / 256)) for s in (3, 8, 15, 32, 63, 127)]
        layers: list[nn.Module] = []
        for s in sizes:
            layers += [nn.Upsample(size=s, mode="bilinear"), nn.Conv2d(64, 64, 4, 1, 2), nn.ReLU(inplace=True),
                       nn.Dropout(0.2)]
        layers += [nn.Upsample(size=out_size, mode="bilinear"), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(inplace=True),
                   nn.Conv2d(64, out_channels, 3, 1, 1)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@dataclass
class EfficientADConfig:
    image_size: int = 128  # paper: 256 (CPU default kept small)
    steps: int = 300  # paper: 70 000
    batch_size: int = 1  # paper: 1
    lr: float = 5e-4  # paper: 1e-4 over 70 000 steps; short budgets need larger steps
    weight_decay: float = 1e-5
    out_channels: int = 384
    hard_quantile: float = 0.999
    penalty: str = "generic"  # paper: ImageNet images; here generic images (see module doc), or "none"
    teacher_path: str | None = None  # published teacher_small.pth (ImageNet-normalised inputs)
    teacher: str = "generic"  # offline distillation data when no teacher_path: "generic" | "support"
    generic_dir: str | None = None  # ImageNet/DTD folder for the teacher and penalty; None: bundled pictures
    teacher_steps: int = 1500  # offline distillation steps (paper: 60 000 on ImageNet)
    teacher_batch: int = 8
    teacher_lr: float = 1e-3
    backbone: str = "tf_efficientnet_lite0"  # distillation target
    backbone_layers: tuple[int, ...] | None = None  # None: the feature store default (stride 8 + 16)
    backbone_weights: str = "auto"
    val_fraction: float = 0.1  # held-out good images for the map quantiles
    # CPU-sized caps: a PDN step costs ~2-6 s on two cores at 128 px (the paper's 70k steps are GPU work),
    # so the first bottle fit (teacher once + student) stays near 10 minutes and later ones near 6.
    time_budget_s: float | None = 360.0  # training (+ distillation with teacher="support")
    teacher_time_budget_s: float | None = 240.0  # the one-off generic distillation
    device: str | None = None
    amp: bool = True
    progress: bool = True
    threads: int | None = None
    score_batch: int = 8

    def __post_init__(self):
        if self.teacher not in ("generic", "support"):
            raise FsadError(f"efficientad teacher={self.teacher!r}: use 'generic' or 'support' (or teacher_path)")
        if self.penalty not in ("generic", "none"):
            raise FsadError(f"efficientad penalty={self.penalty!r}: use 'generic' or 'none'")


class EfficientAD(TrainedDetector):
    name = "efficientad"
    version = 2  # 2: generic-image teacher and penalty

    def __init__(self, config: EfficientADConfig | None = None, artifact_dir=None, **overrides):
        config = config or EfficientADConfig(**overrides)
        super().__init__(config, artifact_dir)
        c = config
        self.out_size = pdn_output_size(c.image_size)
        self._build()
        self.teacher_source = "published:" + str(c.teacher_path) if c.teacher_path else f"distilled:{c.teacher}"

    def _build(self) -> None:
        """Fresh networks (called again after seeding, so the initial weights follow the seed)."""
        c = self.config
        self.teacher = pdn_small(c.out_channels).to(self.device)
        self.student = pdn_small(2 * c.out_channels).to(self.device)
        self.ae = AutoEncoder(c.image_size, c.out_channels, self.out_size).to(self.device)
        self.register = {
            "t_mean": torch.zeros(1, c.out_channels, 1, 1), "t_std": torch.ones(1, c.out_channels, 1, 1),
            "q_st": torch.tensor([0.0, 1.0]), "q_ae": torch.tensor([0.0, 1.0]),
        }

    # ------------------------------------------------------------------ teacher
    def _load_teacher(self) -> None:
        path = self.config.teacher_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise FsadError(f"{path}: teacher weights not found; pass teacher_small.pth or leave teacher_path unset") from exc
        except Exception as exc:
            raise FsadError(f"{path}: cannot read teacher weights ({exc}); pass the PDN state dict teacher_small.pth") from exc
        if isinstance(state, nn.Module):
            state = state.state_dict()
        try:
            self.teacher.load_state_dict(state)
        except RuntimeError as exc:
            raise FsadError(f"{path}: not an EfficientAD-S teacher with {self.config.out_channels} channels "
                            f"({str(exc).splitlines()[0]}); use teacher_small.pth") from exc

    def _distill_teacher(self, draw, loop: TrainLoop) -> dict:
        """Train the PDN to regress backbone patch features (the paper distils WideResNet-101 on ImageNet).

        ``draw(extractor, info)`` returns a callable giving one batch (images, standardised targets).
        """
        c = self.config
        extractor, info = backbone_extractor(c.backbone, c.backbone_layers, c.backbone_weights, self.device)
        extractor = extractor.to(self.device).eval()
        next_batch = draw(extractor, info)
        opt = torch.optim.Adam(self.teacher.parameters(), lr=c.teacher_lr, weight_decay=c.weight_decay)
        self.teacher.train()
        for _ in loop:
            batch, tgt = next_batch()
            with autocast(self.device, c.amp):
                out = self.teacher(normalize(batch, IMAGENET_MEAN, IMAGENET_STD))
            loss = F.mse_loss(out.float(), tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.log(loss=loss.item())
        del extractor
        return {"backbone": info["name"], "layers": info["layers"], "weights": info["weights"],
                **{f"teacher_{k}": v for k, v in loop.summary().items()}}

    @torch.no_grad()
    def _targets(self, extractor, info, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        out = []
        for i in range(0, len(x), 8):
            with autocast(self.device, c.amp):
                feats = extractor(normalize(x[i:i + 8], info["mean"], info["std"]))
            emb = patch_embed([f.float() for f in feats], out_dim=c.out_channels)
            out.append(F.interpolate(emb, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False))
        return torch.cat(out)

    def _support_batches(self, x: torch.Tensor, gen: torch.Generator):
        """Distillation data = the support: targets once per image; augmentations move image and target together."""
        def draw(extractor, info):
            tg = self._targets(extractor, info, x)
            # channel standardisation, so every channel weighs the same in the regression
            tg = (tg - tg.mean(dim=(0, 2, 3), keepdim=True)) / (tg.std(dim=(0, 2, 3), keepdim=True) + 1e-6)

            def next_batch():
                idx = torch.randint(len(x), (max(4, self.config.batch_size),), generator=gen)
                return _augment_geometry(x[idx], tg[idx], gen)
            return next_batch
        return draw

    def _generic_batches(self, source: GenericImages, rng: np.random.Generator):
        """Distillation data = fresh generic crops every step, targets computed on the fly."""
        c = self.config

        def draw(extractor, info):
            probe = self._targets(extractor, info, source.batch(64, c.image_size, rng, self.device))
            mean, std = probe.mean(dim=(0, 2, 3), keepdim=True), probe.std(dim=(0, 2, 3), keepdim=True) + 1e-6

            def next_batch():
                x = source.batch(c.teacher_batch, c.image_size, rng, self.device)
                return x, (self._targets(extractor, info, x) - mean) / std
            return next_batch
        return draw

    def prepare_teacher(self) -> dict:
        """Distil (or load) the generic teacher now, e.g. once before starting parallel fits of a sweep."""
        if self.config.teacher_path or self.config.teacher != "generic":
            raise FsadError("efficientad prepare_teacher: only the generic teacher is shared; unset teacher_path")
        return self._generic_teacher()

    def _generic_teacher(self) -> dict:
        """The category-agnostic teacher: loaded from memory or the artifact store, else distilled once.

        Its own seed (0) and a forked RNG: whether it was cached or trained must not change the episode's
        random draws that follow.
        """
        c = self.config
        spec = {"kind": "efficientad-teacher", "version": 1, "image_size": c.image_size,
                "out_channels": c.out_channels, "steps": c.teacher_steps, "batch": c.teacher_batch,
                "lr": c.teacher_lr, "weight_decay": c.weight_decay, "backbone": c.backbone,
                "layers": list(c.backbone_layers) if c.backbone_layers else None,
                "weights": c.backbone_weights, "generic_dir": c.generic_dir,
                "time_budget_s": c.teacher_time_budget_s}  # a cap that stops early makes another teacher
        key = config_hash(spec)
        hit = _TEACHERS.get(key)
        if hit is None and self.store is not None:
            hit = self.store.load("efficientad-teacher", key, map_location="cpu")
        if hit is None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                self.teacher = pdn_small(c.out_channels).to(self.device)
                source = shared_generic_images(c.generic_dir)
                loop = TrainLoop(c.teacher_steps, c.teacher_time_budget_s, desc="efficientad:generic-teacher",
                                 progress=c.progress)
                meta = {"source": "distilled:generic", "images": source.description, "key": key,
                        **self._distill_teacher(self._generic_batches(source, np.random.default_rng(0)), loop)}
            hit = (cpu_state(self.teacher), meta)
            if self.store is not None:
                self.store.save("efficientad-teacher", key, hit[0], hit[1])
        _TEACHERS[key] = hit
        self.teacher.load_state_dict(hit[0])
        return dict(hit[1])

    # ------------------------------------------------------------------ training
    def _forward_parts(self, x):
        xn = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        t = (self.teacher(xn) - self.register["t_mean"]) / self.register["t_std"]
        return xn, t

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        c = self.config
        self._build()
        info: dict = {}
        n_val = round(len(x) * c.val_fraction) if len(x) >= 10 else 0
        perm = torch.randperm(len(x), generator=gen)
        x_val, x_train = x[perm[:n_val]], x[perm[n_val:]]
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))

        t0 = time.perf_counter()
        if c.teacher_path:
            self._load_teacher()
            info["teacher"] = {"source": "published", "path": str(c.teacher_path)}
        elif c.teacher == "generic":
            info["teacher"] = self._generic_teacher()
            t0 = time.perf_counter()  # the shared one-off distillation is not this fit's training time
        else:
            tloop = TrainLoop(c.teacher_steps, c.time_budget_s and c.time_budget_s / 3, desc="efficientad:teacher",
                              progress=c.progress)
            info["teacher"] = {"source": "distilled:support", **self._distill_teacher(self._support_batches(x_train, gen), tloop)}
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

        with torch.no_grad():  # teacher channel normalisation (paper: over the training images)
            outs = torch.cat([self.teacher(normalize(x_train[i:i + 8], IMAGENET_MEAN, IMAGENET_STD))
                              for i in range(0, len(x_train), 8)])
            self.register["t_mean"] = outs.mean(dim=(0, 2, 3), keepdim=True)
            self.register["t_std"] = outs.std(dim=(0, 2, 3), keepdim=True) + 1e-6
        self.register = {k: v.to(self.device) for k, v in self.register.items()}

        remaining = None if c.time_budget_s is None else max(1.0, c.time_budget_s - (time.perf_counter() - t0))
        loop = TrainLoop(c.steps, remaining, desc="efficientad", progress=c.progress)
        params = list(self.student.parameters()) + list(self.ae.parameters())
        opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * c.steps)), gamma=0.1)
        C = c.out_channels
        penalty_images = shared_generic_images(c.generic_dir) if c.penalty == "generic" else None
        self.student.train()
        self.ae.train()
        for _ in loop:
            idx = torch.randint(len(x_train), (c.batch_size,), generator=gen)
            img = x_train[idx]
            img_ae = _augment_colour(img, gen)
            with autocast(self.device, c.amp):
                with torch.no_grad():
                    _, t = self._forward_parts(img)
                    xa, t_ae = self._forward_parts(img_ae)
                s = self.student(normalize(img, IMAGENET_MEAN, IMAGENET_STD))
                dist = (t.float() - s[:, :C].float()) ** 2
                d_hard = torch.quantile(dist.flatten()[: 2**24], c.hard_quantile)
                loss_hard = dist[dist >= d_hard].mean()
                loss_pen = torch.zeros((), device=self.device)
                if penalty_images is not None:
                    pen = penalty_images.batch(c.batch_size, c.image_size, rng, self.device)
                    s_pen = self.student(normalize(pen, IMAGENET_MEAN, IMAGENET_STD))
                    loss_pen = (s_pen[:, :C].float() ** 2).mean()
                ae_out = self.ae(xa).float()
                s_ae = self.student(xa)[:, C:].float()
                loss_ae = ((t_ae.float() - ae_out) ** 2).mean()
                loss_stae = ((ae_out - s_ae) ** 2).mean()
                loss = loss_hard + loss_pen + loss_ae + loss_stae
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loop.log(loss=loss.item(), st=loss_hard.item(), ae=loss_ae.item(), stae=loss_stae.item())
        self.student.eval()
        self.ae.eval()

        # quantile normalisation of the two maps on held-out good images
        qsrc = x_val if len(x_val) else x_train
        with torch.no_grad():
            m_st, m_ae = zip(*(self._raw_maps(qsrc[i:i + 8]) for i in range(0, len(qsrc), 8)))
        m_st, m_ae = torch.cat(m_st).flatten().float(), torch.cat(m_ae).flatten().float()
        self.register["q_st"] = _quantiles(m_st)
        self.register["q_ae"] = _quantiles(m_ae)
        info["quantiles_from"] = f"held-out ({len(x_val)} images)" if len(x_val) else "support (too few images to hold out)"
        return {**loop.summary(), **info, "penalty": c.penalty}

    def _raw_maps(self, x):
        C = self.config.out_channels
        with autocast(self.device, self.config.amp):
            xn, t = self._forward_parts(x)
            s = self.student(xn)
            ae = self.ae(xn)
        map_st = ((t.float() - s[:, :C].float()) ** 2).mean(1)
        map_ae = ((ae.float() - s[:, C:].float()) ** 2).mean(1)
        return map_st, map_ae

    def _score(self, x):
        map_st, map_ae = self._raw_maps(x)
        q_st, q_ae = self.register["q_st"], self.register["q_ae"]
        map_st = 0.1 * (map_st - q_st[0]) / (q_st[1] - q_st[0] + 1e-12)
        map_ae = 0.1 * (map_ae - q_ae[0]) / (q_ae[1] - q_ae[0] + 1e-12)
        combined = 0.5 * map_st + 0.5 * map_ae
        scores = combined.flatten(1).max(1).values
        # the PDN output lacks a 4-px border (receptive field): pad, then back to image pixels
        maps = F.interpolate(F.pad(combined[:, None], (4, 4, 4, 4)), size=(x.shape[-2], x.shape[-1]),
                             mode="bilinear", align_corners=False)[:, 0]
        return scores, maps

    # ------------------------------------------------------------------ artifact
    def _state(self) -> dict:
        return {"teacher": cpu_state(self.teacher), "student": cpu_state(self.student), "ae": cpu_state(self.ae),
                "register": {k: v.detach().cpu() for k, v in self.register.items()}}

    def _load_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.student.load_state_dict(state["student"])
        self.ae.load_state_dict(state["ae"])
        self.register = {k: v.to(self.device) for k, v in state["register"].items()}
        for m in (self.teacher, self.student, self.ae):
            m.eval()

    def _extra_meta(self) -> dict:
        return {"teacher_source": self.teacher_source}


def _quantiles(values: torch.Tensor) -> torch.Tensor:
    v = values[torch.linspace(0, len(values) - 1, min(len(values), 2**24)).long()] if len(values) > 2**24 else values
    return torch.stack([torch.quantile(v, 0.9), torch.quantile(v, 0.995)])


def _augment_colour(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's AE augmentation: one of brightness / contrast / saturation, factor in [0.8, 1.2]."""
    factor = float(0.8 + 0.4 * torch.rand((), generator=gen))
    kind = int(torch.randint(3, (1,), generator=gen))
    if kind == 0:
        out = x * factor
    elif kind == 1:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - mean) * factor + mean
    else:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        out = (x - grey) * factor + grey
    return out.clamp(0, 1)


def _augment_geometry(x: torch.Tensor, target: torch.Tensor, gen: torch.Generator):
    """The same flip / 90° turn for images and their target maps (distillation on few images).

    The target of a turned image is taken as the turned target: the teacher learns turn-equivariant
    features, and the backbone runs once per image instead of once per step.
    """
    if torch.rand((), generator=gen) < 0.5:
        x, target = x.flip(-1), target.flip(-1)
    if torch.rand((), generator=gen) < 0.5:
        x, target = x.flip(-2), target.flip(-2)
    k = int(torch.randint(4, (1,), generator=gen))
    return torch.rot90(x, k, dims=(-2, -1)), torch.rot90(target, k, dims=(-2, -1))
