"""The default sweep in-process (`fsad run`) against the same sweep on the two-worker cluster profile, on this
machine, in one run; then a projection of a full MVTec AD sweep on N CPU workers and M GPUs from what was
measured here (seconds per episode of each CPU method, per-step overhead of the cluster) and the measured GPU
fit times of docs/benchmarks.md.

    python benchmarks/cluster_sweep.py [--config sweep.yaml] [--out results.json]
    python benchmarks/cluster_sweep.py --project-from results.json      # only the projection, from a saved run

Needs Debian's postgresql and redis-server and `pip install -e '.[cluster]'`. Both modes start from an empty
home (features are built in both). The profile's start-up (`up`, about a minute) is timed apart from the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A full MVTec AD sweep: the default's methods plus the trained detectors and P>M>F, at a thesis-sized grid.
CATEGORIES = 15
ONECLASS_SETTINGS = 4 * 5  # shots 1, 2, 4, 8 x seeds 0-4
SUPERVISED_SETTINGS = 10 * 2 * 5  # the 10 good:bad ratios of docs/benchmarks.md x 2 label modes x 5 seeds
BINARY_SETTINGS = SUPERVISED_SETTINGS // 2
CPU_EPISODES = {  # method -> episodes per category
    "patchcore": ONECLASS_SETTINGS, "knn": ONECLASS_SETTINGS, "ldknn": ONECLASS_SETTINGS,
    "protonet_euclidean": SUPERVISED_SETTINGS, "protonet_cosine": SUPERVISED_SETTINGS,
    "patchcore_supervised": BINARY_SETTINGS,
}
# Seconds per episode on one H200 (fit + score, docs/benchmarks.md "Trained detectors", 4 shots, 256 px, time-
# capped fits). P>M>F has no per-episode time recorded there; GLASS's is used for it and marked so.
GPU_SECONDS = {"efficientad": 92.7 + 0.26, "glass": 100.8 + 0.29, "reb": 68.3 + 0.64, "pmf": 100.8 + 0.29}
GPU_EPISODES = {"efficientad": ONECLASS_SETTINGS, "glass": ONECLASS_SETTINGS, "reb": ONECLASS_SETTINGS,
                "pmf": SUPERVISED_SETTINGS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FSAD_PROFILE", "FSAD_PROFILE_CONFIG", "FSAD_SHARED_ROOT",
                                                            "MLFLOW_TRACKING_URI", "FSAD_CLUSTER_HOME")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _timed(cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{' '.join(cmd[1:4])} failed ({code}); see {log}")
    return seconds


def measure(config: str | None, base: Path) -> dict:
    sweep_args = ["--config", config] if config else []
    print("in-process: fsad run ...", flush=True)
    embedded = _timed([sys.executable, "-m", "fewshot_core", "run", *sweep_args, "--dagster-home",
                       str(base / "embedded_home")], _env(DAGSTER_HOME=str(base / "embedded_home")),
                      base / "embedded.log")
    profile = base / "profile.yaml"
    profile.write_text((ROOT / "deploy" / "cluster.yaml").read_text().replace(
        "ports: {postgres: 55432, redis: 56379, mlflow: 55000, webserver: 53000}",
        f"ports: {{postgres: {_free_port()}, redis: {_free_port()}, mlflow: {_free_port()}, "
        f"webserver: {_free_port()}}}"))
    home = base / "home"
    args = ["--home", str(home), "--profile", str(profile)] + (["--sweep", config] if config else [])
    deploy = [sys.executable, "-m", "pipelines.deploy"]
    try:
        print("cluster: up ...", flush=True)
        up = _timed([*deploy, "up", *args], _env(), base / "up.log")
        print("cluster: sweep ...", flush=True)
        sweep = _timed([*deploy, "sweep", *args], _env(), base / "sweep.log")
        steps = _steps(profile, home)
    finally:
        subprocess.call([*deploy, "down", "--home", str(home), "--profile", str(profile)], cwd=ROOT, env=_env(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"in_process_s": embedded, "cluster_up_s": up, "cluster_sweep_s": sweep, "workers": 2,
            "cpus": os.cpu_count(), "steps": steps}


def _steps(profile: Path, home: Path) -> list[dict]:
    import dagster as dg

    from pipelines.deploy.events import step_timings
    from pipelines.placement.profile import load_profile

    prof = load_profile(profile, home)
    # the instance reads its PostgreSQL password from the environment (dagster.yaml holds none)
    os.environ["FSAD_POSTGRES_PASSWORD"] = prof.secrets["FSAD_POSTGRES_PASSWORD"]
    with dg.DagsterInstance.from_config(str(prof.dagster_home)) as instance:
        runs = [r.run_id for r in instance.get_runs()]
        return [{"step": t.step_key, "worker": t.worker, "seconds": t.seconds, "overhead": t.overhead, "queued": t.queued,
                 "partitions": t.partitions} for t in step_timings(instance, runs)]


def report(m: dict) -> None:
    ratio = m["cluster_sweep_s"] / m["in_process_s"]
    print(f"\nmachine: {m['cpus']} CPU cores (shared with other work while measured)")
    print(f"{'mode':34s} {'wall s':>8s}")
    print(f"{'in-process (fsad run)':34s} {m['in_process_s']:8.1f}")
    print(f"{'cluster, 2 Celery workers':34s} {m['cluster_sweep_s']:8.1f}")
    print(f"{'cluster / in-process':34s} {ratio:8.2f}")
    print(f"{'(cluster start-up, apart)':34s} {m['cluster_up_s']:8.1f}")
    steps = [s for s in m["steps"] if s["seconds"] is not None]
    print(f"\n{'step':52s} {'worker':>6s} {'parts':>5s} {'step s':>7s} {'overhead s':>10s}")
    for s in sorted(steps, key=lambda s: s["step"]):
        print(f"{s['step'][:52]:52s} {s['worker'] or '-':>6s} {s['partitions']:5d} {s['seconds']:7.1f} "
              f"{(s['overhead'] or 0):10.1f}")
    project(m)


def project(m: dict) -> None:
    steps = [s for s in m["steps"] if s["seconds"] is not None]
    overhead = sorted(s["overhead"] for s in steps if s["overhead"] is not None)
    per_step = overhead[len(overhead) // 2]
    per_episode = {}
    for s in steps:
        if s["step"].startswith("evaluation__") and s["partitions"]:
            method = s["step"].split("__")[-1]
            per_episode.setdefault(method, []).append(s["seconds"] / s["partitions"])
    per_episode = {k: sum(v) / len(v) for k, v in per_episode.items()}
    feat = [s for s in steps if s["step"] in ("embeddings", "memory_banks") and s["partitions"]]
    per_category_features = sum(s["seconds"] / s["partitions"] for s in feat)
    missing = sorted(set(CPU_EPISODES) - set(per_episode))
    cpu_seconds = {k: per_episode.get(k, max(per_episode.values())) for k in CPU_EPISODES}

    cpu_steps = CATEGORIES * (2 + len(CPU_EPISODES))
    gpu_steps = CATEGORIES * len(GPU_EPISODES)
    cpu_work = CATEGORIES * (per_category_features + sum(CPU_EPISODES[k] * cpu_seconds[k] for k in CPU_EPISODES))
    gpu_work = CATEGORIES * sum(GPU_EPISODES[k] * GPU_SECONDS[k] for k in GPU_EPISODES)
    longest_gpu_step = max(GPU_EPISODES[k] * GPU_SECONDS[k] for k in GPU_EPISODES)
    print(f"\nprojection: full MVTec AD sweep, {CATEGORIES} categories, {ONECLASS_SETTINGS} one-class and "
          f"{SUPERVISED_SETTINGS} supervised settings per category")
    print(f"  steps: {cpu_steps} cpu-pool (features, banks, {len(CPU_EPISODES)} methods per category) + "
          f"{gpu_steps} gpu-pool ({', '.join(GPU_EPISODES)} per category), one run per category and stage")
    print(f"  measured here: {per_step:.1f} s overhead per step (median: worker loads the code location and plan), "
          f"{per_category_features:.1f} s features+banks per category (default sweep's data), CPU s/episode "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu_seconds.items()))
          + (f" ({', '.join(missing)}: not in this sweep, slowest measured used)" if missing else ""))
    print("  GPU s/episode (docs/benchmarks.md, one H200): " + ", ".join(f"{k} {v:.0f}" for k, v in GPU_SECONDS.items())
          + " (pmf: GLASS's, not measured)")
    print(f"  work: {(cpu_work + cpu_steps * per_step) / 3600:.1f} CPU-worker hours, "
          f"{(gpu_work + gpu_steps * per_step) / 3600:.1f} GPU hours; longest single step "
          f"{longest_gpu_step / 3600:.1f} h (P>M>F, one category: the floor however many GPUs)")
    print(f"\n{'CPU workers N':>14s} {'GPUs M':>7s} {'projected wall h':>17s}")
    for n, gpus in ((2, 1), (8, 1), (8, 4), (32, 8), (64, 15)):
        cpu_wall = (cpu_work + cpu_steps * per_step) / n
        gpu_wall = max((gpu_work + gpu_steps * per_step) / gpus, longest_gpu_step)
        print(f"{n:14d} {gpus:7d} {max(cpu_wall, gpu_wall) / 3600:17.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="sweep YAML (default: the embedded default sweep)")
    p.add_argument("--out", help="write the measurements as JSON here")
    p.add_argument("--project-from", help="print the tables and projection of a saved JSON, measure nothing")
    args = p.parse_args()
    if args.project_from:
        report(json.loads(Path(args.project_from).read_text()))
        return 0
    base = Path(tempfile.mkdtemp(prefix="fsad-bench-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL runs as the postgres user and must reach its data folder
    m = measure(str(Path(args.config).resolve()) if args.config else None, base)
    out = Path(args.out) if args.out else base / "cluster_sweep.json"
    out.write_text(json.dumps(m, indent=1))
    report(m)
    print(f"\nmeasurements: {out}; logs under {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
