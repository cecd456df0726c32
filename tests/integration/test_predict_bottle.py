"""``fsad predict`` on bottle's test split reproduces the evaluation's image AUROC (1 shot, 128 px)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: subprocesses import this code


@pytest.mark.slow
@pytest.mark.shared_data
def test_predict_reproduces_the_evaluation_auroc(mvtec_root, bottle_store, tmp_path):
    from fewshot_core.data import load_dataset
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.features.store import FeatureStore
    from fewshot_core.metrics import image_metrics
    from fewshot_core.models.champion import promote_champions
    from fewshot_core.models.publish import ModelRun, publish_model
    from fewshot_core.tracking.runs import Tracker

    ds = load_dataset(mvtec_root, "bottle")
    part = FeatureStore(bottle_store).build(ds, FeatureSpec(image_size=128), EmbedCompute(num_workers=0, progress=False))
    ep = sample_oneclass(ds, 1, 0)
    res = run_oneclass_episode(ds, part, ep, "patchcore", {}, options=EpisodeOptions(mask_size=128))
    row = res.row
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, (tmp_path / "artifacts").as_uri())
    run_id = tracker.log_evaluation("bottle", "dag", "patchcore", {}, {"image_auroc": row["image_auroc"]})
    out = publish_model(ModelRun(tracker, run_id), ds, res.model, ep.support_ids, "oneclass", partition=part,
                        threshold=res.threshold)
    table = pd.DataFrame([{**row, "model_uri": out["model_uri"], "mlflow_run_id": run_id,
                           "score_seconds": row["score_s"]}])
    assert promote_champions(tracker, table)[0]["moved"]

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.txt").write_text("not an image")
    (extra / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out_dir = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "fewshot_core", "predict", str(mvtec_root / "bottle" / "test"),
                           str(extra), "--model", "models:/fsad-bottle@champion", "--out", str(out_dir)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # two bad inputs, the rest scored
    errors = [ln.split("\r")[-1] for ln in proc.stderr.splitlines() if "fsad: error:" in ln]
    assert all(ln.startswith("fsad: error:") for ln in errors)  # not glued to the progress bar
    assert any("notes.txt" in ln for ln in errors) and any("broken.png" in ln for ln in errors)
    assert "Traceback" not in proc.stderr

    pred = pd.read_csv(out_dir / "predictions.csv")
    scored = pred[pred["error"].isna()]
    assert len(scored) == len(ep.query_ids) and len(pred) == len(ep.query_ids) + 2
    labels = np.array([0 if "/good/" in p else 1 for p in scored["image"]])
    got = image_metrics(labels, scored["image_score"].to_numpy())["image_auroc"]
    assert got == pytest.approx(row["image_auroc"], abs=1e-6)
    assert len(list((out_dir / "overlays").glob("*.png"))) == len(scored)
    assert (out_dir / "predictions.json").is_file()
    # one shot: no held-out good image, so no decision (and the row says why)
    assert scored["decision"].isna().all() and row["threshold_rule"].startswith("none")
