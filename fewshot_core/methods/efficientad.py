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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_core.backbones import TRAINED_DETECTOR_BACKBONE, resolve_weights
from fewshot_core.checksums import sha256_file
from fewshot_core.errors import FsadError
from fewshot_core.methods.base import Method
from fewshot_core.methods.components.backbone_features import backbone_extractor, patch_embed
from fewshot_core.methods.components.generic_images import shared_generic_images
from fewshot_core.methods.components.images import normalize
from fewshot_core.methods.components.persistence import cached_fit, config_hash
from fewshot_core.methods.components.training import TrainLoop, autocast, cpu_state, seeded
from fewshot_core.methods.trained import TrainedDetector

# Generic teachers of this process, by cache key: the state their artifact folder holds, read once.
_TEACHERS: dict[str, dict] = {}

# PDN inputs use ImageNet statistics (as the published teacher was trained).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHERS = ("generic", "support")
PENALTIES = ("generic", "none")


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


def check_image_size(image_size: int) -> None:
    if image_size % 32 or image_size < 64:
        raise FsadError(f"efficientad image_size={image_size}: must be a multiple of 32 and >= 64; use e.g. 128 or 256")


class AutoEncoder(nn.Module):
    """EfficientAD's autoencoder; decoder sizes scale with the image size (paper values at 256 px)."""

    def __init__(self, image_size: int, out_channels: int, out_size: int):
        super().__init__()
        check_image_size(image_size)
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


# ---------------------------------------------------------------------- teacher distillation

@torch.no_grad()
def _targets(extractor, info: dict, x: torch.Tensor, out_channels: int, out_size: int, amp: bool) -> torch.Tensor:
    """Backbone patch features of ``x`` at the PDN's output grid: what the teacher learns to regress."""
    out = []
    for i in range(0, len(x), 8):
        with autocast(x.device, amp):
            feats = extractor(normalize(x[i:i + 8], info["mean"], info["std"]))
        emb = patch_embed([f.float() for f in feats], out_dim=out_channels)
        out.append(F.interpolate(emb, size=(out_size, out_size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def _distill(teacher: nn.Module, extractor_spec: tuple, draw, loop: TrainLoop, lr: float, weight_decay: float,
             device: torch.device, amp: bool) -> dict:
    """Train the PDN to regress backbone patch features (the paper distils WideResNet-101 on ImageNet).

    ``extractor_spec`` = (backbone, layers, weights); ``draw(extractor, info)`` returns a callable giving
    one batch (images, standardised targets).
    """
    extractor, info = backbone_extractor(*extractor_spec, device)
    extractor = extractor.to(device).eval()
    next_batch = draw(extractor, info)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    teacher.train()
    for _ in loop:
        batch, tgt = next_batch()
        with autocast(device, amp):
            out = teacher(normalize(batch, IMAGENET_MEAN, IMAGENET_STD))
        loss = F.mse_loss(out.float(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop.log(loss=loss.item())
    del extractor
    return {"backbone": info["name"], "layers": info["layers"], "weights": info["weights"],
            **{f"teacher_{k}": v for k, v in loop.summary().items()}}


class GenericTeacher(Method):
    """The category-agnostic PDN teacher, distilled on generic images (never on the evaluated category).

    One per configuration: every EfficientAD fit with the same teacher parameters shares it, in memory and
    in ``<artifacts>/efficientad-teacher/<key>/`` (the one save format). Its own seed (0) and a scoped RNG:
    whether it was cached or distilled must not change the episode's random draws that follow.
    """

    name = "efficientad-teacher"
    version = 1

    def __init__(self, image_size: int = 128, out_channels: int = 384, steps: int = 1500, batch_size: int = 8,
                 lr: float = 1e-3, weight_decay: float = 1e-5, backbone: str = TRAINED_DETECTOR_BACKBONE,
                 backbone_layers: tuple[int, ...] | None = None, backbone_weights: str = "auto",
                 generic_dir: str | None = None, time_budget_s: float | None = 240.0):
        self.image_size = image_size
        self.out_channels = out_channels
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.backbone = backbone
        self.backbone_layers = backbone_layers
        self.backbone_weights = backbone_weights
        self.generic_dir = generic_dir
        self.time_budget_s = time_budget_s  # a cap that stops distillation early makes another teacher

    def provenance(self) -> dict:
        info = resolve_weights(self.backbone, self.backbone_weights)
        return {"backbone": self.backbone, "weights": {"source": info.source, "sha256": info.sha256}}

    def cache_key(self) -> str:
        return config_hash({"method": self.name, "version": self.version, "params": self.get_params(),
                            "provenance": self.provenance()})

    def _new_pdn(self) -> nn.Module:
        return pdn_small(self.out_channels).to(self.runtime.torch_device())

    def fit(self, X=None) -> "GenericTeacher":
        """Distil on generic images (``X`` is unused: the data is the generic image source)."""
        device = self.runtime.torch_device()
        source = shared_generic_images(self.generic_dir)
        out_size = pdn_output_size(self.image_size)
        rng = np.random.default_rng(0)

        def draw(extractor, info):  # fresh generic crops every step, targets computed on the fly
            probe = _targets(extractor, info, source.batch(64, self.image_size, rng, device), self.out_channels,
                             out_size, self.runtime.amp)
            mean, std = probe.mean(dim=(0, 2, 3), keepdim=True), probe.std(dim=(0, 2, 3), keepdim=True) + 1e-6

            def next_batch():
                x = source.batch(self.batch_size, self.image_size, rng, device)
                return x, (_targets(extractor, info, x, self.out_channels, out_size, self.runtime.amp) - mean) / std
            return next_batch

        with seeded(0, device):
            self.pdn_ = self._new_pdn()
            loop = TrainLoop(self.steps, self.time_budget_s, desc="efficientad:generic-teacher",
                             progress=self.runtime.progress)
            info = _distill(self.pdn_, (self.backbone, self.backbone_layers, self.backbone_weights), draw, loop,
                            self.lr, self.weight_decay, device, self.runtime.amp)
        self.fit_info_ = {"source": "distilled:generic", "images": source.description, "key": self.cache_key(),
                          **info}
        self.fitted_ = True
        return self

    def get_state(self) -> dict:
        return {"tensors": {"pdn": cpu_state(self.pdn_)}, "info": {"fit": self.fit_info_}}

    def set_state(self, state: dict) -> None:
        with seeded(0, self.runtime.torch_device()):  # module init draws from the RNG; keep the caller's
            self.pdn_ = self._new_pdn()
        self.pdn_.load_state_dict(state["tensors"]["pdn"])
        self.fit_info_ = dict(state["info"]["fit"])


def generic_teacher_state(teacher: GenericTeacher) -> dict:
    """``teacher``'s fitted state: from this process's memory, its artifact folder, or distilled once now."""
    key = teacher.cache_key()
    if key not in _TEACHERS:
        root = teacher.runtime.artifacts
        cached_fit(teacher, None if root is None else root / teacher.name / key, teacher.fit)
        _TEACHERS[key] = teacher.get_state()
    return _TEACHERS[key]


# ---------------------------------------------------------------------- the detector

class EfficientAD(TrainedDetector):
    name = "efficientad"
    version = 3  # 3: the one save format (manifest + tensors), parameters in __init__

    def __init__(self, image_size: int = 128,  # paper: 256 (CPU default kept small)
                 steps: int = 300,  # paper: 70 000
                 batch_size: int = 1,  # paper: 1
                 lr: float = 5e-4,  # paper: 1e-4 over 70 000 steps; short budgets need larger steps
                 weight_decay: float = 1e-5,
                 out_channels: int = 384,
                 hard_quantile: float = 0.999,
                 penalty: str = "generic",  # paper: ImageNet images; here generic images (module doc), or "none"
                 teacher_path: str | None = None,  # published teacher_small.pth (ImageNet-normalised inputs)
                 teacher: str = "generic",  # offline distillation data when no teacher_path: generic | support
                 generic_dir: str | None = None,  # ImageNet/DTD folder for teacher and penalty; None: bundled
                 teacher_steps: int = 1500,  # offline distillation steps (paper: 60 000 on ImageNet)
                 teacher_batch: int = 8,
                 teacher_lr: float = 1e-3,
                 backbone: str = TRAINED_DETECTOR_BACKBONE,  # distillation target
                 backbone_layers: tuple[int, ...] | None = None,  # None: the feature store default (stride 8 + 16)
                 backbone_weights: str = "auto",
                 val_fraction: float = 0.1,  # held-out good images for the map quantiles
                 # CPU-sized caps: a PDN step costs seconds on two cores at 128 px (the paper's 70k steps
                 # are GPU work), so a first bottle fit (teacher once + student) stays near 10 minutes.
                 time_budget_s: float | None = 360.0,  # training (+ distillation with teacher="support")
                 teacher_time_budget_s: float | None = 240.0,  # the one-off generic distillation
                 seed: int = 0):
        if teacher not in TEACHERS:
            raise FsadError(f"efficientad teacher={teacher!r}: use 'generic' or 'support' (or teacher_path)")
        if penalty not in PENALTIES:
            raise FsadError(f"efficientad penalty={penalty!r}: use 'generic' or 'none'")
        check_image_size(image_size)
        self.image_size = image_size
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.out_channels = out_channels
        self.hard_quantile = hard_quantile
        self.penalty = penalty
        self.teacher_path = teacher_path
        self.teacher = teacher
        self.generic_dir = generic_dir
        self.teacher_steps = teacher_steps
        self.teacher_batch = teacher_batch
        self.teacher_lr = teacher_lr
        self.backbone = backbone
        self.backbone_layers = backbone_layers
        self.backbone_weights = backbone_weights
        self.val_fraction = val_fraction
        self.time_budget_s = time_budget_s
        self.teacher_time_budget_s = teacher_time_budget_s
        self.seed = seed

    # ------------------------------------------------------------------ identity
    def teacher_source(self) -> str:
        return f"published:{self.teacher_path}" if self.teacher_path else f"distilled:{self.teacher}"

    def provenance(self) -> dict:
        out = {**super().provenance(), "teacher": {"source": self.teacher_source()}}
        if self.teacher_path:
            out["teacher"]["sha256"] = sha256_file(self._teacher_file())
        return out

    def _teacher_file(self):
        path = Path(self.teacher_path)
        if not path.is_file():
            raise FsadError(f"{path}: teacher weights not found; pass teacher_small.pth or leave teacher_path unset")
        return path

    # ------------------------------------------------------------------ networks
    def _setup(self) -> None:
        self.out_size_ = pdn_output_size(self.image_size)

    def _build(self) -> None:
        """Fresh networks (inside the fit's seeded scope, so the initial weights follow the seed)."""
        C, d = self.out_channels, self.device_
        self.teacher_ = pdn_small(C).to(d)
        self.student_ = pdn_small(2 * C).to(d)
        self.ae_ = AutoEncoder(self.image_size, C, self.out_size_).to(d)
        self.register_ = {
            "t_mean": torch.zeros(1, C, 1, 1), "t_std": torch.ones(1, C, 1, 1),
            "q_st": torch.tensor([0.0, 1.0]), "q_ae": torch.tensor([0.0, 1.0]),
        }

    # ------------------------------------------------------------------ teacher
    def _load_teacher(self) -> None:
        path = self._teacher_file()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FsadError(f"{path}: cannot read teacher weights ({exc}); pass the PDN state dict teacher_small.pth") from exc
        if isinstance(state, nn.Module):
            state = state.state_dict()
        try:
            self.teacher_.load_state_dict(state)
        except RuntimeError as exc:
            raise FsadError(f"{path}: not an EfficientAD-S teacher with {self.out_channels} channels "
                            f"({str(exc).splitlines()[0]}); use teacher_small.pth") from exc

    def _generic_teacher_model(self) -> GenericTeacher:
        return GenericTeacher(self.image_size, self.out_channels, self.teacher_steps, self.teacher_batch,
                              self.teacher_lr, self.weight_decay, self.backbone, self.backbone_layers,
                              self.backbone_weights, self.generic_dir,
                              self.teacher_time_budget_s).set_runtime(self.runtime)

    def prepare_teacher(self) -> dict:
        """Distil (or load) the generic teacher now, e.g. once before starting parallel fits of a sweep."""
        if self.teacher_path or self.teacher != "generic":
            raise FsadError("efficientad prepare_teacher: only the generic teacher is shared; unset teacher_path")
        with self.runtime.thread_limit():
            return dict(generic_teacher_state(self._generic_teacher_model())["info"]["fit"])

    def _support_batches(self, x: torch.Tensor, gen: torch.Generator):
        """Distillation data = the support: targets once per image; augmentations move image and target together."""
        def draw(extractor, info):
            tg = _targets(extractor, info, x, self.out_channels, self.out_size_, self.runtime.amp)
            # channel standardisation, so every channel weighs the same in the regression
            tg = (tg - tg.mean(dim=(0, 2, 3), keepdim=True)) / (tg.std(dim=(0, 2, 3), keepdim=True) + 1e-6)

            def next_batch():
                idx = torch.randint(len(x), (max(4, self.batch_size),), generator=gen)
                return _augment_geometry(x[idx], tg[idx], gen)
            return next_batch
        return draw

    # ------------------------------------------------------------------ training
    def _forward_parts(self, x):
        xn = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        t = (self.teacher_(xn) - self.register_["t_mean"]) / self.register_["t_std"]
        return xn, t

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        self._build()
        device, amp, progress = self.device_, self.runtime.amp, self.runtime.progress
        info: dict = {}
        n_val = round(len(x) * self.val_fraction) if len(x) >= 10 else 0
        perm = torch.randperm(len(x), generator=gen)
        x_val, x_train = x[perm[:n_val]], x[perm[n_val:]]
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))

        t0 = time.perf_counter()
        if self.teacher_path:
            self._load_teacher()
            info["teacher"] = {"source": "published", "path": str(self.teacher_path)}
        elif self.teacher == "generic":
            state = generic_teacher_state(self._generic_teacher_model())
            self.teacher_.load_state_dict(state["tensors"]["pdn"])
            info["teacher"] = dict(state["info"]["fit"])
            t0 = time.perf_counter()  # the shared one-off distillation is not this fit's training time
        else:
            tloop = TrainLoop(self.teacher_steps, self.time_budget_s and self.time_budget_s / 3,
                              desc="efficientad:teacher", progress=progress)
            info["teacher"] = {"source": "distilled:support", **_distill(
                self.teacher_, (self.backbone, self.backbone_layers, self.backbone_weights),
                self._support_batches(x_train, gen), tloop, self.teacher_lr, self.weight_decay, device, amp)}
        self.teacher_.eval()
        for p in self.teacher_.parameters():
            p.requires_grad_(False)

        with torch.no_grad():  # teacher channel normalisation (paper: over the training images)
            outs = torch.cat([self.teacher_(normalize(x_train[i:i + 8], IMAGENET_MEAN, IMAGENET_STD))
                              for i in range(0, len(x_train), 8)])
            self.register_["t_mean"] = outs.mean(dim=(0, 2, 3), keepdim=True)
            self.register_["t_std"] = outs.std(dim=(0, 2, 3), keepdim=True) + 1e-6
        self.register_ = {k: v.to(device) for k, v in self.register_.items()}

        budget = self.time_budget_s
        remaining = None if budget is None else max(1.0, budget - (time.perf_counter() - t0))
        loop = TrainLoop(self.steps, remaining, desc="efficientad", progress=progress)
        params = list(self.student_.parameters()) + list(self.ae_.parameters())
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * self.steps)), gamma=0.1)
        C = self.out_channels
        penalty_images = shared_generic_images(self.generic_dir) if self.penalty == "generic" else None
        self.student_.train()
        self.ae_.train()
        for _ in loop:
            idx = torch.randint(len(x_train), (self.batch_size,), generator=gen)
            img = x_train[idx]
            img_ae = _augment_colour(img, gen)
            with autocast(device, amp):
                with torch.no_grad():
                    _, t = self._forward_parts(img)
                    xa, t_ae = self._forward_parts(img_ae)
                s = self.student_(normalize(img, IMAGENET_MEAN, IMAGENET_STD))
                dist = (t.float() - s[:, :C].float()) ** 2
                d_hard = torch.quantile(dist.flatten()[: 2**24], self.hard_quantile)
                loss_hard = dist[dist >= d_hard].mean()
                loss_pen = torch.zeros((), device=device)
                if penalty_images is not None:
                    pen = penalty_images.batch(self.batch_size, self.image_size, rng, device)
                    s_pen = self.student_(normalize(pen, IMAGENET_MEAN, IMAGENET_STD))
                    loss_pen = (s_pen[:, :C].float() ** 2).mean()
                ae_out = self.ae_(xa).float()
                s_ae = self.student_(xa)[:, C:].float()
                loss_ae = ((t_ae.float() - ae_out) ** 2).mean()
                loss_stae = ((ae_out - s_ae) ** 2).mean()
                loss = loss_hard + loss_pen + loss_ae + loss_stae
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loop.log(loss=loss.item(), st=loss_hard.item(), ae=loss_ae.item(), stae=loss_stae.item())
        self.student_.eval()
        self.ae_.eval()

        # quantile normalisation of the two maps on held-out good images
        qsrc = x_val if len(x_val) else x_train
        with torch.no_grad():
            m_st, m_ae = zip(*(self._raw_maps(qsrc[i:i + 8]) for i in range(0, len(qsrc), 8)))
        m_st, m_ae = torch.cat(m_st).flatten().float(), torch.cat(m_ae).flatten().float()
        self.register_["q_st"] = _quantiles(m_st)
        self.register_["q_ae"] = _quantiles(m_ae)
        info["quantiles_from"] = f"held-out ({len(x_val)} images)" if len(x_val) else "support (too few images to hold out)"
        return {**loop.summary(), **info, "penalty": self.penalty}

    def _raw_maps(self, x):
        C = self.out_channels
        with autocast(self.device_, self.runtime.amp):
            xn, t = self._forward_parts(x)
            s = self.student_(xn)
            ae = self.ae_(xn)
        map_st = ((t.float() - s[:, :C].float()) ** 2).mean(1)
        map_ae = ((ae.float() - s[:, C:].float()) ** 2).mean(1)
        return map_st, map_ae

    def _score(self, x):
        map_st, map_ae = self._raw_maps(x)
        q_st, q_ae = self.register_["q_st"], self.register_["q_ae"]
        map_st = 0.1 * (map_st - q_st[0]) / (q_st[1] - q_st[0] + 1e-12)
        map_ae = 0.1 * (map_ae - q_ae[0]) / (q_ae[1] - q_ae[0] + 1e-12)
        combined = 0.5 * map_st + 0.5 * map_ae
        scores = combined.flatten(1).max(1).values
        # the PDN output lacks a 4-px border (receptive field): pad, then back to image pixels
        maps = F.interpolate(F.pad(combined[:, None], (4, 4, 4, 4)), size=(x.shape[-2], x.shape[-1]),
                             mode="bilinear", align_corners=False)[:, 0]
        return scores, maps

    # ------------------------------------------------------------------ persistence
    def get_state(self) -> dict:
        return {**super().get_state(), "tensors": {
            "teacher": cpu_state(self.teacher_), "student": cpu_state(self.student_), "ae": cpu_state(self.ae_),
            "register": {k: v.detach().cpu() for k, v in self.register_.items()}}}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        with seeded(self.seed, self.device_):  # module init draws from the RNG; keep the caller's
            self._build()
        tensors = state["tensors"]
        self.teacher_.load_state_dict(tensors["teacher"])
        self.student_.load_state_dict(tensors["student"])
        self.ae_.load_state_dict(tensors["ae"])
        self.register_ = {k: v.to(self.device_) for k, v in tensors["register"].items()}
        for m in (self.teacher_, self.student_, self.ae_):
            m.eval()


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
