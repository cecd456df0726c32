"""AUPRO against hand-computed examples and a brute-force reference written from the definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fewshot_core.metrics import aupro
from fewshot_core.metrics.aupro import area_to_limit, region_weights


def _row_example(a2_score):
    # 1 x 13 image: region A = pixels 0-1, region B = pixel 3 (pixel 2 between them is defect-free)
    mask = np.zeros((1, 13), bool)
    mask[0, [0, 1, 3]] = True
    amap = np.zeros((1, 13))
    amap[0, 0], amap[0, 1], amap[0, 3] = 0.9, a2_score, 0.7
    amap[0, 2], amap[0, 4] = 0.8, 0.6  # two defect-free pixels scored high; 8 more at 0 (10 in all)
    return amap, mask


def test_hand_computed_without_interpolation():
    # curve (fpr, pro): (0,.25) (.1,.25) (.1,.75) (.2,.75) (.2,1) (1,1)
    # area to 0.3: .1*.25 + .1*.75 + .1*1 = 0.2 -> normalised 0.2/0.3
    amap, mask = _row_example(0.5)
    assert aupro([amap], [mask]) == pytest.approx(0.2 / 0.3)


def test_hand_computed_with_interpolation_at_the_limit():
    # A's second pixel ties with the eight 0-scored defect-free pixels: the last step goes
    # (.2,.75) -> (1,1) and is interpolated at fpr .3: pro = .75 + .25 * .1/.8 = .78125
    amap, mask = _row_example(0.0)
    expected = (0.1 * 0.25 + 0.1 * 0.75 + 0.1 * (0.75 + 0.78125) / 2) / 0.3
    assert aupro([amap], [mask]) == pytest.approx(expected)


def test_regions_are_eight_connected_and_counted_per_image():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region
    mask[3, 3] = True
    weights, n = region_weights(mask)
    assert n == 2
    assert weights[0, 0] == weights[1, 1] == pytest.approx(0.5) and weights[3, 3] == 1.0
    assert weights[~mask].sum() == 0


def test_perfect_detector_scores_one():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:5] = True
    assert aupro([mask.astype(float), np.zeros((8, 8))], [mask, np.zeros((8, 8), bool)]) == pytest.approx(1.0)


def test_area_to_limit_interpolates():
    assert area_to_limit(np.array([0, 1.0]), np.array([0, 1.0]), 0.5) == pytest.approx(0.125)
    assert area_to_limit(np.array([0, 0.1, 0.2]), np.array([1.0, 1, 1]), 0.3) == pytest.approx(0.2)


def _brute_force_aupro(maps, masks, limit=0.3):
    """Straight from the definition: for each distinct threshold, mean region overlap and FPR."""
    regions = []
    for m, k in zip(maps, masks):
        lab, n = ndimage.label(k, structure=np.ones((3, 3)))
        regions += [(m[lab == i]) for i in range(1, n + 1)]
    neg = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(np.mean(neg >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    # integrate with interpolation at the limit
    keep = fprs <= limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < limit and not keep.all():
        j = np.argmax(~keep)
        y.append(pros[j - 1] + (pros[j] - pros[j - 1]) * (limit - fprs[j - 1]) / (fprs[j] - fprs[j - 1]))
        x.append(limit)
    area = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))
    return area / limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 1:4, 1:5] = True
    masks[0, 8:11, 8:9] = True
    masks[2, 5:9, 2:10] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.0 * masks, 2)  # ties on purpose
    assert aupro(maps, masks) == pytest.approx(_brute_force_aupro(maps, masks), abs=1e-6)
