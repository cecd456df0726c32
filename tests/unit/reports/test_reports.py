"""Aggregation over seeds, the bootstrap interval and the self-contained HTML report, on fabricated rows."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from fewshot_core.figures.gallery import anomaly_gallery
from fewshot_core.reports import aggregate, bootstrap_ci, render_report, write_report


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    values = [0.8, 0.9, 0.85, 0.95, 0.7]
    mean, lo, hi = bootstrap_ci(values, seed=3)
    assert mean == pytest.approx(np.mean(values))
    assert min(values) <= lo < mean < hi <= max(values)
    assert bootstrap_ci(values, seed=3) == (mean, lo, hi)
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert all(np.isnan(bootstrap_ci([float("nan")])))
    # A wider spread gives a wider interval.
    _, lo2, hi2 = bootstrap_ci([0.5, 1.0, 0.5, 1.0, 0.75], seed=3)
    assert hi2 - lo2 > hi - lo


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for cat in ("cat_a", "cat_b"):
        for method in ("patchcore", "knn"):
            for shots in (1, 4):
                for seed in (0, 1):
                    rows.append(dict(method=method, method_name=method, backbone="lite0", category=cat,
                                     protocol="oneclass", setting=f"oc-k{shots}", shots=shots, k_good=shots,
                                     k_bad=0, label_mode=None, distance=None, seed=seed,
                                     mlflow_run_id=f"run-{cat}-{method}-{shots}-{seed}", mlflow_experiment_id="1",
                                     image_auroc=0.6 + 0.08 * shots + 0.01 * seed,
                                     pixel_auroc=0.9 if cat == "cat_a" else float("nan")))
        for dist in ("euclidean", "cosine"):
            for g, b in ((1, 1), (5, 1), (1, 5), (5, 5)):
                for mode in ("binary", "multiclass"):
                    for seed in (0, 1):
                        rows.append(dict(method=f"protonet-{dist}", method_name="protonet", backbone="lite0",
                                         category=cat, protocol="supervised",
                                         setting=f"sup-g{g}b{b}-{mode[:3]}", shots=g, k_good=g, k_bad=b,
                                         label_mode=mode, distance=dist, seed=seed,
                                         mlflow_run_id=f"run-{cat}-{dist}-{g}{b}{mode}-{seed}",
                                         mlflow_experiment_id="1",
                                         balanced_accuracy=float(rng.uniform(0.5, 1.0)),
                                         n_support_good=g, n_support_bad=3 * b, n_query=40,
                                         confusion="[[1, 0], [0, 1]]" if mode == "binary" else
                                         "[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]",
                                         image_auroc=float(rng.uniform(0.5, 1.0))))
    return pd.DataFrame(rows)


def test_aggregate_one_row_per_group_with_run_ids():
    rows = _rows()
    agg = aggregate(rows)
    # 2 cats x (2 oc methods x 2 shots + 2 distances x 4 ratios x 2 modes) groups
    assert len(agg) == 2 * (2 * 2 + 2 * 4 * 2)
    assert (agg["n_seeds"] == 2).all()
    one = agg[(agg.method == "patchcore") & (agg.category == "cat_a") & (agg.shots == 4)].iloc[0]
    assert one["image_auroc_mean"] == pytest.approx(0.6 + 0.32 + 0.005)
    assert one["image_auroc_lo"] <= one["image_auroc_mean"] <= one["image_auroc_hi"]
    assert set(one["run_ids"].split()) == {"run-cat_a-patchcore-4-0", "run-cat_a-patchcore-4-1"}
    # A metric missing for a whole group stays missing; never invented.
    b = agg[(agg.method == "patchcore") & (agg.category == "cat_b")]
    assert b["pixel_auroc_mean"].isna().all()


def test_html_report_is_self_contained_and_links_every_number(tmp_path):
    rows = _rows()
    agg = aggregate(rows)
    gallery = [{"title": "patchcore cat_a", "mlflow_run_id": "run-cat_a-patchcore-4-0", "mlflow_experiment_id": "1",
                "png": anomaly_gallery([{"image": np.zeros((32, 32, 3), np.uint8),
                                         "map": np.random.default_rng(0).random((32, 32)),
                                         "mask": np.eye(32, dtype=bool), "caption": "x"}])}]
    text = render_report(rows, agg, gallery, info={"data": "synthetic"})
    path = write_report(tmp_path / "report.html", text)
    assert path.read_text() == text
    for heading in ("RQ1", "RQ2", "RQ3", "RQ4", "Anomaly maps", "All runs"):
        assert heading in text
    # Self-contained: no external resources, only embedded images that decode as PNG.
    assert not re.search(r'src="(?!data:)', text) and "<script" not in text and "stylesheet" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) >= 4  # shots, imbalance and distance plots + the gallery
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    # Every per-seed run links to MLflow, and every aggregated value links to an anchor that exists.
    for rid in rows["mlflow_run_id"]:
        assert f"#/experiments/1/runs/{rid}" in text
    anchors = set(re.findall(r' id="(g-[0-9a-f]+)"', text))
    links = set(re.findall(r'href="#(g-[0-9a-f]+)"', text))
    assert links and links <= anchors
    assert "0.925 [" in text or "0.925" in text  # patchcore 4-shot mean is shown


def test_report_says_what_is_missing_instead_of_failing():
    rows = _rows()
    oc_only = rows[rows.protocol == "oneclass"]
    text = render_report(oc_only, aggregate(oc_only))
    assert "Needs supervised binary runs" in text and "Needs a method run with both" in text
    assert "No anomaly maps" in text
