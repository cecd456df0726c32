"""A one-class row says what its threshold gets wrong: false alarms, misses and recall per defect type,
consistent with the episode's own scores, labels and threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.episodes import sample_oneclass
from fewshot_core.evaluation.oneclass import run_oneclass_episode
from fewshot_core.features.store import FeatureStore
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def synth(synth_root, tmp_path_factory):
    dataset = load_dataset(synth_root, list_categories(synth_root)[0])
    part = FeatureStore(tmp_path_factory.mktemp("store")).build(dataset, FeatureSpec(image_size=64),
                                                                EmbedCompute(num_workers=0, progress=False))
    return dataset, part


def test_row_reports_errors_and_recall_per_defect_type_at_its_threshold(synth):
    dataset, part = synth
    res = run_oneclass_episode(dataset, part, sample_oneclass(dataset, 3, 0), "knn",
                               options=EpisodeOptions(mask_size=32))
    row = res.row
    scores, labels = np.asarray(res.image_scores), np.asarray(res.labels)
    flagged = scores > row["threshold"]
    assert row["false_alarm_rate"] == pytest.approx(flagged[labels == 0].mean())
    assert row["miss_rate"] == pytest.approx(1 - flagged[labels == 1].mean())
    types = np.array([dataset.by_id(i).defect_type for i in res.query_ids])
    defects = sorted(set(types[labels == 1]))
    assert defects and {f"recall_{t}" for t in defects} <= set(row)
    for t in defects:
        assert row[f"recall_{t}"] == pytest.approx(flagged[types == t].mean())
    # one good shot: no threshold, so no decisions to count
    (one,) = [run_oneclass_episode(dataset, part, sample_oneclass(dataset, 1, 0), "knn",
                                   options=EpisodeOptions(mask_size=32)).row]
    assert math.isnan(one["false_alarm_rate"]) and not any(k.startswith("recall_") for k in one)
