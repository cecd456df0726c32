"""The supervised few-shot protocol (the thesis): labelled good + defective shots, classify the rest.

One episode (``fewshot_core.episodes.sample_supervised``) -> one row of metrics. Methods:

* ``protonet`` (``distance`` euclidean|cosine, ``temperature``) and ``caml`` on the store's global
  embeddings [n, D];
* ``pmf`` on images, re-read from the dataset and preprocessed for the store's backbone (fine-tuning
  needs pixels, not cached features);
* ``patchcore`` / ``ldknn`` (one-class, binary mode only) on the store's patch features, fitted on
  the *good* shots only. Their image score becomes a probability by a logistic calibration on the
  support (see ``OneClassAsSupervised``); the bad shots never enter the memory bank. AUROC does not
  depend on the calibration.

Binary AUROC ranks by the anomaly log-odds ``log P(not good) − log P(good)``, a monotone function of
1 − P(good) that does not saturate to ties when the probabilities round to 0 or 1.
"""

from __future__ import annotations

import functools

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from fewshot_core.data.records import GOOD
from fewshot_core.episodes import SupervisedEpisode, sample_supervised
from fewshot_core.errors import FsadError
from fewshot_core.methods import registry
from fewshot_core.methods.oneclass_classifier import OneClassClassifier
from fewshot_core.metrics.classification import classification_metrics, confusion

# ---------------------------------------------------------------- inputs and method construction


def _images(dataset, ids, backbone: str, image_size: int, cache: dict, preloaded: Mapping | None = None):
    """Preprocessed image tensors [n, 3, S, S] for P>M>F, decoded once per (backbone, size), or taken
    from ``preloaded`` (image id -> tensor) where the pixels are not on this machine."""
    import torch

    if preloaded is not None:
        return torch.stack([torch.as_tensor(preloaded[i]) for i in ids])
    from fewshot_core.backbones import build_transform
    from fewshot_core.data.imageio import load_rgb

    store = cache.setdefault(("images", backbone, image_size), {})
    missing = [i for i in ids if i not in store]
    if missing:
        transform = build_transform(backbone, image_size)
        for i in missing:
            store[i] = transform(load_rgb(dataset.by_id(i).path, max_side=4 * image_size))
    return torch.stack([store[i] for i in ids])


def caml_pool(pairs: Iterable[tuple]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Meta-training pool for CAML from (dataset, partition) pairs of *other* categories: every image's
    global embedding labelled ``good`` or its defect type."""
    pool = {}
    for dataset, partition in pairs:
        ids = [r.image_id for r in dataset.records]
        labels = np.array([GOOD if r.label == 0 else r.defect_type for r in dataset.records])
        pool[dataset.category] = (partition.global_(ids), labels)
    return pool


def _caml_model(dataset, partition, params: dict, cache: dict):
    from fewshot_core.methods.caml import CAMLConfig, MetaTrainConfig, load_published_checkpoint, meta_train_or_load
    from fewshot_core.paths import default_work_dir

    # The evaluated category is part of the key: a cache shared across categories (the pipeline's) must
    # never hand category B the model meta-trained with B in its pool.
    key = ("caml", dataset.category,
           json.dumps({k: v for k, v in params.items() if k not in ("meta_pool", "images")}, sort_keys=True, default=str))
    model = cache.get(key)
    if model is None and params.get("checkpoint"):
        model = load_published_checkpoint(params["checkpoint"], num_heads=int(params.get("num_heads", 16)))
    elif model is None and params.get("meta_pool"):
        pool = params["meta_pool"]
        feat_dim = next(iter(pool.values()))[0].shape[1]
        cfg = CAMLConfig(feat_dim=feat_dim, **params.get("model", {}))
        train = MetaTrainConfig(**params.get("train", {}))
        model = meta_train_or_load(pool, exclude=dataset.category, cfg=cfg, train=train,
                                   cache_root=Path(params.get("cache_root") or default_work_dir() / "artifacts"),
                                   key_extra={"backbone": partition.meta.get("backbone"),
                                              "image_size": partition.meta.get("image_size")})
    elif model is None:
        raise FsadError("caml: needs a published checkpoint (method_params checkpoint=<model.pth>) or embeddings "
                        "of other categories to meta-train on (meta_pool=caml_pool([(dataset, partition), ...]))")
    if dataset.category in model.trained_on:  # leave-the-evaluated-category-out, enforced
        raise FsadError(f"caml: the sequence model was meta-trained on {dataset.category!r}, the category under "
                        "evaluation; meta-train without it")
    cache[key] = model
    return model


PMF_PAPER_BACKBONE = "vit_small_patch16_224.dino"  # P>M>F's pre-training: DINO ViT-S/16, 224 px


@functools.cache  # one probe per process: offline it costs a failed connect
def _paper_backbone_available() -> bool:
    """Whether DINO ViT-S weights can be had (local timm/HF cache, or a download when online)."""
    from fewshot_core.backbones import resolve_weights

    try:
        resolve_weights(PMF_PAPER_BACKBONE, "auto")
        return True
    except FsadError:
        return False


def _pmf_backbone_name(partition, params: dict) -> str:
    """The paper's DINO ViT-S/16 when nothing else was asked for (no backbone, weights or preprocessed
    images; the store on the default backbone) and its weights can be had; otherwise the given backbone
    or the feature store's (offline: the bundled Lite0)."""
    from fewshot_core.backbones.models import DEFAULT_BACKBONE

    if params.get("backbone"):
        return params["backbone"]
    store_backbone = partition.meta.get("backbone")
    chosen = "weights" in params or params.get("images") is not None or store_backbone != DEFAULT_BACKBONE
    if not chosen and _paper_backbone_available():
        return PMF_PAPER_BACKBONE
    return store_backbone


def _pmf_backbone(partition, params: dict, cache: dict):
    from fewshot_core.backbones import create_model

    name = _pmf_backbone_name(partition, params)
    key = ("pmf-backbone", name, params.get("weights", "auto"), params.get("device", "cpu"))
    if key not in cache:
        cache[key] = create_model(name, weights=params.get("weights", "auto"), device=params.get("device", "cpu"))
    return name, cache[key]


PMF_KEYS = ("steps", "search_steps", "lr_candidates", "scale", "aug_prob", "time_budget_s", "search_fallback",
            "batch_size")


def _build(method: str, dataset, partition, episode: SupervisedEpisode, params: dict, cache: dict, runtime=None):
    """(estimator, support inputs, query inputs) for one episode."""
    entry = registry.get(method, protocol=registry.SUPERVISED)
    if entry.family == registry.ONECLASS:  # fitted on the good shots only, calibrated on all (binary)
        if episode.label_mode != "binary":
            raise FsadError(f"{method}: one-class methods only run in binary mode; use --label-mode binary")
        est = OneClassClassifier(method, params).set_runtime(runtime)
        return est, partition.patch(episode.support_ids), partition.patch(episode.query_ids)
    if method == "protonet":
        est = registry.create(method, runtime=runtime, **params)
        return est, partition.global_(episode.support_ids), partition.global_(episode.query_ids)
    if method == "caml":
        from fewshot_core.methods.caml import CAML

        est = CAML(_caml_model(dataset, partition, params, cache))
        return est, partition.global_(episode.support_ids), partition.global_(episode.query_ids)
    if method == "pmf":
        from fewshot_core.methods.pmf import PMF

        name, backbone = _pmf_backbone(partition, params, cache)
        # a ViT's patch grid is fixed by its checkpoint: DINO ViT-S/16 reads 224 px; CNNs take 128 by default
        size = int(params.get("image_size", 224 if name == PMF_PAPER_BACKBONE else 128))
        est = PMF(backbone, seed=episode.seed, **{k: params[k] for k in PMF_KEYS if k in params})
        est.backbone_name = name
        pre = params.get("images")
        return (est, _images(dataset, episode.support_ids, name, size, cache, pre),
                _images(dataset, episode.query_ids, name, size, cache, pre))
    raise FsadError(f"method {method!r}: no input builder under the supervised protocol")  # pragma: no cover


def _log_proba(est, X) -> np.ndarray:
    if hasattr(est, "predict_log_proba"):
        return np.asarray(est.predict_log_proba(X), dtype=np.float64)
    return np.log(np.clip(np.asarray(est.predict_proba(X), dtype=np.float64), 1e-300, None))


def _jsonable_params(params: dict) -> str:
    shown = {k: (f"<{len(v)} entries>" if k in ("meta_pool", "images") else v) for k, v in params.items()}
    return json.dumps(shown, sort_keys=True, default=str)


def run_supervised_episode(dataset, partition, episode: SupervisedEpisode, method: str,
                           method_params: Mapping | None = None, cache: dict | None = None, runtime=None) -> dict:
    """Fit on the episode's support only, predict its queries, return one row of metrics."""
    params = dict(method_params or {})
    cache = {} if cache is None else cache
    names = np.asarray(episode.classes)
    y_support = names[np.asarray(episode.support_labels)]
    y_query = names[np.asarray(episode.query_labels)]
    est, X_support, X_query = _build(method, dataset, partition, episode, params, cache, runtime)

    t0 = time.perf_counter()
    est.fit(X_support, y_support)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logp = _log_proba(est, X_query)
    predict_s = time.perf_counter() - t0

    classes = np.asarray(est.classes_)
    y_pred = classes[np.argmax(logp, axis=1)]
    good = np.flatnonzero(classes == GOOD)
    score = None
    if len(good) and len(classes) > 1:
        others = np.delete(logp, good[0], axis=1)
        score = logsumexp(others, axis=1) - logp[:, good[0]]
    metrics = classification_metrics(y_query, y_pred, classes=list(episode.classes), anomaly_score=score)
    info = dict(getattr(est, "fit_info_", {}))
    model = getattr(est, "model", None)
    if getattr(model, "trained_on", None):
        info["trained_on"] = list(model.trained_on)
    return {
        "episode_id": episode.episode_id,
        "category": episode.category,
        "method": method,
        "params": _jsonable_params(params),
        "backbone": getattr(est, "backbone_name", None) or partition.meta.get("backbone"),
        "label_mode": episode.label_mode,
        "pool": episode.pool,
        "k_good": episode.k_good,
        "k_bad": episode.k_bad,
        "seed": episode.seed,
        "n_support": len(episode.support_ids),
        "n_query": len(episode.query_ids),
        **metrics,
        "classes": json.dumps(list(episode.classes)),
        "confusion": json.dumps(confusion(y_query, y_pred, list(episode.classes))),
        "fit_s": round(fit_s, 4),
        "predict_s": round(predict_s, 4),
        "info": json.dumps(info, default=str, sort_keys=True),
    }


def evaluate_supervised(dataset, partition, method: str, k_good: int, k_bad: int, seeds,
                        label_mode: str = "binary", pool: str = "test",
                        method_params: Mapping | None = None, runtime=None) -> list[dict]:
    """One row per seed (see ``run_supervised_episode``); models that do not depend on the episode
    (a meta-trained CAML, a loaded backbone, decoded images) are built once and shared across seeds."""
    registry.get(method, protocol=registry.SUPERVISED)
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    cache: dict = {}
    rows = []
    for seed in seeds:
        episode = sample_supervised(dataset, k_good, k_bad, seed, label_mode=label_mode, pool=pool)
        rows.append(run_supervised_episode(dataset, partition, episode, method, method_params, cache, runtime))
    return rows
