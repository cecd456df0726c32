"""``config="auto"``: the support alone picks the configuration; the choice is recorded and reproducible."""

from __future__ import annotations

import json

import pytest

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.evaluation.autoconfig import CANDIDATES, candidates_for
from fewshot_core.evaluation.oneclass import evaluate_oneclass
from fewshot_core.features.store import FeatureStore
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec


@pytest.fixture(scope="module")
def synth(synth_root, tmp_path_factory):
    ds = load_dataset(synth_root, list_categories(synth_root)[0])
    part = FeatureStore(tmp_path_factory.mktemp("store")).build(ds, FeatureSpec(image_size=64),
                                                                EmbedCompute(num_workers=0, progress=False))
    return ds, part


def test_candidates_follow_the_method_and_the_users_fixed_parameters():
    names = [c.name for c in candidates_for("patchcore", {})]
    assert names == [c.name for c in CANDIDATES]
    fixed = [c.name for c in candidates_for("patchcore", {"foreground": "none"})]
    assert fixed == ["default", "no-rotations"]  # the user's foreground=none is not varied


def test_auto_choice_is_recorded_and_reproducible(synth):
    ds, part = synth
    first = evaluate_oneclass(ds, part, "patchcore", 3, [0, 1], options=EpisodeOptions(config="auto"))
    again = evaluate_oneclass(ds, part, "patchcore", 3, [0, 1], options=EpisodeOptions(config="auto"))
    for row, row2 in zip(first, again):
        assert row["config"] in {c.name for c in CANDIDATES}
        scores = json.loads(row["config_scores"])
        assert set(scores) == {c.name for c in CANDIDATES}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert row["config_reason"].startswith("synthetic anomalies")
        assert (row["config"], row["config_scores"], row["image_auroc"]) == \
            (row2["config"], row2["config_scores"], row2["image_auroc"])
        chosen = next(c for c in CANDIDATES if c.name == row["config"])
        assert row["augment"] == ("none" if chosen.augment == "none" else "images")
        assert json.loads(row["params"])["foreground"] == chosen.params.get("foreground", "auto")


def test_one_shot_keeps_the_defaults_and_says_why(synth):
    ds, part = synth
    (row,) = evaluate_oneclass(ds, part, "patchcore", 1, [0], options=EpisodeOptions(config="auto"))
    assert row["config"] == "default" and "1 good shot" in row["config_reason"]
    (plain,) = evaluate_oneclass(ds, part, "patchcore", 1, [0])
    assert plain["config"] == "default" and plain["image_auroc"] == row["image_auroc"]


def test_unknown_config_is_one_line(synth):
    from fewshot_core.errors import FsadError

    ds, part = synth
    with pytest.raises(FsadError, match="config 'best'"):
        evaluate_oneclass(ds, part, "patchcore", 2, [0], options=EpisodeOptions(config="best"))
