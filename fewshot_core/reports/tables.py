"""HTML table pieces of the report: aggregated cells linked to their per-seed rows, pivot tables, and the
labels of a setting by what its support really holds."""

from __future__ import annotations

import hashlib
import html

import numpy as np
import pandas as pd

from fewshot_core.reports.aggregate import format_ci
from fewshot_core.reports.stats import FEW_SEEDS

FEW_SEEDS_NOTE = (f"† interval from fewer than {FEW_SEEDS} seeds: too few for the interval to mean much; "
                  "read the paired tests instead.")


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


def cell(rec, metric: str) -> str:
    """An aggregated value linked to its per-seed rows; its title names n and the MLflow run ids; intervals
    from few seeds are flagged."""
    mean = rec.get(f"{metric}_mean", float("nan"))
    if mean is None or not np.isfinite(mean):
        return "<td>–</td>"
    text = format_ci(mean, rec[f"{metric}_lo"], rec[f"{metric}_hi"])
    few = (_int(rec.get("n_seeds")) or 0) < FEW_SEEDS
    runs = esc(rec.get("run_ids", ""))
    flag = '<sup class=few title="fewer than %d seeds">†</sup>' % FEW_SEEDS if few else ""
    return (f'<td><a href="#{anchor(group_key(rec))}" title="{esc(n_label(rec))}; MLflow runs: {runs}">'
            f"{text}</a>{flag}<br><span class=n>{esc(n_label(rec))}</span></td>")


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
    caption = note or f"{metric}: mean [95% bootstrap interval] over seeds"
    return (f"<p class=note>{esc(caption)}</p><div class=scroll><table><tr>{head}</tr>{''.join(body)}"
            "</table></div>")


def simple(header: list[str], rows: list[list], left: int = 1) -> str:
    """A plain table; the first ``left`` columns are left-aligned text, the rest are given as HTML."""
    head = "".join(f'<th class="l">{esc(h)}</th>' if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{esc(v)}</td>' if i < left else f"<td>{v}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"
