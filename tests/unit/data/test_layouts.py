"""Config-declared layouts (YAML and CLI flags) for users' own parts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from _builders import build_folder_layout, write_image
from fewshot_core.data import LayoutConfig, load_dataset
from fewshot_core.data.layouts import (
    add_layout_arguments,
    dataset_from_args,
    holdout_split,
    scan_layout,
    source_from_args,
)
from fewshot_core.errors import FsadError


def _yaml(tmp_path, **cfg) -> Path:
    p = tmp_path / "part.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_yaml_two_defect_folders_without_masks(tmp_path):
    build_folder_layout(tmp_path, n_good=10, defects={"scratch": 2, "dent": 3})
    cfg = _yaml(tmp_path, good_dir="ok", defect_dirs=["nok/scratch", "nok/dent"], holdout=0.3, seed=1)
    ds = load_dataset(cfg)
    assert ds.category == "part" and not ds.has_masks
    assert ds.defect_types() == ["dent", "scratch"]
    assert len(ds.train_good()) == 7
    test_good = [r for r in ds.test() if r.label == 0]
    assert len(test_good) == 3 and all(r.image_id.startswith("part/test/good/") for r in test_good)
    assert not {r.path for r in ds.train_good()} & {r.path for r in test_good}
    assert sum(r.label for r in ds.test()) == 5
    assert ds.root == tmp_path.absolute()
    assert load_dataset(str(cfg)).records == ds.records  # path as str works too


def test_holdout_is_seeded_and_stable():
    imgs = [Path(f"/x/{i:02d}.png") for i in range(20)]
    a = holdout_split(imgs, 0.25, seed=0)
    assert a == holdout_split(imgs, 0.25, seed=0)
    assert len(a[1]) == 5 and sorted(a[0] + a[1]) == imgs
    assert a[1] != holdout_split(imgs, 0.25, seed=1)[1]
    # adding a file moves at most one held-out image (the choice is per file, not a shuffle)
    more = holdout_split(imgs + [Path("/x/99.png")], 0.25, seed=0)[1]
    assert len(set(a[1]) - set(more)) <= 1
    assert holdout_split(imgs[:1], 0.5, 0) == (imgs[:1], [])
    assert holdout_split(imgs, 0.0, 0) == (imgs, [])


@pytest.mark.parametrize("masks", ["flat", "nested"])
def test_masks_with_naming_rule(tmp_path, masks):
    dirs = build_folder_layout(tmp_path, test_good=2, masks=masks)
    cfg = LayoutConfig(good_dir=dirs["good_dir"], defect_dirs=dirs["defect_dirs"], test_good_dir=dirs["test_good_dir"],
                       mask_dir=dirs["mask_dir"], name="m")
    ds = load_dataset(cfg)
    assert ds.has_masks and len(ds.train_good()) == 10 and len(ds.test()) == 6
    for r in ds.test():
        assert (r.mask_path is None) == (r.label == 0)
        if r.mask_path is not None:
            assert r.mask_path.name == f"{r.path.stem}_mask.png"


def test_mask_suffix_empty_and_problems(tmp_path):
    dirs = build_folder_layout(tmp_path, defects={"scratch": 2}, masks="flat")
    for m in (tmp_path / "masks").iterdir():
        m.rename(m.with_name(m.name.replace("_mask", "")))
    ok = LayoutConfig(good_dir=dirs["good_dir"], defect_dirs=dirs["defect_dirs"], mask_dir=dirs["mask_dir"], mask_suffix="")
    assert all(r.mask_path is not None for r in load_dataset(ok).test() if r.label)
    (tmp_path / "masks/scratch_00.png").unlink()
    write_image(tmp_path / "masks/stray_01.png")
    scan = scan_layout(ok)
    assert len(scan.problems) == 2
    assert any("scratch_00.png: defect image has no mask" in p for p in scan.problems)
    assert any("stray_01.png: mask without image" in p for p in scan.problems)
    with pytest.raises(FsadError, match="scratch_00.png"):
        load_dataset(ok)


def test_flags_equal_yaml(tmp_path):
    build_folder_layout(tmp_path, defects={"scratch": 2, "dent": 2}, masks="nested")
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?")
    parser.add_argument("--category")
    add_layout_arguments(parser)
    args = parser.parse_args([
        "--good-dir", str(tmp_path / "ok"), "--defect-dir", str(tmp_path / "nok/scratch"),
        "--defect-dir", str(tmp_path / "nok/dent"), "--mask-dir", str(tmp_path / "masks"),
        "--holdout", "0.3", "--holdout-seed", "4", "--category", "part",
    ])
    from_flags = load_dataset(source_from_args(args))
    cfg = _yaml(tmp_path, good_dir="ok", defect_dirs=["nok/scratch", "nok/dent"], mask_dir="masks", holdout=0.3, seed=4)
    assert from_flags.records == load_dataset(cfg).records
    # name defaults to the folders' common parent
    args.category = None
    assert source_from_args(args).name == tmp_path.name
    # exactly one source form
    for argv in (["root", "--good-dir", "x"], [], ["--layout-config", str(cfg), "--good-dir", "x"]):
        with pytest.raises(FsadError, match="exactly one"):
            source_from_args(parser.parse_args(argv))
    with pytest.raises(FsadError, match="--defect-dir"):
        source_from_args(parser.parse_args(["--good-dir", "ok"]))
    assert source_from_args(parser.parse_args(["some/root"])) == Path("some/root")
    assert isinstance(source_from_args(parser.parse_args(["--layout-config", str(cfg)])), LayoutConfig)


def test_mapping_form_and_config_errors(tmp_path):
    build_folder_layout(tmp_path, defects={"a": 1, "b": 1})
    cfg = LayoutConfig.from_yaml(_yaml(tmp_path, name="p", good_dir="ok", defect_dirs={"crack": "nok/a", "hole": "nok/b"}))
    assert load_dataset(cfg).defect_types() == ["crack", "hole"]
    with pytest.raises(FsadError, match="unknown key"):
        LayoutConfig.from_yaml(_yaml(tmp_path, good_dir="ok", defect_dirs=["nok/a"], masks="m"))
    with pytest.raises(FsadError, match="missing 'defect_dirs'"):
        LayoutConfig.from_yaml(_yaml(tmp_path, good_dir="ok"))
    with pytest.raises(FsadError, match="two defect folders named"):
        LayoutConfig(good_dir="ok", defect_dirs=["x/a", "y/a"], base=tmp_path)
    with pytest.raises(FsadError, match="named 'good'"):
        LayoutConfig(good_dir="ok", defect_dirs=["x/good"], base=tmp_path)
    with pytest.raises(FsadError, match="holdout"):
        LayoutConfig(good_dir="ok", defect_dirs=["x/a"], holdout=1.0, base=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("good_dir: [unclosed")
    with pytest.raises(FsadError, match="bad.yaml: cannot read layout config"):
        LayoutConfig.from_yaml(bad)
    with pytest.raises(FsadError, match="not found"):
        LayoutConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(FsadError, match="not 'other'"):
        load_dataset(cfg, "other")


def test_missing_folders_reported_together(tmp_path):
    cfg = LayoutConfig(good_dir="ok", defect_dirs=["nok/a", "nok/b"], base=tmp_path, mask_dir="masks")
    problems = scan_layout(cfg).problems
    assert len(problems) == 4 and all("folder not found" in p for p in problems)


def test_dataset_from_args_for_other_commands(tmp_path):
    """What ``fsad embed``/``evaluate`` call: any of the three source forms gives the Dataset."""
    from _builders import build_mvtec_category

    build_mvtec_category(tmp_path / "root", "widget")
    build_folder_layout(tmp_path / "own", defects={"scratch": 1})
    cfg = _yaml(tmp_path / "own", good_dir="ok", defect_dirs=["nok/scratch"])
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", type=Path)
    parser.add_argument("--category")
    add_layout_arguments(parser)
    assert dataset_from_args(parser.parse_args([str(tmp_path / "root"), "--category", "widget"])).category == "widget"
    assert dataset_from_args(parser.parse_args(["--layout-config", str(cfg)])).category == "part"
    assert dataset_from_args(parser.parse_args(["--layout-config", str(cfg), "--category", "part"])).category == "part"
    with pytest.raises(FsadError, match="declares category 'part'"):
        dataset_from_args(parser.parse_args(["--layout-config", str(cfg), "--category", "x"]))
    own = ["--good-dir", str(tmp_path / "own/ok"), "--defect-dir", str(tmp_path / "own/nok/scratch")]
    assert dataset_from_args(parser.parse_args([*own, "--category", "x"])).category == "x"
