"""The report answers the user's question: which model to deploy (the registry's champion, its margin over
the runner-up and how often it is wrong), every setting's false-alarm and miss rate, recall per defect type,
time per image end to end and fit time, the machine, and intervals named by what they are."""

from __future__ import annotations

import re

import pytest
from _builders import sweep_rows

from fewshot_core.models.champion import ChampionCriterion, pick_champions
from fewshot_core.reports import aggregate, render_report
from fewshot_core.reports.decisions import margin_interval
from fewshot_core.reports.timing import add_timings, embed_rates, machine

RATES = {"bottle-lite0-64": {"images_per_s": 20.0, "device": "cpu"}}  # 50 ms backbone per image


def _text(rows, **kw):
    return render_report(rows, aggregate(rows), info={"sweep": "small"}, **kw)


def _section(text: str, anchor: str) -> str:
    start = text.index(f'<h2 id="{anchor}">')
    return text[start:text.index("<h2 ", start + 1)]


def test_report_of_a_small_sweep_shows_errors_per_type_recall_speed_and_machine():
    rows = add_timings(sweep_rows(), RATES)
    text = _text(rows)
    dec = _section(text, "decisions")
    for field in ("false-alarm rate", "miss rate", "balanced accuracy", "image AUROC",
                  "time per image, end to end (ms)", "fit (s)", "Recall per defect type"):
        assert field in dec, field
    for defect in ("broken_large", "contamination", "broken_small"):
        assert f"<th>{defect}</th>" in dec
    # knn at 4 shots: 25.5 % false alarms (mean of 0.25, 0.26); its per-type recall 0.345
    assert "0.255</a>" in dec and "[0.250, 0.260]" in dec and "0.345</a>" in dec and "[0.340, 0.350]" in dec
    # 50 ms backbone + 4.15 s / 83 images = 50 ms scoring: 100 ms per image end to end
    assert "<b>100.0</b>" in dec and "backbone 50.0 + scoring 50.0" in dec
    assert "score_seconds is the time to score all n_query test images" in text  # said where times are shown
    assert "backbone excluded" in text
    assert re.search(r'<th class="l">machine</th><td class="l">[^<]*\d+ cores usable[^<]*GPU: ', text)
    # times lead the runs table too, before any metric column
    runs = text[text.index('<h2 id="runs">'):]
    head = re.findall(r"<th>([^<]+)</th>", runs)
    assert head[:3] == ["query", "fit_seconds", "score_seconds"] and "ms_per_image" in head


def test_deploy_section_names_the_registry_champion_its_margin_and_decision_quality():
    rows = add_timings(sweep_rows(), RATES)
    text = _text(rows)
    deploy = _section(text, "deploy")
    champion = pick_champions(rows)["bottle"]  # what the champion asset registers
    assert champion.method == "ldknn"  # better decisions beat knn's 0.0004 AUROC lead
    assert f"bottle: {champion.method} (tf_efficientnet_lite0) with 4 good shots → fsad-bottle@champion" in deploy
    assert champion.model_uri in deploy
    # margin over the runner-up (knn), paired over 2 seeds: a range, never called a 95 % interval
    assert "Lead over the runner-up knn: Δbalanced_accuracy = +0.0500 [range over 2 seeds: +0.0500, +0.0500]" in deploy
    takeaway = deploy[deploy.index("Takeaway"):]
    assert "deploy ldknn with 4 good shots: balanced accuracy 0.895" in takeaway
    assert "it catches broken_large 34%, broken_small 80%, contamination 38% of each defect type (weakest: " \
           "broken_large)" in takeaway
    assert "It leads knn by +0.0500 balanced_accuracy on each of the 2 paired seeds" in takeaway
    assert "flags 10.5% of good parts (false alarms) and passes 5.5% of defective ones" in takeaway and "100.0 ms per image end to end" in takeaway
    # the runner-up ahead on one seed: the lead is not established, and the report says so
    mixed = rows.copy()
    mixed.loc[(mixed["method"] == "knn") & (mixed["shots"] == 4) & (mixed["seed"] == 1), "balanced_accuracy"] = 0.95
    assert "is not established" in _section(_text(mixed), "deploy")
    # a sweep configured to rank by AUROC names knn, in the report as in the registry
    auroc = ChampionCriterion(metric="image_auroc")
    assert pick_champions(rows, auroc)["bottle"].method == "knn"
    assert "bottle: knn (tf_efficientnet_lite0)" in _section(_text(rows, criterion=auroc), "deploy")


def test_intervals_are_named_by_what_they_are():
    two = _text(sweep_rows(seeds=(0, 1)))
    assert "95% bootstrap" not in _section(two, "decisions").split("<table")[0].replace(
        "95% percentile-bootstrap", "")  # the caption says range
    assert "Brackets: range over 2 seeds." in two and "image_auroc: mean [range over 2 seeds]" in two
    assert "not a confidence interval" in two
    five = _text(sweep_rows(seeds=range(5)))
    assert "Brackets: 95% bootstrap CI." in five and "image_auroc: mean [95% bootstrap CI]" in five
    agg = aggregate(sweep_rows(seeds=(0, 1)))
    assert set(agg["interval"]) == {"range"}
    knn = agg[(agg["method"] == "knn") & (agg["shots"] == 4)].iloc[0]
    assert (knn["false_alarm_rate_lo"], knn["false_alarm_rate_hi"]) == pytest.approx((0.25, 0.26))
    assert margin_interval([0.1, 0.3])[1:] == (pytest.approx(0.1), pytest.approx(0.3), "range over 2 seeds")
    assert margin_interval([0.1, 0.2, 0.3, 0.2, 0.25])[3] == "95% bootstrap CI over 5 seeds"


def test_time_per_image_from_the_store_build_record(tmp_path):
    import json

    from fewshot_core.features.store import STORE_VERSION

    part = tmp_path / "bottle-lite0-64"
    part.mkdir()
    (part / "meta.json").write_text(json.dumps({"key": part.name, "store_version": STORE_VERSION,
                                                "build": {"images_per_s": 8.0, "device": "cpu"}}))
    rates = embed_rates(tmp_path, ["bottle-lite0-64", "missing-key"])
    assert rates == {"bottle-lite0-64": {"images_per_s": 8.0, "device": "cpu"}}
    rows = add_timings(sweep_rows(), rates)
    assert rows["embed_ms_per_image"].iloc[0] == pytest.approx(125.0)
    assert rows["ms_per_image"].iloc[0] == pytest.approx(125.0 + 4150.0 / 83)
    # an unknown partition leaves the backbone share unknown (not zero); a pixel-reading method has none
    unknown = add_timings(sweep_rows(), {})
    assert unknown["ms_per_image"].isna().all() and unknown["score_ms_per_image"].notna().all()
    trained = add_timings(sweep_rows().assign(method_name="efficientad"), {})
    assert (trained["embed_ms_per_image"] == 0).all()
    assert "its own network, inside scoring" in _section(_text(trained), "decisions")
    assert "cores usable" in machine() and "GPU: " in machine()


def test_decision_rows_say_where_the_parts_were_registered():
    rows = add_timings(sweep_rows(), RATES)
    rows["align"] = "round part: not aligned"
    knn4 = (rows["method"] == "knn") & (rows["shots"] == 4)
    rows.loc[knn4 & (rows["seed"] == 0), "align"] = "aligned"
    dec = _section(_text(rows), "decisions")
    assert dec.count("parts registered in") == 1 and "parts registered in 1 of 2 seeds" in dec
    knn_row = [tr for tr in dec.split("<tr>") if "parts registered" in tr][0]
    assert ">knn<" in knn_row and "4 good" in knn_row
    assert "parts registered" not in _section(_text(add_timings(sweep_rows(), RATES)), "decisions")  # no column
