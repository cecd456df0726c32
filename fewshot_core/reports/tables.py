"""HTML table pieces of the report: aggregated cells linked to their per-seed rows, pivot tables, and the
labels of a setting by what its support really holds."""

from __future__ import annotations

import hashlib
import html

import numpy as np
import pandas as pd

from fewshot_core.reports.aggregate import format_ci, interval_label
from fewshot_core.reports.stats import FEW_SEEDS

FEW_SEEDS_NOTE = (f"† fewer than {FEW_SEEDS} seeds: the bracket is the range (min–max) over the seeds, not a "
                  "confidence interval; read the paired tests instead.")


def esc(value) -> str:
    return html.escape(str(value))


def anchor(group_key: str) -> str:
    return "g-" + hashlib.sha1(group_key.encode()).hexdigest()[:10]


def group_key(rec) -> str:
    return "|".join(str(rec.get(c)) for c in ("method", "backbone", "category", "setting"))


def _int(value) -> int | None:
    try:
        return None if value is None or not np.isfinite(float(value)) else int(value)
    except (TypeError, ValueError):
        return None


def support_label(rec) -> str:
    """What the support holds: ``1 good + 3 defective`` (counts from the episode, not k per defect type)."""
    good = _int(rec.get("n_support_good"))
    bad = _int(rec.get("n_support_bad"))
    if good is None:  # rows from before the counts were recorded: say what k means
        good, k_bad = _int(rec.get("k_good")), _int(rec.get("k_bad")) or 0
        return f"{good} good" + (f" + {k_bad} per defect type" if k_bad else "")
    return f"{good} good" + (f" + {bad} defective" if bad else "")


def n_label(rec) -> str:
    """``n = 2 episodes × 80 query images``."""
    eps = _int(rec.get("n_seeds"))
    q = _int(rec.get("n_query"))
    return f"n = {eps} episode{'s' if eps != 1 else ''}" + (f" × {q} query images" if q else "")


def cell(rec, metric: str, n_line: bool = True) -> str:
    """An aggregated value linked to its per-seed rows; its title names n and the MLflow run ids; intervals
    from few seeds are flagged. ``n_line``: repeat n under the value (tables with an n column leave it out)."""
    mean = rec.get(f"{metric}_mean", float("nan"))
    if mean is None or not np.isfinite(mean):
        return "<td>–</td>"
    text = format_ci(mean, rec[f"{metric}_lo"], rec[f"{metric}_hi"])
    n_few = (_int(rec.get("n_seeds")) or 0) < FEW_SEEDS
    few = n_few and rec[f"{metric}_lo"] != rec[f"{metric}_hi"]  # one seed has no bracket to flag
    runs = esc(rec.get("run_ids", ""))
    what = esc(interval_label(rec.get("interval") or ("range" if n_few else "bootstrap"), _int(rec.get("n_seeds"))))
    flag = f'<sup class=few title="{what}, not a confidence interval">†</sup>' if few else ""
    link = f'<a href="#{anchor(group_key(rec))}" title="mean [{what}]; {esc(n_label(rec))}; MLflow runs: {runs}">'
    if n_line:
        return f"<td>{link}{text}</a>{flag}<br><span class=n>{esc(n_label(rec))}</span></td>"
    # compact: the interval under the mean, so that wide tables fit the page
    lo, hi = rec[f"{metric}_lo"], rec[f"{metric}_hi"]
    under = f"<br><span class=n>[{lo:.3f}, {hi:.3f}]</span>" if lo != hi else ""
    return f"<td>{link}{mean:.3f}</a>{flag}{under}</td>"


def interval_caption(agg: pd.DataFrame) -> str:
    """What the brackets of a table over ``agg``'s groups are: a bootstrap CI, a range over n seeds, or both."""
    kinds = set(agg["interval"].dropna()) if "interval" in agg else set()
    seeds = sorted({int(n) for n in agg["n_seeds"].dropna()}) if "n_seeds" in agg else []
    if kinds == {"bootstrap"}:
        return interval_label("bootstrap")
    if kinds == {"range"} and len(seeds) == 1:
        return interval_label("range", seeds[0])
    return f"{interval_label('bootstrap')} from {FEW_SEEDS} seeds on, else range (min–max) over the seeds †"


def metric_caption(agg: pd.DataFrame, what: str) -> str:
    """``image_auroc: mean [range over 2 seeds]``, or ``...: one seed: no interval``."""
    kind = interval_caption(agg)
    return f"{what}: {kind}" if kind == interval_label("range", 1) else f"{what}: mean [{kind}]"


def pivot(agg: pd.DataFrame, index: list[str], column: str, metric: str, labels: dict | None = None,
          note: str | None = None) -> str:
    """``index`` rows x ``column`` values of ``metric``; ``labels`` maps column values to header text."""
    cols = sorted(agg[column].dropna().unique(), key=lambda v: (str(type(v)), v))
    labels = labels or {}
    head = "".join(f'<th class="l">{esc(c)}</th>' for c in index)
    head += "".join(f"<th>{esc(labels.get(c, f'{column}={c}'))}</th>" for c in cols)
    body = []
    for idx, group in agg.groupby(index, dropna=False, sort=True):
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = "".join(f'<td class="l">{esc(v)}</td>' for v in idx)
        by_col = {r[column]: r for r in group.to_dict("records")}
        cells += "".join(cell(by_col[c], metric) if c in by_col else "<td>–</td>" for c in cols)
        body.append(f"<tr>{cells}</tr>")
    caption = note or metric_caption(agg, metric)
    return (f"<p class=note>{esc(caption)}</p><div class=scroll><table><tr>{head}</tr>{''.join(body)}"
            "</table></div>")


def simple(header: list[str], rows: list[list], left: int = 1) -> str:
    """A plain table; the first ``left`` columns are left-aligned text, the rest are given as HTML."""
    head = "".join(f'<th class="l">{esc(h)}</th>' if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{esc(v)}</td>' if i < left else f"<td>{v}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"
