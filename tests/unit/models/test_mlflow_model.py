"""A logged model, loaded in a fresh process, scores images exactly as the evaluation did."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fewshot_core.paths import PROJECT_ROOT

FRESH = r"""
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
paths = json.loads(sys.argv[3])
out = model.predict(pd.DataFrame({"path": paths}))
print("RESULT" + json.dumps({"score": out["image_score"].tolist(), "decision": out["decision"].tolist(),
                             "label": out["label"].tolist(), "meta": model.metadata.metadata}))
"""


def _fresh_scores(uri: str, model_uri: str, paths) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH, uri, model_uri, json.dumps([str(p) for p in paths])],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def env(tmp_path_factory, synth_root):
    from fewshot_core.data import load_dataset
    from fewshot_core.features.store import FeatureStore
    from fewshot_core.tracking import Tracker

    tmp = tmp_path_factory.mktemp("mlflow-model")
    category = sorted(p.name for p in synth_root.iterdir() if p.is_dir())[0]
    ds = load_dataset(synth_root, category)
    part = FeatureStore(tmp / "store").build(ds, image_size=64, num_workers=0, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return ds, part, Tracker(uri, (tmp / "artifacts").as_uri()), uri


def _run(tracker):
    return tracker.log_evaluation("t", "dag", "r", {}, {})


@pytest.mark.slow
def test_patchcore_model_scores_like_the_evaluation(env):
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.models.publish import publish_model

    ds, part, tracker, uri = env
    ep = sample_oneclass(ds, 4, 0)
    details: dict = {}
    row = run_oneclass_episode(ds, part, ep, "patchcore", {}, mask_size=64, details=details)
    run_id = _run(tracker)
    out = publish_model(tracker, run_id, ds, details["model"], ep.support_ids, "oneclass", partition=part,
                        threshold=details["threshold"])
    assert out["model_uri"].startswith("models:/")
    paths = [ds.by_id(i).path for i in ep.query_ids]
    got = _fresh_scores(uri, out["model_uri"], paths)
    np.testing.assert_allclose(got["score"], details["image_scores"], rtol=0, atol=1e-6)
    want = (np.asarray(details["image_scores"]) > row["threshold"]).tolist()
    assert got["decision"] == want
    meta = got["meta"]["fsad"]
    assert meta["backbone"] == part.meta["backbone"] and meta["weights_sha256"] == part.meta["weights"]["sha256"]
    assert meta["image_size"] == 64 and meta["support_ids"] == list(ep.support_ids)
    assert meta["threshold"] == pytest.approx(row["threshold"])
    run = tracker.client.get_run(run_id)
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == ds.category
    assert run.outputs.model_outputs, "the logged model is linked to the run"
