"""The support's foreground estimate and object-centric image scores."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_core.methods.components.foreground import Foreground
from fewshot_core.methods.knn import KNN
from fewshot_core.methods.ldknn import LDKNN
from fewshot_core.methods.patchcore import PatchCore

H = W = 12
D = 16


def _object_images(n: int, seed: int, centre=(6, 6), radius=3.5) -> tuple[np.ndarray, np.ndarray]:
    """Patch features of a disc-shaped object (direction A) on a background (direction B), with noise."""
    rng = np.random.default_rng(seed)
    a, b = np.zeros(D, np.float32), np.zeros(D, np.float32)
    a[0], b[1] = 4.0, 4.0
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    feats = np.where(disc[None, :, :, None], a, b) + 0.3 * rng.standard_normal((n, H, W, D))
    return feats.astype(np.float32), disc


def test_an_object_is_found_and_a_texture_is_left_whole():
    sup, disc = _object_images(4, seed=0)
    fg = Foreground().fit(sup)
    assert fg.is_object_
    query, _ = _object_images(2, seed=1)
    mask = fg.mask(query)
    assert mask[:, disc].all()  # the whole object, grown by one patch
    assert mask.mean() < disc.mean() + 0.3 and not mask[:, 0, 0].any()  # the corners stay background
    rng = np.random.default_rng(2)
    noise = (0.3 * rng.standard_normal((4, H, W, D))).astype(np.float32)
    flat = Foreground().fit(noise)
    assert not flat.is_object_ and flat.mask(noise).all()
    stripes = noise.copy()
    stripes[:, :, [2, 6, 9], 0] += 4.0  # a sparse pattern (a quarter of the patches), at the border too
    sparse = Foreground().fit(stripes)
    assert not sparse.is_object_ and sparse.mask(stripes).all()


@pytest.mark.parametrize("cls", [PatchCore, KNN, LDKNN])
def test_a_novel_background_no_longer_wins_the_maximum(cls):
    sup, disc = _object_images(4, seed=3)
    query, _ = _object_images(1, seed=4)
    query[0, 0, 0] += 6.0  # a background patch unlike any support patch: a shadow, a rotation's corner
    plain = cls(foreground="none").fit(sup)
    centric = cls(foreground="auto").fit(sup)
    s_plain, map_plain = plain.score(query)
    s_centric, map_centric = centric.score(query)
    np.testing.assert_array_equal(map_plain, map_centric)  # the anomaly maps stay whole
    assert s_centric[0] < 0.5 * s_plain[0]
    defect = query.copy()
    defect[0, 6, 6] += 6.0  # the same change on the object is still found
    assert centric.score(defect)[0][0] > 2 * s_centric[0]


@pytest.mark.parametrize("cls", [PatchCore, KNN, LDKNN])
def test_the_estimate_is_saved_with_the_detector(cls, tmp_path):
    sup, _ = _object_images(3, seed=5)
    query, _ = _object_images(2, seed=6)
    query[:, 0, 0] += 6.0
    model = cls(foreground="auto").fit(sup)
    again = cls.load(model.save(tmp_path / "m"))
    assert again.foreground_ is not None and again.foreground_.is_object_
    for a, b in zip(model.score(query), again.score(query)):
        np.testing.assert_array_equal(a, b)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="foreground must be one of"):
        PatchCore(foreground="yes")


@pytest.mark.parametrize("cls", [PatchCore, KNN, LDKNN])
def test_a_missing_part_is_scored(cls, tmp_path):
    """A piece of a fixed-pose part replaced by background looks like background: the foreground mask
    alone drops it from the image score and its patches match the support's background. The support's
    positional prior keeps it scored, against the part's own patches."""
    sup, disc = _object_images(4, seed=7)
    good, _ = _object_images(6, seed=8)
    nudged, _ = _object_images(2, seed=9, centre=(7, 6))  # a good part lying one patch lower
    piece, _ = _object_images(1, seed=10)
    yy, xx = np.mgrid[:H, :W]
    gone = disc & (yy < 6) & (xx < 6)  # a quarter of the part removed
    background, _ = _object_images(1, seed=11, radius=0.0)
    piece[0, gone] = background[0, gone]
    whole, _ = _object_images(1, seed=12, radius=0.0)  # the part missing altogether
    model = cls(foreground="auto").fit(sup)
    s_good = model.score(np.concatenate([good, nudged]))[0]
    s_piece, map_piece = model.score(piece)
    s_whole = model.score(whole)[0]
    assert s_piece[0] > 2 * s_good.max() and s_whole[0] > 2 * s_good.max()
    assert map_piece[0][gone].max() > 2 * map_piece[0][~gone].max()  # the map shows where it is missing
    plain = cls(foreground="none").fit(sup)
    assert plain.score(piece)[0][0] < 1.5 * plain.score(good)[0].max()  # whole-image scores miss it too
    again = cls.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(again.score(piece)[0], s_piece)


@pytest.mark.parametrize("cls", [PatchCore, KNN, LDKNN])
def test_a_part_where_the_support_never_has_one_is_scored(cls):
    """A piece of the part lying where the support only ever shows background (a moved or extra
    component) looks like the part: the foreground mask keeps it, but it matches the support's part
    patches. Scored against the support's background patches, it stands out."""
    sup, _ = _object_images(4, seed=13)
    good, _ = _object_images(6, seed=14)
    stray, _ = _object_images(1, seed=15)
    piece, _ = _object_images(1, seed=16, radius=H)  # part features everywhere
    stray[0, 1:3, 1:3] = piece[0, 1:3, 1:3]  # a 2 x 2 piece in the corner's background
    model = cls(foreground="auto").fit(sup)
    assert model.score(stray)[0][0] > 2 * model.score(good)[0].max()
    plain = cls(foreground="none").fit(sup)
    assert plain.score(stray)[0][0] < 1.5 * plain.score(good)[0].max()


def test_a_model_saved_before_the_prior_scores_as_it_did():
    sup, disc = _object_images(4, seed=17)
    whole, _ = _object_images(1, seed=18, radius=0.0)  # the part missing altogether
    model = PatchCore(foreground="auto").fit(sup)
    arrays = {k: v for k, v in model.get_state()["arrays"].items() if k not in ("fg_prior", "fg_absent")}
    before = PatchCore(foreground="auto")
    before.set_state({"arrays": arrays})
    assert not before.foreground_.missing(whole).any() and not before.foreground_.intruding(whole).any()
    assert before.score(whole)[0][0] < 0.5 * model.score(whole)[0][0]
