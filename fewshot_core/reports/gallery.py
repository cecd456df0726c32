"""The report's anomaly-map gallery: per method and category, the strip one of its runs logged
(``fewshot_core/figures/gallery.py`` draws it when the episode is evaluated)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd


def report_gallery(rows: pd.DataFrame, fetch: Callable[[str, str], bytes | None]) -> list[dict]:
    """Per method and category with a strip: the largest-shot run (lowest seed). ``fetch(run_id, artifact)``
    returns the strip's PNG from the run's tracked artifacts, so the report shows exactly what was logged."""
    if not len(rows) or "gallery_artifact" not in rows:
        return []
    have = rows[rows["gallery_artifact"].notna() & rows["mlflow_run_id"].notna()]
    items = []
    for (method, cat), g in have.groupby(["method", "category"], sort=True):
        pick = g.sort_values(["shots", "seed"], ascending=[False, True]).iloc[0]
        png = fetch(pick["mlflow_run_id"], pick["gallery_artifact"])
        if png:
            items.append({"title": f"{method} · {cat} · {pick['setting_key']}", "png": png,
                          "mlflow_run_id": pick["mlflow_run_id"],  # the field render_report reads
                          "mlflow_experiment_id": pick.get("mlflow_experiment_id")})
    return items
