"""What a reader meets in the report: links that open the right MLflow run at the configured address,
settings labelled by their real support, the thesis's four questions with generated takeaways, paired
statistics, and a runs table that fits the page."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from fewshot_core.reports import aggregate, render_report, stats
from fewshot_core.reports.questions import sections
from fewshot_core.tracking.ui import MLFLOW_UI_ENV

DEFECT_TYPES = 3  # k defective shots per type -> 3k defective images in the support


def _sup_row(method, name, cat, g, b, mode, seed, bacc, auroc, distance=None, confusion=None):
    classes = 2 if mode == "binary" else 1 + DEFECT_TYPES
    return dict(method=method, method_name=name, backbone="lite0", category=cat, protocol="supervised",
                setting=f"sup-g{g}b{b}-{mode[:3]}", setting_key=f"sup-g{g}b{b}-{mode[:3]}-s{seed}", shots=g,
                k_good=g, k_bad=b, label_mode=mode, distance=distance, seed=seed,
                mlflow_run_id=f"r-{method}-{cat}-{g}{b}{mode}-{seed}", mlflow_experiment_id="7",
                n_support_good=g, n_support_bad=DEFECT_TYPES * b, n_query=60,
                confusion=confusion or str(np.eye(classes, dtype=int).tolist()),
                balanced_accuracy=bacc, image_auroc=auroc)


def _rows(seeds=range(3), cosine_same=True):
    rng = np.random.default_rng(1)
    out = []
    for cat in ("a", "b"):
        for seed in seeds:
            out.append(dict(method="patchcore", method_name="patchcore", backbone="lite0", category=cat,
                            protocol="oneclass", setting="oc-k1", setting_key=f"oc-k1-s{seed}", shots=1, k_good=1,
                            k_bad=0, label_mode=None, distance=None, seed=seed, n_support_good=1, n_support_bad=0,
                            n_query=83, mlflow_run_id=f"oc-{cat}-{seed}", mlflow_experiment_id="7",
                            image_auroc=0.9 + 0.01 * seed, pixel_auroc=0.95, gallery_png=None))
            for g, b in ((1, 1), (3, 1)):
                for mode in ("binary", "multiclass"):
                    e = float(rng.uniform(0.6, 0.9))
                    au = float(rng.uniform(0.7, 0.95))
                    out.append(_sup_row("protonet-euclidean", "protonet", cat, g, b, mode, seed, e, au, "euclidean"))
                    c = e if cosine_same else e - 0.05
                    out.append(_sup_row("protonet-cosine", "protonet", cat, g, b, mode, seed, c, au, "cosine"))
                # The one-class detector on the same binary supports, always a little below.
                out.append(_sup_row("patchcore-supervised", "patchcore", cat, g, b, "binary", seed, 0.55,
                                    0.6 + 0.01 * seed))
    return pd.DataFrame(out)


def _report(rows, **kw):
    return render_report(rows, aggregate(rows), **kw)


def test_gallery_links_open_the_run_not_none():
    from fewshot_core.figures.gallery import GALLERY_ARTIFACT, anomaly_gallery
    from fewshot_core.reports.gallery import report_gallery

    rows = _rows().assign(gallery_artifact=None)
    rows.loc[rows.protocol == "oneclass", "gallery_artifact"] = GALLERY_ARTIFACT
    png = anomaly_gallery([{"image": np.zeros((8, 8, 3), np.uint8), "map": np.ones((8, 8))}])
    # the report asset's own gallery items, fetched from the runs' artifacts
    items = report_gallery(rows, lambda run_id, path: png)
    assert items and all(i["mlflow_run_id"] for i in items)
    text = _report(rows, gallery=items)
    gallery = text[text.index('id="gallery"'):text.index('id="runs"')]
    assert re.search(r"/#/experiments/7/runs/oc-a-\d", gallery)
    assert "/runs/None" not in text


def test_links_follow_the_mlflow_ui_setting(monkeypatch):
    monkeypatch.setenv(MLFLOW_UI_ENV, "http://127.0.0.1:5123")
    text = _report(_rows())
    assert "http://127.0.0.1:5123/#/experiments/7/runs/oc-a-0" in text
    assert "127.0.0.1:5000" not in text


def test_cells_say_what_the_support_holds_and_their_n():
    text = _report(_rows())
    # 1 good + 1 defective shot per type over 3 types: the support holds 3 defective images, not "1:1"
    assert "1 good + 3 defective" in text and "3 good + 3 defective" in text
    assert ">1:1<" not in text and "ratio=" not in text
    assert "n = 3 episodes × 60 query images" in text
    assert "n = 3 episodes × 83 query images" in text


def test_sections_follow_the_thesis_questions():
    rows = _rows()
    secs = sections(rows, aggregate(rows))
    heads = [s.heading for s in secs]
    assert "compared with PatchCore and EfficientAD" in heads[0]
    assert "more good than defective" in heads[1]
    assert "defect type" in heads[2] and "PatchCore" in heads[2]
    assert "Euclidean" in heads[3] and "cosine" in heads[3]
    rq1 = secs[0].body
    # one-class detector and few-shot learners side by side at equal support, on the same metrics
    assert "one-class detector" in rq1 and "few-shot learner" in rq1 and "patchcore-supervised" in rq1
    assert "image_auroc" in rq1 and "balanced_accuracy" in rq1
    assert "Methods not run:" in rq1 and "efficientad" in rq1.split("Methods not run:")[1]
    assert "not run" in secs[0].takeaway


def test_takeaways_are_generated_from_the_numbers():
    rows = _rows()
    secs = sections(rows, aggregate(rows))
    t1 = secs[0].takeaway
    learner = rows[(rows.method == "protonet-euclidean") & (rows.label_mode == "binary")]
    assert f"{learner['image_auroc'].mean():.3f}" in t1
    assert "protonet" in t1 and "patchcore-supervised" in t1
    assert "protonet-euclidean is consistently higher" in t1 or "protonet-cosine is consistently higher" in t1
    # other numbers, other text
    worse = rows.copy()
    worse.loc[worse.method == "patchcore-supervised", "image_auroc"] = 0.99
    assert sections(worse, aggregate(worse))[0].takeaway != t1
    assert "patchcore-supervised is consistently higher" in sections(worse, aggregate(worse))[0].takeaway
    # multiclass chance level is stated
    assert "chance 0.250" in secs[2].takeaway and "chance 0.500" in secs[2].takeaway
    assert all(s.takeaway for s in secs)


def test_identical_predictions_are_named_with_the_reason():
    rows = _rows()
    rq4 = sections(rows, aggregate(rows))[3]
    assert "identical predictions in 8 of 8 cells" in rq4.takeaway
    assert "prototype norms" in rq4.takeaway
    differ = sections(_rows(cosine_same=False), aggregate(_rows(cosine_same=False)))[3]
    assert "identical predictions in 0 of 8 cells" in differ.takeaway
    assert "Euclidean is consistently higher" in differ.takeaway  # every one of the 24 pairs +0.05


def test_paired_test_and_few_seed_flags():
    a = pd.DataFrame({"category": "a", "seed": range(8), "m": np.linspace(0.7, 0.8, 8)})
    b = a.assign(m=a["m"] - 0.02)
    res = stats.paired(a, b, "m")
    assert res.n == 8 and res.diff == pytest.approx(0.02)
    from scipy.stats import wilcoxon

    assert res.p == pytest.approx(wilcoxon(a["m"], b["m"], zero_method="zsplit").pvalue) and res.significant
    same = stats.paired(a, a, "m")
    assert same.identical and not same.significant
    assert stats.min_pairs_for_significance() == 6
    few = stats.paired(a.head(3), b.head(3), "m")
    assert "no test can reach" in stats.verdict(few, "x", "y", "m")
    # intervals from fewer than 5 seeds are flagged in the tables
    text = _report(_rows(seeds=range(2)))
    assert "sup class=few" in text and "fewer than 5 seeds" in text
    assert "sup class=few" not in _report(_rows(seeds=range(5))).split('id="gallery"')[0].split("<body>")[1] \
        .replace("fewer than 5 seeds", "")


def test_runs_table_scrolls_in_its_box_and_highlights_the_jumped_to_row():
    text = _report(_rows())
    runs = text[text.index('id="runs"'):]
    assert runs.index("<div class=scroll>") < runs.index("<table class=runs>")
    header = re.search(r"<tr>(.*?)</tr>", runs).group(1)
    assert re.findall(r"<th[^>]*>([^<]*)</th>", header)[0] == "MLflow run"  # never pushed off the page
    assert ".scroll{max-width:100%;overflow-x:auto}" in text
    assert "tr:target td{" in text
    # every aggregated cell links to a row anchor that exists
    anchors = set(re.findall(r'<tr id="(g-[0-9a-f]+)"', text))
    assert set(re.findall(r'href="#(g-[0-9a-f]+)"', text)) <= anchors
