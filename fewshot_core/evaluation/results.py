"""What one protocol run of an episode gives back: its row (columns declared in ``fewshot_core/schema.py``)
and what plots, galleries and saved models need without fitting again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OneClassResult:
    """A one-class (or transductive) episode: the queries' scores and maps against their labels."""

    row: dict
    model: Any  # the fitted detector
    query_ids: list[str]
    labels: np.ndarray  # per query: 1 defective, 0 good
    image_scores: np.ndarray
    patch_maps: np.ndarray  # what ``score`` returned, at the method's own resolution
    image_maps: Callable[[np.ndarray, Sequence[str]], np.ndarray]  # (maps, query ids) -> maps at the mask shape
    threshold: Any = None  # evaluation.threshold.Threshold from the good support; None: not computed
    shape: tuple | None = None  # (h, w) the maps and masks were compared at
    partition: Any = None  # an aligned episode's own features, what its model was fitted on (None: the store's)


@dataclass(frozen=True)
class SupervisedResult:
    """A supervised episode: the queries' class probabilities."""

    row: dict
    model: Any  # the fitted estimator
    query_ids: list[str]
    classes: np.ndarray  # the estimator's ``classes_``: the columns of ``log_proba``
    log_proba: np.ndarray
    y_pred: np.ndarray
    image_scores: np.ndarray | None  # anomaly log-odds, what AUROC ranks by; None when the query holds one group
