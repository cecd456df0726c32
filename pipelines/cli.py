"""``fsad run`` and ``fsad mlflow-ui``: the sub-commands that need Dagster, registered from here through
the ``fsad.commands`` entry-point group (``pyproject.toml``), so ``fewshot_core`` never imports Dagster.

``fsad run`` materialises the whole sweep in-process, then prints where the report is and how to open the
Dagster and MLflow UIs; ``fsad mlflow-ui`` starts the MLflow UI on the tracking store the pipeline writes to.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from fewshot_core.cli.args import folder
from fewshot_core.data.mvtec import split_class_warnings
from fewshot_core.errors import FsadError
from fewshot_core.outputs import require_writable
from fewshot_core.tracking.store import SERVER_ENV, default_artifact_root, default_tracking_uri, sqlite_path
from fewshot_core.tracking.ui import MLFLOW_UI_ENV, experiment_url, mlflow_ui_host_port
from pipelines.home import instance_template, prepare_home, resolve_home  # noqa: F401 (instance_template: API)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run the whole benchmark sweep (data, features, every method, report) in-process",
        description="Materialise the default Dagster sweep in-process: synthetic data (or MVTEC_ROOT / --root), "
                    "the offline EfficientNet-Lite2 backbone, the fast methods, a small shots grid; results go "
                    "to MLflow and an HTML report.")
    p.add_argument("--config", help="sweep YAML (see pipelines/config.py); default: the embedded demo sweep")
    p.add_argument("--root", help="MVTec-layout data root to use instead of the configured data")
    p.add_argument("--dagster-home", type=folder, help="Dagster instance folder (default: $DAGSTER_HOME, else ./dagster_home)")
    p.add_argument("--verbose", action="store_true", help="show Dagster's step-level debug log")
    p.set_defaults(func=run_command, write_fix="pass --dagster-home DIR and set work_dir in the sweep YAML "
                                               "to writable folders")

    m = subparsers.add_parser("mlflow-ui", help="start the MLflow UI on the pipeline's tracking store",
                              description="Start `mlflow ui` on the SQLite store in the Dagster home (or "
                                          "MLFLOW_TRACKING_URI), bound to 127.0.0.1.")
    m.add_argument("--host", help="default: the host of FSAD_MLFLOW_UI (127.0.0.1), where report links point")
    m.add_argument("--port", type=int, help="default: the port of FSAD_MLFLOW_UI (5000), where report links point")
    m.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: small machines)")
    m.add_argument("--dagster-home", type=folder, help="Dagster instance folder holding mlflow.db (default as for `fsad run`)")
    m.set_defaults(func=mlflow_ui_command, write_fix="pass --dagster-home DIR (or set DAGSTER_HOME) to a writable folder")


def dagster_ui_command(home: Path, cfg, data_root: str | None = None) -> str:
    """How to open this sweep in the Dagster UI (the checkout's workspace file when run from one), with the
    settings that chose its data, so the UI loads this sweep and not the synthetic default: the sweep file,
    and ``MVTEC_ROOT`` when the real data came from the environment or ``--root`` rather than that file."""
    target = "-w workspace.yaml" if (Path.cwd() / "workspace.yaml").is_file() else "-m pipelines.definitions"
    env = f"DAGSTER_HOME={shlex.quote(str(home))}"
    if cfg.source_file:
        env += f" FSAD_SWEEP_CONFIG={shlex.quote(str(cfg.source_file))}"
    if data_root is not None:
        env += f" MVTEC_ROOT={shlex.quote(str(data_root))}"
    return f"{env} {shlex.quote(str(Path(sys.executable).parent / 'dagster'))} dev {target} -h 127.0.0.1"


def run_command(args) -> int:
    home = prepare_home(args.dagster_home)  # under a lock: concurrent runs on a fresh home are safe
    os.environ["DAGSTER_HOME"] = str(home)  # before Dagster is imported: never a temporary instance
    if args.config:
        os.environ["FSAD_SWEEP_CONFIG"] = str(Path(args.config).resolve())
    start = time.perf_counter()
    # Dagster, the code location and the MLflow tracker load here: after DAGSTER_HOME is set, never for --help
    import dagster as dg

    from fewshot_core.tracking.runs import Tracker
    from pipelines.assets.data import resolve_data
    from pipelines.assets.reports import report_path
    from pipelines.config import load_config
    from pipelines.definitions import build_definitions
    from pipelines.runner import run_sweep
    from pipelines.sweep_claim import check_experiment, check_home, identity

    cfg = load_config(args.config)
    if args.root:
        root = Path(args.root).expanduser().resolve()
        if not root.exists():
            raise FsadError(f"{root}: --root does not exist; pass an MVTec-layout folder (<category>/train/good)")
        cfg.data_source, cfg.data_root = "mvtec", str(root)
    data_root, source = resolve_data(cfg)
    ident = identity(cfg, data_root, source)
    check_home(home, ident)  # before anything is written: one sweep per home and per experiment
    check_experiment(Tracker(default_tracking_uri(home)), ident)
    check_home(home, ident, write=True)

    # before any stage: fail now, not halfway (features, tables and the report need some room)
    require_writable(cfg.resolved_work_dir(), f"free space or set work_dir in {cfg.source_file or 'the sweep YAML'} "
                     "to a writable folder", min_free_mb=50)
    methods = [m.id for m in cfg.method_specs()]
    print(f"fsad run: sweep {cfg.name!r} on {source} data at {data_root}, images at {cfg.image_size_note()}")
    print(f"  backbones {', '.join(cfg.backbones)}; methods {', '.join(methods)}; shots {cfg.shots}; "
          f"ratios {cfg.ratios}; seeds {sorted(set(cfg.oneclass_seeds) | set(cfg.supervised_seeds))}")
    for warning in data_warnings(cfg):
        print(f"  warning: {warning}", flush=True)
    defs = build_definitions(cfg)
    instance = dg.DagsterInstance.get()
    summaries = run_sweep(defs, instance, log=lambda msg: print("  " + msg, flush=True), quiet=not args.verbose)
    report = report_path(cfg)
    print(f"\nDone in {time.perf_counter() - start:.0f}s ({len(summaries)} Dagster runs).")
    print(f"  Report:      {report}")
    print(f"  Tables:      {cfg.resolved_work_dir() / 'tables'}")
    print(f"  MLflow:      {default_tracking_uri(home)} (experiment {cfg.name!r}); open it with `fsad mlflow-ui`")
    from_file = cfg.source_file and cfg.data_root and not args.root
    env_root = data_root if source == "mvtec" and not from_file else None
    print(f"  Dagster UI:  {dagster_ui_command(home, cfg, env_root)}")
    return 0


def data_warnings(cfg) -> list[str]:
    """What ``fsad data validate`` warns about a category's test split (no good, or no defect images: the
    image metrics are then absent from every row), for the data already on disk (synthetic data the sweep
    generates itself has both)."""
    from pipelines.assets.data import categories, load_category, resolve_data  # Dagster: not for --help

    root, source = resolve_data(cfg)
    if source in ("synthetic", "download") and not root.is_dir():
        return []
    try:
        names = categories(cfg, root)
    except FsadError:
        return []  # the data stage reports it
    found = []
    for category in names:
        try:
            dataset = load_category(cfg, category)
        except FsadError:
            continue  # the data stage's blocking check stops the sweep with this problem
        found += split_class_warnings(dataset.records, category)
    return found


def mlflow_ui_command(args) -> int:
    home = resolve_home(args.dagster_home)
    host, port = mlflow_ui_host_port()
    if (args.host or host, args.port or port) != (host, port):
        print(f"note: reports link to {host}:{port}; set {MLFLOW_UI_ENV}=http://{args.host or host}:"
              f"{args.port or port} before `fsad run` so their links open this server", flush=True)
    args.host, args.port = args.host or host, args.port or port
    uri = default_tracking_uri(home)
    db = sqlite_path(uri)
    if db is None or not db.is_file():  # an existing store is only read: a read-only home is fine then
        prepare_home(home, instance=False, tracking_uri=uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    if (artifacts := default_artifact_root(uri)) is not None:
        cmd += ["--default-artifact-root", artifacts]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it", flush=True)
    if db is not None and db.is_file():  # direct links: the UI's start page would open its GenAI view
        from fewshot_core.tracking.runs import Tracker  # mlflow's client: not for --help

        for exp in Tracker(uri).client.search_experiments():
            if exp.name != "Default":
                print(f"  experiment {exp.name!r}: {experiment_url(exp.experiment_id, base)}", flush=True)
    return serve(cmd, env={**os.environ, **SERVER_ENV})


def serve(cmd: list[str], grace_s: float = 10.0, env: dict | None = None) -> int:
    """Run the server ``cmd`` in a process group of its own until it exits; SIGTERM, SIGINT and SIGHUP to
    this process are passed on to the whole group (the server and its workers), so ``kill`` of the
    command stops the server instead of leaving it serving the port. A group still running ``grace_s``
    after the signal is killed. Returns the server's exit status, or 128 + the signal received."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    received: list[tuple[int, float]] = []

    def forward(signum, _frame):
        received.append((signum, time.monotonic()))
        _signal_group(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > grace_s:
                    _signal_group(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_group(proc, grace_s)  # workers left behind, or the server itself when this process fails
    return 128 + received[0][0] if received else code


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when it has no process left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to what is left of ``proc``'s group, SIGKILL after ``grace_s``; ``proc`` is reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _gone_after(proc, sig, grace_s):
            break
    if proc.poll() is None:
        proc.wait()


def _gone_after(proc: subprocess.Popen, sig: int, grace_s: float) -> bool:
    """Send ``sig`` to ``proc``'s group; True once no process of it is left, within ``grace_s``."""
    deadline = time.monotonic() + grace_s
    if not _signal_group(proc.pid, sig):
        return True
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie still counts as a member of its group
        if not _signal_group(proc.pid, 0):
            return True
        time.sleep(0.1)
    return False
