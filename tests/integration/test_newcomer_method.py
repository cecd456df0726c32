"""A method added from outside the package by one file and one registry entry (``registry.register``) runs
everywhere a built-in one does: ``fsad evaluate``, the sweep (the pipeline's definitions pick it up, in the
worker pool its input kind asks for), MLflow and the report. The sweep also runs the transductive method
(musc, 0 good shots), whose rows reach the table, MLflow and the report like the other protocols'."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
import pytest

from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.cli import main
from fewshot_core.methods import registry

pytestmark = pytest.mark.timeout(1200)

# The newcomer's one file: two tiny one-class detectors, one on the store's patch features (CPU), one trained
# on the pixels (an accelerator's job, as far as the worker pools are concerned).
METHOD_FILE = '''
import numpy as np
import torch

from fewshot_core.methods.base import Detector


class MeanPatches(Detector):
    name = "meanpatch"
    input_kind = "patches"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, X):
        self.mean_ = np.asarray(X, dtype=np.float32).mean(axis=(0, 1, 2))
        self.fitted_ = True
        return self

    def score(self, X):
        maps = ((np.asarray(X, dtype=np.float32) - self.mean_) ** 2).sum(-1)
        return maps.reshape(len(maps), -1).max(1), maps

    def get_state(self):
        return {"arrays": {"mean": self.mean_}}

    def set_state(self, state):
        self.mean_, self.fitted_ = state["arrays"]["mean"], True


class MeanImage(Detector):
    name = "meanimage"
    input_kind = "images"
    map_sigma = 0.0

    def __init__(self, image_size: int = 40, seed: int = 0):
        self.image_size = image_size
        self.seed = seed

    def fit(self, X):
        self.mean_ = torch.as_tensor(X).mean(0).numpy()
        self.fitted_ = True
        return self

    def score(self, X):
        maps = ((torch.as_tensor(X).numpy() - self.mean_) ** 2).mean(1)
        return maps.reshape(len(maps), -1).max(1), maps

    def get_state(self):
        return {"arrays": {"mean": self.mean_}}

    def set_state(self, state):
        self.mean_, self.fitted_ = state["arrays"]["mean"], True
'''


@pytest.fixture
def newcomers(tmp_path, monkeypatch):
    """The newcomer's file on the path and its two entries registered, for this test only."""
    (tmp_path / "newcomer_method.py").write_text(METHOD_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    registry.register(registry.MethodEntry("meanpatch", registry.ONECLASS, registry.PATCHES,
                                           "newcomer_method:MeanPatches", "mean patch distance"))
    registry.register(registry.MethodEntry("meanimage", registry.ONECLASS, registry.IMAGES,
                                           "newcomer_method:MeanImage", "mean image distance"))
    return tmp_path


def test_a_registered_method_runs_under_fsad_evaluate(newcomers, tmp_path, capsys):
    from _builders import build_mvtec_category

    build_mvtec_category(tmp_path / "data", "w", n_train=4, n_test_good=3, defects={"cut": 3})
    base = ["evaluate", str(tmp_path / "data"), "--category", "w", "--shots", "2", "--seeds", "0", "--json",
            "--weights", "random", "--image-size", "32", "--num-workers", "0", "--store", str(tmp_path / "store")]
    assert main(base + ["--method", "meanpatch", "--augment", "none"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["method"] == "meanpatch" and row["protocol"] == "oneclass" and 0 <= row["image_auroc"] <= 1
    assert main(base + ["--method", "meanimage"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["method"] == "meanimage" and row["input_shape"] == "40x40"  # masks at the model's own size
    with pytest.raises(SystemExit):  # --help lists it from the registry
        main(["evaluate", "--help"])
    assert "meanimage, meanpatch" in " ".join(capsys.readouterr().out.split())
    # the name is looked up once, at the edge; the library passes the entry on
    looked_up = []

    class Counting(dict):
        def get(self, key, default=None):
            looked_up.append(key)
            return super().get(key, default)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "REGISTRY", Counting(registry.REGISTRY))
        assert main(base + ["--method", "meanpatch", "--augment", "none"]) == 0
    capsys.readouterr()
    assert looked_up == ["meanpatch"]


def test_the_pipeline_places_a_registered_method_by_its_input_kind(newcomers, tmp_path, monkeypatch):
    from pipelines.config import load_config
    from pipelines.definitions import build_definitions

    monkeypatch.delenv("FSAD_PROFILE", raising=False)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"name: t\ndata: {{source: synthetic}}\nmethods: [{{method: meanpatch}}, {{method: meanimage}}, "
                   f"{{method: musc}}]\nwork_dir: {tmp_path / 'work'}\n")
    defs = build_definitions(load_config(cfg))
    nodes = {n.name: n.pool for n in defs.resolve_implicit_global_asset_job_def().graph.node_defs}
    assert nodes[f"evaluation__{DEFAULT_BACKBONE}__meanpatch"] == "cpu"
    assert nodes[f"evaluation__{DEFAULT_BACKBONE}__meanimage"] == "gpu"
    assert nodes[f"evaluation__{DEFAULT_BACKBONE}__musc"] == "cpu"


SWEEP = """\
name: newcomer
data: {{source: synthetic, synth: {{categories: 1, size: 64, n_train: 4, n_test_good: 3, n_test_per_defect: 2}}}}
image_size: 32
oneclass: {{shots: [2], seeds: [0]}}
transductive: {{shots: [0], seeds: [0]}}
methods:
  - {{method: meanpatch}}
  - {{method: meanimage}}
  - {{method: musc}}
full_data: null
work_dir: {work}
"""


@pytest.mark.slow
def test_a_sweep_runs_the_newcomer_and_the_transductive_method_into_mlflow_and_the_report(newcomers, tmp_path,
                                                                                        monkeypatch, capsys):
    from fewshot_core.tracking.runs import Tracker
    from fewshot_core.tracking.store import default_tracking_uri

    home, work, config = tmp_path / "home", tmp_path / "work", tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(SWEEP.format(work=work)))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "MVTEC_ROOT", "FSAD_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FSAD_SWEEP_CONFIG", str(config))
    assert main(["run", "--config", str(config), "--dagster-home", str(home)]) == 0, capsys.readouterr()
    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    by_method = {r["method"]: r for r in table.to_dict("records")}
    assert set(by_method) == {"meanpatch", "meanimage", "musc"}
    assert by_method["musc"]["protocol"] == "transductive" and by_method["musc"]["setting_key"] == "td-k0-s0"
    assert by_method["musc"]["n_support"] == 0 and 0 <= by_method["musc"]["image_auroc"] <= 1
    assert by_method["meanimage"]["protocol"] == by_method["meanpatch"]["protocol"] == "oneclass"
    import dagster as dg

    table_event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("benchmark_table"))
    meta = table_event.asset_materialization.metadata
    assert meta["headline: transductive image AUROC (mean)"].value == pytest.approx(by_method["musc"]["image_auroc"])
    runs = {r.info.run_id: r for r in Tracker(default_tracking_uri(home)).evaluation_runs("newcomer")}
    assert set(runs) == set(table["mlflow_run_id"])
    musc = runs[by_method["musc"]["mlflow_run_id"]]
    assert musc.data.params["protocol"] == "transductive"
    assert musc.data.metrics["image_auroc"] == pytest.approx(by_method["musc"]["image_auroc"])
    summary = pd.read_parquet(work / "tables" / "benchmark_summary.parquet")
    assert set(summary[summary["protocol"] == "transductive"]["method"]) == {"musc"}
    report = (work / "report" / "report.html").read_text()
    assert "Transductive: the unlabeled test images" in report
    assert all(name in report for name in ("meanpatch", "meanimage", "musc"))
