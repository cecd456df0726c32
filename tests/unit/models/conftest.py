"""One logged PatchCore model on the synthetic data, shared by the model-file and served-model tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec


@dataclass
class Logged:
    dataset: object
    tracker: object
    tracking_uri: str
    model_uri: str
    model_id: str
    query_paths: list[Path]
    query_scores: list[float]
    threshold: float


@pytest.fixture(scope="session")
def logged_model(tmp_path_factory, synth_root) -> Logged:
    from fewshot_core.data import load_dataset
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.features.store import FeatureStore
    from fewshot_core.models.publish import ModelRun, publish_model
    from fewshot_core.tracking.runs import Tracker

    tmp = tmp_path_factory.mktemp("logged-model")
    category = sorted(p.name for p in synth_root.iterdir() if p.is_dir())[0]
    ds = load_dataset(synth_root, category)
    part = FeatureStore(tmp / "store").build(ds, FeatureSpec(image_size=64),
                                             EmbedCompute(num_workers=0, progress=False))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri, (tmp / "artifacts").as_uri())
    ep = sample_oneclass(ds, 3, 0)
    res = run_oneclass_episode(ds, part, ep, "patchcore", {}, options=EpisodeOptions(mask_size=64))
    run_id = tracker.log_evaluation("t", "dag", "r", {}, {})
    out = publish_model(ModelRun(tracker, run_id), ds, res.model, ep.support_ids, "oneclass", partition=part,
                        threshold=res.threshold)
    return Logged(ds, tracker, uri, out["model_uri"], out["model_id"], [ds.by_id(i).path for i in ep.query_ids],
                  [float(s) for s in res.image_scores], res.threshold.value)
