"""The decision threshold of a one-class model, from its good support images only (never test labels).

Held-out scores: score each good support image with a model that did *not* see it. A bank detector
(PatchCore, kNN, LDKNN) is that model itself: its bank less the held-out image's rows (and its augmented
views'), with its own coreset, foreground and scoring (``methods/components/heldout.py``), no refit. Other methods
(and models saved before their bank recorded its provenance) fit fresh copies on the rest; the rule text
says which (``held out from the model's bank`` / ``from refits``).

* ``loo`` (leave-one-out): all support images but one score that one; n times. The default up to
  ``LOO_MAX`` images, where every image counts.
* ``holdout``: a seeded ``1 - share`` of the support scoring the held-out ``share``, once; for large
  support sets (full shot) and methods whose fit is expensive.
* ``auto``: ``loo`` up to ``LOO_MAX`` good images, ``holdout`` above.

Rule (docs/models.md, "The decision threshold"): a fresh good image is as likely to take any rank among
k held-out good scores, so the false-alarm rate of a threshold at the r-th highest of them is Beta(r,
k + 1 - r) distributed, whatever the scores' distribution. The threshold is the r-th highest score for the
largest r whose ``CONFIDENCE`` (95 %) upper bound stays within ``fpr``; that bound is ``fpr_bound``. Fewer
than 59 held-out scores cannot certify 5 % even with their highest: the threshold is then the highest
held-out score raised to a normal prediction bound of the scores at ``fpr`` (a tail fit, which aims at the
rate asked but assumes the shape it extrapolates), ``fpr_bound`` is the highest score's bound (the best k
scores can stand behind), and the rule text says so. An image is anomalous when its score is above the
threshold. The bound assumes test good images are like the support's (docs/models.md, "Threshold study",
measures how far they are).

One good image cannot be held out from itself: the threshold is then ``None`` and says so (``reason``);
the model still ranks images by score, it just makes no decision. Neither can a support of identical
images (one image copied): every held-out image has its copy in the training part and scores 0, and a
threshold of 0 would call every test image anomalous.
The threshold is then ``None`` with the reason "degenerate: identical support images"; known up front
from the images' content hashes when the caller gives them, else from held-out scores that are all 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from fewshot_core.errors import FsadError

RULES = ("auto", "loo", "holdout")
LOO_MAX = 16  # largest support scored leave-one-out under "auto" (n fits); holdout above
DEFAULT_FPR = 0.05
DEFAULT_SHARE = 0.2
CONFIDENCE = 0.95  # of the stated false-alarm bound (``Threshold.fpr_bound``)


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
    # the false-alarm rate on good images the threshold can stand behind (see the module docstring);
    # None: no threshold, or a record written before the bound was stated
    fpr_bound: float | None = None

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


def fpr_upper_bound(k: int, r: int) -> float:
    """With ``CONFIDENCE``, the false-alarm rate of a threshold at the r-th highest of ``k`` held-out good
    scores is at most this, whatever the scores' distribution: a fresh good score's rate above the r-th
    highest of k exchangeable ones is Beta(r, k + 1 - r) distributed (the Clopper-Pearson upper bound for
    r - 1 of k). A higher threshold only lowers the rate."""
    return _beta_quantile(CONFIDENCE, r, k + 1 - r)


@lru_cache(maxsize=1024)
def certified_rank(k: int, fpr: float) -> int:
    """The largest r whose r-th highest of ``k`` held-out scores keeps the false-alarm rate at most ``fpr``
    (``fpr_upper_bound``); 0 when even the highest cannot."""
    r = 0
    while r < k and fpr_upper_bound(k, r + 1) <= fpr:
        r += 1
    return r


def normal_tail_fit(scores: np.ndarray, fpr: float) -> float:
    """The ``1 - fpr`` normal prediction bound of the next score: mean + t(k - 1) s sqrt(1 + 1 / k)."""
    k = scores.size
    return float(scores.mean() + _student_t(1.0 - float(fpr), k - 1) * scores.std(ddof=1) * math.sqrt(1.0 + 1.0 / k))


@lru_cache(maxsize=1024)
def _beta_quantile(q: float, a: int, b: int) -> float:
    # deferred: scipy is heavy, and the code location loads this module
    from scipy.stats import beta

    return float(beta.ppf(q, a, b))


@lru_cache(maxsize=256)
def _student_t(q: float, dof: int) -> float:
    # deferred: scipy is heavy, and the code location loads this module
    from scipy.stats import t

    return float(t.ppf(q, dof))


def threshold_from_scores(good_scores, fpr: float, rule: str) -> Threshold:
    """The threshold of ``k`` held-out good scores at the requested false-positive rate ``fpr``, with the
    rate it can stand behind (``fpr_bound``) and a ``rule`` text that says how it was set."""
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    k = int(scores.size)
    if k == 0:
        return Threshold(None, rule, fpr, 0, [], "no held-out good scores")
    kept = [float(s) for s in np.asarray(good_scores, dtype=np.float64)]
    conf = f"{CONFIDENCE:.0%} confidence"
    r = certified_rank(k, float(fpr))
    if r >= 1:
        bound = fpr_upper_bound(k, r)
        which = "highest" if r == 1 else f"{_ordinal(r)} highest"
        return Threshold(float(scores[k - r]), f"{rule}: the {which} of {k} held-out scores, false alarms "
                         f"<= {bound:.1%} ({conf})", float(fpr), k, kept, fpr_bound=bound)
    bound = fpr_upper_bound(k, 1)
    value, how = float(scores[-1]), "the highest held-out score"
    if k >= 2 and fpr > 0:  # aim at the rate asked, under the fit's assumption; never below the highest score
        value = max(value, normal_tail_fit(scores, fpr))
        how += f" raised to a normal tail fit at {fpr:.1%}"
    return Threshold(value, f"{rule}: {k} held-out scores support at best {bound:.1%} false alarms ({conf}), "
                     f"not the {fpr:.1%} asked; threshold: {how}", float(fpr), k, kept, fpr_bound=bound)


def _ordinal(r: int) -> str:
    suffix = "th" if 10 <= r % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(r % 10, "th")
    return f"{r}{suffix}"


def heldout_good_scores(n: int, fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        config: ThresholdConfig) -> tuple[str, np.ndarray | None, str]:
    """(rule used, held-out scores or None, reason) for ``n`` support images.

    ``fit_score(train_idx, held_idx)`` returns the image scores of the support images ``held_idx`` by a
    model of the images ``train_idx`` only (a fresh copy fitted on them, or the model's bank without the
    held-out images' rows).
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
                  config: ThresholdConfig | None = None, support_keys: Sequence[str] | None = None,
                  source: str = "") -> Threshold:
    """The threshold of a model fitted on ``n`` good support images (see the module docstring).

    ``support_keys``: the support images' content hashes, when known: n copies of one image need no fits
    to be refused. ``source``: where the held-out scores come from (the rule text says it). A held-out
    score ``fit_score`` gives as NaN (no model without that image exists: every bank row came from it)
    is left out, and the rule text says how many."""
    config = config or ThresholdConfig()
    if n >= 2 and support_keys is not None and len(set(support_keys)) == 1:
        return Threshold(None, f"{config.rule} fpr={config.fpr:g}", float(config.fpr), n, [],
                         f"{DEGENERATE} (all {n} have the same content); draw other images or remove the copies")
    rule, scores, reason = heldout_good_scores(n, fit_score, config)
    if scores is None:
        return Threshold(None, f"{rule} fpr={config.fpr:g}", float(config.fpr), n, [], reason)
    label = f"{rule} fpr={config.fpr:g} n={n}" + (f" share={config.share:g}" if rule == "holdout" else "")
    label += f" (held out from {source})" if source else ""
    unscored = np.flatnonzero(np.isnan(scores))
    if len(unscored):
        label += (f"; {len(unscored)} held-out image(s) without a score (every bank row came from "
                  f"{'it' if len(unscored) == 1 else 'them'})")
        scores = scores[~np.isnan(scores)]
        if not scores.size:
            return Threshold(None, label, float(config.fpr), n, [],
                             "no held-out score: every bank row came from the held-out images; give the model a "
                             "larger bank (coreset_ratio) or more good images")
    if np.all(scores == 0):  # every held-out image met an exact copy of itself (distance 0)
        return Threshold(None, label, float(config.fpr), n, [float(s) for s in scores],
                         f"{DEGENERATE} (every held-out image scored 0: each has a copy in the rest of the "
                         "support); draw other images or remove the copies")
    out = threshold_from_scores(scores, config.fpr, label)
    return Threshold(out.value, out.rule, out.fpr, n, out.good_scores, fpr_bound=out.fpr_bound)


def decision_metrics(labels, scores, threshold: Threshold | None) -> dict:
    """``balanced_accuracy``, ``false_alarm_rate`` (good test images flagged) and ``miss_rate`` (defective
    test images passed) at the threshold, with ``threshold``, ``threshold_rule`` and ``threshold_fpr_bound``
    (the false-alarm rate the threshold stands behind).

    Without a usable threshold the rates are NaN and the rule says why; a rate whose class is absent
    from the test split is NaN.
    """
    # deferred: sklearn is heavy, and the code location loads this module
    from sklearn.metrics import balanced_accuracy_score

    nan = float("nan")
    undecided = {"balanced_accuracy": nan, "false_alarm_rate": nan, "miss_rate": nan, "threshold": nan,
                 "threshold_fpr_bound": nan}
    if threshold is None:
        return {**undecided, "threshold_rule": "none"}
    decided = threshold.decide(scores)
    if decided is None:
        return {**undecided, "threshold_rule": f"none: {threshold.reason}"}
    labels = np.asarray(labels, dtype=int)
    bacc = float(balanced_accuracy_score(labels, decided.astype(int))) if len(set(labels)) > 1 else nan
    good, bad = labels == 0, labels == 1
    bound = nan if threshold.fpr_bound is None else float(threshold.fpr_bound)
    return {"balanced_accuracy": bacc, "false_alarm_rate": float(decided[good].mean()) if good.any() else nan,
            "miss_rate": float((~decided[bad]).mean()) if bad.any() else nan,
            "threshold": float(threshold.value), "threshold_rule": threshold.rule, "threshold_fpr_bound": bound}
