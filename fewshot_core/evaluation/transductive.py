"""The transductive protocol: the unlabeled test images are scored together, with or without good shots.

Not comparable with the one-class protocol row for row: a transductive method sees every test image
(never a label) before it scores any, so a deployment must score batches of parts, not one part at a
time. Rows say ``protocol="transductive"``; ``shots`` = 0 means no support at all (zero-shot).

Same data, masks and metrics as the one-class protocol (``oneclass.query_metrics``); the support of
``shots`` > 0 is the one-class episode's support for the same seed, so rows line up with one-class rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from fewshot_core.episodes import OneClassEpisode, sample_oneclass
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.oneclass import episode_identity, mask_shape, query_metrics, require_partition
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext, context_of
from fewshot_core.evaluation.support_views import AUTO
from fewshot_core.evaluation.results import OneClassResult
from fewshot_core.methods import registry
from fewshot_core.schema import Protocol

# the one-class options this protocol has no use for, with the values that leave them idle
UNUSED_OPTIONS = {"augment": (AUTO, "none"), "config": ("default",), "align": (AUTO, "none"), "threshold": (None,)}


def transductive_episode(dataset, shots: int, seed: int) -> OneClassEpisode:
    """The one-class episode of ``shots`` good images (0: none; the whole test split is the query)."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 0:
        raise FsadError(f"shots {shots!r}: give 0 (test images only) or a positive number of good images")
    if shots:
        return sample_oneclass(dataset, int(shots), seed)
    ep = sample_oneclass(dataset, 1, seed)
    return OneClassEpisode(ep.episode_id.replace("oneclass-", "transductive-").replace("-k1-", "-k0-"),
                           ep.category, 0, ep.seed, (), ep.query_ids)


def check_options(options: EpisodeOptions) -> EpisodeOptions:
    """The transductive protocol compares masks and maps as the one-class one does (``mask_size``,
    ``sigma``) but has no support augmentation, configuration choice, alignment or threshold."""
    asked = [f"{name}={getattr(options, name)!r}" for name, idle in UNUSED_OPTIONS.items()
             if getattr(options, name) not in idle]
    if asked:
        raise FsadError(f"transductive protocol: {', '.join(asked)} is one-class only; leave it at its default")
    return options


def run_transductive_episode(dataset, partition, episode: OneClassEpisode, method,
                             method_params: Mapping | None = None, options: EpisodeOptions | None = None,
                             context: EvalContext | None = None) -> OneClassResult:
    """Fit ``method`` (a ``MethodEntry`` or its name) on the episode's good shots (none for 0), score the
    queries together; the result is the one-class protocol's (``.row``, scores, maps, labels, mask
    ``shape``; no decision threshold). ``options.mask_size`` None: the partition's shape; ``options.sigma``
    None: the detector's ``map_sigma``."""
    entry = registry.get(method, protocol=registry.TRANSDUCTIVE)
    require_partition(entry, partition)
    opts = check_options(options or EpisodeOptions())
    context = context_of(context)
    model = registry.create(entry, runtime=context.runtime, **{"seed": episode.seed, **dict(method_params or {})})
    shape = mask_shape(opts.mask_size, partition, model.input_size)
    t0 = time.perf_counter()
    model.fit(partition.patch(list(episode.support_ids)) if episode.support_ids else None)
    fit_s = time.perf_counter() - t0
    query_ids = list(episode.query_ids)
    queries = partition.patch(query_ids)
    t0 = time.perf_counter()
    scores, maps = model.score(queries)  # all at once: each image is scored against the others
    score_s = time.perf_counter() - t0
    to_image = lambda batch, ids: model.anomaly_maps(batch, shape, opts.sigma)  # noqa: E731
    labels, metrics = query_metrics(dataset, query_ids, scores, maps, to_image, shape, context.cache)
    row = episode_identity(dataset, episode, entry.name, model.get_params(), partition.meta.get("backbone"),
                           partition.meta.get("key"), len(query_ids), "none", shape)
    row.update(protocol=Protocol.TRANSDUCTIVE.value, shots=len(episode.support_ids), full_shot="no")
    row = {**row, **metrics, "bank_size": int(len(episode.support_ids)), "fit_s": round(fit_s, 4),
           "score_s": round(score_s, 4)}
    return OneClassResult(row, model, query_ids, labels, scores, maps, to_image, shape=shape)


def evaluate_transductive(dataset, partition, method, shots: int, seeds, method_params: Mapping | None = None,
                          options: EpisodeOptions | None = None, context: EvalContext | None = None) -> list[dict]:
    """One row per seed; ``shots`` = 0 scores the test images against each other only."""
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds)]
    context = context_of(context)  # one cache across the seeds
    method = registry.get(method, protocol=registry.TRANSDUCTIVE)  # the name becomes its entry once
    return [run_transductive_episode(dataset, partition, transductive_episode(dataset, shots, int(seed)), method,
                                     method_params, options, context).row for seed in seeds]
