"""Champion logic: the best method per category gets the alias; a worse rerun does not move it."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
import pytest

from fewshot_core.models.champion import (
    ChampionCriterion,
    current_champion,
    pick_champions,
    promote_champions,
    rank_candidates,
)


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture()
def tracker(tmp_path):
    from fewshot_core.tracking.runs import Tracker

    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri())


def _logged(tracker, name="r"):
    from mlflow.models import Model

    from fewshot_core.tracking.store import fluent_uri

    run_id = tracker.log_evaluation("t", "dag", name, {}, {})
    with fluent_uri(tracker.tracking_uri):
        info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=_Constant(), pip_requirements=["mlflow"])
    return run_id, info.model_uri


def _rows(tracker, aurocs: dict, shots=4, seconds=None):
    rows = []
    for method, values in aurocs.items():
        for seed, v in enumerate(values):
            run_id, uri = _logged(tracker, f"{method}-{seed}")
            rows.append({"protocol": "oneclass", "category": "bottle", "method": method, "backbone": "lite0",
                         "shots": shots, "seed": seed, "balanced_accuracy": v, "model_uri": uri,
                         "mlflow_run_id": run_id,
                         "score_seconds": (seconds or {}).get(method, 1.0), "n_query": 10})
    return rows


def test_pick_uses_the_largest_shots_and_breaks_ties_by_speed():
    base = {"protocol": "oneclass", "category": "bottle", "backbone": "b", "mlflow_run_id": "r", "n_query": 10}
    table = pd.DataFrame([
        {**base, "method": "knn", "shots": 1, "seed": 0, "image_auroc": 1.0, "model_uri": "m1", "score_seconds": 1},
        {**base, "method": "patchcore", "shots": 4, "seed": 0, "image_auroc": 0.9, "model_uri": "m2", "score_seconds": 2},
        {**base, "method": "ldknn", "shots": 4, "seed": 1, "image_auroc": 0.9, "model_uri": "m3", "score_seconds": 1},
        {**base, "method": "ldknn", "shots": 4, "seed": 0, "image_auroc": 0.9, "model_uri": "m4", "score_seconds": 1},
    ])
    best = pick_champions(table, ChampionCriterion(metric="image_auroc"))["bottle"]
    assert (best.method, best.shots, best.model_uri) == ("ldknn", 4, "m4")  # faster; its lowest seed
    assert pick_champions(table, ChampionCriterion(metric="image_auroc", shots=1))["bottle"].method == "knn"
    # no row has a decision metric (no thresholds): the ranking metric orders them, the champion is the same
    assert pick_champions(table)["bottle"].method == "ldknn"


def test_default_criterion_weighs_decisions_over_a_tiny_ranking_lead():
    """The issue's case: a 0.0004 AUROC lead must not beat clearly better decisions; a model without a
    threshold (no balanced accuracy) ranks below every model with one."""
    base = {"protocol": "oneclass", "category": "bottle", "backbone": "b", "shots": 4, "n_query": 83,
            "score_seconds": 1.0}
    rows = []
    for seed in (0, 1):
        rows += [{**base, "method": "knn", "seed": seed, "image_auroc": 0.9994, "balanced_accuracy": 0.85},
                 {**base, "method": "ldknn", "seed": seed, "image_auroc": 0.9990, "balanced_accuracy": 0.90},
                 {**base, "method": "efficientad", "seed": seed, "image_auroc": 1.0, "balanced_accuracy": None}]
    table = pd.DataFrame([{**r, "model_uri": f"m-{r['method']}-{r['seed']}", "mlflow_run_id": "r"} for r in rows])
    ranked = rank_candidates(table)["bottle"]
    assert [c.method for c in ranked] == ["ldknn", "knn", "efficientad"]
    assert ranked[0].value == pytest.approx(0.90) and ranked[0].tiebreak_value == pytest.approx(0.9990)
    assert pick_champions(table)["bottle"] == ranked[0]
    assert ranked[0].beats(ranked[1].value, ranked[1].seconds_per_image, ranked[1].tiebreak_value)
    assert not ranked[2].beats(ranked[1].value, ranked[1].seconds_per_image, ranked[1].tiebreak_value)


@pytest.mark.slow
def test_worse_rerun_keeps_the_alias_better_one_moves_it(tracker):
    first = promote_champions(tracker, pd.DataFrame(_rows(tracker, {"patchcore": [0.9, 0.8], "knn": [0.7, 0.7]})),
                              report="/r/report.html")
    assert first[0]["moved"] and first[0]["candidate"]["method"] == "patchcore"
    v1 = current_champion(tracker.client, "fsad-bottle")
    assert v1.tags["fsad.report"] == "/r/report.html" and v1.tags["fsad.mlflow_run_id"] in v1.tags["fsad.run_url"]
    assert tracker.client.get_run(v1.tags["fsad.mlflow_run_id"]).info.run_id == v1.run_id

    worse = promote_champions(tracker, pd.DataFrame(_rows(tracker, {"patchcore": [0.8, 0.8]})))
    assert not worse[0]["moved"]
    assert current_champion(tracker.client, "fsad-bottle").version == v1.version

    better = promote_champions(tracker, pd.DataFrame(_rows(tracker, {"ldknn": [0.95, 0.9]})))
    assert better[0]["moved"]
    now = current_champion(tracker.client, "fsad-bottle")
    assert now.version != v1.version and now.tags["fsad.method"] == "ldknn"
    assert all(v.current_stage in (None, "None") for v in tracker.client.search_model_versions("name='fsad-bottle'"))


def test_model_logging_leaves_the_process_tracking_uri_as_it_was(monkeypatch, tmp_path):
    import os

    from fewshot_core.tracking.store import fluent_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with fluent_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # a later Tracker must not follow the model's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with fluent_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_registering_prints_nothing_and_keeps_mlflow_event_log_on(tracker, capsys):
    """MLflow's "Successfully registered model" / "Created version" notices stay out of the stage log; the
    event stream is on again afterwards and a failed registration still raises."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import logging_utils

    from fewshot_core.models.mlflow_model import register_model

    _, uri = _logged(tracker)
    capsys.readouterr()
    first = register_model(tracker.tracking_uri, uri, "fsad-bottle", {"k": "v"})
    second = register_model(tracker.tracking_uri, uri, "fsad-bottle", {})
    out, err = capsys.readouterr()
    assert (str(first.version), str(second.version)) == ("1", "2") and out + err == "", out + err
    assert logging_utils.MLFLOW_LOGGING_STREAM.enabled
    with pytest.raises(MlflowException):
        register_model(tracker.tracking_uri, "models:/m-no-such-model", "fsad-bottle", {})
    assert logging_utils.MLFLOW_LOGGING_STREAM.enabled
