"""Statistics behind the report's comparisons: paired differences over the same episodes, chance levels,
and whether two settings made identical predictions.

Two settings are compared on the episodes both ran (same category and seed, hence the same support and
query draws), so the difference of their per-episode metrics is paired; a Wilcoxon signed-rank test
(``scipy.stats.wilcoxon``, exact for small n) tells whether its sign is consistent. With five or fewer pairs
the exact two-sided p cannot drop below 2/2^5 = 0.0625, which the generated text says instead of implying
a finding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Fewer seeds than this: a bootstrap of so few values is only their range; the report shows the range, flagged †.
FEW_SEEDS = 5
ALPHA = 0.05
EPISODE_KEYS = ("category", "seed")


@dataclass(frozen=True)
class Paired:
    n: int  # paired episodes with the metric in both
    mean_a: float
    mean_b: float
    diff: float  # mean of a - b
    p: float  # two-sided Wilcoxon signed-rank p (NaN below two pairs)
    identical: bool  # the metric is equal in every pair

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p) and self.p < ALPHA and not self.identical

    def text(self, metric: str, a: str = "", b: str = "") -> str:
        if self.n == 0:
            return f"no common episodes with {metric}"
        if self.identical:
            return f"identical {metric} in all {self.n} paired episodes"
        p = f"Wilcoxon p={self.p:.3g}" if math.isfinite(self.p) else "too few pairs for a test"
        who = f" ({a} − {b})" if a and b else ""
        return f"Δ{metric}{who} = {self.diff:+.3f}, n={self.n} paired episodes, {p}"


def paired(rows_a: pd.DataFrame, rows_b: pd.DataFrame, metric: str, keys=EPISODE_KEYS) -> Paired:
    """Pair ``rows_a`` and ``rows_b`` on ``keys`` (the episode) and test ``metric`` a - b."""
    keys = [k for k in keys if k in rows_a and k in rows_b]
    if metric not in rows_a or metric not in rows_b:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, False)
    a = rows_a.groupby(keys)[metric].mean()
    b = rows_b.groupby(keys)[metric].mean()
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, False)
    d = (both["a"] - both["b"]).to_numpy(dtype=np.float64)
    identical = bool(np.all(np.abs(d) < 1e-12))
    p = math.nan
    if identical:
        p = 1.0
    elif n >= 2:
        from scipy.stats import wilcoxon  # scipy.stats: the code location loads reports without it

        # zsplit keeps tied episodes in n (a tie is evidence of no difference, not a missing pair)
        p = float(wilcoxon(both["a"], both["b"], zero_method="zsplit").pvalue)
    return Paired(n, float(both["a"].mean()), float(both["b"].mean()), float(d.mean()), p, identical)


def min_pairs_for_significance(alpha: float = ALPHA) -> int:
    """Smallest n at which an exact two-sided Wilcoxon test can reach ``alpha`` (all signs agreeing)."""
    n = 1
    while 2.0 / 2 ** n >= alpha:
        n += 1
    return n


def verdict(res: Paired, a: str, b: str, metric: str) -> str:
    """A sentence on ``a`` vs ``b`` from the paired result."""
    if res.n == 0:
        return f"{a} and {b} share no episodes with {metric}"
    if res.identical:
        return f"{a} and {b} give the same {metric} on every one of the {res.n} episodes"
    if res.significant:
        better = a if res.diff > 0 else b
        return f"{better} is consistently higher in {metric} ({res.text(metric, a, b)})"
    if res.n < min_pairs_for_significance():
        return (f"{a} vs {b}: {res.text(metric, a, b)}; with {res.n} pairs no test can reach p<{ALPHA}, "
                f"so run at least {min_pairs_for_significance()} seeds × categories to decide")
    return f"no consistent difference in {metric} between {a} and {b} ({res.text(metric, a, b)})"


def n_classes(rows: pd.DataFrame) -> int | None:
    """Classes of the episodes (from their confusion matrices); None when unknown or mixed."""
    if "confusion" not in rows:
        return None
    sizes = {len(json.loads(c)) for c in rows["confusion"].dropna()}
    return sizes.pop() if len(sizes) == 1 else None


def chance_balanced_accuracy(classes: int | None) -> float:
    """Balanced accuracy of a constant or random guess: 1 / classes."""
    return 1.0 / classes if classes else math.nan


def same_predictions(rows_a: pd.DataFrame, rows_b: pd.DataFrame, metrics, keys=EPISODE_KEYS) -> tuple[int, int]:
    """(episodes with identical predictions, paired episodes): identical = the same confusion matrix (the
    same predicted class for every query, up to which query is which) and the same value of each of
    ``metrics`` (pass decision metrics; pass the AUROC too to ask for the same score ranking)."""
    keys = [k for k in keys if k in rows_a and k in rows_b]
    cols = [m for m in metrics if m in rows_a and m in rows_b]
    if "confusion" in rows_a and "confusion" in rows_b:
        cols = cols + ["confusion"]
    a = rows_a.set_index(keys)[cols]
    b = rows_b.set_index(keys)[cols]
    common = a.index.intersection(b.index)
    same = 0
    for k in common:
        ra, rb = a.loc[[k]].iloc[0], b.loc[[k]].iloc[0]
        equal = True
        for c in cols:
            va, vb = ra[c], rb[c]
            if c == "confusion":
                equal &= (va == vb) or (pd.isna(va) and pd.isna(vb))
            elif pd.isna(va) or pd.isna(vb):
                equal &= pd.isna(va) and pd.isna(vb)
            else:
                equal &= abs(float(va) - float(vb)) < 1e-12
        same += int(equal)
    return same, len(common)
