"""Object-centric scoring on real data: bottle under random poses gains, bottle itself does not lose."""

from __future__ import annotations

import numpy as np
import pytest
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext
from fewshot_core.features.store import EmbedCompute, FeatureSpec

SIZE = 128
SEEDS = [0, 1, 2]


@pytest.mark.slow
@pytest.mark.shared_data
def test_foreground_lifts_posed_bottle_and_keeps_bottle(mvtec_root, bottle_store, tmp_path):
    from fewshot_core.data import load_dataset
    from fewshot_core.data.derived import posed_copy
    from fewshot_core.episode_cache import EpisodeCache
    from fewshot_core.evaluation.oneclass import evaluate_oneclass
    from fewshot_core.features.store import FeatureStore

    bottle = load_dataset(mvtec_root, "bottle")
    posed = load_dataset(tmp_path, posed_copy(bottle, tmp_path, seed=0, size=256).name)
    cache = EpisodeCache()

    def mean_auroc(ds, foreground: str) -> float:
        store = FeatureStore(bottle_store if ds is bottle else tmp_path / "store")
        part = store.build(ds, FeatureSpec(image_size=SIZE), EmbedCompute(num_workers=0, progress=False))
        rows = evaluate_oneclass(ds, part, "patchcore", 1, SEEDS, {"foreground": foreground},
                                 options=EpisodeOptions(mask_size=SIZE), context=EvalContext(cache=cache))
        return float(np.mean([r["image_auroc"] for r in rows]))

    whole, centric = mean_auroc(posed, "none"), mean_auroc(posed, "auto")
    # hard suite at 128 px (docs/benchmarks.md): 0.843 -> 0.945 over seeds 0-2
    assert centric >= whole + 0.05, (whole, centric)
    # bottle fills its image: the foreground estimate must not cost it anything against the whole image
    # (the 0.995 one-shot bar is at the default 256 px: test_evaluate_oneclass, docs/benchmarks.md)
    kept = mean_auroc(bottle, "auto")
    assert kept >= mean_auroc(bottle, "none") and kept >= 0.99, kept
