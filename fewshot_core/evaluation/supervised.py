"""The supervised few-shot protocol (the thesis): labelled good + defective shots, classify the rest.

One episode (``fewshot_core.episodes.sample_supervised``) -> one row of metrics. Methods:

The registry entry's input kind says what an estimator reads:

* embeddings (``protonet``: ``distance`` euclidean|cosine, ``temperature``; ``caml``, whose sequence model
  is a published checkpoint or meta-trained on an explicit ``meta_pool`` of other categories) read the
  store's global embeddings [n, D];
* images (methods that fine-tune a backbone) are re-read from the dataset and preprocessed for the
  method's backbone at its ``input_size`` (fine-tuning needs pixels, not cached features); parameters
  only the protocol knows (the store's backbone) come from the class's ``protocol_params``;
* one-class detectors on patch features (``patchcore``, ``knn``, ``ldknn``; binary mode only) are fitted
  on the *good* shots only; their image score becomes a probability by a logistic calibration on the
  support (``evaluation/oneclass_classifier.py``); the bad shots never enter the memory bank. AUROC does
  not depend on the calibration.

Binary AUROC ranks by the anomaly log-odds ``log P(not good) − log P(good)``, a monotone function of
1 − P(good) that does not saturate to ties when the probabilities round to 0 or 1.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping

import numpy as np
import torch
from scipy.special import logsumexp

from fewshot_core.backbones import build_transform
from fewshot_core.data.imageio import load_rgb
from fewshot_core.data.records import GOOD
from fewshot_core.episode_cache import EpisodeCache, MetaTrainedKey, PreprocessedImagesKey
from fewshot_core.episodes import SupervisedEpisode, sample_supervised
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.oneclass_classifier import OneClassClassifier
from fewshot_core.evaluation.options import EvalContext, SupervisedDraw, context_of
from fewshot_core.evaluation.results import SupervisedResult
from fewshot_core.methods import registry
from fewshot_core.metrics.classification import classification_metrics, confusion
from fewshot_core.schema import Protocol

# ---------------------------------------------------------------- inputs and method construction


def _images(dataset, ids, backbone: str, image_size: int, cache: EpisodeCache, preloaded: Mapping | None = None):
    """Preprocessed image tensors [n, 3, S, S] for a method that reads images, decoded once per (backbone,
    size), or taken from ``preloaded`` (image id -> tensor) where the pixels are not on this machine."""
    if preloaded is not None:
        return torch.stack([torch.as_tensor(preloaded[i]) for i in ids])
    store = cache.get_or_make(PreprocessedImagesKey(backbone, image_size), dict)
    missing = [i for i in ids if i not in store]
    if missing:
        transform = build_transform(backbone, image_size)
        for i in missing:
            store[i] = transform(load_rgb(dataset.by_id(i).path, max_side=4 * image_size))
    return torch.stack([store[i] for i in ids])


def _meta_trained(entry, dataset, partition, params: dict, context: EvalContext):
    """An estimator meta-fitted on ``context.meta_pool`` without the evaluated category, or loaded from its
    published ``checkpoint`` (shared across the seeds of one evaluation)."""
    cache, runtime, meta_pool = context.cache, context.runtime, context.meta_pool
    key = MetaTrainedKey(entry.name, dataset.category, json.dumps(params, sort_keys=True, default=str),
                         None if meta_pool is None else meta_pool.source)
    est = cache.get(key)
    if est is None:
        est = registry.create(entry, runtime=runtime, **params)
        if not params.get("checkpoint"):
            if meta_pool is None:
                raise FsadError(f"{entry.name}: needs a published checkpoint (param checkpoint=<model.pth>) or a "
                                "meta-training pool of other categories (--meta-pool synthetic, --meta-pool ROOT, "
                                "or EvalContext(meta_pool=...) in the library)")
            est.meta_fit(meta_pool.embeddings, exclude=dataset.category,
                         key_extra={"backbone": partition.meta.get("backbone"),
                                    "image_size": partition.meta.get("image_size")})
        if dataset.category in est.trained_on:  # leave-the-evaluated-category-out, enforced
            raise FsadError(f"{entry.name}: the model was meta-trained on {dataset.category!r}, the category under "
                            "evaluation; meta-train without it")
        cache[key] = est
    return copy.copy(est)  # the meta-trained model is shared; each episode fits its own support


def _build(entry, dataset, partition, episode: SupervisedEpisode, params: dict, context: EvalContext):
    """(estimator, support inputs, query inputs) for one episode: the registry entry's input kind decides
    what the estimator reads."""
    support, query = list(episode.support_ids), list(episode.query_ids)
    cache, runtime, images = context.cache, context.runtime, context.images
    if entry.family == registry.ONECLASS:  # fitted on the good shots only, calibrated on all (binary)
        if episode.label_mode != "binary":
            raise FsadError(f"{entry.name}: one-class methods only run in binary mode; use --label-mode binary")
        est = OneClassClassifier(entry.name, params).set_runtime(runtime)
        return est, partition.patch(support), partition.patch(query)
    if entry.meta_pool:
        est = _meta_trained(entry, dataset, partition, params, context)
    else:
        cls = entry.load_class()
        params = cls.protocol_params(params, store_backbone=partition.meta.get("backbone"),
                                     preloaded=images is not None)
        if "seed" in cls._param_names():  # the method's randomness follows the episode
            params = {"seed": episode.seed, **params}
        est = registry.create(entry, runtime=runtime, **params)
    if entry.input_kind == registry.EMBEDDINGS:
        return est, partition.global_(support), partition.global_(query)
    return (est, _images(dataset, support, est.backbone_name, est.input_size, cache, images),
            _images(dataset, query, est.backbone_name, est.input_size, cache, images))


def _meta_pool_used(entry, params: dict, meta_pool, category: str) -> str:
    """What a meta-trained method learnt from, for the row: the pool (without the evaluated category) or
    the published checkpoint; empty for methods that meta-train on nothing."""
    if not entry.meta_pool:
        return ""
    if params.get("checkpoint"):
        return f"checkpoint {params['checkpoint']}"
    return "" if meta_pool is None else meta_pool.describe(exclude=category)


def _jsonable_params(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def run_supervised_episode(dataset, partition, episode: SupervisedEpisode, method,
                           method_params: Mapping | None = None, context: EvalContext | None = None
                           ) -> SupervisedResult:
    """Fit on the episode's support only, predict its queries; the result holds the row of metrics
    (``.row``), the fitted model, the query log-probabilities, their anomaly ``image_scores`` (log-odds,
    the score AUROC ranks by) and the predicted classes ``y_pred``.

    ``context`` (``EvalContext``): the runtime, the cache, ``meta_pool`` (``evaluation.meta_pool.MetaPool``:
    other categories a meta-trained method learns from) and ``images`` (preprocessed image tensors by
    image id, for image methods where the pixels are elsewhere)."""
    entry = registry.get(method, protocol=registry.SUPERVISED)  # a name or the entry the caller resolved
    params = dict(method_params or {})
    context = context_of(context)
    names = np.asarray(episode.classes)
    y_support = names[np.asarray(episode.support_labels)]
    y_query = names[np.asarray(episode.query_labels)]
    est, X_support, X_query = _build(entry, dataset, partition, episode, params, context)

    t0 = time.perf_counter()
    est.fit(X_support, y_support)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logp = np.asarray(est.predict_log_proba(X_query), dtype=np.float64)
    score_s = time.perf_counter() - t0

    classes = np.asarray(est.classes_)
    y_pred = classes[np.argmax(logp, axis=1)]
    good = np.flatnonzero(classes == GOOD)
    score = None
    if len(good) and len(classes) > 1:
        others = np.delete(logp, good[0], axis=1)
        score = logsumexp(others, axis=1) - logp[:, good[0]]
    metrics = classification_metrics(y_query, y_pred, classes=list(episode.classes), anomaly_score=score)
    info = dict(est.fit_info_)
    if est.trained_on:
        info["trained_on"] = list(est.trained_on)
    row = {
        "episode_id": episode.episode_id,
        "protocol": Protocol.SUPERVISED.value,
        "category": episode.category,
        "method": entry.name,
        "params": _jsonable_params(params),
        "backbone": est.backbone_name or partition.meta.get("backbone"),
        "meta_pool": _meta_pool_used(entry, params, context.meta_pool, dataset.category),
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
        "score_s": round(score_s, 4),
        "info": json.dumps(info, default=str, sort_keys=True),
    }
    return SupervisedResult(row, est, list(episode.query_ids), classes, logp, y_pred, score)


def evaluate_supervised(dataset, partition, method, draw: SupervisedDraw, seeds,
                        method_params: Mapping | None = None, context: EvalContext | None = None) -> list[dict]:
    """One row per seed (``run_supervised_episode(...).row``) of the episodes ``draw`` (``SupervisedDraw``:
    shots, label mode, pool) gives; models that do not depend on the episode (a meta-trained CAML, a loaded
    backbone, decoded images) are built once and shared across seeds."""
    method = registry.get(method, protocol=registry.SUPERVISED)  # the name becomes its entry once
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    context = context_of(context)  # one cache across the seeds
    rows = []
    for seed in seeds:
        episode = sample_supervised(dataset, draw.k_good, draw.k_bad, seed, label_mode=draw.label_mode,
                                    pool=draw.pool)
        rows.append(run_supervised_episode(dataset, partition, episode, method, method_params, context).row)
    return rows
