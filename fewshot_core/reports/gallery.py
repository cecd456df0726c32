"""Anomaly-map galleries: which query images to show, and the strip that shows them.

``pick_examples`` chooses from an episode's scores (the two highest-scored anomalous images, the
highest-scored good one, the lowest-scored anomalous one: hits, the worst false alarm, the worst miss);
``render_gallery`` decodes those images and masks and draws them with their maps (``plots.anomaly_gallery``,
each on its own colour scale with the model's threshold marked, captioned with the decision);
``report_gallery`` picks, per method and category, the run whose strip the HTML report shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from fewshot_core.data.imageio import load_mask, load_rgb
from fewshot_core.reports import plots

GALLERY_IMAGES = 4
GALLERY_ARTIFACT = "plots/anomaly_maps.png"  # the strip's name among a run's MLflow artifacts


def pick_examples(labels: np.ndarray, scores: np.ndarray, n: int = GALLERY_IMAGES) -> list[int]:
    """Indices into the queries, at most ``n``, in display order (ties keep the query order)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    bad = [int(i) for i in order if labels[i] == 1]
    good = [int(i) for i in order if labels[i] == 0]
    return list(dict.fromkeys(bad[:2] + good[:1] + bad[-1:]))[:n]


def render_gallery(dataset, query_ids: Sequence[str], scores: np.ndarray, image_maps: np.ndarray,
                   picks: Sequence[int], size, title: str, threshold: float | None = None) -> bytes:
    """PNG strip of the picked queries at ``size`` (an int for a square, or the maps' (height, width)) with
    their image-resolution maps and mask contours; with the model's ``threshold`` each caption says what the
    decision was (caught, missed, false alarm)."""
    from fewshot_core.backbones.preprocess import as_shape  # torch: the code location loads reports without it

    h, w = as_shape(size)
    items = []
    for i, amap in zip(picks, image_maps):
        rec = dataset.by_id(query_ids[i])
        items.append({"image": np.asarray(load_rgb(rec.path).convert("RGB").resize((w, h))), "map": amap,
                      "mask": load_mask(rec.mask_path, (w, h)) if rec.mask_path else None,
                      "caption": caption(rec.defect_type, rec.label, float(scores[i]), threshold)})
    return plots.anomaly_gallery(items, title, threshold)


def caption(defect_type: str, label: int, score: float, threshold: float | None) -> str:
    """``good: false alarm`` over ``s=3.41 > t=2.87`` (two lines: a strip's captions must not collide);
    without a threshold the defect type over the score."""
    if threshold is None or not np.isfinite(threshold):
        return f"{defect_type}\ns={score:.2f}"
    flagged = score > threshold
    outcome = ("caught" if flagged else "missed") if int(label) == 1 else ("false alarm" if flagged else "passed")
    return f"{defect_type}: {outcome}\ns={score:.2f} {'>' if flagged else '≤'} t={threshold:.2f}"


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
