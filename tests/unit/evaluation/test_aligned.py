"""Registration (align="auto"): poses from foreground masks, aligned crops, and maps warped back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fewshot_core.data import load_dataset
from fewshot_core.data.synth import generate
from fewshot_core.evaluation.aligned import Pose, aligned_image, pose_of, to_original
from fewshot_core.evaluation.oneclass import evaluate_oneclass
from fewshot_core.features.store import FeatureStore
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec


def _bar(angle: float, size: int = 32, length: float = 20, width: float = 4) -> np.ndarray:
    """A grid mask of a bar at ``angle`` degrees, heavier (a blob) at its positive end."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    a = math.radians(angle)
    c = np.array([size / 2, size / 2])
    u = np.array([math.cos(a), math.sin(a)])
    p, q = c - u * length / 2, c + u * length / 2
    d.line([tuple(p), tuple(q)], fill=1, width=int(width))
    d.ellipse([q[0] - 4, q[1] - 4, q[0] + 4, q[1] + 4], fill=1)
    return np.asarray(img, bool)


@pytest.mark.parametrize("angle", [0, 30, 90, 135, 250])
def test_pose_follows_the_parts_axis_and_heavier_end(angle):
    pose = pose_of(_bar(angle), (256, 256))
    assert abs(((pose.angle - angle) + 180) % 360 - 180) <= 6, pose
    assert math.hypot(pose.cx - 128, pose.cy - 128) < 48  # the centroid, pulled towards the blob
    assert 80 <= pose.half <= 200


def test_round_part_is_only_centred_and_cropped():
    yy, xx = np.mgrid[:32, :32]
    disk = (yy - 20) ** 2 + (xx - 12) ** 2 <= 36
    pose = pose_of(disk, (256, 256))
    assert pose.angle == 0.0 and abs(pose.cx - 100) < 10 and abs(pose.cy - 164) < 10


def test_maps_warp_back_to_the_original_frame():
    """A mark at a known place in the original image lands where it was after aligning and warping back."""
    img = Image.new("RGB", (128, 128), (20, 20, 20))
    ImageDraw.Draw(img).ellipse([88, 28, 96, 36], fill=(255, 255, 255))  # mark at (92, 32)
    pose = Pose(cx=70.0, cy=50.0, angle=40.0, half=50.0)
    out = aligned_image(img, pose, (64, 64))
    amap = np.asarray(out.convert("L"), np.float32)[None]
    back = to_original(amap, [pose], (128, 128), (128, 128))[0]  # poses in the 128 px frame
    y, x = np.unravel_index(np.argmax(back), back.shape)
    assert abs(x - 92) <= 3 and abs(y - 32) <= 3, (x, y)
    assert back[127, 0] == pytest.approx(amap.min())  # outside the crop: the map's minimum


def test_aligned_episode_scores_posed_parts(tmp_path):
    (name,) = generate(tmp_path / "data", seed=0, size=96, n_train=8, n_test_good=6, n_test_per_defect=3,
                       kinds=("screw",))
    ds = load_dataset(tmp_path / "data", name)
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=64),
                                                  EmbedCompute(num_workers=0, progress=False))
    aligned = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="auto"))
    plain = evaluate_oneclass(ds, part, "patchcore", 4, [0])
    assert aligned[0]["align"] == "aligned" and plain[0]["align"] == "none"
    assert "pixel_auroc" in aligned[0] and 0.5 < aligned[0]["pixel_auroc"] <= 1.0
    assert aligned[0]["image_auroc"] > 0.5
    again = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="auto"))
    assert again[0]["image_auroc"] == aligned[0]["image_auroc"]  # poses and crops follow the seed alone
