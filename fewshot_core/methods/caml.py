"""CAML (Fifty et al., ICLR 2024): in-context few-shot classification over frozen embeddings.

Each query becomes one sequence ``[query ⊕ unknown-label ; support_i ⊕ ELMES(label_i) ...]`` that a
non-causal transformer encoder reads as a whole; an MLP head on the query position gives the logits.
The image encoder is frozen, so everything here works on cached global embeddings [n, D].

Two ways to get the sequence model:

* ``load_published_checkpoint(path)``: the authors' released weights (cfifty/CAML, ``model.pth`` of
  ``CAML_CLIP``): a plain ``state_dict`` of their ``CAML`` module, keys
  ``transformer_encoder.encoder.layers.encoder_layer_<i>.{ln_1,self_attention,ln_2,mlp.0,mlp.3}.*``,
  ``transformer_encoder.encoder.ln.*``, ``transformer_encoder.{unk_emb,elmes_scale,label_elmes,
  output_proj.weight}`` (``feature_extractor.*`` keys are ignored). Their encoder has no input
  projection, so the embeddings must be the ones it was trained on (CLIP ViT-B/16, 768-d: hidden 1024 =
  768 + 256 label dims); the number of ways is the checkpoint's (``label_elmes`` rows, 5 for the release).
  The head count is not stored in a state dict: pass ``num_heads`` (16 for their "large" encoder).
* ``meta_train(pool, exclude=...)``: offline meta-training on episodes drawn from cached embeddings of
  *other* categories (leave-the-evaluated-category-out). The evaluated category is dropped from the pool
  before any sampling, and the trained model records the categories it saw (``trained_on``).
  ``meta_train_or_load`` keeps the result as a saved CAML model folder (``methods/components/persistence.py``) under
  the runtime's artifact folder and reloads it instead of retraining.

An episode with C classes uses label vectors 0..C−1 and the first C logits; C above the model's
``num_ways`` is refused.

Meta-training episodes are randomly rotated (``MetaTrainConfig.rotate``). The paper meta-trains on
large, varied datasets; a handful of categories (here generated ones) share their good-vs-defect
feature directions, and a model trained on them unrotated learns to score queries along those fixed
directions and to ignore the support labels, which fails on a new domain. Rotated, only the in-episode
geometry is informative, so the model must compare the query with the labelled support
(docs/benchmarks.md has the measurements behind these choices).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn

from fewshot_core.errors import FsadError
from fewshot_core.methods.base import Classifier
from fewshot_core.methods.components import persistence
from fewshot_core.methods.components.elmes import elmes

GOOD = "good"


@dataclass(frozen=True)
class CAMLConfig:
    """Sequence-model shape. ``proj_dim=None`` feeds raw embeddings (the published layout)."""

    feat_dim: int
    num_ways: int = 5
    label_dim: int = 32
    proj_dim: int | None = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    head_hidden: int = 64  # 0: a single bias-free linear layer (the published output_proj)
    elmes_seed: int = 0
    # "episode": L2-normalise, centre on the support mean, scale by the support's RMS spread, so a model
    # meta-trained on one domain reads another domain's (much tighter) clusters at the same scale.
    # Uses the support only, never the queries. "none": raw embeddings (the published model).
    normalise: str = "episode"

    @property
    def d_model(self) -> int:
        return (self.proj_dim or self.feat_dim) + self.label_dim


@dataclass(frozen=True)
class MetaTrainConfig:
    # Many-way comparison is learnt slowly; a few CPU minutes, once: the model is cached as an artifact.
    steps: int = 1500
    time_budget_s: float = 600.0
    lr: float = 3e-3  # learning to compare under random rotations is slow at smaller rates
    weight_decay: float = 1e-4
    episodes_per_step: int = 8
    max_shots: int = 10
    queries_per_class: int = 4
    binary_fraction: float = 0.5  # share of episodes relabelled good vs anomalous
    # Give every episode a fresh uniformly random orientation of the feature space (see
    # ``random_rotation``). Without it the input projection learns the few directions in which the
    # meta-training categories' defects lie and the model scores queries by those fixed directions
    # instead of comparing them with the support, so on a new domain its ranking ignores the labels.
    rotate: bool = True
    # Same number of shots for every class of an episode (drawn 1..max_shots per episode). With a
    # per-class count the model learns a count correction (label-only, it does not look at the images)
    # tuned to the meta-training domain, which over-corrects elsewhere. ``CAML`` balances test supports
    # to match.
    balanced_shots: bool = True
    # Classes per episode. "all": every class of the (binarised or not) category, up to ``num_ways``, as
    # CAML meta-trains on fixed N-way episodes. "random": 2..that many, uniformly: few episodes are then
    # many-way, and comparing a query with many labelled classes is learnt slowly.
    ways: str = "all"
    seed: int = 0

    def __post_init__(self):
        if self.ways not in ("all", "random"):
            raise ValueError(f"MetaTrainConfig.ways must be 'all' or 'random', got {self.ways!r}")


class CAMLSequenceModel(nn.Module):
    def __init__(self, cfg: CAMLConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Identity() if cfg.proj_dim is None else nn.Linear(cfg.feat_dim, cfg.proj_dim)
        if cfg.proj_dim is not None:
            # Norm-preserving on average for a random direction (a scaled random orthonormal map, as in
            # Johnson-Lindenstrauss): an episode's distances reach the encoder at the scale
            # ``normalise_episode`` gives them, comparable to the unit label vectors. PyTorch's default
            # init shrinks them by about sqrt(3 * feat_dim / proj_dim) (5-6x at 1280 -> 128).
            nn.init.orthogonal_(self.proj.weight, gain=float(np.sqrt(cfg.feat_dim / cfg.proj_dim)))
            nn.init.zeros_(self.proj.bias)
        # Fixed label vectors, stored as a frozen parameter so checkpoints carry them.
        self.label_elmes = nn.Parameter(
            torch.from_numpy(elmes(cfg.num_ways, cfg.label_dim, seed=cfg.elmes_seed)), requires_grad=False
        )
        self.elmes_scale = nn.Parameter(torch.ones(1))
        self.unk_emb = nn.Parameter(torch.zeros(1, 1, cfg.label_dim))  # learnable "unknown label"
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, cfg.mlp_dim, dropout=0.0, activation="gelu",
            layer_norm_eps=1e-6, batch_first=True, norm_first=True,
        )
        # No mask anywhere: every position attends to every other (non-causal).
        self.encoder = nn.TransformerEncoder(
            layer, cfg.num_layers, norm=nn.LayerNorm(cfg.d_model, eps=1e-6), enable_nested_tensor=False
        )
        if cfg.head_hidden:
            self.head = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, cfg.num_ways)
            )
        else:
            self.head = nn.Linear(cfg.d_model, cfg.num_ways, bias=False)
        self.trained_on: tuple[str, ...] = ()
        self.train_info: dict = {}  # how meta-training went (rotated, balanced shots, steps); {} if published

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor) -> torch.Tensor:
        """query [b, D], support [n, D], support_labels [n] in 0..num_ways-1 -> logits [b, num_ways]."""
        b, n = query.shape[0], support.shape[0]
        q = self.proj(query).unsqueeze(1)
        s = self.proj(support).unsqueeze(0).expand(b, n, -1)
        labels = (self.elmes_scale * self.label_elmes)[support_labels]  # [n, L]
        labels = torch.cat([self.unk_emb, labels.unsqueeze(0)], dim=1).expand(b, n + 1, -1)
        seq = torch.cat([torch.cat([q, s], dim=1), labels], dim=-1)
        return self.head(self.encoder(seq)[:, 0])


def normalise_episode(support: np.ndarray, query: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode == "none":
        return support, query
    if mode != "episode":
        raise ValueError(f"unknown normalise mode {mode!r}")
    s = support / np.maximum(np.linalg.norm(support, axis=1, keepdims=True), 1e-12)
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    centre = s.mean(0, keepdims=True)
    spread = np.sqrt(((s - centre) ** 2).sum(1).mean())
    # One support image (or identical ones) has no spread: keep the unit-sphere scale then.
    scale = spread if spread > 1e-6 else 1.0
    return (s - centre) / scale, (q - centre) / scale


# QR of a tall, thin episode matrix is too small to share out: a second BLAS thread only waits for a busy
# core, and meta-training runs it every episode (docs/benchmarks.md, "Test suite time").
_BLAS = ThreadpoolController()


def random_rotation(rng: np.random.Generator, support: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The episode under a uniformly random rotation of R^D, at the cost of the episode's span only.

    A Haar rotation R maps an orthonormal basis B of the episode's span to a Haar-random orthonormal
    frame F, so R x = F B^T x for every x in the span: QR of D x m matrices (m <= episode size)
    instead of a D x D rotation per episode. Distances and angles inside the episode are unchanged.
    """
    X = np.concatenate([support, query]).astype(np.float64)
    with _BLAS.limit(limits=1, user_api="blas"):
        B, _ = np.linalg.qr(X.T)  # [D, m]
        F, r = np.linalg.qr(rng.standard_normal(B.shape))
    F = F * np.sign(np.diag(r))  # sign fix: makes F Haar-distributed
    Y = ((X @ B) @ F.T).astype(np.float32)
    return Y[: len(support)], Y[len(support):]


@functools.lru_cache(maxsize=2)
def haar_rotations(k: int, dim: int, seed: int) -> np.ndarray:
    """k uniformly random rotations of R^dim, float32 [k, dim, dim], fixed by the seed (cached)."""
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((k, dim, dim), dtype=np.float32)
    for i in range(k):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen))  # torch: ~0.1 s at 1280, numpy's is slower
        out[i] = (q * torch.sign(torch.diagonal(r))).numpy()
    out.flags.writeable = False
    return out


class CAML(Classifier):
    """Estimator: ``meta_fit(pool, exclude)`` (or a published ``checkpoint``) gives the sequence model;
    ``fit(X, y)`` stores an episode's support, ``predict_log_proba`` runs the sequence model.

    ``sequence_model``: an already meta-trained ``CAMLSequenceModel`` (None: from ``checkpoint`` or
    ``meta_fit``). ``model`` / ``train``: ``CAMLConfig`` (without ``feat_dim``) and ``MetaTrainConfig``
    fields for ``meta_fit``.

    ``rotations``: average the log-probabilities over this many seeded random rotations of the
    episode (``random_rotation``). A model meta-trained on rotated episodes is invariant to the
    orientation only approximately; averaging removes most of what is left. ``None``: 8 for such a
    model, 0 otherwise (the published checkpoint reads raw CLIP coordinates and must not be rotated).

    ``balance_support``: repeat every shot of a smaller class ceil(largest / its count) times, so that the
    classes weigh (about) the same in attention, as in the balanced episodes the model
    was meta-trained on (``MetaTrainConfig.balanced_shots``). ``None``: on for such a model.
    """

    name = "caml"
    input_kind = "embeddings"
    # 5: the one model-folder format (earlier: episodes rotated, balanced shots, all ways per episode)
    version = 5

    def __init__(self, sequence_model: CAMLSequenceModel | None = None, checkpoint: str | None = None,
                 num_heads: int = 16, model: dict | None = None, train: dict | None = None, batch_size: int = 256,
                 rotations: int | None = None, seed: int = 0, balance_support: bool | None = None):
        self.sequence_model = sequence_model
        self.checkpoint = checkpoint
        self.num_heads = num_heads
        self.model = model
        self.train = train
        self.batch_size = batch_size
        self.rotations = rotations
        self.seed = seed
        self.balance_support = balance_support

    def get_params(self) -> dict:
        # the sequence model is fitted state (saved with get_state), not a parameter a folder can hold
        return {**super().get_params(), "sequence_model": None}

    # --- the sequence model ----------------------------------------------------------------------
    def _sequence(self) -> CAMLSequenceModel:
        model = getattr(self, "sequence_model_", None)
        if model is None and self.sequence_model is not None:
            model = self.sequence_model
        if model is None and self.checkpoint:
            model = load_published_checkpoint(self.checkpoint, num_heads=int(self.num_heads))
        if model is None:
            raise FsadError("caml: needs a published checkpoint (param checkpoint=<model.pth>) or a meta-training "
                            "pool of other categories (meta_fit; from the CLI --meta-pool synthetic or "
                            "--meta-pool ROOT)")
        self.sequence_model_ = model.eval()
        return self.sequence_model_

    def meta_fit(self, pool: EmbeddingPool, exclude: str | Iterable[str], key_extra: dict | None = None) -> "CAML":
        """Meta-train the sequence model on ``pool`` without the ``exclude`` categories (cached as an artifact
        under the runtime's artifact folder, keyed by configuration and data)."""
        feat_dim = next(iter(pool.values()))[0].shape[1]
        cfg = CAMLConfig(feat_dim=feat_dim, **(self.model or {}))
        train = MetaTrainConfig(**(self.train or {}))
        self.sequence_model_ = meta_train_or_load(pool, exclude=exclude, cfg=cfg, train=train,
                                                  cache_root=self.runtime.artifacts, key_extra=key_extra)
        return self

    @property
    def trained_on(self) -> tuple[str, ...]:
        return tuple(self._sequence().trained_on)

    def _effective(self) -> tuple[int, bool]:
        info = self._sequence().train_info
        rotations = (8 if info.get("rotated") else 0) if self.rotations is None else int(self.rotations)
        balance = bool(info.get("balanced_shots")) if self.balance_support is None else bool(self.balance_support)
        return rotations, balance

    # --- one episode -------------------------------------------------------------------------------
    def fit(self, X, y) -> CAML:
        model = self._sequence()
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or X.shape[1] != model.cfg.feat_dim:
            raise FsadError(
                f"caml: embeddings have shape {X.shape}, the sequence model expects dim {model.cfg.feat_dim}; "
                "use the backbone the model was trained (or published) with"
            )
        self.classes_ = np.unique(y)
        if not 2 <= len(self.classes_) <= model.cfg.num_ways:
            raise FsadError(
                f"caml: episode has {len(self.classes_)} classes, the model supports 2..{model.cfg.num_ways} "
                "ways; meta-train with a larger num_ways or use fewer classes"
            )
        labels = np.searchsorted(self.classes_, y)
        if self._effective()[1]:
            # Every shot of a class repeated the same number of times (not cyclically up to an exact
            # count): the prediction stays independent of the order of the support.
            counts = np.bincount(labels)
            idx = np.concatenate([np.repeat(np.flatnonzero(labels == c), -(-counts.max() // n))
                                  for c, n in enumerate(counts)])
            X, labels = X[idx], labels[idx]
        self.support_ = X
        self.support_labels_ = labels
        self.fitted_ = True
        return self

    @torch.no_grad()
    def _log_proba(self, support: np.ndarray, query: np.ndarray) -> np.ndarray:
        model = self._sequence()
        s = torch.from_numpy(np.ascontiguousarray(support, dtype=np.float32))
        lab = torch.from_numpy(self.support_labels_.astype(np.int64))
        out = []
        for i in range(0, len(query), self.batch_size):
            q = torch.from_numpy(np.ascontiguousarray(query[i : i + self.batch_size], dtype=np.float32))
            out.append(torch.log_softmax(model(q, s, lab)[:, : len(self.classes_)].double(), dim=1))
        return torch.cat(out).numpy()

    def predict_log_proba(self, X) -> np.ndarray:
        if getattr(self, "support_", None) is None:
            raise FsadError("caml: predict before fit; fit the episode's support first")
        support, query = normalise_episode(self.support_, np.asarray(X, dtype=np.float32),
                                           self._sequence().cfg.normalise)
        rotations = self._effective()[0]
        if not rotations:
            return self._log_proba(support, query)
        # Full D x D rotations fixed by the seed (not drawn from the episode's span): a query's
        # prediction depends on the support and that query only, never on the other queries.
        lp = np.mean([self._log_proba(support @ R.T, query @ R.T)
                      for R in haar_rotations(rotations, support.shape[1], self.seed)], axis=0)
        return lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)

    def decision_function(self, X) -> np.ndarray:
        return self.predict_log_proba(X)

    # --- persistence -------------------------------------------------------------------------------
    def get_state(self) -> dict:
        model = self._sequence()
        state = {"tensors": {"sequence_model": model.state_dict()},
                 "info": {"model": asdict(model.cfg), "trained_on": list(model.trained_on),
                          "train_info": model.train_info}}
        if getattr(self, "support_", None) is not None:
            state["arrays"] = {"support": self.support_, "support_labels": self.support_labels_,
                               "classes": np.asarray(self.classes_).astype(str)}
        return state

    def set_state(self, state: dict) -> None:
        info = state["info"]
        model = CAMLSequenceModel(CAMLConfig(**info["model"]))
        model.load_state_dict(state["tensors"]["sequence_model"])
        model.trained_on = tuple(info["trained_on"])
        model.train_info = info.get("train_info", {})
        self.sequence_model_ = model.eval()
        arrays = state.get("arrays") or {}
        if arrays:
            self.support_ = np.asarray(arrays["support"], dtype=np.float32)
            self.support_labels_ = np.asarray(arrays["support_labels"])
            self.classes_ = np.asarray(arrays["classes"])

    def is_fitted(self) -> bool:  # meta-fitted is enough to be saved (the meta-training cache)
        return getattr(self, "sequence_model_", None) is not None


# ---------------------------------------------------------------- meta-training (leave-category-out)

EmbeddingPool = Mapping[str, tuple[np.ndarray, np.ndarray]]  # category -> (X [n, D], labels [n] str)


def _excluded_pool(pool: EmbeddingPool, exclude: str | Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pool without the evaluated categories; only these entries are ever read afterwards."""
    excluded = {exclude} if isinstance(exclude, str) else set(exclude)
    if not excluded:
        raise ValueError("meta_train needs the evaluated category in `exclude` (leave-the-category-out)")
    kept = {}
    for cat in sorted(k for k in pool if k not in excluded):
        X, y = pool[cat]
        y = np.asarray(y).astype(str)
        if len(set(y.tolist())) >= 2:
            kept[cat] = (np.asarray(X, dtype=np.float32), y)
    return kept


def _sample_episode(rng: np.random.Generator, X: np.ndarray, y: np.ndarray, num_ways: int, tc: MetaTrainConfig):
    if rng.random() < tc.binary_fraction:
        y = np.where(y == GOOD, GOOD, "anomalous")
    names, counts = np.unique(y, return_counts=True)
    usable = names[counts >= 2]  # each class needs one support and one query at least
    if len(usable) < 2:
        return None
    most = min(len(usable), num_ways)
    ways = most if tc.ways == "all" else int(rng.integers(2, most + 1))
    chosen = rng.choice(usable, size=ways, replace=False)
    label_ids = rng.permutation(num_ways)[:ways]  # random class -> label-vector assignment
    s_idx, s_lab, q_idx, q_lab = [], [], [], []
    smallest = min(int((y == name).sum()) for name in chosen)
    k_all = int(rng.integers(1, min(tc.max_shots, smallest - 1) + 1))
    for pos, name in enumerate(chosen):
        idx = rng.permutation(np.flatnonzero(y == name))
        # Balanced: one k for the episode. Otherwise imbalance comes from a per-class k.
        k = k_all if tc.balanced_shots else int(rng.integers(1, min(tc.max_shots, len(idx) - 1) + 1))
        nq = min(tc.queries_per_class, len(idx) - k)
        s_idx += idx[:k].tolist(); s_lab += [pos] * k
        q_idx += idx[k : k + nq].tolist(); q_lab += [pos] * nq
    support, query = X[s_idx], X[q_idx]
    return support, label_ids[np.asarray(s_lab)], query, np.asarray(q_lab), label_ids


def meta_train(
    pool: EmbeddingPool,
    exclude: str | Iterable[str],
    cfg: CAMLConfig,
    train: MetaTrainConfig = MetaTrainConfig(),
) -> CAMLSequenceModel:
    """Meta-train the sequence model on episodes from every pool category except ``exclude``."""
    data = _excluded_pool(pool, exclude)
    if not data:
        raise FsadError(
            "caml: no other category with good and defective embeddings to meta-train on; "
            "add categories to the pool (e.g. fewshot_core.data.synth) or pass a published checkpoint"
        )
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    model = CAMLSequenceModel(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr,
                            weight_decay=train.weight_decay)
    # OneCycleLR divides by zero when its warm-up is exactly one step (10 steps at 10 %): no warm-up then,
    # as for any schedule shorter than 10 steps
    warmup = 0.1 if train.steps * 0.1 != 1.0 else 0.05
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=warmup)
    cats = list(data)
    start, steps_done, losses = time.perf_counter(), 0, []
    model.train()
    for _ in range(train.steps):
        if time.perf_counter() - start > train.time_budget_s:
            break
        loss = 0.0
        for _ in range(train.episodes_per_step):
            X, y = data[cats[int(rng.integers(len(cats)))]]
            ep = _sample_episode(rng, X, y, cfg.num_ways, train)
            if ep is None:
                continue
            s, s_lab, q, q_lab, label_ids = ep
            s, q = normalise_episode(s, q, cfg.normalise)
            if train.rotate:
                s, q = random_rotation(rng, s, q)
            logits = model(torch.from_numpy(q.astype(np.float32)), torch.from_numpy(s.astype(np.float32)),
                           torch.from_numpy(s_lab.astype(np.int64)))
            logits = logits[:, torch.from_numpy(label_ids.astype(np.int64))]  # only the episode's ways
            loss = loss + F.cross_entropy(logits, torch.from_numpy(q_lab.astype(np.int64)))
        if not torch.is_tensor(loss):
            continue
        opt.zero_grad()
        (loss / train.episodes_per_step).backward()
        opt.step()
        sched.step()
        steps_done += 1
        losses.append(float(loss.detach()) / train.episodes_per_step)
    model.eval()
    model.trained_on = tuple(cats)
    model.train_info = {
        "steps_done": steps_done,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "budget_hit": steps_done < train.steps,
        "rotated": train.rotate,  # CAML(...) averages over rotations at test time for such a model
        "balanced_shots": train.balanced_shots,  # and balances the support
    }
    return model


# ---------------------------------------------------------------- artifacts


def _fingerprint(data: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for cat in sorted(data):
        X, y = data[cat]
        h.update(cat.encode()); h.update(np.ascontiguousarray(X).tobytes())
        h.update("\0".join(np.asarray(y).astype(str).tolist()).encode())
    return h.hexdigest()


def _load_cached(directory: Path) -> CAMLSequenceModel | None:
    """The meta-trained sequence model cached in ``directory``, or None when absent or of an older layout
    (a cache: retrained, never misread)."""
    try:
        manifest = persistence.read_manifest(directory)
        if manifest.get("method") != CAML.name or manifest.get("method_version") != CAML.version:
            return None
        model = CAML()
        model.set_state(persistence.read_state(directory, manifest))
    except FsadError:
        return None
    return model.sequence_model_


def meta_train_or_load(
    pool: EmbeddingPool,
    exclude: str | Iterable[str],
    cfg: CAMLConfig,
    train: MetaTrainConfig,
    cache_root: Path | None,
    key_extra: dict | None = None,
) -> CAMLSequenceModel:
    """Reload the cached model for (config, training data, ``key_extra`` such as the backbone) or train it;
    ``cache_root`` None trains without caching."""
    data = _excluded_pool(pool, exclude)
    key_src = json.dumps(
        {"v": CAML.version, "model": asdict(cfg), "train": asdict(train),
         "data": _fingerprint(data), "extra": key_extra or {}},
        sort_keys=True,
    )
    directory = None if cache_root is None else (
        Path(cache_root) / "caml" / hashlib.sha256(key_src.encode()).hexdigest()[:16])
    if directory is not None and (model := _load_cached(directory)) is not None:
        return model
    model = meta_train(data, exclude=exclude, cfg=cfg, train=train)
    if directory is not None:
        est = CAML()
        est.sequence_model_ = model
        est.save(directory, extra={"key": json.loads(key_src)})
    return model


# ---------------------------------------------------------------- the published checkpoint


def load_published_checkpoint(path: str | Path, num_heads: int = 16) -> CAMLSequenceModel:
    """Load cfifty/CAML's released ``model.pth`` (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FsadError(f"{path}: CAML checkpoint not found; pass the path of the released model.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling problem is a bad file for the user
        raise FsadError(f"{path}: cannot read CAML checkpoint ({exc}); pass the released model.pth") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    prefix = "transformer_encoder."
    sd = {k.removeprefix("module.")[len(prefix):]: v for k, v in state.items()
          if k.removeprefix("module.").startswith(prefix)}
    if "label_elmes" not in sd or "output_proj.weight" not in sd:
        raise FsadError(f"{path}: not a CAML checkpoint (no transformer_encoder.label_elmes/output_proj); "
                        "pass the released CAML model.pth")
    num_ways, label_dim = sd["label_elmes"].shape
    hidden = sd["output_proj.weight"].shape[1]
    layer_ids = sorted({int(k.split(".")[2].removeprefix("encoder_layer_")) for k in sd if k.startswith("encoder.layers.")})
    mlp_dim = sd[f"encoder.layers.encoder_layer_{layer_ids[0]}.mlp.0.weight"].shape[0]
    cfg = CAMLConfig(feat_dim=hidden - label_dim, num_ways=num_ways, label_dim=label_dim, proj_dim=None,
                     num_layers=len(layer_ids), num_heads=num_heads, mlp_dim=mlp_dim, head_hidden=0,
                     normalise="none")
    rename = {"ln_1": "norm1", "self_attention": "self_attn", "ln_2": "norm2", "mlp.0": "linear1", "mlp.3": "linear2"}
    mapped = {"label_elmes": sd["label_elmes"], "elmes_scale": sd["elmes_scale"], "unk_emb": sd["unk_emb"],
              "head.weight": sd["output_proj.weight"], "encoder.norm.weight": sd["encoder.ln.weight"],
              "encoder.norm.bias": sd["encoder.ln.bias"]}
    for k, v in sd.items():
        if not k.startswith("encoder.layers."):
            continue
        _, _, layer, rest = k.split(".", 3)
        i = int(layer.removeprefix("encoder_layer_"))
        for old, new in rename.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        mapped[f"encoder.layers.{i}.{rest}"] = v
    model = CAMLSequenceModel(cfg)
    model.load_state_dict(mapped, strict=True)
    model.trained_on = ("published:cfifty/CAML",)
    return model.eval()
