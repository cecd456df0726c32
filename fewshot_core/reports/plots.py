"""The sweep report's figures (metric against shots, imbalance heatmaps, grouped bars), rendered headless to
PNG bytes; an episode's own figures are in ``fewshot_core/figures/``."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and in Dagster workers
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fewshot_core.figures.png import to_png
from fewshot_core.reports.tables import interval_caption


def metric_vs_shots(agg: pd.DataFrame, metric: str = "image_auroc") -> bytes:
    """One panel per category: metric mean with its interval (bootstrap CI or range, named in the title)
    against shots, a line per method."""
    cats = sorted(agg["category"].unique())
    fig, axes = plt.subplots(1, len(cats), figsize=(4.2 * len(cats), 3.4), squeeze=False, sharey=True)
    for ax, cat in zip(axes[0], cats):
        sub = agg[agg["category"] == cat]
        for method, m in sub.groupby("method"):
            m = m.sort_values("shots")
            x = m["shots"].to_numpy(dtype=float)
            ax.plot(x, m[f"{metric}_mean"], marker="o", label=method)
            ax.fill_between(x, m[f"{metric}_lo"], m[f"{metric}_hi"], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sub["shots"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(cat)
        ax.set_xlabel("shots (good support images)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"band: {band_label(agg)}", fontsize=8)
    return to_png(fig)


def band_label(agg: pd.DataFrame) -> str:
    """What a plot's bands or error bars are (the table captions' words, without the footnote mark)."""
    return interval_caption(agg).replace(" †", "")


def imbalance_heatmaps(agg: pd.DataFrame, metric: str = "balanced_accuracy") -> bytes:
    """One heatmap per method: mean metric (over categories) on the k_good x k_bad grid."""
    methods = sorted(agg["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = (agg[agg["method"] == method]
                .pivot_table(index="k_good", columns="k_bad", values=f"{metric}_mean", aggfunc="mean"))
        im = ax.imshow(grid.to_numpy(dtype=float), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [str(int(c)) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(int(r)) for r in grid.index])
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xlabel("k_bad")
        ax.set_ylabel("k_good")
        ax.set_title(method)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=metric)
    return to_png(fig)


def grouped_bars(agg: pd.DataFrame, group: str, hue: str, metric: str, title: str = "") -> bytes:
    """Bars of ``metric`` per ``group`` value, one bar per ``hue`` value, with its interval (named in the title)."""
    groups = list(dict.fromkeys(agg[group]))
    hues = sorted(agg[hue].dropna().unique())
    width = 0.8 / max(len(hues), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(groups)), 3.4))
    for i, h in enumerate(hues):
        sub = agg[agg[hue] == h].set_index(group).reindex(groups)
        mean = sub[f"{metric}_mean"].to_numpy(dtype=float)
        err = np.vstack([mean - sub[f"{metric}_lo"].to_numpy(dtype=float),
                         sub[f"{metric}_hi"].to_numpy(dtype=float) - mean])
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, mean, width, yerr=np.nan_to_num(err),
               capsize=3, label=str(h))
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.set_title(f"{title}\nerror bars: {band_label(agg)}" if title else f"error bars: {band_label(agg)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)
