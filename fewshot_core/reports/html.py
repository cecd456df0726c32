"""The self-contained HTML report: tables and base64-embedded PNG plots, no external files or scripts.

Every aggregated number links to the per-seed rows it summarises; every per-seed row links to its MLflow
run, so any figure in the report can be traced to the run that produced it.
"""

from __future__ import annotations

import base64
import hashlib
import html
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from fewshot_core.atomic import atomic_write_text
from fewshot_core.reports import plots
from fewshot_core.reports.aggregate import format_ci, metric_columns

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
.note{color:#555;font-size:.9em}img{max-width:100%;margin:.5em 0}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _anchor(group_key: str) -> str:
    return "g-" + hashlib.sha1(group_key.encode()).hexdigest()[:10]


def _group_key(rec) -> str:
    return "|".join(str(rec.get(c)) for c in ("method", "backbone", "category", "setting"))


def _cell(rec, metric: str) -> str:
    """An aggregated value linked to its per-seed rows (title lists the MLflow run ids)."""
    mean = rec.get(f"{metric}_mean", float("nan"))
    if mean is None or not np.isfinite(mean):
        return "<td>–</td>"
    text = format_ci(mean, rec[f"{metric}_lo"], rec[f"{metric}_hi"])
    runs = html.escape(str(rec.get("run_ids", "")))
    return (f'<td><a href="#{_anchor(_group_key(rec))}" title="n={rec.get("n_seeds")} seeds; MLflow runs: {runs}">'
            f"{text}</a></td>")


def _pivot_table(agg: pd.DataFrame, index: list[str], column: str, metric: str) -> str:
    cols = sorted(agg[column].dropna().unique(), key=lambda v: (str(type(v)), v))
    head = "".join(f'<th class="l">{html.escape(c)}</th>' for c in index)
    head += "".join(f"<th>{html.escape(column)}={html.escape(str(c))}</th>" for c in cols)
    body = []
    for idx, group in agg.groupby(index, dropna=False, sort=True):
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = "".join(f'<td class="l">{html.escape(str(v))}</td>' for v in idx)
        by_col = {r[column]: r for r in group.to_dict("records")}
        cells += "".join(_cell(by_col[c], metric) if c in by_col else "<td>–</td>" for c in cols)
        body.append(f"<tr>{cells}</tr>")
    return f"<p class=note>{html.escape(metric)}: mean [95% bootstrap interval] over seeds</p>" \
           f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _first_metric(agg: pd.DataFrame, candidates) -> str | None:
    for m in candidates:
        col = f"{m}_mean"
        if col in agg and agg[col].notna().any():
            return m
    return None


def _section_shots(agg: pd.DataFrame) -> str:
    oc = agg[agg.get("protocol") == "oneclass"] if "protocol" in agg else agg.iloc[0:0]
    metric = _first_metric(oc, ("image_auroc",)) if len(oc) else None
    if metric is None:
        return "<p class=note>No one-class runs in this sweep.</p>"
    parts = [_img(plots.metric_vs_shots(oc, metric), f"{metric} vs shots"),
             _pivot_table(oc, ["category", "method"], "shots", metric)]
    if (pm := _first_metric(oc, ("pixel_auroc",))) is not None:
        parts.append(_pivot_table(oc, ["category", "method"], "shots", pm))
    return "".join(parts)


def _supervised(agg: pd.DataFrame) -> pd.DataFrame:
    return agg[agg["protocol"] == "supervised"] if "protocol" in agg else agg.iloc[0:0]


def _section_imbalance(agg: pd.DataFrame) -> str:
    sup = _supervised(agg)
    sup = sup[sup["label_mode"] == "binary"] if len(sup) else sup
    metric = _first_metric(sup, ("balanced_accuracy", "auroc")) if len(sup) else None
    if metric is None or sup[["k_good", "k_bad"]].drop_duplicates().shape[0] < 2:
        return "<p class=note>Needs supervised binary runs over at least two good:bad ratios.</p>"
    sup = sup.assign(ratio=[f"{int(g)}:{int(b)}" for g, b in zip(sup["k_good"], sup["k_bad"])])
    parts = [_img(plots.imbalance_heatmaps(sup, metric), "imbalance heatmap"),
             _pivot_table(sup, ["category", "method"], "ratio", metric)]
    if metric != "auroc" and _first_metric(sup, ("auroc",)):
        parts.append(_pivot_table(sup, ["category", "method"], "ratio", "auroc"))
    return "".join(parts)


def _section_label_mode(agg: pd.DataFrame) -> str:
    sup = _supervised(agg)
    if not len(sup) or sup["label_mode"].nunique() < 2:
        return "<p class=note>Needs supervised runs in both binary and multiclass label mode.</p>"
    metric = _first_metric(sup, ("balanced_accuracy", "macro_f1", "accuracy"))
    sup = sup.assign(group=[f"{m} {c} g{int(g)}b{int(b)}" for m, c, g, b in
                            zip(sup["method"], sup["category"], sup["k_good"], sup["k_bad"])])
    both = sup.groupby("group")["label_mode"].transform("nunique") == 2
    sup = sup[both]
    if not len(sup):
        return "<p class=note>No setting was run in both label modes.</p>"
    return (_img(plots.grouped_bars(sup, "group", "label_mode", metric, "binary vs multiclass"), "label modes")
            + _pivot_table(sup, ["category", "method", "k_good", "k_bad"], "label_mode", metric))


def _section_distance(agg: pd.DataFrame) -> str:
    if "distance" not in agg or agg["distance"].nunique() < 2:
        return "<p class=note>Needs a method run with both Euclidean and cosine distance.</p>"
    sub = agg[agg["distance"].notna()].copy()
    metric = _first_metric(sub, ("balanced_accuracy", "auroc", "accuracy"))
    sub["family"] = sub["method_name"] if "method_name" in sub else sub["method"].str.split("-").str[0]
    sub["group"] = [f"{f} {c} {s}" for f, c, s in zip(sub["family"], sub["category"], sub["setting"])]
    return (_img(plots.grouped_bars(sub, "group", "distance", metric, "Euclidean vs cosine"), "distances")
            + _pivot_table(sub, ["category", "family", "setting"], "distance", metric))


def _runs_table(rows: pd.DataFrame, run_url) -> str:
    # Per-class recalls and the like stay in MLflow; the table keeps the comparable metrics and timings.
    metrics = [m for m in metric_columns(rows) if not m.startswith("recall_")]
    ids = [c for c in ("method", "backbone", "category", "setting", "seed") if c in rows]
    head = "".join(f'<th class="l">{c}</th>' for c in ids) + "".join(f"<th>{m}</th>" for m in metrics)
    head += '<th class="l">MLflow run</th>'
    body, seen = [], set()
    for rec in rows.sort_values(ids).to_dict("records"):
        anchor = _anchor(_group_key(rec))
        attr = f' id="{anchor}"' if anchor not in seen else ""
        seen.add(anchor)
        cells = "".join(f'<td class="l">{html.escape(str(rec[c]))}</td>' for c in ids)
        cells += "".join(f"<td>{rec[m]:.4f}</td>" if pd.notna(rec[m]) else "<td>–</td>" for m in metrics)
        rid = rec.get("mlflow_run_id")
        link = f'<a href="{html.escape(run_url(rec))}">{html.escape(str(rid))}</a>' if rid else "–"
        body.append(f'<tr{attr}>{cells}<td class="l">{link}</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_report(rows: pd.DataFrame, agg: pd.DataFrame, gallery: list[dict] | None = None,
                  title: str = "fsad benchmark report", info: dict | None = None,
                  mlflow_ui: str = "http://127.0.0.1:5000") -> str:
    """The report as one HTML string. ``gallery`` items: ``title``, ``png`` (bytes), optional ``run_id``."""

    def run_url(rec) -> str:
        exp = rec.get("mlflow_experiment_id", "")
        return f"{mlflow_ui}/#/experiments/{exp}/runs/{rec.get('mlflow_run_id')}"

    info = dict(info or {})
    info.setdefault("generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    info.setdefault("evaluation rows", len(rows))
    meta = "".join(f'<tr><th class="l">{html.escape(str(k))}</th><td class="l">{html.escape(str(v))}</td></tr>'
                   for k, v in info.items())
    sections = [
        ("rq1", "RQ1 · How does detection improve with the number of shots?",
         "One-class protocol: fit on k good images, score the whole test split.", _section_shots(agg)),
        ("rq2", "RQ2 · How does class imbalance (good : bad shots) affect supervised few-shot methods?",
         "Supervised binary protocol over the k_good × k_bad grid.", _section_imbalance(agg)),
        ("rq3", "RQ3 · Binary (good/defective) vs multiclass (defect type) labels",
         "The same shots classified as good/anomalous or by defect type.", _section_label_mode(agg)),
        ("rq4", "RQ4 · Euclidean vs cosine distance",
         "Prototypical network with either distance on the same episodes.", _section_distance(agg)),
    ]
    out = [(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><table>{meta}</table>"),
           ("<p class=note>Values are means over seeds with a 95% percentile-bootstrap interval. Hover a value to "
            "see its MLflow run ids; click it to jump to its per-seed rows, which link to MLflow "
            f"(start the UI with <code>fsad mlflow-ui</code>, served at {html.escape(mlflow_ui)}).</p>"),
           "<ul>" + "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t, _, _ in sections)
           + '<li><a href="#gallery">Anomaly maps</a></li><li><a href="#runs">All runs</a></li></ul>']
    for anchor, heading, note, body in sections:
        out.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2><p class=note>{html.escape(note)}</p>{body}')
    out.append('<h2 id="gallery">Anomaly maps on test images</h2>')
    if gallery:
        for item in gallery:
            rid = item.get("run_id")
            cap = html.escape(item.get("title", ""))
            if rid:
                cap += f' · MLflow run <a href="{html.escape(run_url(item))}">{html.escape(rid)}</a>'
            out.append(f"<p class=note>{cap}</p>{_img(item['png'], item.get('title', 'anomaly maps'))}")
    else:
        out.append("<p class=note>No anomaly maps (no one-class runs with pixel maps).</p>")
    out.append('<h2 id="runs">All runs (one row per method × category × setting × seed)</h2>')
    out.append(_runs_table(rows, run_url) if len(rows) else "<p class=note>No runs.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: Path, text: str) -> Path:
    """Atomic write: temporary sibling, then rename."""
    return atomic_write_text(path, text, mode=0o644)  # a report is meant to be shared (mkstemp makes 0600)
