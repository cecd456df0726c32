"""The transductive protocol and mutual scoring: an odd patch among similar test images scores highest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.transductive import evaluate_transductive, transductive_episode
from fewshot_core.features.store import FeatureStore
from fewshot_core.methods import registry
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec

torch.set_num_threads(2)


def _queries(m=8, h=4, w=4, d=6, odd=(3, 1, 2)):
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(h, w, d))  # every image: the same part, small noise
    q = grid[None] + 0.05 * rng.normal(size=(m, h, w, d))
    q[odd] += 3.0  # one defective patch in image 3
    return q.astype(np.float32)


def test_mutual_scoring_finds_the_odd_patch_without_and_with_support():
    q = _queries()
    model = registry.create("musc").fit(None)
    scores, maps = model.score(q)
    assert maps.shape == (8, 4, 4) and int(np.argmax(scores)) == 3
    assert np.unravel_index(np.argmax(maps[3]), (4, 4)) == (1, 2)
    support = _queries(m=2, odd=(0, 0, 0))[1:]  # one clean support image
    with_support = registry.create("musc").fit(support).score(q)[1]
    assert np.unravel_index(np.argmax(with_support[3]), (4, 4)) == (1, 2)
    # an image never matches itself: one repeated image alone would score 0 everywhere otherwise
    assert maps[3, 1, 2] > 1.0


def test_musc_is_its_own_protocol():
    assert "musc" in registry.names(protocol=registry.TRANSDUCTIVE)
    assert "musc" not in registry.names(protocol=registry.ONECLASS)
    assert "musc" not in registry.names(protocol=registry.SUPERVISED)
    with pytest.raises(FsadError, match="not available under the oneclass"):
        registry.get("musc", protocol=registry.ONECLASS)
    with pytest.raises(FsadError, match="bad parameters"):
        registry.create("musc", ratio=0)


def test_transductive_rows_zero_and_few_shots(synth_root, tmp_path):
    dataset = load_dataset(synth_root, list_categories(synth_root)[0])
    partition = FeatureStore(tmp_path).build(dataset, FeatureSpec(image_size=64),
                                             EmbedCompute(num_workers=0, progress=False))
    zero = evaluate_transductive(dataset, partition, "musc", 0, [0], options=EpisodeOptions(mask_size=48))[0]
    two = evaluate_transductive(dataset, partition, "musc", 2, [0], options=EpisodeOptions(mask_size=48))[0]
    assert zero["protocol"] == two["protocol"] == "transductive"
    assert zero["shots"] == 0 and two["shots"] == 2 and zero["n_query"] == len(dataset.test())
    assert "-k0-" in zero["episode_id"] and 0.5 < zero["image_auroc"] <= 1.0 and "pixel_auroc" in two
    with pytest.raises(FsadError, match="shots"):
        transductive_episode(dataset, -1, 0)



@pytest.mark.parametrize("protocol, method, extra", [("transductive", "musc", {}),
                                                     ("oneclass", "patchcore", {"augment": "none"})])
def test_a_feature_method_without_its_partition_is_one_line_naming_fsad_embed(protocol, method, extra):
    from types import SimpleNamespace

    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.evaluation.transductive import run_transductive_episode

    run = run_transductive_episode if protocol == "transductive" else run_oneclass_episode
    episode = SimpleNamespace(support_ids=("a", "b"), query_ids=("c",), seed=0)
    with pytest.raises(FsadError) as exc:
        run(None, None, episode, method, options=EpisodeOptions(**extra))
    assert "\n" not in str(exc.value) and "fsad embed" in str(exc.value) and repr(method) in str(exc.value)
