"""Registration (align="always" / "auto"): poses from foreground masks, the rule that decides whether a
category is aligned, aligned crops, and maps warped back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fewshot_core.data import load_dataset
from fewshot_core.data.synth import generate
from fewshot_core.evaluation.aligned import Pose, aligned_image, pose_of, pose_reason, to_original
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
    assert pose.has_axis  # at 0 degrees too: a horizontal part is turned upright like any other
    assert abs(((pose.angle - angle) + 180) % 360 - 180) <= 6, pose
    assert math.hypot(pose.cx - 128, pose.cy - 128) < 48  # the centroid, pulled towards the blob
    assert 80 <= pose.half <= 200


def test_round_part_is_only_centred_and_cropped():
    yy, xx = np.mgrid[:32, :32]
    disk = (yy - 20) ** 2 + (xx - 12) ** 2 <= 36
    pose = pose_of(disk, (256, 256))
    assert not pose.has_axis and pose.angle == 0.0 and abs(pose.cx - 100) < 10 and abs(pose.cy - 164) < 10


def test_a_part_lying_at_zero_degrees_is_turned_upright_like_its_tilted_neighbours():
    """An elongated part whose axis snaps to 0 degrees was once taken for a round one and left lying while
    the others were stood up: one good image in seven scored as a defect on the generated capsule."""
    img = Image.new("RGB", (128, 128), (20, 20, 20))
    ImageDraw.Draw(img).rectangle([24, 56, 104, 72], fill=(230, 230, 230))  # a horizontal bar
    for angle in (0.0, 4.0):
        out = np.asarray(aligned_image(img, Pose(64.0, 64.0, angle, 48.0), (64, 64)).convert("L"), np.float32)
        bright = np.argwhere(out > 128)
        height, width = np.ptp(bright, axis=0) + 1
        assert height > 2 * width, (angle, height, width)  # standing upright


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
    aligned = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="always"))
    plain = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="none"))
    assert aligned[0]["align"] == "aligned" and plain[0]["align"] == "none"
    assert "pixel_auroc" in aligned[0] and 0.5 < aligned[0]["pixel_auroc"] <= 1.0
    assert aligned[0]["image_auroc"] > 0.5
    again = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="always"))
    assert again[0]["image_auroc"] == aligned[0]["image_auroc"]  # poses and crops follow the seed alone


def _axis(angle: float, elongation: float = 6.0) -> Pose:
    return Pose(128.0, 128.0, angle, 60.0, elongation)


@pytest.mark.parametrize("poses, reason", [
    ([_axis(0.0, 1.05)] * 4, "round part: not aligned"),  # a bottle from above: no axis
    ([_axis(30.0), _axis(80.0, 1.1), _axis(0.0, 1.2), _axis(0.0, 1.0)], "round part: not aligned"),  # most round
    ([_axis(88.0), _axis(92.0), _axis(-90.0), _axis(94.0)], "fixed pose: not aligned"),  # upright, either end first
    ([_axis(2.0), _axis(178.0), _axis(-2.0), _axis(180.0)], "fixed pose: not aligned"),  # 178 and 2: 4 degrees apart
    ([_axis(40.0), _axis(44.0)], "fixed pose: not aligned"),  # tilted, but always the same way
    ([_axis(10.0), _axis(70.0), _axis(130.0), _axis(-170.0)], None),  # any angle: posed
    ([_axis(90.0), _axis(90.0), _axis(90.0), _axis(120.0)], None),  # one turned part shows the pose varies
    ([_axis(90.0)], "fixed pose: not aligned"),  # one upright shot: maybe a fixed pose, leave it
    ([_axis(-178.0)], "fixed pose: not aligned"),
    ([_axis(-46.0)], None),  # one shot lying askew: taken as posed
    ([_axis(82.0)], None),
])
def test_auto_aligns_only_an_elongated_part_whose_pose_varies(poses, reason):
    assert pose_reason(poses) == reason


def test_pose_measures_how_elongated_the_part_is():
    yy, xx = np.mgrid[:32, :32]
    assert pose_of((yy - 16) ** 2 + (xx - 16) ** 2 <= 64, (256, 256)).elongation < 1.2
    assert pose_of(_bar(30), (256, 256)).elongation > 4


@pytest.mark.parametrize("kind, expected", [("screw", "aligned"), ("disk", "round part: not aligned")])
def test_auto_episode_aligns_the_posed_screw_and_leaves_the_disk(tmp_path, kind, expected):
    """The generated screw lies at any angle (aligned); the disk is round (left as it is, so its scores are
    the unaligned run's)."""
    (name,) = generate(tmp_path / "data", seed=0, size=128, n_train=8, n_test_good=4, n_test_per_defect=2,
                       kinds=(kind,))
    ds = load_dataset(tmp_path / "data", name)
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=128),
                                                  EmbedCompute(num_workers=0, progress=False))
    (auto,) = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="auto"))
    (plain,) = evaluate_oneclass(ds, part, "patchcore", 4, [0], options=EpisodeOptions(align="none"))
    assert auto["align"] == expected and plain["align"] == "none"
    if expected != "aligned":
        assert auto["image_auroc"] == plain["image_auroc"] and auto["pixel_auroc"] == plain["pixel_auroc"]


def test_a_saved_aligned_model_aligns_new_images_as_the_evaluation_did(tmp_path):
    """The deployed model poses each new image from its own features with the episode's foreground estimate
    (kept as plain numbers in its record), embeds it in its part's frame and warps its map back: the same
    scores and maps as the evaluation's."""
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import run_oneclass_episode
    from fewshot_core.models.deployable import DeployedModel, ModelInputs, Provenance, deploy_record, save_deployable

    (name,) = generate(tmp_path / "data", seed=0, size=128, n_train=8, n_test_good=4, n_test_per_defect=2,
                       kinds=("screw",))
    ds = load_dataset(tmp_path / "data", name)
    part = FeatureStore(tmp_path / "store").build(ds, FeatureSpec(image_size=128),
                                                  EmbedCompute(num_workers=0, progress=False))
    episode = sample_oneclass(ds, 4, 0)
    res = run_oneclass_episode(ds, part, episode, "patchcore", {}, EpisodeOptions(align="auto"))
    assert res.row["align"] == "aligned" and res.partition is not None
    folder = save_deployable(res.model, tmp_path / "model", Provenance(name, episode.support_ids, "oneclass"),
                             ModelInputs.of(res.model, "oneclass", res.partition), res.threshold)
    assert set(deploy_record(folder)["align"]["foreground"]) == {"mean", "direction", "threshold"}
    ids = list(res.query_ids)
    got = DeployedModel(folder).score([ds.by_id(i).path for i in ids], maps=True)
    np.testing.assert_allclose(got.image_score, res.image_scores, rtol=1e-3, atol=1e-3)
    want = res.image_maps(res.patch_maps, ids)
    assert got.anomaly_map.shape == want.shape
    np.testing.assert_allclose(got.anomaly_map, want, rtol=1e-3, atol=1e-2)
    unaligned = save_deployable(res.model, tmp_path / "plain", Provenance(name, episode.support_ids, "oneclass"),
                                ModelInputs.of(res.model, "oneclass", part), res.threshold)
    assert deploy_record(unaligned)["align"] is None  # the store's partition: images read as they are
