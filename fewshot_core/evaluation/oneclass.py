"""The one-class protocol: fit a method on k good support images, score the whole test split.

The registry entry's input kind picks the loader: patch features from the feature store
(``partition.patch(ids)``), or, for the detectors that train on pixels (EfficientAD, GLASS, REB; they
need no partition), the decoded images at the detector's ``input_size``. Masks are read at the mask
shape (``mask_shape``: ``mask_size`` px on the short side at the partition's working aspect, by default
the model's working shape; the store and the image loader resize without cropping, so rescaling a map to
the mask shape is a pure rescale); every detector's maps reach it through its ``anomaly_maps`` (the one shared
post-processing). Pixel metrics stream through ``PixelAccumulator``
(exact below ~8 M pixels, fixed-bin histograms above). Pure library code: no printing, no Dagster, no MLflow.

Row fields: identity (``episode_id``, ``protocol``, ``category``, ``method``, ``params`` as JSON,
``backbone``, ``partition_key``, ``shots`` = number of support images, ``full_shot`` ("yes"/"no",
a string so aggregation never averages it), ``seed``, ``n_support``, ``n_query``, ``augment``,
``mask_size`` = the mask shape's short side, ``input_shape`` = "HxW" of the masks and maps), the
metrics present (``image_auroc``, ``image_f1_max``, ``pixel_auroc``,
``pixel_f1_max``, ``aupro``), ``balanced_accuracy`` at the model's decision ``threshold`` (set from the
good support images only, ``threshold_rule`` says how; ``evaluation/threshold.py``), ``bank_size``,
``fit_s`` (fit, plus embedding of augmented images) and ``score_s`` (scoring only; anomaly maps and
metrics excluded). Detectors that train on images add ``train_s`` (the original training time, also when
the weights were reloaded; ``fit_s`` is then the load time), ``train_steps``, ``stopped_by``,
``loaded_from_artifact`` and ``device``.

The registry entry's input kind picks the loader: patch features from the store, or the images
themselves for the detectors that train on pixels (EfficientAD, GLASS, REB; they need no partition).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fewshot_core.backbones.preprocess import as_shape
from fewshot_core.data.imageio import load_mask
from fewshot_core.episode_cache import EpisodeCache, ImageKey, MaskKey
from fewshot_core.episodes import OneClassEpisode, sample_oneclass
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.aligned import align_episode, check_align, to_original
from fewshot_core.evaluation.autoconfig import check_config, choose
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext, context_of
from fewshot_core.evaluation.results import OneClassResult
from fewshot_core.evaluation.support_views import bank_groups, bank_input, resolve_augment, support_views
from fewshot_core.evaluation.threshold import Threshold, ThresholdConfig, decision_metrics, fit_threshold
from fewshot_core.methods import registry
from fewshot_core.methods.components.images import load_images
from fewshot_core.metrics import PixelAccumulator, image_metrics, recall_per_defect_type
from fewshot_core.schema import Protocol
from fewshot_core.sizes import MIN_MASK_SIZE, WORKING_SIZE, check_size

SCORE_BATCH = 32  # query images scored per call: bounds memory on large test sets


def mask_shape(mask_size=None, partition=None, model_size=None) -> tuple[int, int]:
    """(height, width) that masks and anomaly maps are compared at. None: the model's working shape, i.e.
    the partition's (``partition.input_shape``, the shape the features were embedded at) or, without a
    partition (a detector trained on images), the model's ``input_size`` square, else ``WORKING_SIZE``.
    An int is the short side at the partition's aspect; a (height, width) pair is taken as it is."""
    base = getattr(partition, "input_shape", None) if partition is not None else None
    if mask_size is None:
        shape = as_shape(base or model_size or WORKING_SIZE)
    elif not isinstance(mask_size, (int, np.integer)):
        shape = as_shape(mask_size)
    elif base is None or base[0] == base[1]:
        shape = (int(mask_size), int(mask_size))
    else:
        short = min(base)
        shape = (round(int(mask_size) * base[0] / short), round(int(mask_size) * base[1] / short))
    check_size(min(shape), "mask size", MIN_MASK_SIZE, "too small")
    return shape


def require_partition(entry, partition) -> None:
    """A method that reads patch features needs its feature-store partition: one line naming the fix."""
    if partition is None:
        raise FsadError(f"method {entry.name!r}: reads patch features; build the feature-store partition first "
                        "(fsad embed)")


def _masks(dataset, ids: Sequence[str], shape: tuple[int, int], cache: EpisodeCache) -> np.ndarray:
    """Boolean masks [n, H, W] (all False for good images), cached across seeds."""
    shape = as_shape(shape)

    def load() -> np.ndarray:
        out = np.zeros((len(ids), *shape), dtype=bool)
        for i, image_id in enumerate(ids):
            rec = dataset.by_id(image_id)
            if rec.mask_path is not None:
                out[i] = load_mask(rec.mask_path, (shape[1], shape[0]))
        return out

    return cache.get_or_make(MaskKey(str(dataset.root), dataset.category, tuple(ids), shape), load)


def score_in_batches(query_ids: Sequence[str], load, score, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores, maps, seconds spent in ``score``) of the queries, ``batch`` at a time: ``load(ids)`` gives a
    batch's inputs (features or images), ``score(inputs)`` its (scores, maps). Bounds memory on large test sets."""
    scores, maps, seconds = [], [], 0.0
    for start in range(0, len(query_ids), batch):
        inputs = load(list(query_ids[start:start + batch]))
        t0 = time.perf_counter()
        s, m = score(inputs)
        seconds += time.perf_counter() - t0
        scores.append(s)
        maps.append(m)
    return np.concatenate(scores), np.concatenate(maps), seconds


def query_metrics(dataset, query_ids: Sequence[str], scores: np.ndarray, maps: np.ndarray, resize,
                  shape: tuple[int, int], cache: EpisodeCache) -> tuple[np.ndarray, dict]:
    """Labels and metrics of an episode's queries: image metrics from ``scores``; pixel metrics (only
    where the dataset has masks) from ``maps`` turned into ``shape`` (height, width) maps by
    ``resize(batch, ids)``, batch by batch so the full-resolution maps never sit in memory together."""
    labels = np.array([dataset.by_id(i).label for i in query_ids], dtype=int)
    metrics = image_metrics(labels, scores)
    if dataset.has_masks:
        masks = _masks(dataset, query_ids, shape, cache)
        # resized maps never leave the raw maps' range (convex upsampling/smoothing): fixes the bins
        acc = PixelAccumulator(value_range=(float(maps.min()), float(maps.max())))
        for start in range(0, len(query_ids), SCORE_BATCH):
            ids = query_ids[start:start + SCORE_BATCH]
            for amap, mask in zip(resize(maps[start:start + SCORE_BATCH], ids), masks[start:start + SCORE_BATCH]):
                acc.add(amap, mask)
        metrics.update(acc.compute())
    return labels, metrics


def episode_identity(dataset, episode: OneClassEpisode, method: str, params: Mapping, backbone, partition_key,
                     n_query: int, augment: str, shape: tuple[int, int]) -> dict:
    """The identity columns every one-class row starts with (see the module docstring)."""
    n_train = len(dataset.train_good())
    shape = as_shape(shape)
    return {
        "episode_id": episode.episode_id,
        "protocol": Protocol.ONECLASS.value,
        "category": episode.category,
        "method": method,
        "params": json.dumps(params, sort_keys=True, default=str),
        "backbone": backbone,
        "partition_key": partition_key,
        "shots": len(episode.support_ids),
        "full_shot": "yes" if episode.shots is None or len(episode.support_ids) == n_train else "no",
        "seed": episode.seed,
        "n_support": len(episode.support_ids),
        "n_query": int(n_query),
        "augment": augment,
        "mask_size": int(min(shape)),
        "input_shape": f"{shape[0]}x{shape[1]}",
    }


def episode_images(dataset, ids: Sequence[str], size: int, cache: EpisodeCache | None):
    """Images of ``ids`` at ``size`` (float [n, 3, S, S] in [0, 1]); decoded once per (image, size) with a cache."""
    if cache is None:
        return load_images([dataset.by_id(i).path for i in ids], size)
    keys = {i: ImageKey(str(dataset.root), dataset.category, i, size) for i in ids}
    missing = [i for i in ids if keys[i] not in cache]
    if missing:
        for i, x in zip(missing, load_images([dataset.by_id(i).path for i in missing], size)):
            cache[keys[i]] = x
    return torch.stack([cache[keys[i]] for i in ids])


def _trained_fields(model) -> dict:
    """Row fields of a detector that trains on images, from its ``fit_info_``."""
    info = model.fit_info_
    return {"train_s": float(info.get("fit_s", 0.0)), "train_steps": int(info.get("steps", 0)),
            "stopped_by": str(info.get("stopped_by", "")),
            "loaded_from_artifact": bool(info.get("loaded_from_artifact", False)),
            "device": str(info.get("device", ""))}


def run_oneclass_episode(dataset, partition, episode: OneClassEpisode, method, method_params: Mapping | None = None,
                         options: EpisodeOptions | None = None, context: EvalContext | None = None) -> OneClassResult:
    """Fit ``method`` (a ``MethodEntry``, or its name) on the episode's support (features or images, as its
    registry entry says), score its queries; the result holds the row of metrics (``.row``), the fitted
    model, the scores, maps and labels, the threshold and the mask ``shape`` (for plots and saved models
    without refitting). ``options`` (``EpisodeOptions``): the mask size (None: the model's working shape,
    ``mask_shape``), the map smoothing (None: the detector's ``map_sigma``, 4 px for patch maps, 0 for maps
    already smoothed at image resolution), the support augmentation, how the decision threshold is set
    (default ``ThresholdConfig(seed=episode.seed)``), ``config="auto"`` (the support chooses the
    augmentation and scoring, ``evaluation/autoconfig.py``, over ``augment`` and ``method_params``; the row
    records the choice: ``config``, ``config_scores``, ``config_reason``) and ``align`` ("always": every
    image rotated and cropped to its part, ``evaluation/aligned.py``; "auto": only a posed elongated part,
    as the support shows it; the row's ``align`` says whether it did and why not: textures, round parts
    and fixed poses are not aligned; maps are warped back to the original frame for the pixel metrics).
    ``context`` (``EvalContext``): the runtime and the cache shared across episodes.
    """
    entry = registry.get(method, protocol=registry.ONECLASS)
    on_images = entry.input_kind == registry.IMAGES
    opts = options or EpisodeOptions()
    config, align, sigma, threshold = opts.config, opts.align, opts.sigma, opts.threshold
    augment, augment_transforms = opts.augment, opts.augment_transforms
    if check_config(config) == "auto" and on_images:
        raise FsadError(f"config auto: only for feature-based methods; {entry.name} trains on images")
    context = context_of(context)
    cache, runtime = context.cache, context.runtime
    params = dict(method_params or {})
    chosen = {"config": "default"}
    if config == "auto":
        choice = choose(dataset, partition, episode, entry, params, cache, runtime, augment_transforms)
        params, augment, chosen = {**params, **choice.params}, choice.augment, choice.record()
    augment = resolve_augment(entry, augment, len(episode.support_ids))
    if on_images and augment != "none":
        raise FsadError(f"augment {augment!r}: only for feature-based methods; {entry.name} trains on images")
    if not on_images:
        require_partition(entry, partition)
    params.setdefault("seed", episode.seed)  # coreset / index / training randomness follows the episode seed
    model = registry.create(entry, runtime=runtime, **params)
    shape = mask_shape(opts.mask_size, partition, model.input_size)
    to_image = lambda batch, ids: model.anomaly_maps(batch, shape, sigma)  # noqa: E731
    aligned, aligned_as = None, "none"
    if check_align(align) != "none" and not on_images:
        aligned, aligned_as = align_episode(dataset, partition, episode.support_ids, episode.query_ids,
                                            params["seed"], cache, align)
    if aligned is not None:
        augment_transforms = aligned.transforms(episode.support_ids, augment_transforms)
        partition, working = aligned, aligned.input_shape
        to_image = lambda batch, ids: to_original(model.anomaly_maps(batch, working, sigma),  # noqa: E731
                                                  [aligned.poses[i] for i in ids], working, shape)

    if on_images:
        size = model.input_size
        load = lambda ids: episode_images(dataset, ids, size, cache)  # noqa: E731
        support = load(list(episode.support_ids))
        t0 = time.perf_counter()  # decoding is not the method's time
    else:
        load = partition.patch
        t0 = time.perf_counter()
        views = support_views(dataset, partition, episode, augment, augment_transforms, cache)
        support = bank_input(views, augment)
    model.fit(support)
    fit_s = time.perf_counter() - t0
    del support

    query_ids = list(episode.query_ids)
    scores, patch_maps, score_s = score_in_batches(query_ids, load, model.score, SCORE_BATCH)

    labels, metrics = query_metrics(dataset, query_ids, scores, patch_maps, to_image, shape, cache)
    if on_images:  # held-out scores would need the detector trained again without each held-out image
        cut = Threshold(None, "none", float((threshold or ThresholdConfig()).fpr), len(episode.support_ids), [],
                        "trained on images: a support-only threshold would retrain the detector; not computed")
    else:
        cut = support_threshold(entry, params, views, runtime, threshold or ThresholdConfig(seed=episode.seed),
                                augment, support_keys=content_keys(partition, episode.support_ids), model=model)
    metrics.update(decision_metrics(labels, scores, cut))
    metrics.update(recall_per_defect_type([dataset.by_id(i).defect_type for i in query_ids], labels,
                                          cut.decide(scores)))
    if on_images:
        backbone, partition_key = model.backbone_name, None
    else:
        backbone, partition_key = partition.meta.get("backbone"), partition.meta.get("key")
    row = {
        **episode_identity(dataset, episode, entry.name, model.get_params(), backbone, partition_key, len(query_ids),
                           augment, shape),
        **chosen,
        "align": aligned_as,
        **metrics,
        "bank_size": model.bank_size,
        "fit_s": round(fit_s, 4),
        "score_s": round(score_s, 4),
        **(_trained_fields(model) if on_images else {}),
    }
    return OneClassResult(row, model, query_ids, labels, scores, patch_maps, to_image, cut, shape, aligned)


def content_keys(partition, ids: Sequence[str]) -> list[str] | None:
    """The images' content hashes (sha256 of the file) as the store recorded them; None when unknown."""
    index = getattr(partition, "index", None)
    if index is None or "sha256" not in index:
        return None
    sha = dict(zip(index["image_id"], index["sha256"]))
    return [sha.get(i) for i in ids] if all(i in sha for i in ids) else None


def support_threshold(method, params: Mapping, support: np.ndarray, runtime, config: ThresholdConfig,
                      augment: str = "none", support_keys: Sequence[str] | None = None, model=None):
    """The decision threshold from the good support alone: each held-out support image is scored by a
    model that did not see it (leave-one-out or holdout).

    ``model``: the fitted model, on ``bank_input(support, augment)``. Where it can (``can_score_heldout``:
    the bank detectors), it scores each held-out image itself, its bank less the rows of that image and of
    its augmented views (``methods/components/heldout.py``): no refit, and the model's own coreset, foreground and
    scoring. Otherwise fresh copies of the method (same parameters and seed) are fitted on the rest.

    ``support``: [n, h, w, d], or [n, views, h, w, d] with each image's augmented views after it; a copy
    is then fitted on its training images' views too, as the model itself was, and scores the held-out
    images' stored features only (a flipped copy of a held-out image is not a new part)."""
    views = support if support.ndim == 5 else support[:, None]

    if model is not None and model.can_score_heldout():
        groups = bank_groups(views.shape[:2], augment)

        def own_bank(train_idx, held_idx):
            return model.heldout_scores(views[held_idx, 0], np.flatnonzero(np.isin(groups, held_idx)))

        return fit_threshold(len(support), own_bank, config, support_keys, source="the model's bank")

    method = registry.get(method)
    copy_params = method.load_class().threshold_copy_params(dict(params), views.shape)

    def fit_score(train_idx, held_idx):
        copy = registry.create(method, runtime=runtime, **copy_params).fit(bank_input(views[train_idx], augment))
        return copy.score(views[held_idx, 0])[0]

    return fit_threshold(len(support), fit_score, config, support_keys, source="refits")


def parse_shots(shots) -> int | None:
    """``"full"``/None -> None (every train/good image); otherwise a positive int."""
    if shots is None or (isinstance(shots, str) and shots.lower() in ("full", "all")):
        return None
    try:
        value = int(shots)
    except (TypeError, ValueError):
        raise FsadError(f"shots {shots!r}: give a positive number of good images or 'full'") from None
    if value < 1:
        raise FsadError(f"shots {shots!r}: give a positive number of good images or 'full'")
    return value


def evaluate_oneclass(dataset, partition, method, shots, seeds, method_params: Mapping | None = None,
                      options: EpisodeOptions | None = None, context: EvalContext | None = None) -> list[dict]:
    """One row per seed (``run_oneclass_episode(...).row``); ``shots`` is an int or ``"full"``/None.
    ``context.runtime`` (``fewshot_core.runtime.Runtime``) says where and how to compute, and where the
    detectors that train on images cache their weights. ``partition`` may be None for those."""
    shots = parse_shots(shots)
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    context = context_of(context)  # one cache across the seeds
    method = registry.get(method, protocol=registry.ONECLASS)  # the name becomes its entry once, before any episode
    return [run_oneclass_episode(dataset, partition, sample_oneclass(dataset, shots, int(seed)), method,
                                 method_params, options, context).row
            for seed in seeds]
