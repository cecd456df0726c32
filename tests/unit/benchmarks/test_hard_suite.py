"""The development suite's datasets, levers and tables (benchmarks/hard_suite.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot_core.backbones.stages import resolve_layers


@pytest.fixture(scope="module")
def suite(load_benchmark):
    return load_benchmark("hard_suite")


def _tiles(root):
    """A magnetic_tile category as MTD ships it: grey JPEGs of differing, non-square sizes, PNG masks."""
    cat = root / "magnetic_tile"
    rng = np.random.default_rng(0)
    for split, kind, n in (("train", "good", 3), ("test", "good", 2), ("test", "crack", 2)):
        (cat / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = 40 + 7 * i, 90 - 5 * i
            Image.fromarray(rng.integers(80, 120, (h, w), dtype=np.uint8)).save(cat / split / kind / f"exp{i}.jpg")
            if kind != "good":
                (cat / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((h, w), np.uint8)
                mask[5:9, 10:40] = 255
                Image.fromarray(mask).save(cat / "ground_truth" / kind / f"exp{i}_mask.png")
    return root


def test_every_lever_names_a_valid_backbone_and_stages(suite):
    assert {"magnetic_tile", "bottle_logical"} <= set(suite.HARD) and "bottle" not in suite.HARD
    for name, lever in suite.LEVERS.items():
        assert isinstance(lever, suite.Lever), name
        if lever.method != "musc":
            assert resolve_layers(lever.backbone, lever.layers), name
    backbones = {lever.backbone for lever in suite.LEVERS.values()}
    assert {"tf_efficientnet_lite1", "tf_efficientnet_lite2"} <= backbones


def test_magnetic_tile_is_read_from_its_root_or_skipped(suite, tmp_path, monkeypatch, capsys):
    got = suite.prepare(tmp_path / "cache", None, mtd_root=_tiles(tmp_path / "mtd"), wanted=("magnetic_tile",))
    tiles = got["magnetic_tile"]
    assert list(got) == ["magnetic_tile"] and tiles.has_masks
    assert len(tiles.train_good()) == 3 and sum(r.label for r in tiles.test()) == 2
    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MTD_ROOT", str(tmp_path / "nowhere"))
    assert suite.main(["--datasets", "magnetic_tile", "--levers", "patchcore", "--shots", "1", "--seeds", "0"]) == 0
    assert "# skipped magnetic_tile: no Magnetic Tile Defects root (pass --mtd-root or set MTD_ROOT)" \
        in capsys.readouterr().err


def test_tables_per_metric_cover_the_datasets_that_have_it(suite):
    rows = [{"lever": "patchcore", "dataset": "magnetic_tile", "shots": 1, "image_auroc": 0.8, "image_auroc_ci": 0.01,
             "pixel_auroc": 0.9, "pixel_auroc_ci": 0.02, "aupro": 0.7, "aupro_ci": 0.03},
            {"lever": "patchcore", "dataset": "synth_screw", "shots": 1, "image_auroc": 0.6, "image_auroc_ci": 0.0}]
    image = suite.table(rows, [1], ["synth_screw", "magnetic_tile"])
    assert "| patchcore | 0.600±0.000 | 0.800±0.010 | 0.700 |" in image  # the hard mean over both
    pixel = suite.table(rows, [1], ["synth_screw", "magnetic_tile"], "aupro")
    assert "synth_screw" not in pixel and "| patchcore | 0.700±0.030 | 0.700 |" in pixel


def test_issue_23_levers_name_the_store_aspect_and_protocol_options(suite):
    from dataclasses import fields

    from fewshot_core.evaluation.options import EpisodeOptions

    assert "mtd_tall" in suite.HARD
    keywords = {f.name for f in fields(EpisodeOptions)}
    for name, lever in suite.LEVERS.items():
        assert lever.aspect in ("auto", "square"), name
        assert set(lever.options) <= keywords, name
    assert suite.LEVERS["patchcore+aug+fg square"].aspect == "square"
    assert suite.LEVERS["patchcore auto"].options == {"config": "auto"}
    assert suite.LEVERS["patchcore align"].options == {"align": "always"}
    assert suite.LEVERS["patchcore align auto"].options == {"align": "auto"}


def test_rows_keep_each_seeds_value_for_paired_comparisons(suite, tmp_path):
    """Two levers on the same support draws are compared seed by seed: each row keeps its per-seed values,
    in its seeds' order, and their mean is the row's value."""
    from fewshot_core.data import load_category
    from fewshot_core.features.store import FeatureStore

    _tiles(tmp_path)
    ds = load_category(tmp_path, "magnetic_tile")
    rows = suite.run(["patchcore"], {"magnetic_tile": ds}, [1], [0, 1], FeatureStore(tmp_path / "store"), 64,
                     log=lambda *_: None)
    (row,) = rows
    assert row["seeds"] == [0, 1] and len(row["image_auroc_per_seed"]) == 2
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        assert np.mean(row[m + "_per_seed"]) == pytest.approx(row[m])
