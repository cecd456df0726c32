"""Trained detectors on real MVTec AD bottle (issue 6): EfficientAD-S, GLASS and REB next to PatchCore.

Prints image AUROC, pixel AUROC and AUPRO (mean ± std over seeds) with the training and scoring
time for each method at 1, 4 and full shots; PatchCore runs on the feature store's cached features
for the very same episodes (``sample_oneclass(dataset, shots, seed)``).

    python benchmarks/trained_bottle.py                         # 1/4/full shots x 3 seeds
    python benchmarks/trained_bottle.py --quick                 # 1 seed, shots 1 and 4, tiny budgets
    python benchmarks/trained_bottle.py --steps 100 --methods glass reb --shots 4

Budgets: ``--preset cpu`` is each method's CPU default (one bottle fit within ~10 min on a laptop
CPU); ``--preset gpu`` (the default when CUDA is present) trains longer and at 256 px. ``--steps``
overrides every method's step count; ``--param METHOD.KEY=JSON`` sets any parameter. Trained
weights go to ``--artifacts`` (default $FSAD_HOME/artifacts), so a rerun reloads them; pass
``--fresh`` to train into a temporary folder instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fewshot_core.data import load_dataset  # noqa: E402
from fewshot_core.evaluation.oneclass import evaluate_oneclass, parse_shots  # noqa: E402
from fewshot_core.methods import registry  # noqa: E402
from fewshot_core.paths import default_work_dir, shared_mvtec_root  # noqa: E402
from fewshot_core.runtime import Runtime  # noqa: E402
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext  # noqa: E402
from fewshot_core.features.store import EmbedCompute, FeatureSpec  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")

# Per-method budgets. "cpu" = the class defaults (CPU-sized); "gpu" = longer runs at 256 px, each fit
# capped in time so the table (27 fits, run as parallel processes per method and shot count) fits in
# minutes on one modern GPU; "quick" = a smoke run.
PRESETS = {
    "cpu": {"efficientad": {}, "glass": {}, "reb": {}},
    "gpu": {
        "efficientad": {"image_size": 256, "steps": 12000, "batch_size": 4, "lr": 2e-4, "time_budget_s": 90,
                        "teacher_steps": 10000, "teacher_batch": 16, "teacher_time_budget_s": 120},
        "glass": {"image_size": 256, "steps": 3000, "batch_size": 8, "time_budget_s": 100},
        "reb": {"image_size": 256, "steps": 300, "batch_size": 32, "lr": 0.01, "time_budget_s": 60},
    },
    # EfficientAD at the paper's schedule (70k steps, batch 1, lr 1e-4), capped so that the generic
    # teacher and one fit end within a 10-minute GPU call; run it alone on the GPU
    "paper": {
        "efficientad": {"image_size": 256, "steps": 70000, "batch_size": 1, "lr": 1e-4, "time_budget_s": 420,
                        "teacher_steps": 10000, "teacher_batch": 16, "teacher_time_budget_s": 150},
    },
    "quick": {
        "efficientad": {"image_size": 128, "steps": 30, "teacher_steps": 20},
        "glass": {"image_size": 128, "steps": 30, "batch_size": 2},
        "reb": {"image_size": 128, "steps": 5, "batch_size": 8},
    },
}


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.4f}±{v.std(ddof=1) if v.size > 1 else 0.0:.4f}"


def _line(method, shots, rows, train_key) -> str:
    train = np.mean([r[train_key] for r in rows])
    score = np.mean([r["score_s"] for r in rows])
    extra = ""
    if "train_steps" in rows[0]:
        extra = f" {int(np.mean([r['train_steps'] for r in rows])):>6} {rows[0]['stopped_by']:>6} {rows[0]['device']}"
    return (f"{method:<20} {str(shots):>5} " + " ".join(f"{_ms([r.get(m) for r in rows]):>15}" for m in METRICS)
            + f" {train:>9.1f} {score:>8.2f}" + extra)


def _head() -> str:
    head = (f"{'method':<20} {'shots':>5} " + " ".join(f"{m:>15}" for m in METRICS) + f" {'train_s':>9} {'score_s':>8}"
            + f" {'steps':>6} {'stop':>6} device")
    return head + "\n" + "-" * len(head)


def print_table(paths) -> int:
    """One table from the row files of several runs (e.g. one per method and shot count on one GPU)."""
    rows, devices = [], set()
    for path in paths:
        if not Path(path).exists():
            print(f"(missing: {path})")
            continue
        data = json.loads(Path(path).read_text())
        rows += data["rows"]
        devices.add(data["device"])
    order = {"patchcore": 0, "efficientad": 1, "glass": 2, "reb": 3}
    groups: dict = {}
    for r in rows:
        groups.setdefault((int(r["shots"]), r.get("label", r["method"])), []).append(r)
    head = _head()
    print(f"devices: {sorted(devices)}\n" + head)
    for (shots, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1].split(":")[0], 9), kv[0][1])):
        key = "fit_s" if method == "patchcore" else "train_s"
        label = "full" if rs[0].get("full_shot") == "yes" else shots
        print(_line(method, label, rs, key) + f"  (seeds {sorted(r['seed'] for r in rs)})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, help="MVTec AD root (default ../shared/data/mvtec_ad)")
    p.add_argument("--store", type=Path, default=None, help="feature store for PatchCore (default $FSAD_HOME/features)")
    p.add_argument("--weights", default="auto", help="backbone weights: auto, a local file, or random")
    p.add_argument("--methods", nargs="+", default=["efficientad", "glass", "reb"])
    p.add_argument("--shots", nargs="+", default=["1", "4", "full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="budgets (default: gpu with CUDA, else cpu)")
    p.add_argument("--steps", type=int, default=None, help="training steps for every method (overrides the preset)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per fit (overrides each config)")
    p.add_argument("--quick", action="store_true", help="smoke run: preset quick, 1 seed, shots 1 and 4")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=JSON",
                   help="method parameter, e.g. glass.steps=200 or patchcore.coreset_ratio=0.1")
    p.add_argument("--no-patchcore", action="store_true", help="skip the PatchCore reference rows")
    p.add_argument("--mask-size", type=int, default=256)
    p.add_argument("--artifacts", type=Path, default=None, help="trained-weights folder (default $FSAD_HOME/artifacts)")
    p.add_argument("--fresh", action="store_true", help="train into a temporary artifact folder (no reuse)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write every row here")
    p.add_argument("--tag", default=None, help="label the rows (method:tag), e.g. for an ablation run beside the defaults")
    p.add_argument("--prepare", action="store_true",
                   help="only distil the shared EfficientAD teacher into --artifacts (before parallel runs)")
    p.add_argument("--table-from", type=Path, nargs="+", default=None,
                   help="print one table from the --json files of several (parallel) runs and exit")
    args = p.parse_args(argv)
    if args.table_from:
        return print_table(args.table_from)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.quick:
        args.preset = args.preset or "quick"
        args.seeds = args.seeds[:1]
        if args.shots == ["1", "4", "full"]:
            args.shots = ["1", "4"]
    preset = args.preset or ("gpu" if cuda else "cpu")
    params = {m: dict(PRESETS[preset].get(m, PRESETS["gpu"].get(m, {}))) for m in args.methods}
    for m in args.methods:
        if args.weights != "auto":
            params[m]["backbone_weights"] = args.weights
        if args.steps is not None:
            params[m]["steps"] = args.steps
        if args.time_budget is not None:
            params[m]["time_budget_s"] = args.time_budget
    patchcore_params: dict = {}
    for item in args.param:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        target = patchcore_params if method == "patchcore" else params.setdefault(method, {})
        target[name] = json.loads(value)

    if args.prepare:
        artifacts = args.artifacts or default_work_dir() / "artifacts"
        t0 = time.perf_counter()
        runtime = Runtime(artifact_dir=artifacts, progress=False, threads=args.threads)
        meta = registry.create("efficientad", runtime=runtime, **params.get("efficientad", {})).prepare_teacher()
        print(f"EfficientAD generic teacher in {artifacts} ({time.perf_counter() - t0:.1f} s): "
              f"{ {k: v for k, v in meta.items() if k.startswith('teacher_') or k == 'images'} }", flush=True)
        return 0

    root = args.root or shared_mvtec_root()
    if root is None:
        print("no MVTec AD root: pass --root or set MVTEC_ROOT", file=sys.stderr)
        return 2
    dataset = load_dataset(root, "bottle")
    artifacts = Path(tempfile.mkdtemp(prefix="fsad-art-")) if args.fresh else (args.artifacts or default_work_dir() / "artifacts")
    runtime = Runtime(artifact_dir=artifacts, progress=False, threads=args.threads)
    device = f"cuda: {torch.cuda.get_device_name(0)}" if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bottle: {len(dataset.train_good())} train/good, {len(dataset.test())} test; device {device}; "
          f"preset {preset}; seeds {args.seeds}; artifacts {artifacts}", flush=True)
    for m in args.methods:
        print(f"  {m}: {params[m]}", flush=True)

    head = _head()
    print("\n" + head, flush=True)
    results = []
    cache: dict = {}

    def save():  # after every table line, so a run cut short still leaves its rows
        if args.json:
            args.json.write_text(json.dumps({"preset": preset, "params": params, "device": device, "rows": results},
                                            indent=1, default=str))

    partition = None
    if not args.no_patchcore:
        from fewshot_core.features.store import FeatureStore

        t0 = time.perf_counter()
        partition = FeatureStore(args.store).build(dataset, FeatureSpec(image_size=256, weights=args.weights),
                                                   EmbedCompute(progress=False))
        print(f"(PatchCore: feature-store partition {partition.key}, grid {partition.grid}, "
              f"{time.perf_counter() - t0:.1f} s to open/build)", flush=True)
    # shots outermost: a run cut short still has every method at the small shot counts
    for shots in args.shots:
        if partition is not None:
            rows = evaluate_oneclass(dataset, partition, "patchcore", parse_shots(shots), args.seeds,
                                     patchcore_params or None, options=EpisodeOptions(mask_size=args.mask_size),
                                     context=EvalContext(cache=cache))
            results.extend(rows)
            print(_line("patchcore", shots, rows, "fit_s"), flush=True)
            save()
        for method in args.methods:
            rows = evaluate_oneclass(dataset, None, method, parse_shots(shots), args.seeds, params[method],
                                     options=EpisodeOptions(mask_size=args.mask_size),
                                     context=EvalContext(runtime=runtime, cache=cache))
            for row in rows:
                row["label"] = f"{method}:{args.tag}" if args.tag else method
            results.extend(rows)
            print(_line(rows[0]["label"], shots, rows, "train_s"), flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
