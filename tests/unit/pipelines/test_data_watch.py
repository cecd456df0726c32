"""What the pipeline notices about the data: the new-images sensor's fingerprint sees every image the
reader takes and files replaced with their timestamp kept; ``fsad run`` warns about a test split
without good (or without defect) images as ``fsad data validate`` does."""

from __future__ import annotations

import os
import shutil

import pytest

from _builders import build_mvtec_category, write_image
from pipelines.sensors import folder_fingerprint


@pytest.mark.parametrize("ext", [".webp", ".jpeg", ".tiff", ".bmp"])
def test_an_added_image_of_any_readable_format_changes_the_fingerprint(ext, tmp_path):
    """Before: ``.webp`` (which the reader takes) was not counted, so adding one requested nothing."""
    from fewshot_core.data.imageio import IMAGE_EXTENSIONS

    assert ext in IMAGE_EXTENSIONS
    cat = build_mvtec_category(tmp_path, "w", n_train=2, n_test_good=1, defects={"cut": 1})
    before = folder_fingerprint(cat)
    write_image(cat / "train" / "good" / f"new{ext}", seed=99)
    assert folder_fingerprint(cat) != before


def test_a_replaced_image_with_its_timestamp_kept_changes_the_fingerprint(tmp_path):
    """Before: (count, newest mtime) stayed the same when a file was replaced and its mtime restored."""
    cat = build_mvtec_category(tmp_path, "w", n_train=3, n_test_good=1, defects={"cut": 1})
    target = cat / "train" / "good" / "001.png"
    st = target.stat()
    before = folder_fingerprint(cat)
    assert folder_fingerprint(cat) == before  # stable while nothing changes
    write_image(tmp_path / "other.png", seed=1234)
    shutil.copyfile(tmp_path / "other.png", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -d` / `cp -p`: the old timestamp back
    assert target.stat().st_mtime_ns == st.st_mtime_ns
    assert folder_fingerprint(cat) != before


def test_fsad_run_warns_about_an_only_defective_test_split(tmp_path, capsys, monkeypatch):
    """Before: only ``fsad data validate`` said anything, and only for the only-good case."""
    import pipelines.runner
    from fewshot_core.cli import main

    build_mvtec_category(tmp_path / "data", "good_only", n_train=3, n_test_good=2, defects={})
    build_mvtec_category(tmp_path / "data", "bad_only", n_train=3, n_test_good=0, defects={"cut": 2})
    config = tmp_path / "sweep.yaml"
    config.write_text(f"name: warn\ndata: {{source: mvtec, root: {tmp_path / 'data'}}}\nwork_dir: {tmp_path / 'work'}\n")
    stages = []
    monkeypatch.setattr(pipelines.runner, "run_sweep", lambda *a, **k: stages.append(a) or [])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--config", str(config), "--dagster-home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    assert "warning: bad_only: no good images in test; image metrics (AUROC, F1) need at least one" in out
    assert "warning: good_only: no defect images in test; anomaly metrics need at least one" in out
    assert stages  # the sweep still runs
