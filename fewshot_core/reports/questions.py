"""The report's four sections: the thesis's research questions, each answered from the sweep's rows with
its tables, paired tests and a takeaway sentence generated from those numbers (never fixed text).

1. Is few-shot learning fit for anomaly detection, compared with PatchCore and EfficientAD?
2. Does giving the few-shot learner more good than defective shots improve it?
3. How well do the methods name the anomaly class (binary vs defect type), compared with the detectors?
4. Euclidean distance vs cosine similarity.

Comparisons are paired over the same episodes (category and seed fix the support and query draws) and use
the metric names both protocols share: ``image_auroc`` (good vs defective ranking) and
``balanced_accuracy`` (at the decision threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from fewshot_core.methods import registry
from fewshot_core.reports import plots, stats
from fewshot_core.reports.tables import esc, metric_caption, pivot, simple, support_label
from fewshot_core.reports.timing import reads_images
from fewshot_core.schema import Protocol

RANK, DECIDE = "image_auroc", "balanced_accuracy"  # declared in fewshot_core/schema.py, higher is better
SUPERVISED, ONECLASS = Protocol.SUPERVISED, Protocol.ONECLASS  # protocols; also the registry's family names


@dataclass(frozen=True)
class Section:
    anchor: str
    heading: str
    note: str
    body: str  # HTML
    takeaway: str  # plain text generated from the numbers


def sections(rows: pd.DataFrame, agg: pd.DataFrame, image=None) -> list[Section]:
    """The four sections; ``image(png, alt)`` embeds a plot (None: no plots)."""
    image = image or (lambda png, alt: "")
    rows = _with_family(rows)
    agg = _with_family(agg)
    return [rq1(rows, agg, image), rq2(rows, agg, image), rq3(rows, agg), rq4(rows, agg, image)]


# -- shared ----------------------------------------------------------------------------------------------

def _family(method_name) -> str:
    try:
        return registry.get(str(method_name)).family
    except Exception:  # noqa: BLE001 - a method no longer registered keeps its rows, labelled unknown
        return "unknown"


def _with_family(frame: pd.DataFrame) -> pd.DataFrame:
    if not len(frame):
        return frame
    names = frame["method_name"] if "method_name" in frame else frame["method"].str.split("-").str[0]
    return frame.assign(method_name=names, family=[_family(n) for n in names])


FAMILY_LABEL = {ONECLASS: "one-class detector", SUPERVISED: "few-shot learner", "unknown": "unknown"}


def _select(frame: pd.DataFrame, **eq) -> pd.DataFrame:
    if not len(frame):
        return frame
    mask = pd.Series(True, index=frame.index)
    for col, value in eq.items():
        if col not in frame:
            return frame.iloc[0:0]
        mask &= frame[col] == value
    return frame[mask]


def _mean(frame: pd.DataFrame, metric: str) -> float:
    return float(frame[metric].mean()) if metric in frame and frame[metric].notna().any() else math.nan


def _f(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "n/a"


def _setting_labels(agg: pd.DataFrame) -> dict:
    """Setting -> what its support holds (several categories with different defect types: all of them)."""
    out = {}
    for setting, g in agg.groupby("setting"):
        out[setting] = " / ".join(dict.fromkeys(support_label(r) for r in g.to_dict("records")))
        mode = g["label_mode"].dropna().unique() if "label_mode" in g else []
        if len(mode) == 1 and mode[0] == "multiclass":
            out[setting] += " (defect types)"
    return out


def _best(rows: pd.DataFrame, metric: str) -> str | None:
    if not len(rows) or metric not in rows or rows[metric].isna().all():
        return None
    return rows.groupby("method")[metric].mean().sort_values(ascending=False).index[0]


# -- RQ1 -------------------------------------------------------------------------------------------------

def rq1(rows, agg, image) -> Section:
    heading = "RQ1 · Is few-shot learning fit for anomaly detection, compared with PatchCore and EfficientAD?"
    note = ("One-class detectors and supervised few-shot learners on the same supervised binary episodes: "
            "equal support, the same query images, the same metrics.")
    sb_rows = _select(rows, protocol=SUPERVISED, label_mode="binary")
    sb_agg = _select(agg, protocol=SUPERVISED, label_mode="binary")
    parts, takeaway = [], ""
    learners = _select(sb_rows, family=SUPERVISED)
    detectors = _select(sb_rows, family=ONECLASS)
    if len(sb_agg):
        sb_agg = sb_agg.assign(family=[FAMILY_LABEL[f] for f in sb_agg["family"]])  # header reads "family"
        labels = _setting_labels(sb_agg)
        for metric in (RANK, DECIDE):
            if f"{metric}_mean" in sb_agg and sb_agg[f"{metric}_mean"].notna().any():
                parts.append(pivot(sb_agg, ["category", "family", "method"], "setting", metric, labels))
    if len(learners) and len(detectors):
        a, b = _best(learners, RANK), _best(detectors, RANK)
        keys = ("category", "setting", "seed")
        ra, rb = _select(learners, method=a), _select(detectors, method=b)
        res_rank = stats.paired(ra, rb, RANK, keys)
        res_dec = stats.paired(ra, rb, DECIDE, keys)
        parts.append("<p class=note>Paired over the same episodes (category × setting × seed), best of each "
                     "family by mean image_auroc:</p>")
        parts.append(simple(["comparison", "metric", "few-shot learner", "one-class detector", "paired test"],
                            [[f"{a} vs {b}", m, _f(r.mean_a), _f(r.mean_b), esc(r.text(m, a, b))]
                             for m, r in ((RANK, res_rank), (DECIDE, res_dec))], left=2))
        n_settings = sb_rows["setting"].nunique()
        takeaway = (f"At equal support ({n_settings} binary settings, {res_rank.n} shared episodes), the best "
                    f"few-shot learner {a} reaches image AUROC {_f(res_rank.mean_a)} and balanced accuracy "
                    f"{_f(res_dec.mean_a)}, the best one-class detector {b} {_f(res_rank.mean_b)} and "
                    f"{_f(res_dec.mean_b)}: {stats.verdict(res_rank, a, b, RANK)}; "
                    f"{stats.verdict(res_dec, a, b, DECIDE)}.")
    else:
        parts.append("<p class=note>Needs one-class detectors and few-shot learners on the same supervised "
                     "binary settings (the default sweep runs patchcore-supervised beside ProtoNet).</p>")
        takeaway = "No comparison at equal support: the sweep lacks one of the two families on binary episodes."
    # The one-class protocol (whole test split as query) as the detectors' own reference.
    oc = _select(agg, protocol=ONECLASS)
    if len(oc) and f"{RANK}_mean" in oc:
        parts.append("<h3>One-class protocol: k good images, the whole test split as query</h3>")
        parts.append(image(plots.metric_vs_shots(oc, RANK), f"{RANK} vs shots"))
        shot_labels = {s: f"{int(s)} good" for s in oc["shots"].dropna().unique()}
        for metric in (RANK, "pixel_auroc", "aupro"):
            if f"{metric}_mean" in oc and oc[f"{metric}_mean"].notna().any():
                parts.append(pivot(oc, ["category", "method"], "shots", metric, shot_labels))
        best_oc = oc.sort_values(f"{RANK}_mean", ascending=False).iloc[0]
        takeaway += (f" Under the one-class protocol the best cell is {best_oc['method']} with "
                     f"{support_label(best_oc)}: image AUROC {_f(best_oc[f'{RANK}_mean'])}.")
    trained = sorted({m for m in rows.get("method_name", pd.Series(dtype=str)) if reads_images(m)}) if len(rows) else []

    ran = set(rows["method_name"]) if len(rows) else set()
    missing = [n for n in registry.names() if n not in ran]
    parts.append(f"<p class=note>Trained detectors in this sweep: {esc(', '.join(trained) or 'none')}. "
                 f"Methods not run: {esc(', '.join(missing) or 'none')}.</p>")
    if not trained:
        takeaway += " EfficientAD and the other trained detectors were not run in this sweep."
    return Section("rq1", heading, note, "".join(parts), takeaway.strip())


# -- RQ2 -------------------------------------------------------------------------------------------------

def rq2(rows, agg, image) -> Section:
    heading = "RQ2 · Does giving the few-shot learner more good than defective shots improve it?"
    note = ("Supervised binary episodes over the good × defective shot grid; settings are labelled by what the "
            "support really holds (k defective shots are drawn per defect type).")
    sb_rows = _select(rows, protocol=SUPERVISED, label_mode="binary")
    sb_agg = _select(agg, protocol=SUPERVISED, label_mode="binary")
    if not len(sb_agg) or sb_agg[["k_good", "k_bad"]].drop_duplicates().shape[0] < 2:
        return Section("rq2", heading, note, "<p class=note>Needs supervised binary runs over at least two "
                       "good : defective settings.</p>", "Not answered: fewer than two shot settings were run.")
    labels = _setting_labels(sb_agg)
    parts = [image(plots.imbalance_heatmaps(sb_agg, DECIDE), "imbalance heatmap")]
    for metric in (DECIDE, RANK):
        if f"{metric}_mean" in sb_agg and sb_agg[f"{metric}_mean"].notna().any():
            parts.append(pivot(sb_agg, ["category", "method"], "setting", metric, labels))
    table, diffs, sentences = [], [], []
    for method, m in sb_rows.groupby("method"):
        for k_bad, g in m.groupby("k_bad"):
            goods = sorted(g["k_good"].unique())
            if len(goods) < 2:
                continue
            lo, hi = _select(g, k_good=goods[0]), _select(g, k_good=goods[-1])
            res = {metric: stats.paired(hi, lo, metric) for metric in (DECIDE, RANK)}
            table.append([method, f"{goods[-1]} vs {goods[0]} good, {k_bad} defective per type",
                          esc(res[DECIDE].text(DECIDE)), esc(res[RANK].text(RANK))])
            if res[DECIDE].n:
                diffs.append((method, k_bad, goods, res[DECIDE]))
    if table:
        parts.append("<p class=note>More good shots at the same defective shots, paired over category × seed "
                     "(the supports differ only by the added good images):</p>")
        parts.append(simple(["method", "comparison", DECIDE, RANK], table, left=2))
    if diffs:
        mean_diff = sum(r.diff for *_, r in diffs) / len(diffs)
        up = [f"{m} (k_bad {k})" for m, k, _, r in diffs if r.significant and r.diff > 0]
        down = [f"{m} (k_bad {k})" for m, k, _, r in diffs if r.significant and r.diff < 0]
        n_pairs = sorted({r.n for *_, r in diffs})
        per_method: dict[str, list[float]] = {}
        for m, _, _, r in diffs:
            per_method.setdefault(m, []).append(r.diff)
        by_method = ", ".join(f"{m} {sum(v) / len(v):+.3f}" for m, v in sorted(per_method.items(),
                                                                               key=lambda kv: -sum(kv[1]) / len(kv[1])))
        sentences.append(f"More good shots at the same defective shots change balanced accuracy by {mean_diff:+.3f} "
                         f"on average over {len(diffs)} method × defective-shot comparisons ({by_method})")
        if up or down:
            sentences.append(("consistently better for " + ", ".join(up) if up else "")
                             + ("; " if up and down else "")
                             + ("consistently worse for " + ", ".join(down) if down else ""))
        else:
            small = max(n_pairs) < stats.min_pairs_for_significance()
            sentences.append("no comparison is consistent across episodes" +
                             (f" (at most {max(n_pairs)} pairs each; a Wilcoxon test needs "
                              f"{stats.min_pairs_for_significance()} to reach p<{stats.ALPHA})" if small else ""))
        takeaway = "; ".join(s for s in sentences if s) + "."
    else:
        takeaway = "Not answered: no method ran two good-shot counts at the same defective shots."
    return Section("rq2", heading, note, "".join(parts), takeaway)


# -- RQ3 -------------------------------------------------------------------------------------------------

def rq3(rows, agg) -> Section:
    heading = ("RQ3 · Naming the anomaly class: good/defective vs defect type, and compared with PatchCore and "
               "EfficientAD")
    note = ("The same supports labelled good/defective (binary) or by defect type (multiclass). Balanced accuracy "
            "has chance 1/classes, so it is also shown above chance: (value − chance) / (1 − chance). The image "
            "AUROC ranks good vs defective in both modes (defect-type probabilities summed).")
    sup = _select(rows, protocol=SUPERVISED)
    if not len(sup) or sup["label_mode"].nunique() < 2:
        return Section("rq3", heading, note, "<p class=note>Needs supervised runs in both binary and multiclass "
                       "label mode.</p>", "Not answered: the sweep ran one label mode only.")
    summary, pair_rows, gains = [], [], []
    for (method, family), m in sup.groupby(["method", "family"]):
        for mode, g in m.groupby("label_mode"):
            classes = stats.n_classes(g) or (2 if mode == "binary" else None)
            chance = stats.chance_balanced_accuracy(classes)
            bacc = _mean(g, DECIDE)
            above = (bacc - chance) / (1 - chance) if math.isfinite(chance) and chance < 1 else math.nan
            summary.append([method, FAMILY_LABEL[family], mode, str(classes or "?"), _f(chance), _f(bacc),
                            _f(above), _f(_mean(g, RANK)), str(len(g))])
        modes = set(m["label_mode"])
        if {"binary", "multiclass"} <= modes:
            keys = ("category", "k_good", "k_bad", "seed")
            b, mc = _select(m, label_mode="binary"), _select(m, label_mode="multiclass")
            r_rank = stats.paired(mc, b, RANK, keys)
            r_dec = stats.paired(mc, b, DECIDE, keys)
            pair_rows.append([method, esc(r_dec.text(DECIDE)), esc(r_rank.text(RANK))])
            c = stats.chance_balanced_accuracy(stats.n_classes(mc))
            gains.append((method, r_dec, r_rank, c))
    parts = [simple(["method", "family", "label mode", "classes", "chance", DECIDE, "above chance", RANK,
                     "episodes"], summary, left=3)]
    if pair_rows:
        parts.append("<p class=note>Multiclass minus binary on the same supports (category × setting × seed):</p>")
        parts.append(simple(["method", DECIDE, RANK], pair_rows))
    agg_sup = _select(agg, protocol=SUPERVISED)
    labels = _setting_labels(agg_sup)
    mc_agg = _select(agg_sup, label_mode="multiclass")
    if len(mc_agg):
        parts.append(pivot(mc_agg, ["category", "method"], "setting", DECIDE, labels,
                           note=metric_caption(mc_agg, "balanced_accuracy naming the defect type (multiclass)")))
    if not gains:
        return Section("rq3", heading, note, "".join(parts),
                       "Not answered: no method ran the same settings in both label modes.")
    best = max(gains, key=lambda t: t[1].mean_a if math.isfinite(t[1].mean_a) else -1)
    method, r_dec, r_rank, chance = best
    text = (f"Naming the defect type, the best learner {method} reaches balanced accuracy {_f(r_dec.mean_a)} "
            f"(chance {_f(chance)}) against {_f(r_dec.mean_b)} for good/defective (chance 0.500); "
            f"for its anomaly ranking between modes, {stats.verdict(r_rank, 'multiclass', 'binary', RANK)}")
    det = _select(_select(sup, family=ONECLASS), label_mode="binary")
    if len(det):
        d_best = _best(det, RANK)
        d = _select(det, method=d_best)
        text += (f"; the one-class detector {d_best} on the same binary supports: image AUROC {_f(_mean(d, RANK))}, "
                 f"balanced accuracy {_f(_mean(d, DECIDE))} (it cannot name defect types)")
    return Section("rq3", heading, note, "".join(parts), text + ".")


# -- RQ4 -------------------------------------------------------------------------------------------------

def rq4(rows, agg, image) -> Section:
    heading = "RQ4 · Euclidean distance vs cosine similarity"
    note = "The same method with either distance on the same episodes."
    if "distance" not in rows or rows["distance"].dropna().nunique() < 2:
        return Section("rq4", heading, note, "<p class=note>Needs a method run with both Euclidean and cosine "
                       "distance.</p>", "Not answered: no method ran with both distances.")
    sub = rows[rows["distance"].notna()]
    sub_agg = agg[agg["distance"].notna()] if "distance" in agg else agg.iloc[0:0]
    parts, sentences = [], []
    sub_agg = sub_agg.assign(support=[support_label(r) + (" (defect types)" if r.get("label_mode") == "multiclass"
                                                          else "") for r in sub_agg.to_dict("records")])
    metric = DECIDE if f"{DECIDE}_mean" in sub_agg else RANK
    group = [f"{m} {c} {s}" for m, c, s in zip(sub_agg["method_name"], sub_agg["category"], sub_agg["setting"])]
    parts.append(image(plots.grouped_bars(sub_agg.assign(group=group), "group", "distance", metric,
                                          "Euclidean vs cosine"), "distances"))
    parts.append(pivot(sub_agg, ["category", "method_name", "support"], "distance", metric))
    table = []
    for name, fam in sub.groupby("method_name"):
        dists = sorted(fam["distance"].unique())
        if len(dists) < 2:
            continue
        a, b = (_select(fam, distance="euclidean"), _select(fam, distance="cosine")) \
            if {"euclidean", "cosine"} <= set(dists) else (_select(fam, distance=dists[0]), _select(fam, distance=dists[1]))
        keys = ("category", "setting", "seed")
        cells_same, cells = 0, 0
        eps_same, eps = 0, 0
        for _, cell_a in a.groupby(["category", "setting"]):
            cell_b = b[(b["category"] == cell_a["category"].iloc[0]) & (b["setting"] == cell_a["setting"].iloc[0])]
            same, n = stats.same_predictions(cell_a, cell_b, (DECIDE, "accuracy", "macro_f1"))
            if n:
                cells += 1
                cells_same += int(same == n)
                eps_same, eps = eps_same + same, eps + n
        res = {m: stats.paired(a, b, m, keys) for m in (DECIDE, RANK)}
        table.append([name, f"{cells_same} of {cells}", f"{eps_same} of {eps}", esc(res[DECIDE].text(DECIDE)),
                      esc(res[RANK].text(RANK))])
        s = (f"{name}: Euclidean and cosine give identical predictions in {cells_same} of {cells} cells "
             f"({eps_same} of {eps} episodes with the same confusion matrix)")
        if eps_same:
            s += (", because both assign a query to its nearest class prototype and ‖q−p‖² = ‖q‖² + ‖p‖² − "
                  "2‖q‖‖p‖·cos(q, p): for a fixed query the two orderings of the prototypes can differ only "
                  "through the prototype norms ‖p‖" + (", which here never differ enough to flip a decision"
                                                   if eps_same == eps else
                                                   ", which flip decisions only in the other episodes"))
        s += f"; {stats.verdict(res[DECIDE], 'Euclidean', 'cosine', DECIDE)}"
        sentences.append(s)
    if table:  # decisions can agree while the score ranking (image AUROC) differs: the table shows both
        parts.append(simple(["method", "cells with identical predictions", "episodes", f"Δ{DECIDE} (Euclidean − "
                             "cosine)", f"Δ{RANK}"], table))
    takeaway = ". ".join(sentences) + "." if sentences else "Not answered: no method ran with both distances."
    return Section("rq4", heading, note, "".join(parts), takeaway)
