"""The self-contained HTML report: tables and base64-embedded PNG plots, no external files or scripts.

Every aggregated number links to the per-seed rows it summarises; every per-seed row links to its MLflow
run, so any figure in the report can be traced to the run that produced it. The report opens with what a
user deploys (``decisions.py``: the champion, every setting's errors at its threshold, recall per defect
type, time per image); the four research-question sections (tables, paired tests, generated takeaways)
live in ``questions.py``.
"""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from fewshot_core import schema
from fewshot_core.atomic import atomic_write_text
from fewshot_core.reports import decisions, questions
from fewshot_core.reports.aggregate import aggregate, metric_columns
from fewshot_core.reports.stats import FEW_SEEDS
from fewshot_core.reports.tables import FEW_SEEDS_NOTE, anchor, group_key, support_label
from fewshot_core.reports.timing import SCORE_NOTE, TIME_COLUMNS, add_timings, machine
from fewshot_core.tracking.ui import MLFLOW_UI_ENV, mlflow_ui_url
from fewshot_core.tracking.ui import run_url as mlflow_run_url

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}th{background:#f4f4f4}
td.l,th.l{text-align:left}a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
.note{color:#555;font-size:.9em}img{max-width:100%;margin:.5em 0}
.scroll{max-width:100%;overflow-x:auto}table.dec td,table.runs td{white-space:nowrap}
.n{color:#777;font-size:.8em;white-space:nowrap}sup.few{color:#b5651d}
.takeaway{background:#f1f6fb;border-left:4px solid #1a5fb4;padding:.5em .8em}
tr:target td{background:#fff3b0}tr:target td:first-child{box-shadow:inset 4px 0 #e5a50a}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _runs_table(rows: pd.DataFrame, run_url) -> str:
    """Every per-seed row; the MLflow link comes first so a wide metric list never hides it, and the table
    scrolls inside its own box instead of widening the page. Each row stays one line (a setting key broken at
    its hyphens is unreadable); the link shows the run id's first 8 characters, the whole id in its tooltip."""
    # Per-type recalls have their own table; timings come first so that no scroll hides them.
    times = schema.timing_columns(rows.columns)
    metrics = times + [m for m in metric_columns(rows) if not m.startswith(schema.RECALL_PREFIX)]
    ids = [c for c in ("method", "backbone", "category", "setting", "seed") if c in rows]
    head = '<th class="l">MLflow run</th>' + "".join(f'<th class="l">{c}</th>' for c in ids)
    head += '<th class="l">support</th><th>query</th>' + "".join(f"<th>{m}</th>" for m in metrics)
    body, seen = [], set()
    for rec in rows.sort_values(ids).to_dict("records"):
        target = anchor(group_key(rec))
        attr = f' id="{target}"' if target not in seen else ""
        seen.add(target)
        rid = rec.get("mlflow_run_id")
        link = (f'<a href="{html.escape(run_url(rec))}" title="{html.escape(str(rid))}">{html.escape(str(rid)[:8])}</a>'
                if _present(rid) else "–")
        cells = f'<td class="l">{link}</td>'
        cells += "".join(f'<td class="l">{html.escape(str(rec[c]))}</td>' for c in ids)
        q = rec.get("n_query")
        cells += f'<td class="l">{html.escape(support_label(rec))}</td><td>{int(q) if _present(q) else "–"}</td>'
        cells += "".join(f"<td>{rec[m]:.4f}</td>" if pd.notna(rec[m]) else "<td>–</td>" for m in metrics)
        body.append(f"<tr{attr}>{cells}</tr>")
    return f"<div class=scroll><table class=runs><tr>{head}</tr>{''.join(body)}</table></div>"


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value) not in ("", "None")


def render_report(rows: pd.DataFrame, agg: pd.DataFrame, gallery: list[dict] | None = None,
                  title: str = "fsad benchmark report", info: dict | None = None,
                  mlflow_ui: str | None = None, criterion=None) -> str:
    """The report as one HTML string. ``gallery`` items: ``title``, ``png`` (bytes), optional
    ``mlflow_run_id`` and ``mlflow_experiment_id``. ``mlflow_ui``: the MLflow UI address the links point at
    (default: the ``FSAD_MLFLOW_UI`` setting). ``criterion``: the sweep's ``ChampionCriterion`` (default:
    the registry's default). Rows without per-image times get the scoring share (``timing.add_timings``)."""
    mlflow_ui = (mlflow_ui or mlflow_ui_url()).rstrip("/")
    if len(rows) and "score_seconds" in rows and "ms_per_image" not in rows:
        rows = add_timings(rows)
    if len(rows) and any(c in rows and f"{c}_mean" not in agg for c in TIME_COLUMNS):
        agg = aggregate(rows)

    def run_url(rec) -> str:
        return mlflow_run_url(rec.get("mlflow_experiment_id", ""), rec.get("mlflow_run_id"), mlflow_ui)

    info = dict(info or {})
    info.setdefault("generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    info.setdefault("evaluation rows", len(rows))
    info.setdefault("machine", machine())
    meta = "".join(f'<tr><th class="l">{html.escape(str(k))}</th><td class="l">{html.escape(str(v))}</td></tr>'
                   for k, v in info.items())
    sections = [decisions.deploy(rows, agg, criterion), decisions.decisions(rows, agg),
                *questions.sections(rows, agg, image=_img)]
    out = [(f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><table>{meta}</table>"),
           ("<p class=note>Values are means over seeds; the bracket after a mean is a 95% percentile-bootstrap "
            f"interval where the group has {FEW_SEEDS} or more seeds, and the range (min–max) over its seeds "
            "otherwise (marked †). Each value states its n (episodes × query images); hover it to see its "
            "interval's kind and MLflow run ids; click it to jump to its "
            "per-seed rows, which link to MLflow (start the UI with <code>fsad mlflow-ui</code>, served at "
            f"{html.escape(mlflow_ui)}; set <code>{MLFLOW_UI_ENV}</code> to move both). "
            f"{html.escape(FEW_SEEDS_NOTE)}</p>"),
           "<ul>" + "".join(f'<li><a href="#{s.anchor}">{html.escape(s.heading)}</a></li>' for s in sections)
           + '<li><a href="#gallery">Anomaly maps</a></li><li><a href="#runs">All runs</a></li></ul>']
    for s in sections:
        out.append(f'<h2 id="{s.anchor}">{html.escape(s.heading)}</h2><p class=note>{html.escape(s.note)}</p>'
                   f"{s.body}<p class=takeaway><b>Takeaway:</b> {html.escape(s.takeaway)}</p>")
    out.append('<h2 id="gallery">Anomaly maps on test images</h2>')
    if gallery:
        for item in gallery:
            rid = item.get("mlflow_run_id")
            cap = html.escape(item.get("title", ""))
            if _present(rid):
                cap += f' · MLflow run <a href="{html.escape(run_url(item))}">{html.escape(str(rid))}</a>'
            out.append(f"<p class=note>{cap}</p>{_img(item['png'], item.get('title', 'anomaly maps'))}")
    else:
        out.append("<p class=note>No anomaly maps (no one-class runs with pixel maps).</p>")
    out.append('<h2 id="runs">All runs (one row per method × category × setting × seed)</h2>'
               f"<p class=note>{html.escape(SCORE_NOTE)} Times in ms are per image.</p>")
    out.append(_runs_table(rows, run_url) if len(rows) else "<p class=note>No runs.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: Path, text: str) -> Path:
    """Atomic write: temporary sibling, then rename."""
    return atomic_write_text(path, text, mode=0o644)  # a report is meant to be shared (mkstemp makes 0600)
