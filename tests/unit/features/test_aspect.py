"""Non-square categories keep their aspect: the store embeds at the working shape, masks and anomaly maps
follow it pixel for pixel, and a saved model's featurizer resizes new images the same way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot_core.backbones.preprocess import resize_image, working_shape
from fewshot_core.data import load_dataset
from fewshot_core.data.aspect import category_aspect, resolve_aspect
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.oneclass import evaluate_oneclass, mask_shape
from fewshot_core.features.store import FeatureStore
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec

W, H = 64, 160  # tall images, height / width = 2.5 (the working shape at 64 px: 160 x 64)


def _texture(rng: np.random.Generator) -> np.ndarray:
    base = rng.normal(120, 6, size=(H, W)).clip(0, 255)
    stripes = 20 * np.sin(np.arange(H)[:, None] / 3.0)  # a horizontal stripe pattern, squashed by a square resize
    return (base + stripes).clip(0, 255).astype(np.uint8)


def _write(path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert("RGB").save(path)


@pytest.fixture(scope="module")
def tall_root(tmp_path_factory):
    """A grey striped texture, 64 x 160 px; defects are a bright 10 x 10 square at a known place."""
    root = tmp_path_factory.mktemp("tall")
    rng = np.random.default_rng(0)
    cat = root / "tall"
    for i in range(6):
        _write(cat / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(4):
        _write(cat / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(4):
        img, mask = _texture(rng), np.zeros((H, W), np.uint8)
        top, left = 20 + 30 * i, 10 + 8 * i
        img[top:top + 10, left:left + 10] = 250
        mask[top:top + 10, left:left + 10] = 255
        _write(cat / "test" / "spot" / f"{i:03d}.png", img)
        _write(cat / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


def test_working_shape_keeps_the_aspect_on_the_short_side():
    assert working_shape(256, 1.0) == (256, 256)
    assert working_shape(256, 1.1) == (256, 256)  # within the square tolerance
    assert working_shape(256, 2.5) == (640, 256)
    assert working_shape(256, 1 / 2.5) == (256, 640)
    assert working_shape(64, 2.5) == (160, 64)
    assert working_shape(200, 20.0) == (800, 200)  # capped at MAX_ASPECT, rounded to the stride multiple
    with pytest.raises(FsadError):
        working_shape(256, 0.0)


def test_resize_takes_height_and_width():
    img = Image.new("RGB", (W, H))
    assert resize_image(img, (80, 32)).size == (32, 80)
    assert resize_image(img, 48).size == (48, 48)


def test_category_aspect_from_the_training_images(tall_root):
    ds = load_dataset(tall_root, "tall")
    assert category_aspect(ds) == pytest.approx(2.5)
    assert resolve_aspect(ds, "square") == 1.0
    assert resolve_aspect(ds, "2") == 2.0
    with pytest.raises(FsadError, match="--aspect"):
        resolve_aspect(ds, "wide")


def test_store_embeds_at_the_working_shape_and_masks_follow(tall_root, tmp_path):
    ds = load_dataset(tall_root, "tall")
    store = FeatureStore(tmp_path / "store")
    kept = store.build(ds, FeatureSpec(image_size=64), EmbedCompute(num_workers=0, progress=False))
    square = store.build(ds, FeatureSpec(image_size=64, aspect="square"), EmbedCompute(num_workers=0, progress=False))
    assert kept.input_shape == (160, 64) and kept.grid == (20, 8)
    assert square.input_shape == (64, 64) and square.grid == (8, 8)
    assert kept.key != square.key
    assert kept.meta["preprocessing"]["input_size"] == [160, 64]
    assert mask_shape(None, kept) == (160, 64)
    assert mask_shape(32, kept) == (80, 32)  # the short side, at the partition's aspect
    assert mask_shape(32, square) == (32, 32)

    rows = evaluate_oneclass(ds, kept, "patchcore", 4, [0], {"foreground": "none"},
                             options=EpisodeOptions(mask_size=None, augment="none"))
    assert rows[0]["input_shape"] == "160x64" and rows[0]["mask_size"] == 64
    assert rows[0]["image_auroc"] == 1.0
    assert rows[0]["pixel_auroc"] > 0.95


def test_maps_line_up_with_the_defect_pixels(tall_root, tmp_path):
    """The anomaly map's peak lies inside the defect's mask, in the mask's own (tall) coordinates."""
    from fewshot_core.data.imageio import load_mask
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.episodes import sample_oneclass

    ds = load_dataset(tall_root, "tall")
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=64),
                                                  EmbedCompute(num_workers=0, progress=False))
    res = run_oneclass_episode(ds, part, sample_oneclass(ds, 4, 0), "patchcore", {"foreground": "none"},
                               options=EpisodeOptions(mask_size=None, augment="none"))
    ids = res.query_ids
    maps = res.model.anomaly_maps(res.patch_maps, part.input_shape)
    assert maps.shape[1:] == (H, W)
    for i, image_id in enumerate(ids):
        rec = ds.by_id(image_id)
        if rec.mask_path is None:
            continue
        mask = load_mask(rec.mask_path, (W, H))
        y, x = np.unravel_index(np.argmax(maps[i]), maps[i].shape)
        ys, xs = np.nonzero(mask)
        assert abs(y - ys.mean()) <= 8 and abs(x - xs.mean()) <= 8, (image_id, (y, x), (ys.mean(), xs.mean()))


def test_featurizer_resizes_new_images_to_the_partition_shape(tall_root, tmp_path):
    from fewshot_core.models.featurizer import Featurizer, FeaturizerSpec

    ds = load_dataset(tall_root, "tall")
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=64),
                                                  EmbedCompute(num_workers=0, progress=False))
    spec = FeaturizerSpec.from_partition(part)
    assert spec.shape == (160, 64)
    assert FeaturizerSpec.from_dict(spec.to_dict()) == spec
    rec = ds.test()[0]
    patch, _ = Featurizer(spec)([rec.path])
    stored = part.patch([rec.image_id])
    assert patch.shape == stored.shape
    np.testing.assert_allclose(patch, stored, rtol=2e-3, atol=2e-3)  # float16 rounding of a lone image


def test_tiles_stitch_into_the_whole_image_grid(monkeypatch):
    """Above TILE_SIDE an image is embedded in overlapping tiles; the stitched grid has the whole image's
    shape and matches its features away from the seams' padding effects."""
    import torch

    from fewshot_core.backbones.models import create_extractor
    from fewshot_core.backbones.preprocess import Normalize
    from fewshot_core.features import extract

    ex = create_extractor("tf_efficientnet_lite0", device="cpu")
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.uniform(0, 255, (1, 3, 24, 8))).float(),
                                             size=(384, 128), mode="bilinear")
    batch = smooth.clamp(0, 255).to(torch.uint8)
    whole, whole_g = extract.embed_batch(ex, batch, norm)
    monkeypatch.setattr(extract, "TILE_SIDE", 192)
    monkeypatch.setattr(extract, "TILE_OVERLAP", 32)
    assert extract.tile_starts(384, 192, 32) == [0, 128, 192]
    tiled, tiled_g = extract.embed_batch(ex, batch, norm)
    assert tiled.shape == whole.shape
    rel = (tiled - whole).norm(dim=-1) / whole.norm(dim=-1)
    assert float(rel.median()) < 0.05, float(rel.median())
    assert torch.nn.functional.cosine_similarity(tiled_g, whole_g).item() > 0.95


def test_augmented_supports_keep_the_working_shape(tall_root, tmp_path):
    """A tall partition's supports are augmented with the shape-keeping transforms only (no quarter turns)."""
    from fewshot_core.evaluation.augment import transforms_for

    assert transforms_for((160, 64)) == ("hflip", "vflip", "rot180")
    assert len(transforms_for((64, 64))) == 5
    ds = load_dataset(tall_root, "tall")
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=64),
                                                  EmbedCompute(num_workers=0, progress=False))
    rows = evaluate_oneclass(ds, part, "patchcore", 2, [0], {"coreset_ratio": 1.0},
                             options=EpisodeOptions(mask_size=None, augment="images"))
    assert rows[0]["augment"] == "images"
    assert rows[0]["bank_size"] == 2 * 4 * 20 * 8  # 2 shots x (stored + 3 views) x the 20 x 8 grid
    assert rows[0]["image_auroc"] > 0.9
