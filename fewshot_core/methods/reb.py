"""REB (Lyu et al.): DefectMaker self-supervised fine-tuning of the backbone, then LDKNN on its patch features.

Training (§3.1.2, §4.2): the ImageNet backbone gets a 7-way head (normal + 3 shapes × 2 fills) and is
fine-tuned end to end with cross-entropy on DefectMaker samples drawn from the good support images;
SGD with momentum and a cosine learning-rate decay (paper: lr 0.03, batch 1024, 300 iterations at
256 px; the CPU defaults are smaller, see ``REBConfig``). The fine-tuned network's stride-8/16 stages
then give PatchCore-style patch features of the support images; ``LDKNN`` (methods/ldknn.py) builds
the local-density memory bank from them and scores query patches. Maps: upsampled + σ=4 smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_core.methods.anomaly_map import to_image_maps
from fewshot_core.methods.defectmaker import CLASSES, DefectMaker, DefectMakerConfig
from fewshot_core.methods.training import (
    TrainedDetector,
    TrainLoop,
    autocast,
    cosine_lr,
    cpu_state,
    grad_scaler,
    normalize,
    patch_embed,
)


@dataclass
class REBConfig:
    image_size: int = 256  # paper: 256
    steps: int = 100  # paper: 300 iterations
    batch_size: int = 16  # paper: 1024 (accumulated)
    lr: float = 0.003  # paper: 0.03 at batch 1024; smaller for small batches
    momentum: float = 0.9
    weight_decay: float = 1e-4
    flip: bool = True  # random horizontal flips of the synthetic batch
    saliency_model: str | None = None  # TorchScript saliency net; None: foreground estimate
    backbone: str = "tf_efficientnet_lite0"
    backbone_layers: tuple[int, ...] | None = None  # None: the feature store default (stride 8 + 16)
    backbone_weights: str = "auto"
    patch_dim: int | None = None  # None: concatenated channels, as the feature store's default
    k: int = 5  # LDKNN neighbours
    ld_coef: float = 1.0
    coreset_ratio: float = 1.0  # REB: no coreset
    finetune: bool = True  # False: ImageNet weights + LDKNN (the paper's "LDKNN" ablation)
    time_budget_s: float | None = 540.0
    device: str | None = None
    amp: bool = True
    progress: bool = True
    threads: int | None = None
    score_batch: int = 8


class REB(TrainedDetector):
    name = "reb"
    version = 1

    def __init__(self, config: REBConfig | None = None, artifact_dir=None, **overrides):
        from fewshot_core.backbones import preprocess_config

        config = config or REBConfig(**overrides)
        super().__init__(config, artifact_dir)
        c = config
        self._build()
        cfg = preprocess_config(c.backbone)
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.maker = DefectMaker(DefectMakerConfig(), saliency_model=c.saliency_model)
        self.ldknn = None

    def _build(self) -> None:
        """The pretrained backbone with a fresh 7-way head (again after seeding: the head's init follows the seed)."""
        from fewshot_core.backbones import create_model

        c = self.config
        self.model = create_model(c.backbone, weights=c.backbone_weights, device=self.device)
        self.weights_info = self.model.fsad_weights
        self.model.reset_classifier(len(CLASSES))
        self.model.to(self.device)
        self._extractor = None

    def _extractor_of_model(self):
        from fewshot_core.backbones import FeatureExtractor

        if self._extractor is None:
            self.model.eval()
            self._extractor = FeatureExtractor(self.model, self.config.backbone_layers, self.config.backbone,
                                               self.weights_info)
        return self._extractor

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor) -> np.ndarray:
        """Fine-tuned backbone patch features [n, h, w, d] (float32, numpy) for LDKNN."""
        ext = self._extractor_of_model()
        out = []
        for i in range(0, len(x), 8):
            with autocast(self.device, self.config.amp):
                maps = ext(normalize(x[i:i + 8].to(self.device), self.mean, self.std))
            out.append(patch_embed([m.float() for m in maps], self.config.patch_dim).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy().astype(np.float32)

    def _finetune(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        c = self.config
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        imgs = list((x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
        fgs = [self.maker.foreground(im) for im in imgs]
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        scaler = grad_scaler(self.device, c.amp)
        loop = TrainLoop(c.steps, c.time_budget_s, desc="reb:defectmaker", progress=c.progress)
        for step in loop:
            cosine_lr(opt, [c.lr], step, c.steps)
            batch, _, labels = self.maker.batch(imgs, rng, c.batch_size, fgs=fgs)
            xb = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255)
            if c.flip:
                flip = torch.rand(len(xb), generator=gen) < 0.5
                xb[flip] = xb[flip].flip(-1)
            yb = torch.from_numpy(labels).to(self.device)
            with autocast(self.device, c.amp):
                logits = self.model(normalize(xb.to(self.device), self.mean, self.std))
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            acc = (logits.argmax(1) == yb).float().mean().item()
            loop.log(loss=loss.item(), acc=acc)
        self.model.eval()
        return loop.summary()

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        from fewshot_core.methods.ldknn import LDKNN

        c = self.config
        self._build()
        info = self._finetune(x, gen) if c.finetune and c.steps > 0 else {"steps": 0, "stopped_by": "finetune off"}
        self._extractor = None
        feats = self.patch_features(x)
        self.ldknn = LDKNN(k=c.k, ld_coef=c.ld_coef, coreset_ratio=c.coreset_ratio,
                           seed=int(torch.randint(2**31, (1,), generator=gen))).fit(feats)
        return {**info, "bank": int(len(self.ldknn.bank_)), "grid": list(feats.shape[1:3]),
                "feature_dim": int(feats.shape[-1])}

    def _score(self, x):
        scores, patch = self.ldknn.score(self.patch_features(x))
        maps = to_image_maps(patch, x.shape[-1])
        return torch.from_numpy(scores), torch.from_numpy(maps)

    def _state(self) -> dict:
        return {"model": cpu_state(self.model), "ldknn_params": dict(self.ldknn.get_params()),
                "ldknn": {k: torch.from_numpy(np.asarray(v)) for k, v in self.ldknn._state().items()}}

    def _load_state(self, state: dict) -> None:
        from fewshot_core.methods.ldknn import LDKNN

        self.model.load_state_dict(state["model"])
        self.model.eval()
        self._extractor = None
        self.ldknn = LDKNN(**state["ldknn_params"])
        self.ldknn._set_state({k: v.numpy() for k, v in state["ldknn"].items()})

    def _extra_meta(self) -> dict:
        return {"backbone": {"name": self.config.backbone, "weights": self.weights_info.to_dict()},
                "classes": list(CLASSES)}
