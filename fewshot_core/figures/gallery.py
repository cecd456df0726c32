"""Anomaly-map galleries: which query images to show, and the strip that shows them.

``pick_examples`` chooses from an episode's scores (the two highest-scored anomalous images, the
highest-scored good one, the lowest-scored anomalous one: hits, the worst false alarm, the worst miss);
``render_gallery`` decodes those images and masks and draws them with their maps (``anomaly_gallery``,
each on its own colour scale with the model's threshold marked, captioned with the decision). The report
shows the strips its runs logged (``reports/gallery.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from fewshot_core.backbones.preprocess import as_shape
from fewshot_core.data.imageio import load_mask, load_rgb
from fewshot_core.figures.png import to_png

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
    h, w = as_shape(size)
    items = []
    for i, amap in zip(picks, image_maps):
        rec = dataset.by_id(query_ids[i])
        items.append({"image": np.asarray(load_rgb(rec.path).convert("RGB").resize((w, h))), "map": amap,
                      "mask": load_mask(rec.mask_path, (w, h)) if rec.mask_path else None,
                      "caption": caption(rec.defect_type, rec.label, float(scores[i]), threshold)})
    return anomaly_gallery(items, title, threshold)


def caption(defect_type: str, label: int, score: float, threshold: float | None) -> str:
    """``good: false alarm`` over ``s=3.41 > t=2.87`` (two lines: a strip's captions must not collide);
    without a threshold the defect type over the score."""
    if threshold is None or not np.isfinite(threshold):
        return f"{defect_type}\ns={score:.2f}"
    flagged = score > threshold
    outcome = ("caught" if flagged else "missed") if int(label) == 1 else ("false alarm" if flagged else "passed")
    return f"{defect_type}: {outcome}\ns={score:.2f} {'>' if flagged else '≤'} t={threshold:.2f}"


def map_scale(amap: np.ndarray, threshold: float | None = None) -> tuple[float, float]:
    """One map's colour range: its own min..max, stretched to include the threshold, so a map whose peak
    stays below the threshold never reaches the top colour and one above it always does."""
    lo, hi = float(np.min(amap)), float(np.max(amap))
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, float(threshold)), max(hi, float(threshold))
    return lo, hi if hi > lo else lo + 1e-9


def anomaly_gallery(items: list[dict], title: str = "", threshold: float | None = None) -> bytes:
    """A strip of test images with their anomaly map overlaid and the ground-truth contour.

    Each item: ``image`` (H x W x 3 uint8), ``map`` (H x W float), optional ``mask`` (H x W bool), ``caption``.
    Each map has its own colour scale, spanning the map and the model's ``threshold``: a shared scale lets
    the defective images' peaks wash out a good image's, so a false alarm looked clean. The threshold is a
    line on each image's colour bar and a dashed contour where the map exceeds it.
    """
    n = len(items)
    # constrained layout keeps the suptitle, the two-line captions and the colour bars apart
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False, layout="constrained")
    for ax, it in zip(axes[0], items):
        amap = np.asarray(it["map"], dtype=float)
        lo, hi = map_scale(amap, threshold)
        ax.imshow(it["image"])
        im = ax.imshow(amap, cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        if it.get("mask") is not None and np.any(it["mask"]):
            ax.contour(np.asarray(it["mask"], dtype=float), levels=[0.5], colors="w", linewidths=0.8)
        bar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
        bar.ax.tick_params(labelsize=6)
        if threshold is not None and np.isfinite(threshold):
            bar.ax.axhline(threshold, color="k", linewidth=1.5)
            if amap.min() < threshold < amap.max():
                ax.contour(amap, levels=[threshold], colors="k", linewidths=0.8, linestyles="dashed")
        ax.set_title(it.get("caption", ""), fontsize=7)
        ax.axis("off")
    note = ("colour scale per image; black line / dashed contour: the threshold" if threshold is not None
            and np.isfinite(threshold) else "colour scale per image; no threshold (the model only ranks)")
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=8)
    return to_png(fig)
