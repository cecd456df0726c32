"""A one-class detector under the supervised protocol: fitted on the good shots, calibrated on all of them.

The supervised protocol's adapter, not a registry method: the protocol builds it around a registered
one-class method, so it lives beside its one user.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_expit

from fewshot_core.data.records import GOOD
from fewshot_core.errors import FsadError
from fewshot_core.methods import registry
from fewshot_core.methods.base import Classifier


class OneClassClassifier(Classifier):
    """A one-class method under the supervised protocol (binary only).

    The memory bank holds the good shots only. The score s becomes P(anomalous) = σ((s − t) / τ):
    t is the midpoint between the median leave-one-out score of the good shots (each scored by a bank
    of the other good shots, so it is an out-of-bank score like a query's) and the median score of the
    bad shots; τ is a quarter of their gap. With a single good shot there is no leave-one-out score and
    t = median(bad) / 2 (a good query is assumed to score near 0); with no bad shot t = max(LOO).
    """

    name = "oneclass-classifier"
    input_kind = "patches"

    def __init__(self, detector: str, params: dict | None = None):  # the protocol names the detector
        self.detector = detector
        self.params = params

    def _new(self):
        return registry.create(self.detector, runtime=self.runtime, **(self.params or {}))

    def fit(self, patches: np.ndarray, labels) -> "OneClassClassifier":
        labels = np.asarray(labels)
        self.classes_ = np.unique(labels)
        if GOOD not in self.classes_ or len(self.classes_) > 2:
            raise FsadError(f"{self.detector}: the supervised protocol runs one-class methods in binary mode with good "
                            "shots; use --label-mode binary")
        good = np.flatnonzero(labels == GOOD)
        bad = np.flatnonzero(labels != GOOD)
        self.method_ = self._new().fit(patches[good])
        loo = np.array([self._new().fit(patches[np.delete(good, i)]).score(patches[good[i : i + 1]])[0][0]
                        for i in range(len(good))]) if len(good) >= 2 else np.array([])
        bad_scores = self.method_.score(patches[bad])[0] if len(bad) else np.array([])
        if len(loo) and len(bad_scores):
            lo, hi = float(np.median(loo)), float(np.median(bad_scores))
        elif len(bad_scores):
            lo, hi = 0.0, float(np.median(bad_scores))
        elif len(loo):
            lo = hi = float(np.max(loo))
        else:
            raise FsadError(f"{self.detector}: one good shot and no bad shot leave nothing to calibrate a threshold; "
                            "use k_good >= 2 or k_bad >= 1")
        self.threshold_ = (lo + hi) / 2
        gap = abs(hi - lo) if hi != lo else (np.std(loo) if len(loo) > 1 else abs(hi))
        self.scale_ = max(float(gap) / 4, 1e-6 * (abs(self.threshold_) + 1.0))
        self.fit_info_ = {"threshold": self.threshold_, "scale": self.scale_, "n_bank_images": int(len(good))}
        self.fitted_ = True
        return self

    def anomaly_logit(self, patches) -> np.ndarray:
        return (np.asarray(self.method_.score(patches)[0], dtype=np.float64) - self.threshold_) / self.scale_

    def predict_log_proba(self, patches) -> np.ndarray:
        z = self.anomaly_logit(patches)
        cols = {GOOD: log_expit(-z)}
        out = np.empty((len(z), len(self.classes_)))
        for j, c in enumerate(self.classes_):
            out[:, j] = cols.get(c, log_expit(z))
        return out

    def get_state(self) -> dict:
        inner = self.method_.get_state()
        return {"arrays": {**{f"detector.{k}": v for k, v in (inner.get("arrays") or {}).items()},
                           "classes": np.asarray(self.classes_).astype(str)},
                "info": {"threshold": self.threshold_, "scale": self.scale_, "fit_info": self.fit_info_}}

    def set_state(self, state: dict) -> None:
        arrays = state["arrays"]
        self.classes_ = np.asarray(arrays["classes"])
        self.threshold_, self.scale_ = float(state["info"]["threshold"]), float(state["info"]["scale"])
        self.fit_info_ = dict(state["info"].get("fit_info", {}))
        self.method_ = self._new()
        self.method_.set_state({"arrays": {k[len("detector."):]: v for k, v in arrays.items()
                                           if k.startswith("detector.")}})
        self.method_.fitted_ = True
