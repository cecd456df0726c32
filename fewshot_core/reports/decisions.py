"""The report's answer to "what do I deploy, how often is it wrong, how fast is it": the champion per
category with its runner-up and margin (``deploy``), and every method × setting's errors at its
threshold, recall per defect type and time per image (``decisions``).

The champion comes from ``fewshot_core.models.champion.rank_candidates``, the function the registry's
``champion`` asset uses, so the report and ``fsad-<category>@champion`` name the same model.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fewshot_core.models.champion import ChampionCriterion, rank_candidates, registered_name
from fewshot_core.reports.aggregate import bootstrap_ci, interval_label, value_range
from fewshot_core.reports.questions import Section
from fewshot_core.reports.stats import FEW_SEEDS
from fewshot_core.reports.tables import cell, esc, interval_caption, support_label
from fewshot_core.reports.timing import SCORE_NOTE, reads_images
from fewshot_core.schema import METRICS, RECALL_PREFIX, Protocol

DECISION_METRICS = tuple((m, METRICS[m].label) for m in ("image_auroc", "balanced_accuracy", "false_alarm_rate",
                                                          "miss_rate"))
# recall of the supervised binary classes: the complements of the false-alarm and miss rates, not a type
NOT_DEFECT_TYPES = (f"{RECALL_PREFIX}good", f"{RECALL_PREFIX}anomalous")
N_HEAD = "seeds × test images"


def _f(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if x is not None and math.isfinite(x) else "–"


def _ms(rec) -> str:
    """``12.3 ms`` with its split, or the scoring share alone where the backbone's is unknown."""
    total, embed, score = (rec.get(f"{c}_mean", math.nan) for c in
                           ("ms_per_image", "embed_ms_per_image", "score_ms_per_image"))
    if math.isfinite(total) and reads_images(rec.get("method_name", "")):
        return f"<b>{total:.1f}</b><br><span class=n>its own network, inside scoring</span>"
    if math.isfinite(total):
        return f"<b>{total:.1f}</b><br><span class=n>backbone {embed:.1f} + scoring {score:.1f}</span>"
    if math.isfinite(score):
        return f"– <br><span class=n>scoring {score:.1f}; backbone unknown</span>"
    return "–"


def _order(agg: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("category", "protocol", "method", "backbone", "label_mode", "k_good", "k_bad") if c in agg]
    return agg.sort_values(keys, na_position="first")


def defect_types(agg: pd.DataFrame) -> list[str]:
    return sorted(c[len("recall_"):-len("_mean")] for c in agg.columns
                  if c.startswith("recall_") and c.endswith("_mean") and c[:-len("_mean")] not in NOT_DEFECT_TYPES)


def decisions(rows: pd.DataFrame, agg: pd.DataFrame) -> Section:
    heading = "How often wrong, and how fast: every method × setting at its threshold"
    note = ("A deployed model flags an image when its score is above the model's threshold (one-class: set from "
            "the good support images only; supervised: the predicted class). False-alarm rate: good test images "
            "flagged; miss rate: defective test images passed; balanced accuracy: 1 − their mean. " + SCORE_NOTE)
    if not len(agg):
        return Section("decisions", heading, note, "<p class=note>No runs.</p>", "No runs to judge.")
    parts = []
    for protocol, group in _order(agg).groupby(agg.get("protocol", pd.Series("", index=agg.index)), sort=False):
        parts.append(f"<h3>{esc(PROTOCOL_LABEL.get(protocol, protocol))}</h3>"
                     f"<p class=note>Brackets: {esc(interval_caption(group))}.</p>{_decision_table(rows, group)}")
    oc = agg[agg["protocol"] == Protocol.ONECLASS] if "protocol" in agg else agg.iloc[0:0]
    types = [t for t in defect_types(oc) if oc[f"recall_{t}_mean"].notna().any()]
    if types:
        parts.append("<h3 id=recall>Recall per defect type (one-class, at the threshold)</h3><p class=note>The "
                     "share of each defect type's test images flagged anomalous; a low value is a defect the model "
                     "lets through. (The supervised learners' per-class recall, naming the defect type, is in "
                     f"RQ3's runs.) Brackets: {esc(interval_caption(oc))}.</p>")
        th = "".join(f'<th class="l">{h}</th>' for h in ("category", "method", "support", N_HEAD))
        th += "".join(f"<th>{esc(t)}</th>" for t in types)
        trs = []
        for rec in _order(oc).to_dict("records"):
            tds = "".join(f'<td class="l">{esc(v)}</td>' for v in (rec["category"], rec["method"], support_label(rec)))
            tds += f'<td class="l n">{esc(_n(rec))}</td>'
            tds += "".join(cell(rec, f"recall_{t}", n_line=False) for t in types)
            trs.append(f"<tr>{tds}</tr>")
        parts.append(f"<div class=scroll><table class=dec><tr>{th}</tr>{''.join(trs)}</table></div>")
    return Section("decisions", heading, note, "".join(parts), _decisions_takeaway(agg, types))


PROTOCOL_LABEL = {Protocol.ONECLASS: "One-class: k good images, the whole test split as query",
                  Protocol.SUPERVISED: "Supervised episodes: good and defective support images",
                  Protocol.TRANSDUCTIVE: "Transductive: the unlabeled test images scored together, 0 or more "
                                         "good images beside them"}


def _decision_table(rows: pd.DataFrame, agg: pd.DataFrame) -> str:
    """One row per method × setting: times first, then the ranking and decision metrics; the threshold
    rule sits under the support (full text on hover), and whether the parts were registered."""
    metrics = [(m, label) for m, label in DECISION_METRICS if f"{m}_mean" in agg]
    head = "".join(f'<th class="l">{h}</th>' for h in ("category", "method", "support · threshold", N_HEAD))
    head += "<th>time per image, end to end (ms)</th><th>fit (s)</th>"
    head += "".join(f"<th>{esc(label)}</th>" for _, label in metrics)
    body = []
    for rec in agg.to_dict("records"):
        support = support_label(rec) + (" (defect types)" if rec.get("label_mode") == "multiclass" else "")
        rule = _rule(rows, rec)
        cells = "".join(f'<td class="l">{esc(v)}</td>' for v in (rec["category"], rec["method"]))
        registered = _registered(rows, rec)
        cells += (f'<td class="l">{esc(support)}<br><span class=n title="{esc(rule)}">{esc(rule.split(":")[0])}'
                  f"</span>{f'<br><span class=n>{esc(registered)}</span>' if registered else ''}</td>")
        cells += f'<td class="l n">{esc(_n(rec))}</td>'
        cells += f"<td>{_ms(rec)}</td><td>{_f(rec.get('fit_seconds_mean', math.nan), 2)}</td>"
        cells += "".join(cell(rec, m, n_line=False) for m, _ in metrics)
        body.append(f"<tr>{cells}</tr>")
    return f"<div class=scroll><table class=dec><tr>{head}</tr>{''.join(body)}</table></div>"


def _n(rec) -> str:
    """``2 × 83``: seeds (episodes) × test images, the n of every value in the row."""
    eps, q = rec.get("n_seeds"), rec.get("n_query")
    if eps is None or (isinstance(eps, float) and not math.isfinite(eps)):
        return ""
    return f"{int(eps)} × {int(q)}" if q is not None and math.isfinite(float(q)) else f"{int(eps)}"


def _group_column(rows: pd.DataFrame, rec, column: str) -> pd.Series:
    """``column`` of the aggregated row ``rec``'s own table rows (one per seed); empty when not recorded."""
    if column not in rows or not rec.get("run_ids"):
        return pd.Series([], dtype=object)
    return rows[rows["mlflow_run_id"].isin(str(rec["run_ids"]).split())][column]


def _rule(rows: pd.DataFrame, rec) -> str:
    """The threshold rule of the group's rows (the first seed's: the rule is the same up to n)."""
    mine = _group_column(rows, rec, "threshold_rule").dropna()
    return str(mine.iloc[0]) if len(mine) else ""


def _registered(rows: pd.DataFrame, rec) -> str:
    """``parts registered in 2 of 3 seeds`` where the support's poses had the images aligned (``align``);
    empty where no seed was, so unaligned rows stay as they were."""
    mine = _group_column(rows, rec, "align")
    aligned = int((mine == "aligned").sum())
    return f"parts registered in {aligned} of {len(mine)} seeds" if aligned else ""


def _decisions_takeaway(agg: pd.DataFrame, types: list[str]) -> str:
    oc = agg[(agg["protocol"] == Protocol.ONECLASS)] if "protocol" in agg else agg
    if "false_alarm_rate_mean" not in oc or oc["false_alarm_rate_mean"].isna().all():
        return "No one-class model made decisions (no threshold: one good shot or detectors trained on images)."
    worst = oc.sort_values("false_alarm_rate_mean", ascending=False).iloc[0]
    text = (f"Highest false-alarm rate: {worst['method']} with {support_label(worst)} on {worst['category']} flags "
            f"{worst['false_alarm_rate_mean']:.0%} of good images")
    if "miss_rate_mean" in oc and oc["miss_rate_mean"].notna().any():
        miss = oc.sort_values("miss_rate_mean", ascending=False).iloc[0]
        text += (f"; highest miss rate: {miss['method']} with {support_label(miss)} on {miss['category']} passes "
                 f"{miss['miss_rate_mean']:.0%} of defective images")
    if types:
        recalls = oc[[f"recall_{t}_mean" for t in types]].mean()
        if recalls.notna().any():
            t = recalls.idxmin()[len("recall_"):-len("_mean")]
            text += f"; the defect type caught least often, over all one-class models, is {t} ({recalls.min():.0%})"
    if "ms_per_image_mean" in oc and oc["ms_per_image_mean"].notna().any():
        fast = oc.sort_values("ms_per_image_mean").iloc[0]
        text += f"; fastest end to end: {fast['method']} at {fast['ms_per_image_mean']:.1f} ms per image"
    return text + "."


# -- which model to deploy -------------------------------------------------------------------------------

def deploy(rows: pd.DataFrame, agg: pd.DataFrame, criterion=None) -> Section:
    criterion = criterion or ChampionCriterion()
    heading = "Which model to deploy"
    note = (f"Per category, the champion registered as fsad-<category>@champion (criterion {criterion.key()}): "
            f"among the {criterion.protocol} rows of the largest shot count, the highest mean {criterion.metric} "
            f"over seeds, which weighs the decisions at the model's threshold rather than the ranking alone; ties "
            f"to the higher {criterion.tiebreak}, then the faster scorer; models without a {criterion.metric} "
            "(no threshold) rank after all that have one. The alias moves only if it beats the current champion "
            "on the same criterion. The margin is the champion minus the runner-up on the same episodes (paired "
            "by seed).")
    ranked = rank_candidates(rows, criterion)
    if not ranked:
        return Section("deploy", heading, note, "<p class=note>No candidate: no evaluation row of the protocol "
                       "has a logged model and the criterion's metrics.</p>",
                       "No champion: no run logged a model with the criterion's metrics.")
    parts, sentences = [], []
    for category, cands in ranked.items():
        champ = cands[0]
        parts.append(f"<h3>{esc(category)}: {esc(champ.method)}"
                     f"{' (' + esc(champ.backbone) + ')' if champ.backbone else ''} with {_shots(champ.shots)}"
                     f" → {esc(registered_name(category))}@champion</h3>")
        parts.append(_candidates_table(agg, cands, criterion))
        margin, text = _margin(rows, criterion, cands)
        parts.append(f"<p class=note>{esc(margin)}</p>")
        parts.append(f"<p class=note>Model: <code>{esc(champ.model_uri)}</code> (MLflow run {esc(champ.run_id)}, "
                     "its lowest seed).</p>")
        sentences.append(_deploy_sentence(agg, category, champ, criterion) + text)
    return Section("deploy", heading, note, "".join(parts), " ".join(sentences))


def _group(agg: pd.DataFrame, cand, protocol: str):
    m = (agg["category"] == cand.category) & (agg["method"] == cand.method) & (agg["shots"] == cand.shots)
    m &= agg["protocol"] == protocol
    if "backbone" in agg and cand.backbone:
        m &= agg["backbone"] == cand.backbone
    hit = agg[m]
    return hit.iloc[0].to_dict() if len(hit) else None


def _candidates_table(agg: pd.DataFrame, cands, criterion) -> str:
    metrics = [m for m, _ in DECISION_METRICS if f"{m}_mean" in agg]
    head = '<th>rank</th><th class="l">method</th><th class="l">backbone</th><th class="l">' + N_HEAD + "</th>"
    head += "".join(f"<th>{esc(dict(DECISION_METRICS)[m])}{' ★' if m == criterion.metric else ''}</th>"
                    for m in metrics)
    head += "<th>time per image (ms)</th>"
    body = []
    for i, cand in enumerate(cands, 1):
        rec = _group(agg, cand, criterion.protocol)
        cells = f'<td>{i}</td><td class="l">{"<b>" if i == 1 else ""}{esc(cand.method)}{"</b>" if i == 1 else ""}'
        cells += f'</td><td class="l">{esc(cand.backbone or "")}</td><td class="l n">{esc(_n(rec or {}))}</td>'
        cells += "".join(cell(rec, m, n_line=False) if rec else "<td>–</td>" for m in metrics)
        cells += f"<td>{_ms(rec) if rec else '–'}</td>"
        body.append(f"<tr>{cells}</tr>")
    return f"<div class=scroll><table class=dec><tr>{head}</tr>{''.join(body)}</table></div>"


def _per_seed(rows: pd.DataFrame, cand, protocol: str, metric: str) -> pd.Series:
    m = (rows["category"] == cand.category) & (rows["method"] == cand.method) & (rows["shots"] == cand.shots)
    m &= (rows["protocol"] == protocol) & rows["model_uri"].notna()
    if "backbone" in rows and cand.backbone:
        m &= rows["backbone"] == cand.backbone
    return rows[m].groupby("seed")[metric].mean() if metric in rows else pd.Series(dtype=float)


def margin_interval(diffs) -> tuple[float, float, float, str]:
    """(mean, low, high, what the interval is) of per-seed paired differences."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    if d.size >= FEW_SEEDS:
        return (*bootstrap_ci(d), interval_label("bootstrap", d.size))
    return (*value_range(d), interval_label("range", d.size))


def _margin(rows: pd.DataFrame, criterion, cands) -> tuple[str, str]:
    """The margin line under the table and the takeaway's clause on it."""
    if len(cands) < 2:
        return "No runner-up: one candidate only.", " It had no competitor at this shot count."
    champ, second = cands[0], cands[1]
    metric = criterion.metric if math.isfinite(champ.value) and math.isfinite(second.value) else criterion.tiebreak
    a = _per_seed(rows, champ, criterion.protocol, metric)
    b = _per_seed(rows, second, criterion.protocol, metric)
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if not len(both):
        return (f"Runner-up {second.method}: no shared seeds with {metric} to pair.",
                f" Its lead over {second.method} cannot be paired.")
    mean, lo, hi, what = margin_interval(both["a"] - both["b"])
    line = (f"Lead over the runner-up {second.method}: Δ{metric} = {mean:+.4f} [{what}: {lo:+.4f}, {hi:+.4f}], "
            f"paired over {len(both)} seed{'s' if len(both) != 1 else ''}.")
    if metric != criterion.metric:
        line += f" (Decided by the tiebreak {metric}: at least one of them has no {criterion.metric}.)"
    if lo <= 0 <= hi or len(both) < 2:
        clause = (f" Its lead over {second.method} ({mean:+.4f} {metric}, {what} {lo:+.4f} to {hi:+.4f}) is not "
                  f"established: the interval reaches zero or rests on one seed; run more seeds before trusting "
                  "the order.")
    elif len(both) < FEW_SEEDS:
        clause = (f" It leads {second.method} by {mean:+.4f} {metric} on each of the {len(both)} paired seeds "
                  f"({what} {lo:+.4f} to {hi:+.4f}); too few seeds for a confidence interval.")
    else:
        clause = f" It leads {second.method} by {mean:+.4f} {metric} ({what} {lo:+.4f} to {hi:+.4f})."
    return line, clause


def _shots(k) -> str:
    return f"{k} good shot" + ("" if k == 1 else "s")


def _deploy_sentence(agg: pd.DataFrame, category: str, champ, criterion) -> str:
    rec = _group(agg, champ, criterion.protocol) or {}
    bacc, far, miss = (rec.get(f"{m}_mean", math.nan) for m in ("balanced_accuracy", "false_alarm_rate", "miss_rate"))
    text = f"{category}: deploy {champ.method} with {_shots(champ.shots)}"
    if math.isfinite(far):
        text += (f": balanced accuracy {_f(bacc)}, it flags {far:.1%} of good parts (false alarms) and passes "
                 f"{f'{miss:.1%}' if math.isfinite(miss) else '–'} of defective ones (misses)")
    else:
        text += " (it has no threshold at this shot count: it ranks images but makes no decision)"
    if math.isfinite(rec.get("ms_per_image_mean", math.nan)):
        text += f", {rec['ms_per_image_mean']:.1f} ms per image end to end"
    recalls = {t: rec[f"recall_{t}_mean"] for t in defect_types(pd.DataFrame([rec]))
               if math.isfinite(rec.get(f"recall_{t}_mean", math.nan))}
    if recalls:
        weakest = min(recalls, key=recalls.get)
        text += (f"; it catches {', '.join(f'{t} {v:.0%}' for t, v in sorted(recalls.items()))} of each defect "
                 f"type (weakest: {weakest})")
    return text + "."

