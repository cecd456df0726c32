"""``fsad predict`` walking folders and writing its output folder: it never scores its own output, a
reused ``--out`` holds no stale overlays, two runs into one ``--out`` cannot silently lose rows, and a
FIFO named like an image is refused instead of hanging the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from _builders import build_mvtec_category, write_image
from fewshot_core.cli import main
from fewshot_core.features.store import EmbedCompute, FeatureSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real deployable PatchCore folder fitted on a tiny category at 32 px."""
    from fewshot_core.data import load_dataset
    from fewshot_core.features.store import FeatureStore
    from fewshot_core.methods import registry
    from fewshot_core.models.deployable import ModelInputs, Provenance, save_deployable
    from fewshot_core.models.featurizer import FeaturizerSpec

    base = tmp_path_factory.mktemp("predict-model")
    build_mvtec_category(base / "data", "w", n_train=3, n_test_good=1, defects={"cut": 1})
    ds = load_dataset(base / "data", "w")
    part = FeatureStore(base / "store").build(ds, FeatureSpec(image_size=32),
                                              EmbedCompute(num_workers=0, progress=False))
    support = [r.image_id for r in ds.train_good()]
    model = registry.create("patchcore", seed=0).fit(part.patch(support))
    return save_deployable(model, base / "model", Provenance("w", support, "oneclass"),
                           ModelInputs(featurizer=FeaturizerSpec.from_partition(part)))


def _predict(capsys, *argv) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _parts(folder: Path, n: int = 2) -> Path:
    for i in range(n):
        write_image(folder / f"part{i}.png", seed=100 + i)
    return folder


def test_predicting_the_current_folder_twice_never_scores_its_own_output(model_dir, tmp_path, capsys, monkeypatch):
    """Before: the second ``fsad predict .`` scored the first run's overlays (and its CSV) as parts."""
    parts = _parts(tmp_path / "parts")
    write_image(parts / ".thumbs" / "hidden.png", seed=7)  # a dot-folder: never an input
    monkeypatch.chdir(parts)
    for _ in range(2):
        code, _out, err = _predict(capsys, ".", "--model", model_dir)
        assert code == 0, err
        rows = pd.read_csv(parts / "fsad-predictions" / "predictions.csv")
        assert sorted(Path(p).name for p in rows["image"]) == ["part0.png", "part1.png"], rows["image"].tolist()
    # an output folder under another name is recognised by its lock file too
    code, _out, err = _predict(capsys, ".", "--model", model_dir, "--out", "elsewhere")
    assert code == 0 and len(pd.read_csv(parts / "elsewhere" / "predictions.csv")) == 2


def test_a_reused_out_keeps_only_this_runs_overlays(model_dir, tmp_path, capsys):
    """Before: the overlays of an earlier, larger run stayed beside a table that no longer listed them."""
    out = tmp_path / "out"
    assert _predict(capsys, _parts(tmp_path / "many", 3), "--model", model_dir, "--out", out)[0] == 0
    assert len(list((out / "overlays").iterdir())) == 3
    assert _predict(capsys, _parts(tmp_path / "few", 1), "--model", model_dir, "--out", out)[0] == 0
    rows = pd.read_csv(out / "predictions.csv")
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [Path(p).name for p in rows["overlay"]]
    assert len(rows) == 1
    assert _predict(capsys, tmp_path / "few", "--model", model_dir, "--out", out, "--no-overlays")[0] == 0
    assert not (out / "overlays").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".overlays-")]  # no staging left behind


def test_a_file_of_the_users_in_the_overlay_folder_is_never_deleted(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    mine = out / "overlays" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    code, _out, err = _predict(capsys, _parts(tmp_path / "p", 1), "--model", model_dir, "--out", out)
    assert code == 2 and "notes.txt: not an overlay written by fsad predict" in err
    assert mine.read_text() == "mine"


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(model_dir, tmp_path, capsys):
    """Before: both runs exited 0 and reported their CSV written; one run's rows were gone."""
    from fewshot_core.cli.predict import LOCK_NAME
    from fewshot_core.locking import file_lock

    out = tmp_path / "out"
    code = ("import sys, time; from fewshot_core.locking import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n")
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _out, err = _predict(capsys, _parts(tmp_path / "p", 1), "--model", model_dir, "--out", out)
        assert code == 2 and f"{out}: another fsad predict (pid {holder.pid}) is writing there" in err, err
        assert not (out / "predictions.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    with file_lock(out / LOCK_NAME, wait=False):  # released by the kernel when its holder died
        pass
    assert _predict(capsys, tmp_path / "p", "--model", model_dir, "--out", out)[0] == 0


@pytest.mark.timeout(120)
def test_a_fifo_given_or_found_is_refused_not_waited_on(model_dir, tmp_path, capsys):
    """Before: ``open`` on the FIFO waited for a writer forever."""
    parts = _parts(tmp_path / "parts", 1)
    fifo = parts / "pipe.png"
    os.mkfifo(fifo)
    for inputs in ([parts], [fifo, parts / "part0.png"]):
        code, _out, err = _predict(capsys, *inputs, "--model", model_dir, "--out", tmp_path / "out")
        assert code == 1 and f"{fifo}: not a regular file (a FIFO" in err, err
        rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
        assert rows["error"].notna().sum() == 1
