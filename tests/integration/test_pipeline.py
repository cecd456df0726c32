"""The Dagster pipeline end to end on a tiny synthetic sweep: `fsad run` materialises every stage in-process,
MLflow holds one nested run per evaluation partition, a second materialisation reuses the cached features,
re-materialising a partition makes a new MLflow run, and the sensor requests the partitions new images touch."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fewshot_core.backbones import DEFAULT_BACKBONE as BB  # the sweep's default backbone
from fewshot_core.cli import main
from fewshot_core.errors import FsadError

pytestmark = pytest.mark.timeout(1200)  # the shared 2-core machine: fsad run alone has taken 10 min under load

SWEEP = """\
name: tiny
data: {{source: synthetic, synth: {{categories: 1, size: 64, n_train: 6, n_test_good: 4, n_test_per_defect: 2}}}}
image_size: 64
oneclass: {{shots: [1, 2], seeds: [0, 1]}}
supervised: {{ratios: [[1, 1], [2, 1]], label_modes: [binary, multiclass], seeds: [0]}}
methods:
  - {{id: patchcore, method: patchcore}}
  - {{id: knn, method: knn}}
  - {{id: protonet-euclidean, method: protonet, params: {{distance: euclidean}}}}
work_dir: {work}
"""
N_EVAL = 4 + 4 + 4  # patchcore and knn: 2 shots x 2 seeds; protonet: 2 ratios x 2 label modes x 1 seed


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run `fsad run` once on a tiny config; yield (home, work, config, output) with the environment kept;
    the output is stdout and stderr together, as a terminal shows them."""
    base = tmp_path_factory.mktemp("pipeline")
    home, work = base / "dagster_home", base / "work"
    config = base / "sweep.yaml"
    config.write_text(SWEEP.format(work=work))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MVTEC_ROOT", raising=False)
        mp.setenv("FSAD_SWEEP_CONFIG", str(config))
        import io
        from contextlib import redirect_stderr, redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(out):
            code = main(["run", "--config", str(config), "--dagster-home", str(home)])
        assert code == 0, out.getvalue()
        yield home, work, config, out.getvalue()


def _defs(config):
    from pipelines.config import load_config
    from pipelines.definitions import build_definitions

    return build_definitions(load_config(config))


def test_fsad_run_materialises_every_asset_and_prints_where_things_are(sweep):
    import dagster as dg

    home, work, config, out = sweep
    report = work / "report" / "report.html"
    assert f"Report:      {report}" in out
    assert "dagster dev -w workspace.yaml" in out and "-h 127.0.0.1" in out and "fsad mlflow-ui" in out
    # the stage log stays one line per stage: MLflow's registry notices are not mixed into it
    for notice in ("registered model", "Created version", "Creating a new version"):
        assert notice.lower() not in out.lower(), out
    template = Path(__file__).parents[2] / "pipelines" / "templates" / "dagster.yaml"
    assert (home / "dagster.yaml").read_text() == template.read_text()
    assert (Path(__file__).parents[2] / "dagster_home" / "dagster.yaml").resolve() == template.resolve()
    instance = dg.DagsterInstance.get()
    defs = _defs(config)
    for asset in defs.assets:
        key = asset.key
        if asset.partitions_def is None:
            assert instance.get_latest_materialization_event(key) is not None, key
        else:
            expected = asset.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            assert set(instance.get_materialized_partitions(key)) == set(expected), key
    # Asset checks ran and passed: manifest validation, metric range, support/query disjointness, table.
    checks = [c for a in defs.assets for c in a.check_keys]
    checks += [c for chk in defs.asset_checks for c in chk.check_keys]
    assert len(checks) >= 2 + 2 * 3
    for check in checks:
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([check]).get(check)
        assert record is not None and record.status.value == "SUCCEEDED", check

    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    assert len(table) == N_EVAL
    assert set(table["method"]) == {"patchcore", "knn", "protonet-euclidean"}
    oc = table[table["protocol"] == "oneclass"]
    assert oc["image_auroc"].between(0, 1).all() and oc["pixel_auroc"].between(0, 1).all()
    sup = table[table["protocol"] == "supervised"]
    assert sup["balanced_accuracy"].between(0, 1).all()
    assert set(sup["label_mode"]) == {"binary", "multiclass"}
    summary = pd.read_parquet(work / "tables" / "benchmark_summary.parquet")
    assert (summary[summary["protocol"] == "oneclass"]["n_seeds"] == 2).all()
    # every column has a kind in fewshot_core/schema.py; only metrics and timings are averaged
    from fewshot_core import schema

    assert schema.undeclared(table.columns) == [] and "threshold" in table and "threshold_mean" not in summary
    meta = instance.get_latest_materialization_event(dg.AssetKey("benchmark_table")).asset_materialization.metadata
    assert {"headline: oneclass image AUROC (mean)", "headline: supervised balanced accuracy (mean)"} <= set(meta)
    text = report.read_text()
    assert "RQ1" in text and "RQ4" in text and text.count("data:image/png;base64,") >= 3
    for run_id in table["mlflow_run_id"]:
        assert run_id in text
    _check_decisions(table, text)


def _check_decisions(table: pd.DataFrame, text: str) -> None:
    """The table and report answer the deployer: errors at the threshold, recall per defect type, time per
    image end to end, the machine, and the champion the registry gets."""
    from fewshot_core.models.champion import pick_champions

    decided = table[(table["protocol"] == "oneclass") & (table["shots"] == 2)]
    assert decided["false_alarm_rate"].between(0, 1).all() and decided["miss_rate"].between(0, 1).all()
    types = [c for c in table.columns if c.startswith("recall_") and c not in ("recall_good", "recall_anomalous")]
    assert types and decided[types].notna().any().all()  # per defect type, at the threshold
    # backbone (the store's build rate) + scoring per image
    assert (table["ms_per_image"] > table["score_ms_per_image"]).all() and (table["embed_ms_per_image"] > 0).all()
    for field in ('<h2 id="deploy">Which model to deploy', "false-alarm rate", "miss rate",
                  "Recall per defect type", "time per image, end to end (ms)", "score_seconds is the time",
                  '<th class="l">machine</th>', "cores usable", '<th class="l">backbone embedding</th>'):
        assert field in text, field
    champ = pick_champions(table)["synth_fabric"]
    assert f"synth_fabric: {champ.method} ({BB}) with 2 good shots → fsad-synth_fabric@champion" in text
    assert "range over 2 seeds" in text and "95% interval" not in text


def test_full_data_model_is_registered_beside_the_champion(sweep):
    """The full-data detector per category is its own asset and MLflow run and the registered model's
    ``full-data`` version; the few-shot champion is another version of the same registered model."""
    from fewshot_core.tracking.runs import KIND_TAG, Tracker
    from fewshot_core.tracking.store import default_tracking_uri
    from pipelines.resources import ASSET_TAG

    home, _, _, _ = sweep
    tracker = Tracker(default_tracking_uri(home))
    full = tracker.client.get_model_version_by_alias("fsad-synth_fabric", "full-data")
    run = tracker.client.get_run(full.tags["fsad.mlflow_run_id"])
    assert run.data.tags[KIND_TAG] == "full-data" and run.data.tags[ASSET_TAG] == "full_data_model"
    assert run.data.params["method"] == "patchcore" and run.data.params["n_support"] == "6"
    assert run.data.params["threshold_rule"].startswith("holdout") and "image_auroc" in run.data.metrics
    champion = tracker.client.get_model_version_by_alias("fsad-synth_fabric", "champion")
    assert champion.version != full.version


def test_mlflow_holds_one_nested_run_per_evaluation_partition(sweep):
    from fewshot_core.tracking.runs import BATCH_TAG, CODE_VERSION_TAG, KIND_TAG, PARENT_RUN_TAG, Tracker
    from fewshot_core.tracking.store import default_tracking_uri
    from pipelines.resources import ASSET_TAG, PARTITION_TAG

    home, work, _, _ = sweep
    tracker = Tracker(default_tracking_uri(home))
    runs = tracker.evaluation_runs("tiny")
    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    assert {r.info.run_id for r in runs} == set(table["mlflow_run_id"])
    assert len(runs) == N_EVAL
    parents = {r.data.tags[PARENT_RUN_TAG] for r in runs}
    assert len(parents) == 2  # one per evaluation Dagster run (one-class group, supervised group)
    for parent in parents:
        p = tracker.client.get_run(parent)
        assert p.data.tags[KIND_TAG] == "dagster-run" and p.data.tags[BATCH_TAG]
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        assert r.info.status == "FINISHED"
        assert tags[BATCH_TAG] == tracker.client.get_run(tags[PARENT_RUN_TAG]).data.tags[
            BATCH_TAG]
        assert tags[ASSET_TAG].startswith("evaluation/")
        assert tags[PARTITION_TAG].startswith("synth_fabric|")
        assert tags[CODE_VERSION_TAG]
        for name in ("method", "backbone", "category", "shots", "k_good", "k_bad", "ratio", "seed", "feature_key"):
            assert name in params, name
        assert params["backbone"] == BB and params["category"] == "synth_fabric"
        artifacts = {a.path for a in tracker.client.list_artifacts(r.info.run_id, "plots")}
        if params["protocol"] == "oneclass":
            assert 0.0 <= metrics["image_auroc"] <= 1.0 and "pixel_auroc" in metrics and "aupro" in metrics
            assert {"plots/roc_curve.png", "plots/anomaly_maps.png"} <= artifacts
            # what the support decided (methods trained on images: none)
            assert params["align"] in ("aligned", "none") or params["align"].endswith(": not aligned")
        else:
            assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
            assert "plots/confusion_matrix.png" in artifacts
        # the fitted method is the run's MLflow Model; the category's manifest its dataset input
        assert r.outputs.model_outputs and tags["fsad.model_uri"].startswith("models:/")
        assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["synth_fabric"]
        # named by method, category and setting in the Models tab, and stored once: not again as plain files
        logged = tracker.client.get_logged_model(r.outputs.model_outputs[0].model_id)
        assert logged.name == f"{params['method_id']}-synth_fabric-{tags['fsad.setting']}"
        assert "model" not in {a.path for a in tracker.client.list_artifacts(r.info.run_id)}
        assert metrics["score_ms_per_image"] > 0
    row = table[(table["method"] == "patchcore") & (table["setting_key"] == "oc-k2-s1")].iloc[0]
    assert tracker.client.get_run(row["mlflow_run_id"]).data.metrics["image_auroc"] == pytest.approx(row["image_auroc"])
    assert row["model_uri"] == tracker.client.get_run(row["mlflow_run_id"]).data.tags["fsad.model_uri"]
    assert row["align"] == tracker.client.get_run(row["mlflow_run_id"]).data.params["align"]  # the table says it too
    # after the report: the best one-class method at 2 shots is the category's champion
    champion = tracker.client.get_model_version_by_alias("fsad-synth_fabric", "champion")
    assert champion.tags["fsad.shots"] == "2" and champion.tags["fsad.method"] in ("patchcore", "knn")


def test_second_materialisation_reuses_embeddings_and_makes_new_mlflow_runs(sweep):
    import dagster as dg

    from fewshot_core.tracking.runs import Tracker
    from fewshot_core.tracking.store import default_tracking_uri
    from pipelines.assets.evaluation import evaluation_key

    home, work, config, _ = sweep
    defs = _defs(config)
    instance = dg.DagsterInstance.get()
    parts = [p for p in (work / "features").iterdir() if (p / "meta.json").is_file()]
    assert len(parts) == 1
    stamps = {f: f.stat().st_mtime_ns for f in parts[0].iterdir()}

    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    emb = dg.AssetKey("embeddings")
    res = dg.materialize(assets, selection=[emb], resources=defs.resources, instance=instance,
                         partition_key=f"{BB}|synth_fabric")
    assert res.success
    meta = instance.get_latest_materialization_event(emb).asset_materialization.metadata
    assert meta["cache hit"].value is True and meta["store key"].value == parts[0].name
    assert {f: f.stat().st_mtime_ns for f in parts[0].iterdir()} == stamps  # nothing rewritten

    tracker = Tracker(default_tracking_uri(home))
    before = {r.info.run_id: r.data.metrics for r in tracker.evaluation_runs("tiny")}
    key = dg.AssetKey(evaluation_key(BB, _spec(config, "knn")).path)
    res = dg.materialize(assets, selection=[key], resources=defs.resources, instance=instance,
                         partition_key="synth_fabric|oc-k1-s0")
    assert res.success
    after = {r.info.run_id: r for r in tracker.evaluation_runs("tiny")}
    new = set(after) - set(before)
    assert len(new) == 1  # a new run, the old ones untouched
    assert all(after[rid].data.metrics == m for rid, m in before.items())
    new_run = after[new.pop()]
    assert new_run.data.tags["dagster.partition_key"] == "synth_fabric|oc-k1-s0"
    old = [rid for rid, r in after.items() if r.data.tags["dagster.partition_key"] == "synth_fabric|oc-k1-s0"
           and r.data.params["method_id"] == "knn" and rid != new_run.info.run_id]
    assert len(old) == 1
    assert after[old[0]].data.metrics["image_auroc"] == pytest.approx(new_run.data.metrics["image_auroc"])
    part = pd.read_parquet(work / "tables" / "evaluation" / BB / "knn" / "synth_fabric"
                           / "oc-k1-s0.parquet")
    assert part["mlflow_run_id"].tolist() == [new_run.info.run_id]


def _spec(config, method_id):
    from pipelines.config import load_config

    return next(m for m in load_config(config).method_specs() if m.id == method_id)


def test_sensor_requests_partitions_for_new_and_changed_images(sweep):
    import dagster as dg

    from fewshot_core.data.synth import generate
    from pipelines.partitions import CATEGORY

    _, work, config, _ = sweep
    defs = _defs(config)
    instance = dg.DagsterInstance.get()
    sensor = defs.get_sensor_def("new_images_sensor")
    first = sensor(dg.build_sensor_context(instance=instance))
    assert not first.run_requests and not first.dynamic_partitions_requests  # nothing new: baseline cursor
    root = work / "synthetic"
    generate(root, categories=2, seed=0, size=64, n_train=6, n_test_good=4, n_test_per_defect=2)
    second = sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert [list(r.partition_keys) for r in second.dynamic_partitions_requests] == [["synth_disk"]]
    assert [str(r.partition_key) for r in second.run_requests] == [f"{BB}|synth_disk"]
    instance.add_dynamic_partitions(CATEGORY.name, ["synth_disk"])
    extra = root / "synth_fabric" / "train" / "good" / "zz_new.png"
    shutil.copyfile(next((root / "synth_fabric" / "train" / "good").glob("*.png")), extra)
    third = sensor(dg.build_sensor_context(instance=instance, cursor=second.cursor))
    assert [str(r.partition_key) for r in third.run_requests] == [f"{BB}|synth_fabric"]
    assert not third.dynamic_partitions_requests
    extra.unlink()
    # A category folder that disappears is unregistered by the next data run (range runs would fail on it).
    shutil.rmtree(root / "synth_disk")
    everything = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)] + list(defs.asset_checks)
    assert dg.materialize(everything, selection=[dg.AssetKey("dataset")], resources=defs.resources,
                          instance=instance).success
    assert instance.get_dynamic_partitions(CATEGORY.name) == ["synth_fabric"]


def test_definitions_expose_schedule_sensor_jobs_and_partitions(sweep):
    _, _, config, _ = sweep
    defs = _defs(config)
    schedule = defs.get_schedule_def("nightly_sweep_schedule")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.job_name == "nightly_sweep"
    assert defs.resolve_job_def("embeddings_job") is not None
    emb = next(a for a in defs.assets if a.key.to_user_string() == "embeddings")
    assert [d.name for d in emb.partitions_def.partitions_defs] == ["backbone", "category"]
    ev = next(a for a in defs.assets if a.key.to_user_string().startswith("evaluation/"))
    dims = {d.name: d.partitions_def for d in ev.partitions_def.partitions_defs}
    assert set(dims) == {"category", "setting"}
    assert set(dims["setting"].get_partition_keys()) == {"oc-k1-s0", "oc-k1-s1", "oc-k2-s0", "oc-k2-s1"}


def test_setting_keys_round_trip_and_reject_garbage():
    from fewshot_core.settings import Setting

    for key in ("oc-k4-s0", "sup-g10b1-bin-s3", "sup-g5b5-multi-s0"):
        assert Setting.parse(key).key == key
    s = Setting.parse("sup-g10b1-bin-s3")
    assert (s.protocol, s.k_good, s.k_bad, s.label_mode, s.seed, s.name) == ("supervised", 10, 1, "binary", 3,
                                                                          "sup-g10b1-bin")
    with pytest.raises(FsadError, match="not a setting key"):
        Setting.parse("k4")


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "unknown key"),
    ("methods: [{method: nope}]\n", "unknown method"),
    ("oneclass: {shots: [0]}\n", "greater than or equal to 1"),
    ("data: [unclosed\n", "not valid YAML"),
])
def test_bad_sweep_config_names_the_file_and_the_fix(tmp_path, text, message):
    from pipelines.config import load_config

    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(FsadError, match=message) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and ";" in str(exc.value)


def test_fsad_run_reports_bad_config_without_traceback(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("bogus: 1\n")
    env = dict(os.environ)
    try:
        assert main(["run", "--config", str(path), "--dagster-home", str(tmp_path / "home")]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)
    err = capsys.readouterr().err
    assert err.startswith("fsad: error:") and "Traceback" not in err


def test_benchmark_check_fails_on_bad_rows():
    import dagster as dg

    from pipelines.checks import build_table_checks

    @dg.asset
    def benchmark_table():
        return None

    (check,) = build_table_checks(benchmark_table)
    good = pd.DataFrame({"method": ["knn", "knn"], "backbone": ["b", "b"], "category": ["c", "c"],
                         "setting_key": ["oc-k1-s0", "oc-k1-s1"], "mlflow_run_id": ["r1", "r2"],
                         "image_auroc": [0.9, 0.8], "fit_seconds": [12.0, 3.0]})
    assert check(good).passed
    bad = good.assign(image_auroc=[0.9, 1.2])
    assert not check(bad).passed
    dup = good.assign(setting_key=["oc-k1-s0", "oc-k1-s0"])
    assert not check(dup).passed


def test_io_managers_write_one_file_per_partition_and_read_back_what_exists(tmp_path):
    import dagster as dg
    import numpy as np

    from pipelines.io_managers import ArrayStoreIOManager, ParquetIOManager

    parts = dg.StaticPartitionsDefinition(["a", "b", "c"])

    @dg.asset(partitions_def=parts, io_manager_key="table_io", backfill_policy=dg.BackfillPolicy.single_run())
    def rows(context):
        return {k: pd.DataFrame({"k": [k], "v": [len(k)]}) for k in context.partition_keys}

    @dg.asset(io_manager_key="table_io")
    def table(rows):
        return rows.sort_values("k")

    @dg.asset(partitions_def=parts, io_manager_key="array_io")
    def arrays(context):
        return {"x": np.arange(3.0), "names": np.array(["p", "q"])}

    resources = {"table_io": ParquetIOManager(base_dir=str(tmp_path)),
                 "array_io": ArrayStoreIOManager(base_dir=str(tmp_path))}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([rows], resources=resources, instance=instance,
                          tags={"dagster/asset_partition_range_start": "a",
                                "dagster/asset_partition_range_end": "b"}).success
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["a.parquet", "b.parquet"]
    res = dg.materialize([rows, table], selection=[table.key], resources=resources, instance=instance)
    assert res.success and res.output_for_node("table")["k"].tolist() == ["a", "b"]  # c never materialised
    assert dg.materialize([arrays], partition_key="c", resources=resources, instance=instance).success
    back = ArrayStoreIOManager(base_dir=str(tmp_path))._read(tmp_path / "arrays" / "c.npz")
    assert back["x"].tolist() == [0.0, 1.0, 2.0] and back["names"].tolist() == ["p", "q"]


def test_fsad_run_reports_a_failed_step_in_one_line(sweep, capsys):
    """An impossible setting (more bad shots than images) fails its stage; the CLI names the cause and exits 2."""
    home, _, config, _ = sweep
    bad = config.parent / "bad.yaml"
    bad.write_text(config.read_text().replace("ratios: [[1, 1], [2, 1]]", "ratios: [[1, 5]]")
                   .replace("label_modes: [binary, multiclass]", "label_modes: [binary]")
                   .replace("  - {id: patchcore, method: patchcore}\n  - {id: knn, method: knn}\n", ""))
    env = dict(os.environ)
    try:
        assert main(["run", "--config", str(bad), "--dagster-home", str(home)]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsad: error: stage banks")  # its support cannot be drawn
    assert "k_bad=5" in err[0] and "Traceback" not in err[0]


def test_own_image_level_layout_runs_through_the_pipeline(tmp_path, monkeypatch):
    """Issue 8 in the pipeline: a layout YAML (no masks) is a category; image metrics only, no pixel columns."""
    from _builders import build_folder_layout

    dirs = build_folder_layout(tmp_path / "own", n_good=6, defects={"scratch": 2, "dent": 2}, test_good=2, size=48)
    layout = tmp_path / "housing.yaml"
    layout.write_text(textwrap.dedent(f"""\
        name: housing
        good_dir: {dirs['good_dir']}
        test_good_dir: {dirs['test_good_dir']}
        defect_dirs: [{', '.join(str(d) for d in dirs['defect_dirs'])}]
        """))
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: own
        data: {{source: layout, layouts: [{layout.name}]}}
        image_size: 64
        oneclass: {{shots: [2], seeds: [0]}}
        supervised: {{ratios: [], seeds: []}}
        methods:
          - {{id: patchcore, method: patchcore}}
        work_dir: {tmp_path / 'work'}
        """))
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--config", str(config), "--dagster-home", str(home)]) == 0
    tables = list((tmp_path / "work").rglob("*.parquet"))
    rows = pd.concat([pd.read_parquet(t) for t in tables if "image_auroc" in pd.read_parquet(t).columns])
    housing = rows[rows["category"] == "housing"]
    assert len(housing) >= 1 and housing["image_auroc"].between(0, 1).all()
    assert "aupro" not in housing.columns or housing["aupro"].isna().all()


def test_default_sweep_puts_few_shot_learning_and_patchcore_in_one_supervised_table(monkeypatch):
    """Thesis RQ1 (is few-shot learning fit for anomaly detection vs PatchCore?) needs both families on the
    same supervised binary episodes in the embedded default sweep."""
    from fewshot_core.settings import SUPERVISED
    from pipelines.config import load_config

    monkeypatch.delenv("FSAD_SWEEP_CONFIG", raising=False)
    specs = load_config(None).method_specs()
    supervised = {s.method for s in specs if s.protocol == SUPERVISED}
    assert {"protonet", "patchcore"} <= supervised


def test_each_evaluation_partition_carries_its_own_metrics_run_link_and_path(sweep):
    """Issue 14.2: after the single-run backfill of `fsad run`, a partition's materialisation holds its own
    row's metrics, MLflow run and parquet file, never the batch's."""
    import dagster as dg

    from pipelines.assets.evaluation import evaluation_key

    home, work, config, _ = sweep
    instance = dg.DagsterInstance.get()
    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    for method_id in ("patchcore", "protonet-euclidean"):
        key = evaluation_key(BB, _spec(config, method_id))
        rows = table[table["method"] == method_id]
        assert len(rows) == 4
        for _, row in rows.iterrows():
            pk = row["partition_key"]
            event = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[pk]), limit=1).records[0]
            meta = event.asset_materialization.metadata
            category, setting = pk.split("|")
            assert meta["mlflow_run_id"].value == row["mlflow_run_id"]
            # the run page in the UI's model-training view (its start page would open the GenAI one)
            assert meta["MLflow run"].value.endswith(f"/runs/{row['mlflow_run_id']}?workflowType=machine_learning")
            assert meta["path"].value.endswith(f"{category}/{setting}.parquet")
            assert meta["dagster/row_count"].value == 1
            headline = "image_auroc" if row["protocol"] == "oneclass" else "balanced_accuracy"
            assert meta[headline].value == pytest.approx(row[headline])
            assert "rows" not in meta and "MLflow runs" not in meta
    emb = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=1).records[0].asset_materialization
    assert emb.metadata["store key"].value and "partitions built" not in emb.metadata


def test_lineage_runs_from_the_gated_manifest_through_support_banks_to_evaluations(sweep):
    """Issue 14.10: the manifest gates the embeddings (blocking check), the evaluations consume the support
    banks, one bank per category x setting shared by the methods of that setting."""
    import dagster as dg

    from pipelines.assets.banks import bank_key

    _, work, config, _ = sweep
    defs = _defs(config)
    graph = defs.resolve_asset_graph()
    bank = bank_key(BB)
    assert graph.get(dg.AssetKey("embeddings")).parent_keys == {dg.AssetKey("image_manifest")}
    assert graph.get(bank).parent_keys == {dg.AssetKey("embeddings")}
    evals = [k for k in graph.get_all_asset_keys() if k.path[0] == "evaluation"]
    assert evals and all(bank in graph.get(k).parent_keys for k in evals)
    check = next(c for c in defs.asset_checks if "manifest_validates" in {k.name for k in c.check_keys})
    assert all(spec.blocking for spec in check.check_specs)
    banks = sorted((work / "arrays" / "memory_banks" / BB / "synth_fabric").glob("*.npz"))
    # one bank per setting some method runs: 2 shots x 2 seeds + 2 ratios x 2 label modes x 1 seed
    assert [b.stem for b in banks] == sorted(["oc-k1-s0", "oc-k1-s1", "oc-k2-s0", "oc-k2-s1", "sup-g1b1-bin-s0",
                                              "sup-g1b1-multi-s0", "sup-g2b1-bin-s0", "sup-g2b1-multi-s0"])
    with np.load(banks[0]) as arrays:
        assert {"support_ids", "support_patches", "support_embeddings"} <= set(arrays.files)


def test_gallery_strips_live_in_mlflow_not_in_hand_written_files(sweep):
    home, work, _, _ = sweep
    assert not (work / "gallery").exists()
    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    oc = table[table["protocol"] == "oneclass"]
    assert (oc["gallery_artifact"] == "plots/anomaly_maps.png").all() and "gallery_png" not in table


def _requested(result) -> set[str]:
    return {r.key.to_user_string() for r in result.results if r.true_subset.size}


def test_updated_embeddings_carry_on_to_an_updated_report(sweep):
    """Issue 14.11: declarative automation takes what the new-images sensor (or a UI run) materialises on
    through the banks and evaluations to the report; an instance that `fsad run` filled launches nothing."""
    import dagster as dg

    from pipelines.assets.evaluation import evaluation_key
    from pipelines.automation import SWEEP_TAG
    from pipelines.runner import RANGE_END, RANGE_START, stages

    _, _, config, _ = sweep
    defs = _defs(config)
    instance = dg.DagsterInstance.get()
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert first.total_requested == 0
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    # a sweep's own run updating the embeddings launches nothing: the sweep runs its next stages itself
    assert dg.materialize(assets, selection=[dg.AssetKey("embeddings")], resources=defs.resources,
                          instance=instance, partition_key=f"{BB}|synth_fabric",
                          tags={SWEEP_TAG: "features"}).success
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert first.total_requested == 0, _requested(first)
    for _name, group in stages(defs)[2:-1]:  # banks, models, evaluations as the sweep runs them: range runs
        keys = group[0].partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        assert dg.materialize(assets, selection=[a.key for a in group], resources=defs.resources,
                              instance=instance, tags={SWEEP_TAG: _name, RANGE_START: keys[0],
                                                       RANGE_END: keys[-1]}).success
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert first.total_requested == 0, (_name, _requested(first))
    assert dg.materialize(assets, selection=[dg.AssetKey("embeddings")], resources=defs.resources,
                          instance=instance, partition_key=f"{BB}|synth_fabric").success
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    requested = _requested(second)
    assert f"memory_banks/{BB}" in requested and any(k.startswith("evaluation/") for k in requested)
    assert "full_data_model" in requested  # the production candidate follows new images too
    assert not {"dataset", "image_manifest", "embeddings"} & requested
    # the automation sensor launches those; once an evaluation is updated, the tables and the report follow
    knn = evaluation_key(BB, _spec(config, "knn"))
    assert dg.materialize(assets, selection=[knn], resources=defs.resources, instance=instance,
                          partition_key="synth_fabric|oc-k1-s0").success
    third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    assert {"benchmark_table", "benchmark_summary", "html_report"} <= _requested(third)  # one tick, in order
    assert stages(defs)[-1][0] == "reports"  # the nightly schedule runs every stage: it ends with the report
    sensor = defs.get_sensor_def("downstream_of_new_images")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_a_mask_of_the_wrong_size_stops_the_chain_with_the_validators_line(tmp_path, capsys):
    """Issue 17.2: the data stage stops `fsad run` with the validator's line before any features are computed
    (the dataset loader refuses the mask already; the blocking manifest check guards what loads)."""
    from PIL import Image

    from fewshot_core.data.synth import generate

    data = tmp_path / "data"
    generate(data, categories=1, seed=0, size=48, n_train=4, n_test_good=2, n_test_per_defect=1)
    mask = next((data / "synth_fabric" / "ground_truth").rglob("*.png"))
    Image.open(mask).resize((40, 40)).save(mask)
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(work=tmp_path / "work").replace(
        "data: {source: synthetic, synth: {categories: 1, size: 64, n_train: 6, n_test_good: 4, n_test_per_defect: 2}}",
        f"data: {{source: mvtec, root: {data}}}"))
    env = dict(os.environ)
    try:
        assert main(["run", "--config", str(config), "--dagster-home", str(tmp_path / "home")]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsad: error: stage data")
    assert mask.name in err[0] and "mask is 40x40" in err[0] and "fsad data validate" in err[0]
    assert not (tmp_path / "work" / "features").exists()


def test_backfill_policy_promises_what_it_launches_and_seeds_of_a_setting_are_one_range(tmp_path):
    """Issue 14.12: a run covers one contiguous key range, so the policy says 'at most one category's
    settings per run' (not 'a single run'); one setting's seeds are neighbours, so one drag selects them."""
    import dagster as dg

    from fewshot_core.settings import Setting
    from pipelines.config import load_config
    from pipelines.definitions import build_definitions

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.format(work=tmp_path / "work"))
    defs = build_definitions(load_config(config))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("category", ["a_cat", "b_cat"])
    for asset in defs.assets:
        if asset.key.path[0] not in ("evaluation", "memory_banks"):
            continue
        settings = asset.partitions_def.get_partitions_def_for_dimension("setting").get_partition_keys()
        policy = asset.backfill_policy
        assert policy.policy_type.name == "MULTI_RUN"
        assert policy.max_partitions_per_run == len(settings)
        keys = [str(k) for k in asset.partitions_def.get_partition_keys(dynamic_partitions_store=instance)]
        assert keys[:len(settings)] == [f"a_cat|{s}" for s in settings]  # one category's grid = one run
        names = [Setting.parse(s).name for s in settings]
        for name in set(names):  # the seeds of a setting sit next to each other
            at = [i for i, n in enumerate(names) if n == name]
            assert at == list(range(at[0], at[-1] + 1)), (asset.key, name)
