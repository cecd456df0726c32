"""Stage layouts are cached per timm version, so a cached evaluation never imports timm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fewshot_core.backbones import stages


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("FSAD_HOME", str(tmp_path))
    monkeypatch.setattr(stages, "_MEMO", {})
    return stages._cache_file()


def test_the_cache_holds_what_timm_builds_and_a_damaged_file_is_rebuilt(monkeypatch, tmp_path):
    path = _fresh(monkeypatch, tmp_path)
    built = stages._from_timm("tf_efficientnet_lite0")
    assert stages.stage_info("tf_efficientnet_lite0") == built
    assert json.loads(path.read_text())["tf_efficientnet_lite0"] == built
    for damage in ("{not json", json.dumps({"tf_efficientnet_lite0": [{"num_chs": "16"}]}), "[]"):
        path.write_text(damage)
        monkeypatch.setattr(stages, "_MEMO", {})
        assert stages.stage_info("tf_efficientnet_lite0") == built
        assert json.loads(path.read_text())["tf_efficientnet_lite0"] == built
    assert stages.resolve_layers("tf_efficientnet_lite0") == (2, 3)


def test_a_cache_hit_does_not_import_timm(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    stages.stage_info("tf_efficientnet_lite0")
    code = ("import sys; from fewshot_core.backbones.stages import resolve_layers; "
            "print(resolve_layers('tf_efficientnet_lite0'), 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FSAD_HOME": str(tmp_path)}).stdout.split()
    assert out == ["(2,", "3)", "False"]


def test_an_unwritable_cache_folder_only_costs_the_build(monkeypatch, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(stages, "_MEMO", {})
    assert stages.stage_info("tf_efficientnet_lite0") == stages._from_timm("tf_efficientnet_lite0")
