"""The row schema (``fewshot_core/schema.py``): the one owner of protocol names, metric columns with their
direction and timing columns; every protocol's row, the report and the pipeline's table speak it."""

from __future__ import annotations

import pandas as pd
import pytest

from _builders import sweep_rows
from fewshot_core import schema
from fewshot_core.evaluation.run import SettingResult
from fewshot_core.reports.aggregate import aggregate, metric_columns
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec


def _direction(name: str) -> bool:
    col = schema.metric(name)
    assert col is not None, f"{name}: shown as a metric but not declared in fewshot_core/schema.py"
    assert col.higher_is_better in (True, False), name
    return col.higher_is_better


def test_every_metric_the_report_cli_and_pipeline_show_is_declared_with_a_direction():
    from fewshot_core.reports import decisions, questions
    from pipelines.sweep_schema import CHAMPION_METRICS

    shown = ({m for m, _ in decisions.DECISION_METRICS} | {questions.RANK, questions.DECIDE}
             | set(schema.HEADLINE.values()) | {m for ms in schema.SHOWN.values() for m in ms}
             | set(CHAMPION_METRICS))
    for name in shown:
        _direction(name)
    assert not _direction("false_alarm_rate") and not _direction("miss_rate")
    assert all(_direction(m) for m in CHAMPION_METRICS)  # the champion ranks by "higher wins"
    assert _direction("recall_broken_large")  # the per-class family
    assert schema.higher_is_better("score_seconds") is False
    with pytest.raises(KeyError, match="not a declared metric"):
        schema.higher_is_better("bank_size")
    assert set(schema.HEADLINE) == set(schema.Protocol) == set(schema.SHOWN)


def test_the_report_summarises_declared_columns_only():
    rows = sweep_rows().assign(debug_score=3.0, bank_size=1000, train_steps=7)  # numeric, undeclared as metrics
    assert not {"debug_score", "bank_size", "train_steps", "threshold"} & set(metric_columns(rows))
    agg = aggregate(rows)
    summarised = {c[:-len("_mean")] for c in agg.columns if c.endswith("_mean")}
    assert {"image_auroc", "balanced_accuracy", "recall_contamination", "fit_seconds", "score_seconds"} <= summarised
    assert not {"debug_score", "bank_size", "train_steps", "threshold"} & summarised
    for name in summarised:
        assert schema.is_metric(name) or name in schema.TIMING, name
    # what MLflow logs and the pipeline checks of a row: its declared metrics, nothing else numeric
    row = {"image_auroc": 0.9, "recall_crack": 0.5, "debug_score": 3.0, "bank_size": 10, "threshold": 2.5}
    assert SettingResult(row).metrics == {"image_auroc": 0.9, "recall_crack": 0.5}


def test_the_benchmark_table_refuses_an_undeclared_column():
    row = sweep_rows().iloc[0].to_dict()
    assert schema.table_row(row) == row  # every column the pipeline writes is declared
    with pytest.raises(ValueError, match="debug_score.*fewshot_core/schema.py"):
        schema.table_row({**row, "debug_score": 1.0})


def test_every_protocol_row_carries_the_shared_names(synth_root, tmp_path):
    from fewshot_core.data import list_categories, load_dataset
    from fewshot_core.episodes import sample_oneclass, sample_supervised
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.evaluation.results import OneClassResult, SupervisedResult
    from fewshot_core.evaluation.supervised import run_supervised_episode
    from fewshot_core.evaluation.transductive import run_transductive_episode, transductive_episode
    from fewshot_core.features.store import FeatureStore

    ds = load_dataset(synth_root, list_categories(synth_root)[0])
    part = FeatureStore(tmp_path).build(ds, FeatureSpec(image_size=64), EmbedCompute(num_workers=0, progress=False))
    results = {
        schema.Protocol.ONECLASS: run_oneclass_episode(ds, part, sample_oneclass(ds, 2, 0), "knn",
                                                       options=EpisodeOptions(mask_size=32, augment="none")),
        schema.Protocol.SUPERVISED: run_supervised_episode(ds, part, sample_supervised(ds, 2, 1, 0), "protonet"),
        schema.Protocol.TRANSDUCTIVE: run_transductive_episode(ds, part, transductive_episode(ds, 0, 0), "musc",
                                                               options=EpisodeOptions(mask_size=32))}
    shared = {"episode_id", "protocol", "category", "method", "params", "backbone", "seed", "n_support", "n_query",
              "fit_s", "score_s", "image_auroc"}
    for protocol, res in results.items():
        # a typed result: the row beside what plots and saved models need, no out-parameter dict
        assert isinstance(res, SupervisedResult if protocol == schema.Protocol.SUPERVISED else OneClassResult)
        assert res.model is not None and len(res.image_scores) == len(res.query_ids) == res.row["n_query"]
        row = res.row
        assert row["protocol"] == protocol and type(row["protocol"]) is str, protocol
        assert shared <= row.keys(), (protocol, shared - row.keys())
        assert "predict_s" not in row
        assert schema.undeclared(row) == [], protocol  # every column has a declared kind
        for name in schema.metric_columns(row):
            _direction(name)
    frame = pd.DataFrame([r.row for r in results.values()])
    assert set(frame["protocol"]) == set(schema.PROTOCOLS) and frame["score_s"].notna().all()
    oc = results[schema.Protocol.ONECLASS]
    assert oc.image_maps(oc.patch_maps[:1], oc.query_ids[:1]).shape[1:] == (32, 32) and oc.threshold is not None
