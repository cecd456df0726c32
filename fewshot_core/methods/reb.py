"""REB (Lyu et al.): DefectMaker self-supervised fine-tuning of the backbone, then LDKNN on its patch features.

Training (§3.1.2, §4.2): the ImageNet backbone gets a 7-way head (normal + 3 shapes × 2 fills) and is
fine-tuned end to end with cross-entropy on DefectMaker samples drawn from the good support images;
SGD with momentum and a cosine learning-rate decay (paper: lr 0.03, batch 1024, 300 iterations at
256 px; the CPU defaults are smaller, see ``REB``'s parameters). The fine-tuned network's stride-8/16 stages
then give PatchCore-style patch features of the support images; ``LDKNN`` (methods/ldknn.py) builds
the local-density memory bank from them and scores query patches. Maps: upsampled + σ=4 smoothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_core.backbones import TRAINED_DETECTOR_BACKBONE, FeatureExtractor, create_model, preprocess_config
from fewshot_core.checksums import sha256_file
from fewshot_core.methods.components.anomaly_map import to_image_maps
from fewshot_core.methods.components.backbone_features import patch_embed
from fewshot_core.methods.components.defectmaker import CLASSES, DefectMaker, DefectMakerConfig
from fewshot_core.methods.components.images import normalize
from fewshot_core.methods.components.training import TrainLoop, autocast, cosine_lr, cpu_state, grad_scaler, seeded
from fewshot_core.methods.ldknn import LDKNN
from fewshot_core.methods.trained import TrainedDetector


class REB(TrainedDetector):
    name = "reb"
    version = 2  # 2: the one save format (manifest + tensors + LDKNN arrays), parameters in __init__

    def __init__(self, image_size: int = 256,  # paper: 256
                 steps: int = 100,  # paper: 300 iterations
                 batch_size: int = 16,  # paper: 1024 (accumulated)
                 lr: float = 0.003,  # paper: 0.03 at batch 1024; smaller for small batches
                 momentum: float = 0.9,
                 weight_decay: float = 1e-4,
                 flip: bool = True,  # random horizontal flips of the synthetic batch
                 saliency_model: str | None = None,  # TorchScript saliency net; None: foreground estimate
                 backbone: str = TRAINED_DETECTOR_BACKBONE,
                 backbone_layers: tuple[int, ...] | None = None,  # None: the feature store default (stride 8 + 16)
                 backbone_weights: str = "auto",
                 patch_dim: int | None = None,  # None: concatenated channels, as the feature store's default
                 k: int = 5,  # LDKNN neighbours
                 ld_coef: float = 1.0,
                 coreset_ratio: float = 1.0,  # REB: no coreset
                 finetune: bool = True,  # False: ImageNet weights + LDKNN (the paper's "LDKNN" ablation)
                 time_budget_s: float | None = 540.0,
                 seed: int = 0):
        self.image_size = image_size
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.flip = flip
        self.saliency_model = saliency_model
        self.backbone = backbone
        self.backbone_layers = backbone_layers
        self.backbone_weights = backbone_weights
        self.patch_dim = patch_dim
        self.k = k
        self.ld_coef = ld_coef
        self.coreset_ratio = coreset_ratio
        self.finetune = finetune
        self.time_budget_s = time_budget_s
        self.seed = seed

    def provenance(self) -> dict:
        out = super().provenance()
        if self.saliency_model:
            out["saliency_model"] = {"path": str(self.saliency_model), "sha256": sha256_file(self.saliency_model)}
        return out

    def _setup(self) -> None:
        cfg = preprocess_config(self.backbone)
        self.mean_, self.std_ = tuple(cfg["mean"]), tuple(cfg["std"])
        self.maker_ = DefectMaker(DefectMakerConfig(), saliency_model=self.saliency_model)
        self.weights_ = self.weights_info()

    def _build(self) -> None:
        """The pretrained backbone with a fresh 7-way head (inside the fit's seeded scope: the head's init
        follows the seed)."""
        self.model_ = create_model(self.backbone, device=self.device_, weights_info=self.weights_)
        self.model_.reset_classifier(len(CLASSES))
        self.model_.to(self.device_)
        self._extractor = None

    def _extractor_of_model(self):
        if self._extractor is None:
            self.model_.eval()
            self._extractor = FeatureExtractor(self.model_, self.backbone_layers, self.backbone, self.weights_)
        return self._extractor

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor) -> np.ndarray:
        """Fine-tuned backbone patch features [n, h, w, d] (float32, numpy) for LDKNN."""
        ext = self._extractor_of_model()
        out = []
        for i in range(0, len(x), 8):
            with autocast(self.device_, self.runtime.amp):
                maps = ext(normalize(x[i:i + 8].to(self.device_), self.mean_, self.std_))
            out.append(patch_embed([m.float() for m in maps], self.patch_dim).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy().astype(np.float32)

    def _finetune(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        device, amp = self.device_, self.runtime.amp
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        imgs = list((x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
        fgs = [self.maker_.foreground(im) for im in imgs]
        self.model_.train()
        opt = torch.optim.SGD(self.model_.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        scaler = grad_scaler(device, amp)
        loop = TrainLoop(self.steps, self.time_budget_s, desc="reb:defectmaker", progress=self.runtime.progress)
        for step in loop:
            cosine_lr(opt, [self.lr], step, self.steps)
            batch, _, labels = self.maker_.batch(imgs, rng, self.batch_size, fgs=fgs)
            xb = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255)
            if self.flip:
                flip = torch.rand(len(xb), generator=gen) < 0.5
                xb[flip] = xb[flip].flip(-1)
            yb = torch.from_numpy(labels).to(device)
            with autocast(device, amp):
                logits = self.model_(normalize(xb.to(device), self.mean_, self.std_))
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            acc = (logits.argmax(1) == yb).float().mean().item()
            loop.log(loss=loss.item(), acc=acc)
        self.model_.eval()
        return loop.summary()

    def _ldknn(self, seed: int) -> LDKNN:
        # REB's own scoring: the whole-image maximum of the paper, not fsad's foreground default
        return LDKNN(k=self.k, ld_coef=self.ld_coef, coreset_ratio=self.coreset_ratio, foreground="none",
                     seed=seed).set_runtime(self.runtime)

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        self._build()
        info = self._finetune(x, gen) if self.finetune and self.steps > 0 else {"steps": 0, "stopped_by": "finetune off"}
        self._extractor = None
        feats = self.patch_features(x)
        self.ldknn_ = self._ldknn(int(torch.randint(2**31, (1,), generator=gen))).fit(feats)
        return {**info, "bank": int(len(self.ldknn_.bank_)), "grid": list(feats.shape[1:3]),
                "feature_dim": int(feats.shape[-1]), "classes": list(CLASSES)}

    def _score(self, x):
        scores, patch = self.ldknn_.score(self.patch_features(x))
        maps = to_image_maps(patch, x.shape[-1])
        return torch.from_numpy(scores), torch.from_numpy(maps)

    # ------------------------------------------------------------------ persistence
    def get_state(self) -> dict:
        state = super().get_state()
        state["info"]["ldknn_seed"] = int(self.ldknn_.seed)
        ldknn = self.ldknn_.get_state()["arrays"]
        return {**state, "tensors": {"model": cpu_state(self.model_)},
                "arrays": {f"ldknn.{k}": v for k, v in ldknn.items()}}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        with seeded(self.seed, self.device_):  # the head's init draws from the RNG; keep the caller's
            self._build()
        self.model_.load_state_dict(state["tensors"]["model"])
        self.model_.eval()
        self.ldknn_ = self._ldknn(int(state["info"]["ldknn_seed"]))
        self.ldknn_.set_state({"arrays": {k[len("ldknn."):]: v for k, v in state["arrays"].items()
                                          if k.startswith("ldknn.")}})
