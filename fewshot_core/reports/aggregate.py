"""Aggregate evaluation rows over seeds: mean and an interval per metric, labelled by what it is.

With ``FEW_SEEDS`` or more seeds the interval is a 95% percentile bootstrap of the mean; below that a
bootstrap of so few values is only their min–max range under another name, so the range is reported and
called a range (``interval`` column: ``bootstrap`` or ``range``).

Input rows are the pipeline's evaluation table: one row per method x category x setting x seed, with the
identity columns, the MLflow run id, and one column per metric (``fewshot_core/schema.py`` declares them
all). Only the schema's metrics and timings are summarised; any other numeric column (a threshold, a
bank size) is not a metric. A metric that could not be computed for a row is missing (NaN in the frame);
it is left out of that group's statistics rather than counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fewshot_core import schema
from fewshot_core.reports.stats import FEW_SEEDS


def _numeric(rows: pd.DataFrame, columns) -> list[str]:
    return [c for c in columns if pd.api.types.is_numeric_dtype(rows[c])]


def metric_columns(rows: pd.DataFrame) -> list[str]:
    """The schema's metrics present in ``rows``, its headline order first; no other column is a metric."""
    return _numeric(rows, schema.metric_columns(rows.columns))


def summary_columns(rows: pd.DataFrame) -> list[str]:
    """What ``aggregate`` summarises over seeds: the metrics, then the timings (``schema.TIMING``)."""
    return metric_columns(rows) + _numeric(rows, schema.timing_columns(rows.columns))


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over the given values (NaN ignored).

    With one value the interval collapses to it; with none all three are NaN.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def value_range(values) -> tuple[float, float, float]:
    """(mean, min, max) over the given values (NaN ignored; all NaN without any)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    return float(x.mean()), float(x.min()), float(x.max())


def interval_label(kind: str, n: int | None = None, level: float = 0.95) -> str:
    """What an interval of ``aggregate`` is, in words: ``95% bootstrap CI`` or ``range over 2 seeds``."""
    if kind == "bootstrap":
        return f"{level:.0%} bootstrap CI" + (f" over {n} seeds" if n else "")
    if n == 1:
        return "one seed: no interval"
    return f"range over {n} seeds" if n else "range (min–max) over seeds"


def aggregate(rows: pd.DataFrame, metrics: list[str] | None = None, level: float = 0.95,
              n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per seed-free group with ``<metric>_mean``, ``<metric>_lo``, ``<metric>_hi``, ``interval``
    (``bootstrap``: a ``level`` percentile bootstrap, from ``FEW_SEEDS`` seeds on; ``range``: min–max over
    fewer seeds), ``n_seeds``, ``seeds``, ``run_ids`` (space-separated MLflow run ids of the rows it
    summarises) and, where the rows carry them, the episode sizes ``n_query``, ``n_support_good`` and
    ``n_support_bad`` (median over seeds). ``metrics`` default: ``summary_columns``."""
    if rows.empty:
        return pd.DataFrame()
    metrics = metrics or summary_columns(rows)
    keys = [c for c in schema.GROUP if c in rows.columns]
    out = []
    for group_values, group in rows.groupby(keys, dropna=False, sort=True):
        rec = dict(zip(keys, group_values if isinstance(group_values, tuple) else (group_values,)))
        rec["n_seeds"] = int(group["seed"].nunique()) if "seed" in group else len(group)
        rec["seeds"] = " ".join(str(s) for s in sorted(group["seed"].unique())) if "seed" in group else ""
        rec["run_ids"] = " ".join(str(r) for r in group.get("mlflow_run_id", pd.Series(dtype=str)).dropna())
        for size in ("n_query", "n_support_good", "n_support_bad"):
            if size in group and group[size].notna().any():
                rec[size] = int(group[size].median())
        rec["interval"] = "bootstrap" if rec["n_seeds"] >= FEW_SEEDS else "range"
        for m in metrics:
            if rec["interval"] == "bootstrap":
                mean, lo, hi = bootstrap_ci(group[m].to_numpy(), level=level, n_boot=n_boot, seed=seed)
            else:
                mean, lo, hi = value_range(group[m].to_numpy())
            rec[f"{m}_mean"], rec[f"{m}_lo"], rec[f"{m}_hi"] = mean, lo, hi
        out.append(rec)
    return pd.DataFrame(out)


def format_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "–"
    if lo == hi:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
