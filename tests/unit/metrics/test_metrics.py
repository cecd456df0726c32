"""Image and pixel metrics against scikit-learn on small cases, and the streaming/binned accumulator."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from fewshot_core.metrics import PixelAccumulator, f1_max, image_metrics, pixel_metrics


def _sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    return f.max()


def test_image_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)  # rounding creates ties
    out = image_metrics(y, s)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["image_f1_max"] == pytest.approx(_sk_f1_max(y, s), abs=1e-12)


def test_f1_max_hand_example():
    # threshold 0.35 -> tp=2, fp=1, fn=0: P=2/3, R=1, F1=0.8; threshold 0.8 -> P=1, R=0.5, F1=2/3
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)


def test_single_class_is_absent_not_nan():
    assert image_metrics([0, 0, 0], [0.1, 0.2, 0.3]) == {}
    maps = np.random.default_rng(0).random((3, 8, 8))
    assert pixel_metrics(maps, np.zeros((3, 8, 8), bool)) == {}


def _random_maps(seed, n=5, size=16, ties=False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    masks[1, 2:6, 3:9] = True
    masks[2, 10:14, 10:12] = True
    masks[2, 0:2, 0:2] = True
    masks[4, 5:12, 1:4] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if ties:
        maps = np.round(maps, 1)
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("ties", [False, True])
def test_pixel_metrics_exact_equal_sklearn(ties):
    maps, masks = _random_maps(1, ties=ties)
    out = pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert out["pixel_f1_max"] == pytest.approx(_sk_f1_max(y, s), abs=1e-9)
    assert 0.0 < out["aupro"] < 1.0


def _full_curve_metrics(maps, masks):
    """Every distinct score a threshold, every pixel argsorted: the curve the reduced one must equal."""
    from fewshot_core.metrics.aupro import aupro_from_curve, region_weights

    weights, n_regions = zip(*(region_weights(m) for m in masks))
    w = np.concatenate([x.ravel() for x in weights])
    s = np.concatenate([m.ravel() for m in maps])
    order = np.argsort(s)[::-1]
    s, w = s[order], w[order]
    ends = np.append(np.flatnonzero(np.diff(s)), len(s) - 1)
    tp = np.cumsum(w > 0)[ends].astype(float)
    fp = ends + 1 - tp
    pro = np.cumsum(w.astype(np.float64))[ends]
    fpr, tpr = np.r_[0, fp / fp[-1]], np.r_[0, tp / tp[-1]]
    return {"pixel_auroc": float(np.trapezoid(tpr, fpr)),
            "pixel_f1_max": float((2 * tp / (tp + fp + tp[-1])).max()),
            "aupro": aupro_from_curve(fpr, np.r_[0, pro / sum(n_regions)])}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_reduced_exact_curve_equals_the_full_curve(seed, decimals):
    """Ties across defect and defect-free pixels (rounded scores) and none: the same three values."""
    maps, masks = _random_maps(seed, n=6, size=24)
    if decimals is not None:
        maps = np.round(maps, decimals)
    out = pixel_metrics(maps, masks)
    full = _full_curve_metrics(maps, masks)
    for key in full:
        assert out[key] == pytest.approx(full[key], abs=1e-12), key


def test_binned_mode_is_close_to_exact_and_streams():
    maps, masks = _random_maps(2, n=8, size=32)
    exact = pixel_metrics(maps, masks)
    acc = PixelAccumulator(exact_max_pixels=3000, bins=2**16, value_range=(float(maps.min()), float(maps.max())))
    for m, k in zip(maps, masks):
        acc.add(m, k)
    assert not acc.exact  # switched to bins after the third image
    binned = acc.compute()
    for key in ("pixel_auroc", "pixel_f1_max", "aupro"):
        assert binned[key] == pytest.approx(exact[key], abs=2e-3), key
    # without a given range: the buffered range is used and later scores are clipped
    acc2 = PixelAccumulator(exact_max_pixels=3000)
    for m, k in zip(maps, masks):
        acc2.add(m, k)
    assert acc2.compute()["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=5e-3)


def test_perfect_and_inverted_maps():
    _, masks = _random_maps(3)
    perfect = pixel_metrics(masks.astype(np.float32), masks)
    assert perfect == pytest.approx({"pixel_auroc": 1.0, "pixel_f1_max": 1.0, "aupro": 1.0})
    inverted = pixel_metrics((~masks).astype(np.float32), masks)
    assert inverted["pixel_auroc"] == pytest.approx(0.0)
    assert inverted["aupro"] == pytest.approx(0.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics([np.zeros((4, 4))], [np.zeros((5, 5), bool)])
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics([np.full((4, 4), np.nan)], [np.eye(4, dtype=bool)])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [0.0, np.nan])
