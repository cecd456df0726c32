"""Prototypical network on frozen global embeddings (Snell et al. 2017).

Each class is the mean of its support embeddings; a query gets ``softmax(-d(x, c_k) / temperature)``.
``euclidean`` uses the squared L2 distance (as in the paper); ``cosine`` uses 1 − cos between the
query and the class mean (P>M>F style: mean of raw embeddings, then compared by angle).

The temperature only shapes the probabilities (argmax, accuracy and AUROC do not depend on it).
Defaults: 1 for squared Euclidean, 0.1 for cosine (P>M>F's cosine classifier scale of 10).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from fewshot_core.methods.base import Classifier

DISTANCES = ("euclidean", "cosine")
DEFAULT_TEMPERATURE = {"euclidean": 1.0, "cosine": 0.1}


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_distances(queries: np.ndarray, prototypes: np.ndarray, distance: str) -> np.ndarray:
    """[m, C] squared Euclidean or cosine distances, in float64 for stable large-D sums."""
    q = np.asarray(queries, dtype=np.float64)
    p = np.asarray(prototypes, dtype=np.float64)
    if distance == "euclidean":
        d = (q * q).sum(1)[:, None] - 2.0 * q @ p.T + (p * p).sum(1)[None, :]
        return np.maximum(d, 0.0)
    if distance == "cosine":
        return 1.0 - _l2_normalise(q) @ _l2_normalise(p).T
    raise ValueError(f"unknown distance {distance!r}; use one of {DISTANCES}")


class ProtoNet(Classifier):
    """Nearest-class-mean classifier with softmax over negative distances."""

    name = "protonet"
    input_kind = "embeddings"

    def __init__(self, distance: str = "euclidean", temperature: float | None = None):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; use one of {DISTANCES}")
        if temperature is not None and float(temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.distance = distance
        self.temperature = temperature

    @property
    def temperature_(self) -> float:
        return DEFAULT_TEMPERATURE[self.distance] if self.temperature is None else float(self.temperature)

    def fit(self, X, y) -> "ProtoNet":
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise ValueError(f"expected X [n, D] and y [n] with n > 0, got {X.shape} and {y.shape}")
        self.classes_ = np.unique(y)
        self.prototypes_ = np.stack([X[y == c].mean(0) for c in self.classes_]).astype(np.float32)
        self.fitted_ = True
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits [m, C] = −distance / temperature."""
        return -class_distances(np.asarray(X, dtype=np.float32), self.prototypes_, self.distance) / self.temperature_

    def predict_log_proba(self, X) -> np.ndarray:
        return log_softmax(self.decision_function(X), axis=1)

    def get_state(self) -> dict:
        return {"arrays": {"prototypes": self.prototypes_, "classes": np.asarray(self.classes_).astype(str)}}

    def set_state(self, state: dict) -> None:
        self.prototypes_ = np.asarray(state["arrays"]["prototypes"], dtype=np.float32)
        self.classes_ = np.asarray(state["arrays"]["classes"])
