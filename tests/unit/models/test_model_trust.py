"""Model files are data, never code: a logged model holds no pickle, and a model folder whose code file or
pickle was replaced, or whose manifest or MLmodel metadata was edited, is refused before anything of it
runs (``fewshot_core/models/trust.py``)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from fewshot_core.errors import FsadError

PROJECT_ROOT = Path(__file__).resolve().parents[3]


class _Hostile:
    """Unpickling it creates ``marker``: the stand-in for any command a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy(logged, dst: Path) -> Path:
    from fewshot_core.models.trust import download_verified

    return download_verified(logged.model_uri, dst, logged.tracking_uri)


def _one_line_error(fn) -> str:
    with pytest.raises(FsadError) as caught:
        fn()
    message = str(caught.value)
    assert "\n" not in message
    return message


def _fsad_predict(model: str, image: Path, out: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot_core", "predict", str(image), "--model", model,
                           "--out", str(out), "--no-progress", "--tracking-uri", tracking_uri],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


@pytest.mark.slow
def test_logged_model_holds_no_pickle_and_mlflow_still_loads_it(logged_model, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from fewshot_core.models.trust import ENTRY, load_verified

    model_dir = _copy(logged_model, tmp_path / "copy")
    files = [p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file()]
    assert not [f for f in files if f.suffix in (".pkl", ".pickle")], files
    assert (model_dir / ENTRY.name).read_bytes() == ENTRY.read_bytes()
    conf = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in conf and conf["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    # MLflow's own loader runs the untouched model (as `mlflow models serve` does) and scores as fsad's does
    served = mlflow.pyfunc.load_model(str(model_dir))
    got = served.predict(pd.DataFrame({"image": [p.read_bytes() for p in logged_model.query_paths[:3]]}))
    ours = load_verified(str(model_dir)).score(logged_model.query_paths[:3])
    assert got["image_score"].tolist() == pytest.approx(ours.image_score.tolist(), abs=1e-6)
    assert got["error"].tolist() == [None] * 3


@pytest.mark.slow
def test_hostile_pickle_in_a_model_folder_is_refused_and_never_unpickled(logged_model, tmp_path):
    from fewshot_core.models.trust import load_verified

    payload = pickle.dumps(_Hostile(tmp_path / "proof"))
    pickle.loads(payload)
    assert (tmp_path / "proof").exists(), "the payload runs when unpickled"
    marker = tmp_path / "pwned"
    model_dir = _copy(logged_model, tmp_path / "copy")
    (model_dir / "python_model.pkl").write_bytes(pickle.dumps(_Hostile(marker)))
    # the MLmodel of a pickled wrapper, as older fsad versions logged it
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    conf = mlmodel["flavors"]["python_function"]
    conf.pop("model_code_path")
    conf.update(python_model="python_model.pkl", loader_module="mlflow.pyfunc.model")
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))

    proc = _fsad_predict(str(model_dir), logged_model.query_paths[0], tmp_path / "out", logged_model.tracking_uri)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "python_model.pkl" in lines[0] and "pickle" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # a stray pickle beside an otherwise intact model is refused as well
    clean = _copy(logged_model, tmp_path / "clean")
    (model_dir / "MLmodel").write_bytes((clean / "MLmodel").read_bytes())
    assert "pickle" in _one_line_error(lambda: load_verified(str(model_dir)))
    assert not marker.exists()


@pytest.mark.slow
def test_replaced_code_file_in_the_model_store_is_refused_unrun(logged_model, tmp_path):
    """The logged model's code file, replaced where MLflow stores it: ``fsad predict --model models:/...``
    refuses it in one line and the code never runs."""
    from fewshot_core.models.trust import ENTRY

    logged = logged_model.tracker.client.get_logged_model(logged_model.model_id)
    stored = Path(urlparse(logged.artifact_location).path) / ENTRY.name
    original = stored.read_bytes()
    marker = tmp_path / "pwned"
    stored.write_text(f"open({str(marker)!r}, 'w').close()\n" + original.decode())
    try:
        proc = _fsad_predict(logged_model.model_uri, logged_model.query_paths[0], tmp_path / "out",
                             logged_model.tracking_uri)
    finally:
        stored.write_bytes(original)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ENTRY.name in lines[0] and "differs" in lines[0], proc.stderr[-2000:]
    assert not marker.exists()
    assert not (tmp_path / "out" / "predictions.csv").exists()


def _edit_threshold_digit(text: str) -> str:
    """The deploy record's threshold with its first decimal digit changed, as a hand edit would."""
    match = re.search(r'("threshold": \{[^{}]*?"value": )(\d+)\.(\d)', text, flags=re.S)
    assert match, "the manifest records a threshold"
    digit = str((int(match.group(3)) + 1) % 10)
    return text[:match.start(3)] + digit + text[match.end(3):]


@pytest.mark.slow
def test_one_digit_threshold_edit_in_the_manifest_is_damaged(logged_model, tmp_path):
    from fewshot_core.methods.components.persistence import MANIFEST
    from fewshot_core.models.trust import load_verified

    model_dir = _copy(logged_model, tmp_path / "copy")
    (manifest,) = model_dir.joinpath("artifacts").rglob(MANIFEST)
    before = json.loads(manifest.read_text())["extra"]["deploy"]["threshold"]["value"]
    manifest.write_text(_edit_threshold_digit(manifest.read_text()))
    after = json.loads(manifest.read_text())["extra"]["deploy"]["threshold"]["value"]
    assert after != before and abs(after - before) < 1
    for target in (model_dir, manifest.parent):  # the logged model, and its deployable folder given directly
        message = _one_line_error(lambda: load_verified(str(target)))
        assert "damaged" in message and str(manifest) in message


@pytest.mark.slow
def test_threshold_edit_in_the_mlmodel_metadata_is_damaged(logged_model, tmp_path):
    from fewshot_core.models.trust import load_verified

    model_dir = _copy(logged_model, tmp_path / "copy")
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["metadata"]["fsad"]["threshold"] *= 1.1
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    message = _one_line_error(lambda: load_verified(str(model_dir)))
    assert "damaged" in message and "threshold" in message
