"""The decision threshold of a one-class model, from its good support images only (never test labels).

Rule (docs/models.md): score each good support image with a model that did *not* see it, then put the
threshold at the ``1 - fpr`` quantile of those scores (the "higher" sample, so at most ``fpr`` of the
held-out good scores lie above it). An image is anomalous when its score is above the threshold.

* ``loo`` (leave-one-out): fit a copy of the method on all support images but one, score that one; n
  fits of n - 1 images. The default up to ``LOO_MAX`` images, where fits are cheap and every image counts.
* ``holdout``: one fit on a seeded ``1 - share`` of the support, scoring the held-out ``share``; for
  large support sets (full shot) and methods whose fit is expensive.
* ``auto``: ``loo`` up to ``LOO_MAX`` good images, ``holdout`` above.

Held-out scores come from a model fitted on fewer images than the deployed one, so they lean high: the
threshold errs towards fewer false alarms. One good image cannot be held out from itself: the threshold
is then ``None`` and says so (``reason``); the model still ranks images by score, it just makes no
decision. Neither can a support of identical images (one image copied): every held-out image has its
copy in the training part and scores 0, and a threshold of 0 would call every test image anomalous.
The threshold is then ``None`` with the reason "degenerate: identical support images"; known up front
from the images' content hashes when the caller gives them, else from held-out scores that are all 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from fewshot_core.errors import FsadError

RULES = ("auto", "loo", "holdout")
LOO_MAX = 16  # largest support scored leave-one-out under "auto" (n fits); holdout above
DEFAULT_FPR = 0.05
DEFAULT_SHARE = 0.2


@dataclass(frozen=True)
class ThresholdConfig:
    """How the threshold is set: ``rule`` (auto | loo | holdout), target false-positive rate on good
    images ``fpr``, held-out ``share`` for holdout, and the ``seed`` of the holdout draw."""

    rule: str = "auto"
    fpr: float = DEFAULT_FPR
    share: float = DEFAULT_SHARE
    seed: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise FsadError(f"threshold rule {self.rule!r}: unknown; use one of {', '.join(RULES)}")
        if not 0.0 <= float(self.fpr) < 1.0:
            raise FsadError(f"threshold fpr {self.fpr}: give a false-positive rate in [0, 1), e.g. 0.05")
        if not 0.0 < float(self.share) < 1.0:
            raise FsadError(f"threshold share {self.share}: give the held-out share of good images in (0, 1)")


@dataclass(frozen=True)
class Threshold:
    """A fitted threshold. ``value`` None: no threshold could be set (``reason`` says why)."""

    value: float | None
    rule: str  # e.g. "loo fpr=0.05 n=4"
    fpr: float
    n_good: int
    good_scores: list[float] = field(default_factory=list)
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.value is not None and math.isfinite(self.value)

    def decide(self, scores) -> np.ndarray | None:
        """True where anomalous (score above the threshold); None when there is no threshold."""
        if not self.usable:
            return None
        return np.asarray(scores, dtype=np.float64) > self.value

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Threshold | None":
        if not data:
            return None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def threshold_from_scores(good_scores, fpr: float, rule: str) -> Threshold:
    """The ``1 - fpr`` quantile ("higher" sample) of held-out good scores."""
    scores = np.asarray(good_scores, dtype=np.float64)
    if scores.size == 0:
        return Threshold(None, rule, fpr, 0, [], "no held-out good scores")
    value = float(np.quantile(scores, 1.0 - float(fpr), method="higher"))
    return Threshold(value, rule, float(fpr), int(scores.size), [float(s) for s in scores])


def heldout_good_scores(n: int, fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        config: ThresholdConfig) -> tuple[str, np.ndarray | None, str]:
    """(rule used, held-out scores or None, reason) for ``n`` support images.

    ``fit_score(train_idx, held_idx)`` fits a fresh copy of the method on the support rows ``train_idx``
    and returns the image scores of the rows ``held_idx``.
    """
    if n < 2:
        return config.rule, None, (f"{n} good support image: a threshold needs a good image the model did not "
                                   "see (2 or more); the model ranks images but makes no decision")
    rule = config.rule if config.rule != "auto" else ("loo" if n <= LOO_MAX else "holdout")
    idx = np.arange(n)
    if rule == "loo":
        scores = np.concatenate([np.asarray(fit_score(np.delete(idx, i), idx[i:i + 1]), dtype=np.float64)
                                 for i in range(n)])
        return rule, scores, ""
    n_held = min(n - 1, max(1, math.ceil(config.share * n)))
    held = np.sort(np.random.default_rng(config.seed).choice(n, size=n_held, replace=False))
    train = np.setdiff1d(idx, held)
    return rule, np.asarray(fit_score(train, held), dtype=np.float64), ""


DEGENERATE = "degenerate: identical support images"


def fit_threshold(n: int, fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  config: ThresholdConfig | None = None, support_keys: Sequence[str] | None = None) -> Threshold:
    """The threshold of a model fitted on ``n`` good support images (see the module docstring).

    ``support_keys``: the support images' content hashes, when known: n copies of one image need no fits
    to be refused."""
    config = config or ThresholdConfig()
    if n >= 2 and support_keys is not None and len(set(support_keys)) == 1:
        return Threshold(None, f"{config.rule} fpr={config.fpr:g}", float(config.fpr), n, [],
                         f"{DEGENERATE} (all {n} have the same content); draw other images or remove the copies")
    rule, scores, reason = heldout_good_scores(n, fit_score, config)
    if scores is None:
        return Threshold(None, f"{rule} fpr={config.fpr:g}", float(config.fpr), n, [], reason)
    label = f"{rule} fpr={config.fpr:g} n={n}" + (f" share={config.share:g}" if rule == "holdout" else "")
    if np.all(scores == 0):  # every held-out image met an exact copy of itself (distance 0)
        return Threshold(None, label, float(config.fpr), n, [float(s) for s in scores],
                         f"{DEGENERATE} (every held-out image scored 0: each has a copy in the rest of the "
                         "support); draw other images or remove the copies")
    out = threshold_from_scores(scores, config.fpr, label)
    return Threshold(out.value, label, out.fpr, n, out.good_scores)


def decision_metrics(labels, scores, threshold: Threshold | None) -> dict:
    """``balanced_accuracy``, ``false_alarm_rate`` (good test images flagged) and ``miss_rate`` (defective
    test images passed) at the threshold, with ``threshold`` and ``threshold_rule``.

    Without a usable threshold the rates are NaN and the rule says why; a rate whose class is absent
    from the test split is NaN.
    """
    from sklearn.metrics import balanced_accuracy_score

    nan = float("nan")
    undecided = {"balanced_accuracy": nan, "false_alarm_rate": nan, "miss_rate": nan, "threshold": nan}
    if threshold is None:
        return {**undecided, "threshold_rule": "none"}
    decided = threshold.decide(scores)
    if decided is None:
        return {**undecided, "threshold_rule": f"none: {threshold.reason}"}
    labels = np.asarray(labels, dtype=int)
    bacc = float(balanced_accuracy_score(labels, decided.astype(int))) if len(set(labels)) > 1 else nan
    good, bad = labels == 0, labels == 1
    return {"balanced_accuracy": bacc, "false_alarm_rate": float(decided[good].mean()) if good.any() else nan,
            "miss_rate": float((~decided[bad]).mean()) if bad.any() else nan,
            "threshold": float(threshold.value), "threshold_rule": threshold.rule}
