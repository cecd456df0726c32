"""``fsad embed`` on the real bottle category and its user errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.cli import main
from fewshot_core.features import FeatureStore

torch.set_num_threads(2)


@pytest.mark.shared_data
@pytest.mark.slow
def test_embed_real_bottle_then_cache_hit(mvtec_root, tmp_path, capsys):
    # 64 px keeps the forward pass cheap; decoding all 292 full-size PNGs is the real work here
    args = ["embed", str(mvtec_root), "--category", "bottle", "--store", str(tmp_path), "--image-size", "64",
            "--batch-size", "32", "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert re.search(rf"built bottle-{DEFAULT_BACKBONE}-64-\w+: 292 images in [\d.]+ s = [\d.]+ images/s", first)
    # the bundled Lite2 file's published sha256 (../shared/README.md)
    assert "weights bundled sha256 9656183eaeaf" in first and "RANDOM" not in first

    (key,) = FeatureStore(tmp_path).keys()
    part = FeatureStore(tmp_path).open(key)
    assert len(part) == 292 and part.grid == (8, 8) and part.meta["weights"]["source"] == "bundled"
    idx = part.index
    assert (idx["split"] == "train").sum() == 209 and idx["label"].sum() == 63
    good = part.global_(list(idx.loc[idx["split"] == "train", "image_id"][:20]))
    assert np.isfinite(good).all() and good.std(0).mean() > 0

    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.startswith(f"cache hit: {key} (292 images") and "nothing recomputed" in second
    assert FeatureStore(tmp_path).keys() == [key]


def test_embed_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from fewshot_core.data.synth import generate

    (category,) = generate(tmp_path / "data", categories=1, seed=0, size=48, n_train=2, n_test_good=1,
                           n_test_per_defect=1)
    base = ["embed", str(tmp_path / "data"), "--store", str(tmp_path / "store"), "--no-progress"]
    cases = [
        (["--category", "nope"], "nope"),
        (["--category", category, "--weights", str(tmp_path / "missing.pth")], "missing.pth: weights file not found"),
        (["--category", category, "--layers", "3,1"], "layers [3, 1] invalid"),
        (["--category", category, "--image-size", "8"], "--image-size 8: too small"),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("fsad: error: ") and expected in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists() or FeatureStore(tmp_path / "store").keys() == []


def test_embed_random_weights_are_flagged(tmp_path, capsys):
    from fewshot_core.data.synth import generate

    (category,) = generate(tmp_path / "data", categories=1, seed=1, size=48, n_train=2, n_test_good=1,
                           n_test_per_defect=1)
    args = ["embed", str(tmp_path / "data"), "--category", category, "--store", str(tmp_path / "store"),
            "--image-size", "32", "--weights", "random", "--num-workers", "0", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "weights random" in out and out.rstrip().endswith("[RANDOM WEIGHTS]")
