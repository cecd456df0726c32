"""What travels with a protocol call besides the data and the method: small frozen groups, one meaning each.

* ``EpisodeOptions``: how a one-class (or transductive) episode is run and compared; none of it is a
  method's hyper-parameter, and none of it changes which images the episode draws.
* ``SupervisedDraw``: what a supervised episode draws (shots per class, label mode, labelled pool); the
  seed comes per episode.
* ``EvalContext``: where and how the episodes of one evaluation compute and what they share across seeds
  and settings (runtime, episode cache, meta-training pool, preloaded images); never part of a row.

The protocols (``oneclass``, ``transductive``, ``supervised``) and ``run.evaluate_setting`` take these in
place of long keyword lists; front ends (the CLI, the pipeline) build them from their own flags and config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fewshot_core.episode_cache import EpisodeCache, episode_cache
from fewshot_core.evaluation.support_views import AUTO
from fewshot_core.evaluation.threshold import ThresholdConfig
from fewshot_core.evaluation.augment import TRANSFORMS
from fewshot_core.runtime import Runtime


@dataclass(frozen=True)
class EpisodeOptions:
    """How a one-class episode is run and compared.

    ``mask_size``: None compares masks and maps at the model's working shape (``oneclass.mask_shape``), an
    int is the short side, a (height, width) pair is taken as it is. ``augment`` / ``augment_transforms``:
    the support augmentation (``support_views.resolve_augment``). ``sigma``: the map smoothing in pixels
    (None: the detector's own ``map_sigma``). ``threshold``: how the decision threshold is set (None:
    ``ThresholdConfig(seed=episode.seed)``). ``config="auto"``: the support chooses the augmentation and
    scoring; ``align``: parts aligned before embedding ("auto", the default: posed elongated parts only, as the
    support shows them; "always"; "none"). The transductive protocol reads
    ``mask_size`` and ``sigma`` only."""

    mask_size: int | tuple[int, int] | None = None
    augment: str = AUTO
    augment_transforms: Sequence[str] = TRANSFORMS
    sigma: float | None = None
    threshold: ThresholdConfig | None = None
    config: str = "default"
    align: str = AUTO


@dataclass(frozen=True)
class SupervisedDraw:
    """What a supervised episode draws: ``k_good`` good shots and ``k_bad`` shots per defect type from the
    labelled ``pool``, labelled ``binary`` (good / defective) or ``multiclass`` (per defect type)."""

    k_good: int
    k_bad: int
    label_mode: str = "binary"
    pool: str = "test"


@dataclass(frozen=True)
class EvalContext:
    """Where and how episodes compute, and what they share: ``runtime`` (device, threads, artifact folder;
    None: the default), ``cache`` (one ``EpisodeCache`` per category and process; None: a fresh one per
    call), ``meta_pool`` (the other categories a meta-trained method learns from, an
    ``evaluation.meta_pool.MetaPool``) and ``images`` (preprocessed image tensors by image id, for image
    methods whose pixels are not on this machine)."""

    runtime: Runtime | None = None
    cache: EpisodeCache | None = None
    meta_pool: Any = None
    images: Mapping[str, Any] | None = field(default=None, repr=False)

    def with_cache(self) -> "EvalContext":
        """This context with a cache for certain (a fresh one when it has none), to share across episodes."""
        cache = episode_cache(self.cache)
        return self if cache is self.cache else replace(self, cache=cache)


def context_of(context: EvalContext | None) -> EvalContext:
    """``context`` with a cache (a default context for None)."""
    return (context or EvalContext()).with_cache()
