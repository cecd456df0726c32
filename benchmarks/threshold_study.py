"""Threshold study (issue 24): the false-alarm rate a one-class model's threshold achieves on the test good
images against the rate it was asked for, old rule against new.

Each episode is run once with the defaults (``run_oneclass_episode``, as ``evaluate_oneclass`` runs it):
its held-out good support scores (leave-one-out, what the threshold is set from) and the deployed model's
test scores are kept in a JSON cache beside the feature store, so a rerun only prints the table. Both rules
then set their threshold from the same held-out scores, never from a test label:

* old: the ``1 - fpr`` quantile ("higher" sample) of the held-out scores (their maximum below 20 scores);
* new: ``threshold_from_scores`` (``fewshot_core/evaluation/threshold.py``, docs/models.md): the certified
  order statistic, or below 59 scores the highest raised to a normal tail fit, with its stated 95 % bound.

Per method x shots: nominal rate, achieved false-alarm rate on the test good images (mean and max over
seeds), miss rate on the defect images, and for the new rule the bound it states and whether the mean
over seeds stays within it.

    FSAD_HOME=/tmp/fsad_thr python benchmarks/threshold_study.py --data bottle --image-size 128
    FSAD_HOME=/tmp/fsad_thr python benchmarks/threshold_study.py --data mtd --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fewshot_core.atomic import atomic_write_text  # noqa: E402
from fewshot_core.data import load_dataset  # noqa: E402
from fewshot_core.episode_cache import EpisodeCache  # noqa: E402
from fewshot_core.episodes import sample_oneclass  # noqa: E402
from fewshot_core.evaluation.oneclass import run_oneclass_episode  # noqa: E402
from fewshot_core.evaluation.threshold import DEFAULT_FPR, threshold_from_scores  # noqa: E402
from fewshot_core.features.store import FeatureStore  # noqa: E402
from fewshot_core.paths import default_work_dir, shared_root  # noqa: E402
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext  # noqa: E402
from fewshot_core.features.store import EmbedCompute, FeatureSpec  # noqa: E402

DATA = {"bottle": ("mvtec_ad", "bottle"), "mtd": ("mtd", "magnetic_tile")}


def collect(dataset, partition, methods, shots_list, seeds, cache_dir: Path, mask_size: int) -> dict:
    """{"method/shots/seed": {"heldout", "good", "defect"}} scores; episodes already in the cache (one file
    per method, so studies of different methods can run at once) are kept."""
    episodes: dict = {}
    cache = EpisodeCache()
    for method in methods:
        path = cache_dir / f"{method}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        for shots in shots_list:
            for seed in seeds:
                key = f"{method}/{shots}/{seed}"
                if key in done:
                    continue
                t0 = time.perf_counter()
                res = run_oneclass_episode(dataset, partition, sample_oneclass(dataset, shots, seed), method,
                                           options=EpisodeOptions(mask_size=mask_size),
                                           context=EvalContext(cache=cache))
                labels = np.asarray(res.labels)
                scores = np.asarray(res.image_scores, dtype=float)
                done[key] = {"heldout": list(res.threshold.good_scores),
                             "good": scores[labels == 0].tolist(), "defect": scores[labels == 1].tolist()}
                atomic_write_text(path, json.dumps(done))
                print(f"  {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        episodes.update(done)
    return episodes


def old_rule(heldout, fpr: float) -> float:
    """The rule before issue 24: the ``1 - fpr`` quantile (higher sample) of the held-out scores."""
    return float(np.quantile(np.asarray(heldout, dtype=float), 1.0 - fpr, method="higher"))


def rates(episode: dict, value: float) -> tuple[float, float]:
    """(false-alarm rate on the test good images, miss rate on the test defect images) at ``value``."""
    return float(np.mean(np.asarray(episode["good"]) > value)), float(np.mean(np.asarray(episode["defect"]) <= value))


def table(episodes: dict, methods, shots_list, seeds, fpr: float) -> list[dict]:
    rows = []
    for method in methods:
        for shots in shots_list:
            eps = [episodes[f"{method}/{shots}/{seed}"] for seed in seeds]
            old = np.array([rates(e, old_rule(e["heldout"], fpr)) for e in eps])
            cuts = [threshold_from_scores(e["heldout"], fpr, "study") for e in eps]
            new = np.array([rates(e, c.value) for e, c in zip(eps, cuts)])
            bound = float(np.mean([c.fpr_bound for c in cuts]))
            rows.append({"method": method, "shots": shots, "nominal": fpr,
                         "old_fpr": old[:, 0].mean(), "old_fpr_max": old[:, 0].max(), "old_miss": old[:, 1].mean(),
                         "new_fpr": new[:, 0].mean(), "new_fpr_max": new[:, 0].max(), "new_miss": new[:, 1].mean(),
                         "bound": bound, "within": bool(new[:, 0].mean() <= bound), "rule": cuts[0].rule})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| method | shots | nominal | old FPR mean (max) | old miss | new FPR mean (max) | new miss "
            "| stated bound | new mean ≤ bound |")
    lines = [head, "|" + " --- |" * 9]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['shots']} | {pct(r['nominal'])} "
                     f"| {pct(r['old_fpr'])} ({pct(r['old_fpr_max'])}) "
                     f"| {pct(r['old_miss'])} | {pct(r['new_fpr'])} ({pct(r['new_fpr_max'])}) | {pct(r['new_miss'])} "
                     f"| {pct(r['bound'])} | {'yes' if r['within'] else 'NO'} |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model and count (and the GPU, which the study does not use: the scores come from the CPU)."""
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(DATA), default="bottle")
    p.add_argument("--root", type=Path, default=None, help="dataset root (default ../shared/data/<mvtec_ad|mtd>)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--methods", nargs="*", default=["patchcore", "knn", "ldknn"])
    p.add_argument("--shots", type=int, nargs="*", default=[2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR, help="nominal false-positive rate (default 0.05)")
    p.add_argument("--mask-size", type=int, default=32,
                   help="pixel metrics' resolution; the study reads image scores only, so a small one saves time")
    args = p.parse_args(argv)

    folder, category = DATA[args.data]
    root = args.root or shared_root() / "data" / folder
    dataset = load_dataset(root, category)
    partition = FeatureStore().build(dataset, FeatureSpec(image_size=args.image_size), EmbedCompute(progress=False))
    cache_dir = default_work_dir() / "threshold_study" / f"{category}-{args.image_size}px-{partition.key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    episodes = collect(dataset, partition, args.methods, args.shots, args.seeds, cache_dir, args.mask_size)
    n_good = len(next(iter(episodes.values()))["good"])
    print(f"{category} ({root}), {args.image_size} px, {n_good} test good images, seeds {args.seeds}; {machine()}")
    print(markdown(table(episodes, args.methods, args.shots, args.seeds, args.fpr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
