"""The cache the episodes of one category share: one type, one key class per kind of entry."""

from __future__ import annotations

import pytest

from fewshot_core.episode_cache import AlignedKey, EpisodeCache, ExtractorKey, ImageKey, MaskKey, ViewKey, episode_cache
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext
from fewshot_core.features.store import EmbedCompute, FeatureSpec


def test_keys_of_different_kinds_never_collide_and_untyped_keys_are_refused():
    cache = EpisodeCache()
    cache[ViewKey("part", "img", "hflip")] = "view"
    cache[AlignedKey("part", "img", "hflip")] = "aligned"  # same values, another kind: its own entry
    assert cache[ViewKey("part", "img", "hflip")] == "view" and len(cache) == 2
    made = []
    assert cache.get_or_make(ExtractorKey("part"), lambda: made.append(1) or "extractor") == "extractor"
    assert cache.get_or_make(ExtractorKey("part"), lambda: made.append(1) or "other") == "extractor" and made == [1]
    with pytest.raises(TypeError, match="key classes"):
        cache[("augment", "part", "img", "hflip")] = "untyped"
    with pytest.raises(TypeError, match="EpisodeCache"):
        episode_cache({})
    assert isinstance(episode_cache(None), EpisodeCache) and episode_cache(cache) is cache


def test_a_shared_cache_holds_each_masks_and_images_once(synth_root, tmp_path):
    from fewshot_core.data import list_categories, load_dataset
    from fewshot_core.evaluation.oneclass import evaluate_oneclass
    from fewshot_core.features.store import FeatureStore

    ds = load_dataset(synth_root, list_categories(synth_root)[0])
    part = FeatureStore(tmp_path).build(ds, FeatureSpec(image_size=64), EmbedCompute(num_workers=0, progress=False))
    cache = EpisodeCache()
    evaluate_oneclass(ds, part, "knn", 2, [0, 1], options=EpisodeOptions(mask_size=32, augment="none"),
                      context=EvalContext(cache=cache))
    masks = [k for k in cache.keys() if isinstance(k, MaskKey)]
    assert len(masks) == 1 and masks[0].shape == (32, 32)  # the same queries at both seeds: loaded once
    assert not [k for k in cache.keys() if isinstance(k, ImageKey)]  # features from the store, no decoded images
