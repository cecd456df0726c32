"""Faults a careless or unlucky user meets, end to end: kill -9 at several points of `fsad run`, two runs at
once on a fresh home, read-only and full disks, and a data problem that must stop the chain.

Every case failed before its fix: a half-migrated `mlflow.db` broke every later run, concurrent first
runs died with `IntegrityError`, unwritable folders ended in `OSError` tracebacks, and a mask of the
wrong size went into the pixel metrics. The `fsad run` cases use a one-category, 64 px, one-method
sweep and run `python -m fewshot_core` from this checkout in a subprocess of its own, so that it can be
killed like a real one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from _builders import build_mvtec_category, write_mask
from fewshot_core.cli import main

pytestmark = pytest.mark.timeout(1200)

PROJECT = Path(__file__).resolve().parents[2]
SWEEP = """\
name: faults
data: {{source: synthetic, synth: {{categories: 1, size: 64, n_train: 4, n_test_good: 2, n_test_per_defect: 2}}}}
image_size: 64
oneclass: {{shots: [1], seeds: [0, 1]}}
methods:
  - {{id: knn, method: knn}}
work_dir: {work}
"""
METRICS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"]


def _sweep(base: Path, name: str = "sweep") -> tuple[Path, Path]:
    work = base / f"{name}-work"
    config = base / f"{name}.yaml"
    config.write_text(SWEEP.format(work=work))
    return config, work


def _setenv(monkeypatch, base: Path, home: Path) -> None:
    """The same environment in-process; every change is undone after the test (``fsad run`` sets some)."""
    for key, value in _env(base, home).items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_TRACKING_URI", "MVTEC_ROOT", "FSAD_SWEEP_CONFIG"):
        monkeypatch.setenv(key, "")  # recorded, so that the undo removes what the run sets
        monkeypatch.delenv(key)


def _env(base: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MVTEC_ROOT", "FSAD_SWEEP_CONFIG", "PYTHONPATH")}
    env.update(DAGSTER_HOME=str(home), FSAD_HOME=str(base / "fsad_home"), HF_HUB_OFFLINE="1")
    return env


class Run:
    """`fsad run` in its own process group, output in files (readable while it runs)."""

    def __init__(self, config: Path, home: Path, base: Path, tag: str):
        self.out, self.err = base / f"{tag}.out", base / f"{tag}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fewshot_core", "run", "--config", str(config), "--dagster-home", str(home)],
                cwd=PROJECT, env=_env(base, home), stdout=out, stderr=err, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def kill_when(self, reached, what: str, timeout: float = 600) -> None:
        """SIGKILL the whole process group as soon as ``reached()``; fail if the run ends first."""
        deadline = time.monotonic() + timeout
        while not reached():
            if self.proc.poll() is not None:
                pytest.fail(f"fsad run ended (rc {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"fsad run never reached {what}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 900) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"fsad run did not finish in {timeout}s:\n{self.text()[-3000:]}")
        assert self.proc.returncode == 0, self.text()[-4000:]
        return self.text()


def _mlflow_runs(home: Path) -> dict[str, tuple[str, dict]]:
    """run id -> (status, {metric: value}) of the evaluation runs, read straight from the SQLite file."""
    db = home / "mlflow.db"
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute("SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = 'fsad.kind' AND t.value = 'evaluation'").fetchall()
            metrics = con.execute("SELECT run_uuid, key, value FROM latest_metrics").fetchall()
        finally:
            con.close()
    except sqlite3.Error:  # being written: the caller polls again
        return {}
    out = {run: (status, {}) for run, status in rows}
    for run, key, value in metrics:
        if run in out:
            out[run][1][key] = value
    return out


def _table(work: Path) -> pd.DataFrame:
    table = pd.read_parquet(work / "tables" / "benchmark_table.parquet")
    return table.sort_values(["method", "setting_key"]).reset_index(drop=True)


def _numbers(table: pd.DataFrame) -> pd.DataFrame:
    cols = ["method", "setting_key"] + [c for c in METRICS if c in table.columns]
    return table[cols]


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    """Two `fsad run` started at once on one fresh home (own work dirs: the feature store's own
    concurrency is tested in tests/integration/test_store_faults.py); yields (home, [(run, work), ...])."""
    base = tmp_path_factory.mktemp("concurrent")
    home = base / "home"
    runs = []
    for tag in ("first", "second"):
        config, work = _sweep(base, tag)
        runs.append((Run(config, home, base, tag), work))
    for run, _ in runs:
        run.finish()
    return home, runs


@pytest.fixture(scope="module")
def reference(concurrent):
    """Numbers of a clean run: every fault below must end with exactly these."""
    return _numbers(_table(concurrent[1][0][1]))


def test_two_runs_at_once_on_a_fresh_home_both_succeed(concurrent, reference):
    """Before: one of them died with sqlite3.IntegrityError (Dagster's and MLflow's first-use table creation
    raced). Now the second waits for the first's initialisation of the home and reuses it."""
    home, runs = concurrent
    for _, work in runs:
        pd.testing.assert_frame_equal(_numbers(_table(work)), reference)
    assert len(_mlflow_runs(home)) == 2 * len(reference)


def test_kill_9_at_any_point_of_fsad_run_then_a_rerun_gives_the_same_numbers(tmp_path, reference):
    """Kill during embedding, during MLflow's first table creation, and during evaluation (after an
    earlier complete run): each rerun succeeds, the numbers are bit-identical to a clean run, and the
    complete run's results (table, MLflow runs) are never lost."""
    config, work = _sweep(tmp_path)
    home = tmp_path / "home"

    # mid-migration: the database file (in place before the fix, built aside now) is a fifth grown
    def migrating() -> bool:
        files = [home / "mlflow.db", *home.glob(".mlflow.db.*.building")]
        return any(f.is_file() and f.stat().st_size > 200_000 for f in files)

    run = Run(config, home, tmp_path, "kill-mlflow")
    run.kill_when(migrating, "MLflow's first table creation")
    assert not (home / "mlflow.db").exists(), "built aside: never a half-made mlflow.db in place"

    run = Run(config, home, tmp_path, "kill-embed")
    run.kill_when(lambda: any(work.glob("features/.*")), "embedding (a feature-store partition being written)")

    first = Run(config, home, tmp_path, "complete").finish()  # before the fix: "table ... already exists"
    assert "Done in" in first
    table = _table(work)
    pd.testing.assert_frame_equal(_numbers(table), reference)
    earlier = _mlflow_runs(home)
    assert set(earlier) == set(table["mlflow_run_id"]) and all(s == "FINISHED" for s, _ in earlier.values())

    run = Run(config, home, tmp_path, "kill-eval")
    run.kill_when(lambda: len(_mlflow_runs(home)) > len(earlier), "evaluation (a new MLflow child run)")
    pd.testing.assert_frame_equal(_table(work), table)  # the earlier table is still whole

    Run(config, home, tmp_path, "rerun").finish()
    again = _table(work)
    pd.testing.assert_frame_equal(_numbers(again), reference)
    after = _mlflow_runs(home)
    for run_id, (status, metrics) in earlier.items():  # no earlier result lost or changed
        assert after[run_id] == (status, metrics)
    assert (work / "report" / "report.html").is_file()
    assert not list(home.glob(".mlflow.db.*")), "leftovers of the killed builds were cleaned"


_INIT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    home, gate = sys.argv[1], Path(sys.argv[2])
    import dagster as dg
    from fewshot_core.tracking.runs import Tracker
    from fewshot_core.tracking.store import default_tracking_uri
    from pipelines.home import prepare_home
    (gate / f"ready-{os.getpid()}").touch()  # imported: the test releases all three together
    while not (gate / "start").exists():
        time.sleep(0.005)
    start = float((gate / "start").read_text())
    time.sleep(max(0.0, start - time.time()))  # every process reaches the fresh home at the same moment
    prepare_home(home)
    with dg.DagsterInstance.from_config(home) as instance:
        instance.get_runs(limit=1)
    Tracker(default_tracking_uri(home)).experiment_id("faults")
    print("ok")
""")


def test_simultaneous_initialisation_of_a_fresh_home_is_serialised(tmp_path):
    """Three processes released at the same instant on one fresh home (before: 2 of 3 failed with
    IntegrityError / 'table ... already exists' / 'duplicate column')."""
    home = tmp_path / "home"
    env = _env(tmp_path, home)
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _INIT, str(home), str(gate)], cwd=PROJECT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    deadline = time.monotonic() + 300
    while len(list(gate.glob("ready-*"))) < 3:  # every interpreter has imported Dagster and MLflow
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    # one start instant for all three, a moment ahead so that each has seen it before it comes
    (gate / "start.tmp").write_text(repr(time.time() + 1.0))
    os.replace(gate / "start.tmp", gate / "start")
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert (home / "dagster.yaml").read_text() == (PROJECT / "dagster_home" / "dagster.yaml").read_text()


# --- a failed data check stops the chain ------------------------------------------------------------


def test_fsad_run_stops_on_a_mask_of_the_wrong_size(tmp_path, monkeypatch, capsys):
    """Before: the manifest check failed silently in Dagster and the run reported pixel metrics."""
    root = tmp_path / "data"
    build_mvtec_category(root, "widget", defects={"scratch": 2}, size=64)
    write_mask(root / "widget" / "ground_truth" / "scratch" / "000_mask.png", (64, 48))
    config, work = _sweep(tmp_path)
    _setenv(monkeypatch, tmp_path, tmp_path / "home")
    code = main(["run", "--config", str(config), "--root", str(root), "--dagster-home", str(tmp_path / "home")])
    err = capsys.readouterr().err
    assert code == 2
    assert "000_mask.png: mask is 64x48 but its image 000.png is 64x64; resize the mask to the image" in err
    assert not (work / "tables").exists()


# --- read-only and full disks ------------------------------------------------------------------------


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def _mounted(target: Path, options: str):
    if not _mount_tmpfs(target, options):
        pytest.skip(f"cannot mount a tmpfs ({options}) here: needs root with mount rights")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


@pytest.fixture
def readonly(tmp_path):
    """A read-only folder: a read-only tmpfs as root (EROFS), a folder without write permission otherwise."""
    target = tmp_path / "ro"
    if os.geteuid() == 0:
        with _mounted(target, "ro,size=1m") as ro:
            yield ro, "read-only file system"
        return
    target.mkdir()
    target.chmod(0o555)
    try:
        yield target, "permission denied"
    finally:
        target.chmod(0o755)


@pytest.fixture
def full(tmp_path):
    """A folder on a tmpfs with (almost) no space left; root only."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a small tmpfs, which needs root")
    with _mounted(tmp_path / "full", "size=64k") as target:
        with contextlib.suppress(OSError), open(target / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield target, "no space left on the device"


def _one_line_error(argv, capsys, where: Path, reason: str | None, fix: str | None, monkeypatch, tmp_path) -> str:
    """Run ``fsad argv`` in-process: exit 2 and exactly one line on stderr, naming ``where``."""
    _setenv(monkeypatch, tmp_path, tmp_path / "home")
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith("fsad: error: ") and str(where) in lines[0], out.err
    if reason is not None:
        assert lines[0].startswith(f"fsad: error: {where}") and f": cannot write there ({reason}" in lines[0], out.err
    if fix is not None:
        assert fix in lines[0], out.err
    return lines[0]


def _small_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    build_mvtec_category(root, "widget", defects={"scratch": 2}, size=32)
    return root


def _commands(tmp_path: Path, target: Path) -> dict[str, tuple[list, Path, str]]:
    """command -> (argv, the folder the error must name, the fix it must give) writing into ``target``."""
    data = _small_dataset(tmp_path)
    config, _ = _sweep(tmp_path)
    ro_config = tmp_path / "ro-work.yaml"
    ro_config.write_text(SWEEP.format(work=target / "work"))
    model = ["--image-size", "32", "--weights", "random", "--num-workers", "0"]
    return {
        "data synth": (["data", "synth", target / "synth", "--categories", "1", "--size", "32"], target,
                       "pass a writable ROOT"),
        "data download": (["data", "download", target / "mvtec", "--category", "bottle"], target,
                          "pass a writable ROOT"),
        "data manifest": (["data", "manifest", data, target / "m.parquet"], target, "choose OUT.parquet"),
        "embed": (["embed", data, "--category", "widget", "--store", target / "store", "--no-progress"] + model,
                  target, "pass --store DIR"),
        "evaluate": (["evaluate", data, "--category", "widget", "--method", "knn", "--shots", "1", "--seeds", "0",
                      "--store", target / "store"] + model, target, "pass --store DIR"),
        "run (home)": (["run", "--config", config, "--dagster-home", target / "home"], target,
                       "pass --dagster-home DIR"),
        "run (work dir)": (["run", "--config", ro_config, "--dagster-home", tmp_path / "home"], target,
                           "set work_dir in"),
        "mlflow-ui": (["mlflow-ui", "--dagster-home", target / "home", "--port", "9"], target,
                      "pass --dagster-home DIR"),
    }


@pytest.mark.parametrize("command", ["data synth", "data download", "data manifest", "embed", "evaluate",
                                     "run (home)", "run (work dir)", "mlflow-ui"])
def test_read_only_output_folder_is_a_one_line_error(command, readonly, tmp_path, capsys, monkeypatch):
    target, reason = readonly
    argv, where, fix = _commands(tmp_path, target)[command]
    monkeypatch.setenv("FSAD_MVTEC_BASE_URL", "http://127.0.0.1:9")  # never the internet
    if command in ("embed", "evaluate"):  # the store words its own errors; one line naming the folder it is
        reason = fix = None
    _one_line_error(argv, capsys, where, reason, fix, monkeypatch, tmp_path)


# A full disk while embedding is the feature store's case (tests/integration/test_store_faults.py).
@pytest.mark.parametrize("command", ["data synth", "data manifest", "run (work dir)"])
def test_full_disk_is_a_one_line_error(command, full, tmp_path, capsys, monkeypatch):
    target, reason = full
    argv, where, fix = _commands(tmp_path, target)[command]
    _one_line_error(argv, capsys, where, reason, fix, monkeypatch, tmp_path)
