"""Synthetic MVTec-layout generator: layout, exact masks, determinism, atomic idempotent writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_core.data.synth import (
    DEFECTS,
    KINDS,
    category_plan,
    generate,
    png_bytes,
    render_sample,
)
from fewshot_core.errors import FsadError

SMALL = dict(size=64, n_train=3, n_test_good=2, n_test_per_defect=2)


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_counts(tmp_path):
    names = generate(tmp_path, categories=2, seed=0, size=64, n_train=5, n_test_good=3, n_test_per_defect=2)
    assert names == ["synth_fabric", "synth_disk"]
    for name in names:
        cat = tmp_path / name
        assert len(list((cat / "train" / "good").glob("*.png"))) == 5
        assert len(list((cat / "test" / "good").glob("*.png"))) == 3
        defects = sorted(p.name for p in (cat / "test").iterdir() if p.name != "good")
        assert len(defects) >= 4 and set(defects) <= set(DEFECTS)
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == defects
        for d in defects:
            imgs = sorted(p.stem for p in (cat / "test" / d).glob("*.png"))
            masks = sorted(p.stem for p in (cat / "ground_truth" / d).glob("*.png"))
            assert imgs == ["000", "001"] and masks == ["000_mask", "001_mask"]
        with Image.open(cat / "train" / "good" / "000.png") as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    # the textured and the object category differ in kind, every test category has its own defect set
    assert set(KINDS[0].defects) != set(KINDS[1].defects)
    readme = (tmp_path / "README.txt").read_text()
    assert "synthetic" in readme.lower() and "MVTec AD" in readme and "Licence" in readme


def test_categories_cycle_with_distinct_names_and_palettes():
    plan = category_plan(6)
    names = [n for n, _, _ in plan]
    assert names == ["synth_fabric", "synth_disk", "synth_grid", "synth_capsule", "synth_fabric2", "synth_disk2"]
    assert not np.array_equal(plan[0][2], plan[4][2])  # the variant is recoloured


def test_masks_are_exactly_the_changed_pixels(tmp_path):
    """Each defect image differs from its regenerated defect-free render exactly inside its mask."""
    generate(tmp_path, categories=4, seed=3, **SMALL)
    checked = 0
    for name, kind, palette in category_plan(4):
        cat = tmp_path / name
        for d in kind.defects:
            for i in range(SMALL["n_test_per_defect"]):
                img = np.asarray(Image.open(cat / "test" / d / f"{i:03d}.png"))
                mask_png = np.asarray(Image.open(cat / "ground_truth" / d / f"{i:03d}_mask.png"))
                assert mask_png.shape == img.shape[:2] and set(np.unique(mask_png)) <= {0, 255}
                normal = render_sample(kind, palette, SMALL["size"], 3, (name, "test", d, str(i)))[0]
                changed = (img != normal).any(-1)
                np.testing.assert_array_equal(changed, mask_png == 255, err_msg=f"{name}/{d}/{i}")
                assert changed.sum() >= 10, f"{name}/{d}/{i}: defect too small to learn"
                assert np.abs(img.astype(int) - normal)[changed].max(-1).min() >= 10  # visibly changed
                checked += 1
    assert checked == 4 * 4 * SMALL["n_test_per_defect"]


def test_render_sample_returns_what_is_written(tmp_path):
    generate(tmp_path, categories=2, seed=1, **SMALL)
    name, kind, palette = category_plan(2)[1]
    img, normal, mask = render_sample(kind, palette, 64, 1, (name, "test", "crack", "1"), "crack")
    assert (tmp_path / name / "test" / "crack" / "001.png").read_bytes() == png_bytes(img)
    assert (tmp_path / name / "ground_truth" / "crack" / "001_mask.png").read_bytes() == png_bytes(
        mask.astype(np.uint8) * 255
    )
    good = render_sample(kind, palette, 64, 1, (name, "train", "good", "0"))
    assert good[2] is None and np.array_equal(good[0], good[1])


def test_normal_images_vary_but_stay_alike(tmp_path):
    generate(tmp_path, categories=2, seed=0, size=64, n_train=4, n_test_good=1, n_test_per_defect=1)
    for name in ("synth_fabric", "synth_disk"):
        ims = [np.asarray(Image.open(p), dtype=float) for p in sorted((tmp_path / name / "train" / "good").glob("*"))]
        diffs = [np.abs(a - b).mean() for a, b in zip(ims, ims[1:])]
        assert all(d > 1.0 for d in diffs)  # pose/lighting/noise: no two normals alike
        assert all(d < 60.0 for d in diffs)  # but still the same kind of thing


def test_deterministic_by_seed_and_different_across_seeds(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, categories=2, seed=7, **SMALL)
    generate(b, categories=2, seed=7, **SMALL)
    generate(c, categories=2, seed=8, **SMALL)
    ha, hb, hc = _tree_hash(a), _tree_hash(b), _tree_hash(c)
    assert ha == hb
    assert ha.keys() == hc.keys()
    assert sum(ha[k] != hc[k] for k in ha if k.endswith(".png")) > 0.9 * sum(k.endswith(".png") for k in ha)


def test_png_bytes_are_pinned_across_machines():
    """Golden hashes: a fixed render and a fixed array give the same PNG bytes on every machine.

    The encoder writes stored deflate blocks (no zlib compressor whose output varies by build) and the
    render uses only numpy's PCG64 Generator; a change here means the dataset changed for everyone.
    """
    name, kind, palette = category_plan(2)[1]
    img, _, mask = render_sample(kind, palette, 48, 0, (name, "test", "missing_part", "0"), "missing_part")
    assert hashlib.sha256(png_bytes(img)).hexdigest() == GOLDEN_IMG
    assert hashlib.sha256(png_bytes(mask.astype(np.uint8) * 255)).hexdigest() == GOLDEN_MASK
    big = np.arange(300 * 300 * 3, dtype=np.uint32).astype(np.uint8).reshape(300, 300, 3)  # > one 64 KiB block
    assert hashlib.sha256(png_bytes(big)).hexdigest() == GOLDEN_BIG
    # and the encoder round-trips through Pillow
    for arr in (img, mask.astype(np.uint8) * 255, big):
        np.testing.assert_array_equal(np.asarray(Image.open(_bytesio(png_bytes(arr)))), arr)


GOLDEN_IMG = "ffda37c2389ac62d8e083e1b88a076238f0abefb5642a575f3da44d45fc45435"
GOLDEN_MASK = "da86148ece842a47a9a3c0254ae569869d4bd31cf0353742c665011b849e42a8"
GOLDEN_BIG = "2fa38e7b590a3328ec5ca1d0d4eb91078584611fa3836658b008300312da500d"


def _bytesio(data: bytes):
    import io

    return io.BytesIO(data)


def test_idempotent_and_replaces_own_stale_output(tmp_path):
    generate(tmp_path, categories=2, seed=0, **SMALL)
    before = _tree_hash(tmp_path)
    mtime = (tmp_path / "synth_fabric" / "train" / "good" / "000.png").stat().st_mtime_ns
    assert generate(tmp_path, categories=2, seed=0, **SMALL) == ["synth_fabric", "synth_disk"]
    assert _tree_hash(tmp_path) == before
    assert (tmp_path / "synth_fabric" / "train" / "good" / "000.png").stat().st_mtime_ns == mtime  # skipped
    # a deleted file is noticed and the category rewritten
    (tmp_path / "synth_disk" / "test" / "good" / "001.png").unlink()
    generate(tmp_path, categories=2, seed=0, **SMALL)
    assert _tree_hash(tmp_path) == before
    # other settings: the generator's own folders are replaced
    generate(tmp_path, categories=2, seed=5, **SMALL)
    assert json.loads((tmp_path / "synth.json").read_text())["categories"]["synth_disk"]["seed"] == 5
    assert _tree_hash(tmp_path)["synth_disk/train/good/000.png"] != before["synth_disk/train/good/000.png"]
    # no temporary folders left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "synth_fabric" / "train" / "good").mkdir(parents=True)
    (tmp_path / "synth_fabric" / "train" / "good" / "mine.png").write_bytes(b"x")
    with pytest.raises(FsadError, match="not written by the synthetic generator"):
        generate(tmp_path, categories=1, **SMALL)
    assert (tmp_path / "synth_fabric" / "train" / "good" / "mine.png").read_bytes() == b"x"


def test_failed_generation_leaves_nothing_half_written(tmp_path, monkeypatch):
    import fewshot_core.data.synth as synth

    calls = {"n": 0}
    real = synth.png_bytes

    def flaky(arr):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(arr)

    monkeypatch.setattr(synth, "png_bytes", flaky)
    with pytest.raises(OSError):
        generate(tmp_path, categories=1, **SMALL)
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("kwargs", [dict(categories=0), dict(size=8), dict(n_train=0), dict(n_test_per_defect=-1)])
def test_bad_settings_are_clear_errors(tmp_path, kwargs):
    with pytest.raises(FsadError, match="invalid; use an integer"):
        generate(tmp_path, **kwargs)


def test_default_size_categories_load_with_the_reader(synth_root):
    """The shared fixture's data passes the project's MVTec reader."""
    mvtec = pytest.importorskip("fewshot_core.data.mvtec")
    for name in ("synth_fabric", "synth_disk"):
        ds = mvtec.load_category(synth_root, name)
        assert len(ds.train_good()) == 12 and len(ds.defect_types()) == 4
        assert all(r.mask_path is not None and r.mask_path.is_file() for r in ds.test() if r.label == 1)


def test_screw_kind_random_poses_small_defects_deterministic(tmp_path):
    """The elongated-part kind: asked for by name, deterministic, parts at varied angles, small exact masks."""
    from fewshot_core.data.synth import EXTRA_KINDS

    kind = EXTRA_KINDS["screw"]
    palette = np.asarray(kind.palette, dtype=np.float64)
    img_a, _, _ = render_sample(kind, palette, 128, 0, ("synth_screw", "train", "good", "0"))
    img_b, _, _ = render_sample(kind, palette, 128, 0, ("synth_screw", "train", "good", "0"))
    assert np.array_equal(img_a, img_b)
    # poses differ: the principal axis of the part's pixels points in different directions
    angles = []
    for i in range(6):
        img, _, _ = render_sample(kind, palette, 128, 0, ("synth_screw", "train", "good", str(i)))
        bright = img.astype(float).mean(-1) > np.percentile(img.astype(float).mean(-1), 88)
        ys, xs = np.nonzero(bright)
        cov = np.cov(np.stack([xs - xs.mean(), ys - ys.mean()]))
        vec = np.linalg.eigh(cov)[1][:, -1]
        angles.append(np.degrees(np.arctan2(vec[1], vec[0])) % 180)
    assert np.ptp(angles) > 45
    for defect in kind.defects:
        img, normal, mask = render_sample(kind, palette, 128, 0, ("synth_screw", "test", defect, "0"), defect)
        changed = np.abs(img.astype(int) - normal).max(-1) > 0
        assert np.array_equal(changed, mask) and 0 < mask.mean() < 0.05
    names = generate(tmp_path, seed=0, kinds=("screw",), **SMALL)
    assert names == ["synth_screw"] and (tmp_path / "synth_screw" / "ground_truth" / "hole").is_dir()
    with pytest.raises(FsadError, match="unknown"):
        generate(tmp_path, kinds=("bolt",), **SMALL)


def test_regenerating_with_other_settings_keeps_files_a_user_added(tmp_path):
    """Before: the category folder was replaced as a whole and the user's own images were gone."""
    generate(tmp_path, categories=1, seed=0, **SMALL)
    mine = tmp_path / "synth_fabric" / "train" / "good" / "mine.png"
    mine.write_bytes(b"my own part")
    with pytest.raises(FsadError, match=r"mine.png: not written by the synthetic generator, and regenerating "
                                        r"synth_fabric would delete it"):
        generate(tmp_path, categories=1, seed=1, **SMALL)
    assert mine.read_bytes() == b"my own part"
    assert json.loads((tmp_path / "synth.json").read_text())["categories"]["synth_fabric"]["seed"] == 0
    # the same settings leave the folder (and the user's file) as it is; once moved away, regenerating works
    assert generate(tmp_path, categories=1, seed=0, **SMALL) == ["synth_fabric"] and mine.is_file()
    mine.unlink()
    generate(tmp_path, categories=1, seed=1, **SMALL)
    assert json.loads((tmp_path / "synth.json").read_text())["categories"]["synth_fabric"]["seed"] == 1
