"""DefectMaker: exact masks, placement in the foreground, the 7 classes, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_core.data.synth import KINDS, render_sample
from fewshot_core.errors import FsadError
from fewshot_core.methods.components.defectmaker import (
    CLASSES,
    FILLS,
    SHAPES,
    DefectMaker,
    bezier,
    class_index,
    foreground_mask,
)


def _disk(seed=0, size=96):
    kind = next(k for k in KINDS if k.name == "disk")
    img, _, _ = render_sample(kind, np.asarray(kind.palette, float), size, seed, ("t", str(seed)))
    return img


def _changed(a, b):
    return (a != b).any(-1)


def test_seven_classes():
    assert len(CLASSES) == 7 and CLASSES[0] == "normal"
    idx = {class_index(s, f) for s in SHAPES for f in FILLS}
    assert idx == set(range(1, 7))


def test_bezier_endpoints():
    pts = np.array([[0, 0], [5, 10], [10, 0]], float)
    curve = bezier(pts, 11)
    np.testing.assert_allclose(curve[0], pts[0])
    np.testing.assert_allclose(curve[-1], pts[-1])
    np.testing.assert_allclose(curve[5], [5, 5])  # quadratic midpoint


@pytest.mark.parametrize("shape", SHAPES)
def test_paste_mask_is_exactly_the_written_pixels(shape):
    # constant image + black donor: every written pixel differs from the original, so changed == mask
    img = np.full((96, 96, 3), 128, np.uint8)
    donor = np.zeros_like(img)
    dm = DefectMaker()
    for seed in range(5):
        out, mask, label = dm.make(img, np.random.default_rng(seed), shape=shape, fill="cutpaste", donors=[donor],
                                   fg=np.ones((96, 96), bool), blend=False)
        assert label == class_index(shape, "cutpaste")
        assert mask.sum() >= 4
        np.testing.assert_array_equal(_changed(out, img), mask)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("blend", [False, True])
def test_changes_never_leave_the_mask_and_stay_in_foreground(fill, blend):
    img, donor = _disk(0), _disk(1)
    dm = DefectMaker()
    fg = foreground_mask(img)
    for seed in range(6):
        shape = SHAPES[seed % 3]
        out, mask, _ = dm.make(img, np.random.default_rng(seed), shape=shape, fill=fill, donors=[donor], fg=fg,
                               blend=blend)
        changed = _changed(out, img)
        assert not (changed & ~mask).any()  # nothing outside the mask was touched
        assert not (mask & ~fg).any()  # the defect sits in the foreground
        assert changed.sum() >= 0.8 * mask.sum()  # and the mask pixels were really written


def test_foreground_estimate_matches_object_and_textures_are_whole():
    kind = next(k for k in KINDS if k.name == "disk")
    rng = np.random.default_rng(0)
    from fewshot_core.data import synth

    scene = kind.render(rng, 96, np.asarray(kind.palette, float))
    img = synth._quantise(scene.image)
    fg, truth = foreground_mask(img), scene.alpha > 0.5
    iou = (fg & truth).sum() / (fg | truth).sum()
    assert iou > 0.8
    fabric = next(k for k in KINDS if k.name == "fabric")
    tex, _, _ = render_sample(fabric, np.asarray(fabric.palette, float), 96, 0, ("t",))
    assert foreground_mask(tex).mean() > 0.9


def test_batch_is_deterministic_and_labelled():
    imgs = [_disk(s) for s in range(3)]
    dm = DefectMaker()
    a = dm.batch(imgs, np.random.default_rng(7), 14)
    b = dm.batch(imgs, np.random.default_rng(7), 14)
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[2], b[2])
    assert set(a[2]) <= set(range(7))
    for out, mask, label in zip(*a):
        assert (mask.sum() == 0) == (label == 0)
        if label == 0:
            assert any(np.array_equal(out, im) for im in imgs)
    c = dm.batch(imgs, np.random.default_rng(8), 14)
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_bad_names_and_saliency_path(tmp_path):
    dm = DefectMaker()
    img = _disk(0)
    with pytest.raises(FsadError):
        dm.make(img, np.random.default_rng(0), shape="star")
    with pytest.raises(FsadError):
        dm.make(img, np.random.default_rng(0), fill="paint")
    with pytest.raises(FsadError, match="saliency"):
        DefectMaker(saliency_model=tmp_path / "none.pt")


def test_saliency_model_constrains_placement(tmp_path):
    import torch

    class LeftHalf(torch.nn.Module):  # "salient" = the left half of the image
        def forward(self, x):
            out = torch.full_like(x[:, :1], -10.0)
            out[..., : x.shape[-1] // 2] = 10.0
            return out

    path = tmp_path / "sal.pt"
    torch.jit.script(LeftHalf()).save(str(path))
    dm = DefectMaker(saliency_model=path)
    img = _disk(0)
    for seed in range(5):
        _, mask, _ = dm.make(img, np.random.default_rng(seed))
        assert mask.any() and not mask[:, 48:].any()
