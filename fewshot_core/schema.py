"""The schema of an evaluation row: protocol names, identity, metric and timing columns, in one place.

An episode row (``evaluation/``: one per protocol run), the pipeline's benchmark table (one row per
partition, ``pipelines/assets/evaluation.py``), the MLflow run of a partition, ``fsad evaluate`` and the
report all read their columns from here. A column declared a metric has a direction (higher or lower is
better) and lies in [0, 1]; a numeric column that is not declared a metric is not one: the report does
not average it and the checks do not hold it to [0, 1]. A partition's MLflow run logs the row's metrics,
its timings and, beside them, the decision threshold (a detail, so the run shows its cut). Every
protocol's row carries ``protocol`` and the same timing names (``fit_s``, ``score_s``).

Imports nothing from the project, so every layer (settings, registry, protocols, reports, pipeline) can
read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class Protocol(StrEnum):
    """How an episode is drawn and scored; a ``StrEnum``, so a member equals its plain string."""

    ONECLASS = "oneclass"  # k good support images, the whole test split as query
    SUPERVISED = "supervised"  # labelled good and defective support images (the thesis protocol)
    TRANSDUCTIVE = "transductive"  # the unlabeled test images scored together, 0 or more good shots


PROTOCOLS: tuple[str, ...] = tuple(p.value for p in Protocol)


class Kind(StrEnum):
    IDENTITY = "identity"  # what was evaluated: compared exactly, never averaged
    METRIC = "metric"  # a quality number in [0, 1] with a direction
    TIMING = "timing"  # seconds or milliseconds; lower is better
    DETAIL = "detail"  # anything else a row carries: shown or stored, never averaged, never a metric


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    doc: str
    higher_is_better: bool | None = None  # metrics and timings: which way is better
    group: bool = False  # identity: part of the seed-free group the report averages seeds over
    label: str = ""  # metrics: how the report names it


def _id(name: str, doc: str, group: bool = False) -> Column:
    return Column(name, Kind.IDENTITY, doc, group=group)


def _metric(name: str, label: str, doc: str, higher: bool = True) -> Column:
    return Column(name, Kind.METRIC, doc, higher_is_better=higher, label=label)


def _time(name: str, doc: str) -> Column:
    return Column(name, Kind.TIMING, doc, higher_is_better=False)


def _detail(name: str, doc: str) -> Column:
    return Column(name, Kind.DETAIL, doc)


# Identity: the episode row's and the benchmark table's (the table adds the sweep's names and run ids).
IDENTITY_COLUMNS: tuple[Column, ...] = (
    _id("method", "method name (table: the sweep's method id, e.g. patchcore-supervised)", group=True),
    _id("method_name", "table: the registry name of the method", group=True),
    _id("backbone", "feature backbone (or the detector's own)", group=True),
    _id("category", "the dataset category", group=True),
    _id("protocol", "one of PROTOCOLS", group=True),
    _id("setting", "table: the seed-free setting name (Setting.name)", group=True),
    _id("setting_key", "table: the setting key with its seed (Setting.key)"),
    _id("shots", "good support images (one-class, transductive; table: k_good)", group=True),
    _id("k_good", "supervised: good support images", group=True),
    _id("k_bad", "supervised: defective support images per defect type", group=True),
    _id("label_mode", "supervised: binary or multiclass", group=True),
    _id("distance", "table: ProtoNet's distance parameter", group=True),
    _id("seed", "the episode seed"),
    _id("episode_id", "the sampled episode"),
    _id("partition_key", "the feature-store partition (episode row) or the Dagster partition (table)"),
    _id("n_support", "support images"),
    _id("n_query", "query images"),
    _id("n_support_good", "table: good images in the support"),
    _id("n_support_bad", "table: defective images in the support"),
    _id("mlflow_run_id", "table: the partition's MLflow run"),
    _id("mlflow_experiment_id", "table: its MLflow experiment"),
    _id("dagster_run_id", "table: the Dagster run that computed it"),
)

# Metrics, in the order the report shows them first. ``recall_<class>`` (RECALL_PREFIX) is a family.
METRIC_COLUMNS: tuple[Column, ...] = (
    _metric("image_auroc", "image AUROC", "good vs defective ranking of the query images"),
    _metric("pixel_auroc", "pixel AUROC", "one-class: pixel ranking against the masks"),
    _metric("aupro", "AUPRO", "one-class: per-region overlap up to 30 % false positives"),
    _metric("image_f1_max", "image F1-max", "best F1 over image thresholds"),
    _metric("pixel_f1_max", "pixel F1-max", "best F1 over pixel thresholds"),
    _metric("balanced_accuracy", "balanced accuracy", "at the model's decision threshold or predicted class"),
    _metric("accuracy", "accuracy", "supervised: share of queries given the right class"),
    _metric("macro_f1", "macro F1", "supervised: F1 averaged over the episode's classes"),
    _metric("false_alarm_rate", "false-alarm rate", "good queries flagged", higher=False),
    _metric("miss_rate", "miss rate", "defective queries passed", higher=False),
)
RECALL_PREFIX = "recall_"  # recall_<class or defect type>: its queries flagged as it; higher is better

# Timings. The episode row says fit_s / score_s (every protocol); the benchmark table keeps its
# fit_seconds / score_seconds names (stored tables and MLflow history use them); the report adds the
# per-image times (reports/timing.py).
TIMING_COLUMNS: tuple[Column, ...] = (
    _time("fit_s", "episode row: seconds to fit the support (image detectors: to load or train)"),
    _time("score_s", "episode row: seconds to score the queries (maps and metrics excluded)"),
    _time("train_s", "episode row, detectors trained on images: the original training time"),
    _time("fit_seconds", "table: the episode row's fit_s"),
    _time("score_seconds", "table: the episode row's score_s"),
    _time("ms_per_image", "report: time per image end to end (backbone + scoring)"),
    _time("embed_ms_per_image", "report: the backbone's share per image (the store's build rate)"),
    _time("score_ms_per_image", "report: the scoring share per image"),
)
PER_IMAGE_TIMING = ("ms_per_image", "embed_ms_per_image", "score_ms_per_image")

# Everything else an episode row or the benchmark table holds.
DETAIL_COLUMNS: tuple[Column, ...] = (
    _detail("params", "the method's parameters as JSON (seed included)"),
    _detail("meta_pool", "supervised, meta-trained methods: what they learnt from"),
    _detail("confusion", "supervised: the confusion matrix as JSON, rows true, columns predicted"),
    _detail("classes", "supervised: the episode's classes as JSON"),
    _detail("info", "supervised: the estimator's fit information as JSON"),
    _detail("pool", "supervised: where shots and queries are drawn from"),
    _detail("full_shot", "one-class: 'yes' when the support is every good training image (a string)"),
    _detail("augment", "one-class: how the support bank was augmented"),
    _detail("mask_size", "one-class: short side of masks and maps"),
    _detail("input_shape", "one-class: 'HxW' of masks and maps"),
    _detail("config", "one-class: default, or what config=auto chose"),
    _detail("config_scores", "one-class, config=auto: the candidates' scores"),
    _detail("config_reason", "one-class, config=auto: why it chose"),
    _detail("align", "one-class: none, aligned, or why not ('texture', 'round part' or 'fixed pose: not aligned')"),
    _detail("bank_size", "one-class: memory-bank rows (trained detectors: their own count)"),
    _detail("threshold", "the decision threshold, on the method's score scale"),
    _detail("threshold_rule", "how the threshold was set, or why there is none"),
    _detail("threshold_fpr_bound", "the false-alarm rate the threshold stands behind"),
    _detail("train_steps", "detectors trained on images: optimiser steps"),
    _detail("stopped_by", "detectors trained on images: steps, time budget or convergence"),
    _detail("loaded_from_artifact", "detectors trained on images: weights reloaded instead of trained"),
    _detail("device", "detectors trained on images: where they trained"),
    _detail("feature_key", "table: the feature-store partition the episode read"),
    _detail("gallery_artifact", "table: the MLflow artifact of the anomaly-map strip"),
    _detail("model_uri", "table: the logged MLflow Model"),
    _detail("dataset_digest", "table: the MLflow dataset the model was fitted on"),
)
# Episode-row columns the benchmark table copies as they are.
CARRIED = ("confusion", "threshold", "threshold_rule", "threshold_fpr_bound", "align")

IDENTITY: tuple[str, ...] = tuple(c.name for c in IDENTITY_COLUMNS)
GROUP: tuple[str, ...] = tuple(c.name for c in IDENTITY_COLUMNS if c.group)
METRICS: dict[str, Column] = {c.name: c for c in METRIC_COLUMNS}
TIMING: tuple[str, ...] = tuple(c.name for c in TIMING_COLUMNS)
DETAILS: tuple[str, ...] = tuple(c.name for c in DETAIL_COLUMNS)
_DECLARED = frozenset(IDENTITY) | frozenset(METRICS) | frozenset(TIMING) | frozenset(DETAILS)

# Headline per protocol: what the pipeline's check requires and the log line shows first.
HEADLINE = {Protocol.ONECLASS: "image_auroc", Protocol.TRANSDUCTIVE: "image_auroc",
            Protocol.SUPERVISED: "balanced_accuracy"}
# What ``fsad evaluate`` prints per seed, per protocol.
_SCORED_SHOWN = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")  # scores and maps
SHOWN = {Protocol.ONECLASS: _SCORED_SHOWN, Protocol.TRANSDUCTIVE: _SCORED_SHOWN,
         Protocol.SUPERVISED: ("image_auroc", "balanced_accuracy", "accuracy", "macro_f1")}


def metric(name: str) -> Column | None:
    """The declared metric ``name`` (a ``recall_<class>`` included), or None: then it is not a metric."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith(RECALL_PREFIX) and len(name) > len(RECALL_PREFIX):
        return Column(name, Kind.METRIC, f"recall of {name[len(RECALL_PREFIX):]}", higher_is_better=True,
                      label=name.replace("_", " "))
    return None


def is_metric(name: str) -> bool:
    return metric(name) is not None


def higher_is_better(name: str) -> bool:
    """Direction of a metric or timing column; a ``KeyError`` naming the declared metrics otherwise."""
    col = metric(name) or next((c for c in TIMING_COLUMNS if c.name == name), None)
    if col is None:
        raise KeyError(f"{name!r} is not a declared metric or timing (fewshot_core/schema.py); "
                       f"metrics: {', '.join(METRICS)}, {RECALL_PREFIX}<class>")
    return bool(col.higher_is_better)


def metric_columns(columns: Iterable[str]) -> list[str]:
    """The declared metrics among ``columns``: the headline order first, then ``recall_*`` sorted."""
    present = set(columns)
    head = [m for m in METRICS if m in present]
    return head + sorted(c for c in present if c not in METRICS and is_metric(c))


def timing_columns(columns: Iterable[str]) -> list[str]:
    """The declared timings among ``columns``, in declaration order."""
    present = set(columns)
    return [t for t in TIMING if t in present]


def metrics_of(row: Mapping) -> dict[str, float]:
    """The row's metrics as floats (what MLflow logs and the pipeline checks)."""
    return {k: float(v) for k, v in row.items() if is_metric(k) and v is not None}


def declared(name: str) -> bool:
    """Whether ``name`` is a column of the schema (a ``recall_<class>`` included)."""
    return name in _DECLARED or is_metric(name)


def undeclared(columns: Iterable[str]) -> list[str]:
    return [c for c in columns if not declared(c)]


def table_row(values: Mapping) -> dict:
    """A benchmark-table row, refused when it holds a column the schema does not declare: a new column is
    declared here first (with its kind), so the report can never take it for a metric by accident."""
    if extra := undeclared(values):
        raise ValueError(f"columns {extra} are not declared in fewshot_core/schema.py; declare each with its kind")
    return dict(values)
