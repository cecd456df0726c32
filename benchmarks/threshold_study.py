"""Threshold study (issue 24): the false-alarm rate a one-class model's threshold achieves on the test good
images against the rate it was asked for, by where its held-out good scores come from.

Each episode is run once with the defaults (``run_oneclass_episode``, as ``evaluate_oneclass`` runs it):
its held-out good support scores (leave-one-out, what the threshold is set from) and the deployed model's
test scores are kept in a JSON cache beside the feature store (one file per method and source), so a rerun
only prints the table. The held-out scores come from one of two sources (``--heldout``):

* refit: fresh copies of the method fitted on the other support images (PatchCore's keep every patch),
  the rule before the bank recorded its provenance (``<method>.json``);
* bank: the deployed model's own bank less the held-out image's rows (``methods/components/heldout.py``), the default
  now for the bank detectors (``<method>-bank.json``).

Both set the threshold by ``threshold_from_scores`` (``fewshot_core/evaluation/threshold.py``,
docs/models.md: the certified order statistic, or below 59 scores the highest raised to a normal tail
fit, with its stated 95 % bound), never from a test label. Per method x shots: nominal rate, achieved
false-alarm rate on the test good images (mean and max over seeds), miss rate on the defect images, the
seconds the held-out scores took (mean per episode), the bound the rule states and whether the bank
source's mean over seeds stays within it.

    FSAD_HOME=/tmp/fsad_thr python benchmarks/threshold_study.py --data bottle --methods patchcore knn
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
from fewshot_core.evaluation.augment import TRANSFORMS  # noqa: E402
from fewshot_core.evaluation.oneclass import run_oneclass_episode, support_threshold  # noqa: E402
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext  # noqa: E402
from fewshot_core.evaluation.support_views import support_views  # noqa: E402
from fewshot_core.evaluation.threshold import DEFAULT_FPR, ThresholdConfig, threshold_from_scores  # noqa: E402
from fewshot_core.features.store import EmbedCompute, FeatureSpec, FeatureStore  # noqa: E402
from fewshot_core.paths import default_work_dir, shared_root  # noqa: E402

DATA = {"bottle": ("mvtec_ad", "bottle"), "mtd": ("mtd", "magnetic_tile")}


SOURCES = ("refit", "bank")


def cache_file(cache_dir: Path, method: str, source: str) -> Path:
    """Held-out scores from refitted copies: ``<method>.json`` (the study's first cache); from the model's
    own bank: ``<method>-bank.json``."""
    return cache_dir / (f"{method}.json" if source == "refit" else f"{method}-{source}.json")


def episode_scores(dataset, partition, method: str, shots: int, seed: int, source: str, mask_size: int,
                   cache: EpisodeCache) -> dict:
    """One default episode: its held-out good support scores from ``source`` and the deployed model's test
    scores, with the seconds the threshold's held-out scores took."""
    episode = sample_oneclass(dataset, shots, seed)
    res = run_oneclass_episode(dataset, partition, episode, method, options=EpisodeOptions(mask_size=mask_size),
                               context=EvalContext(cache=cache))
    augment = res.row["augment"]
    views = support_views(dataset, partition, episode, augment, TRANSFORMS, cache)
    t0 = time.perf_counter()  # the held-out scores again, timed apart from the episode
    cut = support_threshold(method, res.model.get_params(), views, None, ThresholdConfig(seed=seed), augment,
                            model=res.model if source == "bank" else None)
    labels = np.asarray(res.labels)
    scores = np.asarray(res.image_scores, dtype=float)
    return {"heldout": list(cut.good_scores), "heldout_s": round(time.perf_counter() - t0, 3),
            "rule": cut.rule, "good": scores[labels == 0].tolist(), "defect": scores[labels == 1].tolist()}


def collect(dataset, partition, methods, shots_list, seeds, cache_dir: Path, mask_size: int,
            source: str) -> dict:
    """{"method/shots/seed": {"heldout", "good", "defect"}} scores; episodes already in the cache (one file
    per method and source, so studies of different methods can run at once) are kept."""
    episodes: dict = {}
    cache = EpisodeCache()
    for method in methods:
        path = cache_file(cache_dir, method, source)
        done = json.loads(path.read_text()) if path.exists() else {}
        for shots in shots_list:
            for seed in seeds:
                key = f"{method}/{shots}/{seed}"
                if key in done:
                    continue
                t0 = time.perf_counter()
                done[key] = episode_scores(dataset, partition, method, shots, seed, source, mask_size, cache)
                atomic_write_text(path, json.dumps(done))
                print(f"  {source} {key}: {time.perf_counter() - t0:.1f} s (held-out scores "
                      f"{done[key]['heldout_s']:.1f} s)", file=sys.stderr, flush=True)
        episodes.update(done)
    return episodes


def rates(episode: dict, value: float) -> tuple[float, float]:
    """(false-alarm rate on the test good images, miss rate on the test defect images) at ``value``."""
    return float(np.mean(np.asarray(episode["good"]) > value)), float(np.mean(np.asarray(episode["defect"]) <= value))


def table(by_source: dict, methods, shots_list, seeds, fpr: float) -> list[dict]:
    """Per method x shots: each source's achieved rates at ``threshold_from_scores`` of its held-out scores
    (mean and max over seeds), the bound the bank rule states, and whether both sources saw the same test
    scores (the same model: the sources differ in the held-out scores only)."""
    rows = []
    for method in methods:
        for shots in shots_list:
            row = {"method": method, "shots": shots, "nominal": fpr}
            for source, episodes in by_source.items():
                eps = [episodes[f"{method}/{shots}/{seed}"] for seed in seeds]
                cuts = [threshold_from_scores([s for s in e["heldout"] if s == s], fpr, "study") for e in eps]
                got = np.array([rates(e, c.value) for e, c in zip(eps, cuts)])
                bound = float(np.mean([c.fpr_bound for c in cuts]))
                row.update({f"{source}_fpr": got[:, 0].mean(), f"{source}_fpr_max": got[:, 0].max(),
                            f"{source}_miss": got[:, 1].mean(), f"{source}_bound": bound,
                            f"{source}_within": bool(got[:, 0].mean() <= bound),
                            f"{source}_s": float(np.mean([e.get("heldout_s", np.nan) for e in eps]))})
            if len(by_source) == 2:
                a, b = (by_source[s] for s in SOURCES)
                row["same_model"] = all(np.allclose(a[f"{method}/{shots}/{seed}"]["good"],
                                                    b[f"{method}/{shots}/{seed}"]["good"], rtol=1e-4)
                                        for seed in seeds)
            rows.append(row)
    return rows


def markdown(rows: list[dict], sources) -> str:
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    head = ["method", "shots", "nominal"]
    for source in sources:
        head += [f"{source} FPR mean (max)", f"{source} miss", f"{source} held-out s"]
    head += ["stated bound", f"{sources[-1]} mean ≤ bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["shots"]), pct(r["nominal"])]
        for source in sources:
            cells += [f"{pct(r[f'{source}_fpr'])} ({pct(r[f'{source}_fpr_max'])})", pct(r[f"{source}_miss"]),
                      "–" if np.isnan(r[f"{source}_s"]) else f"{r[f'{source}_s']:.1f}"]  # cached before timed
        last = sources[-1]
        cells += [pct(r[f"{last}_bound"]), "yes" if r[f"{last}_within"] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(not r.get("same_model", True) for r in rows):
        lines.append("\nnote: some episodes' test scores differ between the sources' caches (the code changed "
                     "between the runs): " + ", ".join(f"{r['method']}/{r['shots']}" for r in rows
                                                       if not r.get("same_model", True)))
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
    p.add_argument("--heldout", nargs="+", choices=SOURCES, default=list(SOURCES),
                   help="where the held-out good scores come from: refitted copies (the rule before), the "
                        "model's own bank (the default now); the table compares those given")
    args = p.parse_args(argv)
    args.heldout = [s for s in SOURCES if s in args.heldout]

    folder, category = DATA[args.data]
    root = args.root or shared_root() / "data" / folder
    dataset = load_dataset(root, category)
    partition = FeatureStore().build(dataset, FeatureSpec(image_size=args.image_size), EmbedCompute(progress=False))
    cache_dir = default_work_dir() / "threshold_study" / f"{category}-{args.image_size}px-{partition.key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    by_source = {source: collect(dataset, partition, args.methods, args.shots, args.seeds, cache_dir,
                                 args.mask_size, source) for source in args.heldout}
    n_good = len(next(iter(by_source[args.heldout[0]].values()))["good"])
    print(f"{category} ({root}), {args.image_size} px, {n_good} test good images, seeds {args.seeds}; {machine()}")
    print(markdown(table(by_source, args.methods, args.shots, args.seeds, args.fpr), args.heldout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
