"""P>M>F (Hu et al., CVPR 2022): pre-trained backbone > ProtoNet meta-training > per-episode fine-tuning.

The classifier is ProtoNet with a cosine head, ``logits = scale · cos(f(x), c_k)`` (scale 10 as in
hushell/pmf_cvpr22). Stages here:

* pre-training: the backbone asked for; by default (``default_backbone``) the paper's DINO ViT-S/16
  when its weights can be had and nothing else was asked for, otherwise the feature store's backbone
  (offline: the bundled default, EfficientNet-Lite2 ImageNet weights).
* meta-training (optional, ``meta_train_backbone``): ProtoNet episodes drawn from images of *other*
  categories, cosine loss, the evaluated category excluded before sampling.
* fine-tuning (``PMF.fit``): augmented support images act as pseudo-queries against the support's
  prototypes, a few Adam steps on the whole backbone. The learning rate comes from a small set by the
  reference implementation's rule: one image per class forms the prototypes, the remaining support
  images are held out, each candidate lr (and lr = 0, no fine-tuning) is tried from the same start and
  the best held-out score wins (strictly better than lr = 0). The score is *balanced* accuracy (the
  reference uses accuracy, the same thing on its balanced episodes): with 1 good : 5 bad shots plain
  accuracy rewards a collapsed backbone that calls everything anomalous. For the same reason the held-out images must cover at least two
  classes. Otherwise (e.g. one shot per class) the reference keeps lr = 0 (``search_fallback="none"``,
  the default), or ``"augmented"`` scores the candidates on a fresh augmented draw of the support.
  Candidates are tried gentlest first (ties keep the smaller change), and a final fine-tuning that
  classifies its own support worse than the pretrained backbone is discarded as diverged
  (``fit_info_["reverted_lr"]``): a tiny held-out split can pick a rate that collapses the backbone.

Deviations, both for small CPU budgets: BatchNorm layers stay in eval mode (a 2-image batch would wreck
the running statistics), and steps are bounded by ``steps`` and by a wall-time budget
(``time_budget_s``, recorded in ``fit_info_``; hitting it makes the result depend on machine speed).
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_core.backbones import create_model, resolve_weights
from fewshot_core.backbones.models import DEFAULT_BACKBONE
from fewshot_core.errors import FsadError
from fewshot_core.methods.base import Classifier


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit embedding of a timm model (or the output of any other module)."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


def augment(x: torch.Tensor, gen: torch.Generator, prob: float = 0.9) -> torch.Tensor:
    """DiffAugment-style colour jitter + translation (≤ 1/8 of the side), drawn from ``gen``."""
    if float(torch.rand((), generator=gen)) >= prob:
        return x
    n = x.shape[0]
    # Random numbers come from the CPU generator (reproducible on any device), then move to x's device.
    r = lambda *s: torch.rand(*s, generator=gen, dtype=x.dtype).to(x.device)  # noqa: E731
    x = x + (r(n, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r(n, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - mean) * (r(n, 1, 1, 1) + 0.5) + mean  # contrast
    h, w = x.shape[-2:]
    max_dy, max_dx = h // 8, w // 8
    out = torch.zeros_like(x)
    for i in range(n):
        dy = int(torch.randint(-max_dy, max_dy + 1, (), generator=gen))
        dx = int(torch.randint(-max_dx, max_dx + 1, (), generator=gen))
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def _prototypes(feats: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    onehot = F.one_hot(y, n_classes).to(feats.dtype)  # [n, C]
    return (onehot.T @ feats) / onehot.sum(0)[:, None]


def cosine_logits(feats: torch.Tensor, protos: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(feats, dim=1) @ F.normalize(protos, dim=1).T


def _freeze_bn(model: nn.Module) -> nn.Module:
    model.eval()  # BN uses running statistics; gradients still flow to every weight
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _steps(model, x_proto, y_proto, x_pseudo, y_pseudo, n_classes, lr, steps, scale, gen, aug_prob, deadline):
    """Adam steps of the P>M>F loss: prototypes from ``x_proto``, augmented ``x_pseudo`` as queries."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    done = 0
    for _ in range(steps):
        if time.perf_counter() > deadline:
            break
        z = augment(x_pseudo, gen, aug_prob)
        protos = _prototypes(embed(model, x_proto), y_proto, n_classes)
        loss = F.cross_entropy(cosine_logits(embed(model, z), protos, scale), y_pseudo)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    return done


PAPER_BACKBONE = "vit_small_patch16_224.dino"  # P>M>F's pre-training: DINO ViT-S/16, 224 px


@functools.cache  # one probe per process: offline it costs a failed connect
def paper_backbone_available() -> bool:
    """Whether DINO ViT-S weights can be had (local timm/HF cache, or a download when online)."""
    try:
        resolve_weights(PAPER_BACKBONE, "auto")
        return True
    except FsadError:
        return False


def default_backbone(store_backbone: str | None, weights_given: bool = False) -> str | None:
    """The paper's DINO ViT-S/16 when nothing else was asked for (no weights, the store on the default
    backbone) and its weights can be had; otherwise the feature store's backbone (offline: the bundled default)."""
    if not weights_given and store_backbone == DEFAULT_BACKBONE and paper_backbone_available():
        return PAPER_BACKBONE
    return store_backbone


@functools.lru_cache(maxsize=2)
def _pretrained_model(name: str, weights: str, device: str) -> nn.Module:
    """The pre-trained backbone, loaded once per process; never modified (fine-tuning works on copies)."""
    return create_model(name, weights=weights, device=device)


class PMF(Classifier):
    """Fine-tuning ProtoNet over images. ``fit(images [n,3,H,W], labels)``, ``predict_proba(images)``.

    ``backbone``: a timm name (its pre-trained weights from ``weights``) or a ready ``nn.Module``;
    ``image_size``: the input size (None: 224 for the paper's ViT, whose patch grid is fixed by its
    checkpoint, 128 for CNNs).
    """

    name = "pmf"
    input_kind = "images"

    def __init__(
        self,
        backbone: str | nn.Module | None = None,
        weights: str = "auto",
        image_size: int | None = None,
        steps: int = 20,
        search_steps: int | None = None,
        lr_candidates: Iterable[float] = (1e-2, 1e-3, 1e-4),
        scale: float = 10.0,
        aug_prob: float = 0.9,
        time_budget_s: float = 120.0,
        search_fallback: str = "none",
        seed: int = 0,
        batch_size: int = 32,
    ):
        if search_fallback not in ("none", "augmented"):
            raise ValueError(f"search_fallback must be 'none' or 'augmented', got {search_fallback!r}")
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.steps = steps
        self.search_steps = search_steps
        self.lr_candidates = lr_candidates
        self.scale = scale
        self.aug_prob = aug_prob
        self.time_budget_s = time_budget_s
        self.search_fallback = search_fallback
        self.seed = seed
        self.batch_size = batch_size

    @property
    def backbone_name(self) -> str | None:
        """The ``backbone`` parameter when it is a timm name; None for a module passed in."""
        return self.backbone if isinstance(self.backbone, str) else None

    @classmethod
    def protocol_params(cls, params: dict, *, store_backbone: str | None = None, preloaded: bool = False) -> dict:
        """No backbone given: the paper's, or the feature store's (``default_backbone``)."""
        if "backbone" in params:
            return params
        return {**params, "backbone": default_backbone(store_backbone, "weights" in params or preloaded)}

    @property
    def input_size(self) -> int:
        """The square input resolution the images must be preprocessed to."""
        if self.image_size:
            return int(self.image_size)
        return 224 if self.backbone == PAPER_BACKBONE else 128

    def _pretrained(self) -> nn.Module:
        if isinstance(self.backbone, nn.Module):
            return self.backbone
        if not self.backbone:
            raise FsadError("pmf: no backbone; pass backbone=<timm name> (the protocol uses the store's)")
        return _pretrained_model(self.backbone, str(self.weights), str(self.runtime.torch_device()))

    @torch.no_grad()
    def _embed_batched(self, model, x):
        return torch.cat([embed(model, x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])

    def _accuracy(self, model, x_proto, y_proto, x_eval, y_eval, n_classes) -> float:
        """Balanced accuracy: the mean over held-out classes of their recall."""
        protos = _prototypes(self._embed_batched(model, x_proto), y_proto, n_classes)
        hit = (cosine_logits(self._embed_batched(model, x_eval), protos, self.scale).argmax(1) == y_eval).float()
        return float(torch.stack([hit[y_eval == c].mean() for c in torch.unique(y_eval)]).mean())

    def fit(self, images: torch.Tensor, labels) -> "PMF":
        backbone = self._pretrained()
        steps = int(self.steps)
        search_steps = steps if self.search_steps is None else int(self.search_steps)
        lr_candidates = tuple(float(v) for v in self.lr_candidates)
        x = torch.as_tensor(images, dtype=torch.float32).to(next(backbone.parameters()).device)
        labels = np.asarray(labels)
        if x.ndim != 4 or len(x) != len(labels):
            raise ValueError(f"expected images [n, 3, H, W] and labels [n], got {tuple(x.shape)}, {labels.shape}")
        self.classes_ = np.unique(labels)
        n_classes = len(self.classes_)
        y = torch.from_numpy(np.searchsorted(self.classes_, labels).astype(np.int64)).to(x.device)
        gen = torch.Generator().manual_seed(self.seed)
        start = time.perf_counter()
        deadline = start + float(self.time_budget_s)

        # lr search (reference rule): one image per class -> prototypes, the rest -> held-out.
        rng = np.random.default_rng(self.seed)
        y_np = y.cpu().numpy()
        proto_idx = np.array([rng.choice(np.flatnonzero(y_np == c)) for c in range(n_classes)])
        rest = np.setdiff1d(np.arange(len(y)), proto_idx)
        x_p, y_p = x[proto_idx], y[proto_idx]
        if len(np.unique(y_np[rest])) >= 2:
            x_eval, y_eval, p_x, p_y = x[rest], y[rest], x_p, y_p
        elif self.search_fallback == "augmented":
            eval_gen = torch.Generator().manual_seed(self.seed + 1)
            x_eval, y_eval, p_x, p_y = augment(x, eval_gen, prob=1.0), y, x, y
        else:
            x_eval = None
        scores = {}
        best_lr = 0.0
        if x_eval is not None and lr_candidates:
            model = _freeze_bn(copy.deepcopy(backbone))
            best = scores[0.0] = self._accuracy(model, p_x, p_y, x_eval, y_eval, n_classes)
            # gentlest first: on a tie (tiny held-out sets tie often) the smaller change to the backbone wins
            for lr in sorted(lr_candidates):
                model = _freeze_bn(copy.deepcopy(backbone))
                _steps(model, p_x, p_y, p_x, p_y, n_classes, lr, search_steps, self.scale, gen,
                       self.aug_prob, deadline)
                scores[lr] = self._accuracy(model, p_x, p_y, x_eval, y_eval, n_classes)
                if scores[lr] > best:
                    best, best_lr = scores[lr], lr
                if time.perf_counter() > deadline:
                    break

        model = _freeze_bn(copy.deepcopy(backbone))
        done, reverted = 0, None
        if best_lr > 0:
            done = _steps(model, x, y, x, y, n_classes, best_lr, steps, self.scale, gen, self.aug_prob, deadline)
            # A fine-tuning that sorts its own support worse than the pretrained backbone did has diverged
            # (the tiny held-out split cannot always tell): keep the pretrained backbone.
            if self._accuracy(model, x, y, x, y, n_classes) < self._accuracy(backbone, x, y, x, y, n_classes):
                model, reverted, best_lr = _freeze_bn(copy.deepcopy(backbone)), best_lr, 0.0
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_ = model
        self.prototypes_ = _prototypes(self._embed_batched(model, x), y, n_classes)
        self.fit_info_ = {
            "lr": best_lr, "lr_scores": {str(k): v for k, v in scores.items()}, "steps_done": done,
            "reverted_lr": reverted,
            "seconds": round(time.perf_counter() - start, 2), "budget_hit": time.perf_counter() > deadline,
        }
        self.fitted_ = True
        return self

    def decision_function(self, images) -> np.ndarray:
        x = torch.as_tensor(images, dtype=torch.float32).to(self.prototypes_.device)
        return cosine_logits(self._embed_batched(self.model_, x), self.prototypes_, self.scale).double().cpu().numpy()

    def predict_log_proba(self, images) -> np.ndarray:
        z = self.decision_function(images)
        return z - np.logaddexp.reduce(z, axis=1, keepdims=True)

    def provenance(self) -> dict:
        if not isinstance(self.backbone, str):
            return {"backbone": self.backbone_name}
        return {"backbone": self.backbone, "weights": resolve_weights(self.backbone, self.weights).to_dict(),
                "image_size": self.input_size}

    def get_state(self) -> dict:
        return {"tensors": {"model": self.model_.state_dict(), "prototypes": self.prototypes_.cpu()},
                "arrays": {"classes": np.asarray(self.classes_).astype(str)}, "info": self.fit_info_}

    def set_state(self, state: dict) -> None:
        model = copy.deepcopy(self._pretrained())
        model.load_state_dict(state["tensors"]["model"])
        self.model_ = model.eval()
        for p in self.model_.parameters():
            p.requires_grad_(False)
        self.prototypes_ = state["tensors"]["prototypes"].to(next(self.model_.parameters()).device)
        self.classes_ = np.asarray(state["arrays"]["classes"])
        self.fit_info_ = dict(state.get("info") or {})


def meta_train_backbone(
    backbone: nn.Module,
    pool: Mapping[str, tuple[torch.Tensor, np.ndarray]],
    exclude: str | Iterable[str],
    steps: int = 50,
    lr: float = 1e-4,
    shots: int = 2,
    queries: int = 2,
    scale: float = 10.0,
    time_budget_s: float = 300.0,
    seed: int = 0,
) -> nn.Module:
    """The optional "M" stage: ProtoNet episodes (cosine loss) from other categories' images.

    ``pool`` maps category -> (preprocessed images [n,3,H,W], labels [n]); ``exclude`` is dropped
    before anything is read. Returns a fine-tuned copy with ``trained_on`` listing the categories used.
    """
    excluded = {exclude} if isinstance(exclude, str) else set(exclude)
    if not excluded:
        raise ValueError("meta_train_backbone needs the evaluated category in `exclude`")
    cats = sorted(c for c in pool.keys() if c not in excluded)
    data = {c: (torch.as_tensor(pool[c][0], dtype=torch.float32), np.asarray(pool[c][1]).astype(str)) for c in cats}
    data = {c: v for c, v in data.items() if (np.unique(v[1], return_counts=True)[1] >= shots + 1).sum() >= 2}
    if not data:
        raise FsadError("pmf: no other category with two classes of enough images to meta-train on; "
                        "add categories to the pool or skip meta-training")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _freeze_bn(copy.deepcopy(backbone))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    deadline = time.perf_counter() + time_budget_s
    names = list(data)
    done = 0
    for _ in range(steps):
        if time.perf_counter() > deadline:
            break
        x, y = data[names[int(rng.integers(len(names)))]]
        classes = [c for c, k in zip(*np.unique(y, return_counts=True)) if k >= shots + 1]
        s_idx, s_lab, q_idx, q_lab = [], [], [], []
        for pos, c in enumerate(classes):
            idx = rng.permutation(np.flatnonzero(y == c))
            s_idx += idx[:shots].tolist(); s_lab += [pos] * shots
            q = idx[shots : shots + queries].tolist(); q_idx += q; q_lab += [pos] * len(q)
        protos = _prototypes(embed(model, x[s_idx]), torch.tensor(s_lab), len(classes))
        logits = cosine_logits(embed(model, augment(x[q_idx], gen)), protos, scale)
        loss = F.cross_entropy(logits, torch.tensor(q_lab))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.trained_on = tuple(names)
    model.meta_steps_done = done
    return model
