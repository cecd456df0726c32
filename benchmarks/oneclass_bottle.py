"""One-class few-shot benchmark on real MVTec AD bottle (issue 4).

Prints a table method x shots (1, 2, 4, 8, 16, full) of image AUROC, pixel AUROC and AUPRO (mean ± std
over seeds), with fit and scoring time; the 1-shot augmentation rows; and a speed section: patches
searched per second by a fitted PatchCore against the raw search backend (faiss IndexFlatL2, or the
torch flat search where faiss is absent) on the very same arrays, plus the coreset time of the bank.

    python benchmarks/oneclass_bottle.py                       # everything, 5 seeds (GPU advised)
    python benchmarks/oneclass_bottle.py --shots 1 4 --seeds 0 1 --methods patchcore --speed-shots 16

Bar (Lite0, 256 px, stride-8 + stride-16 stages): PatchCore full-shot image AUROC >= 0.99, pixel
AUROC >= 0.97; 1-shot image AUROC >= 0.95; search ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fewshot_core.data import load_dataset  # noqa: E402
from fewshot_core.episodes import sample_oneclass  # noqa: E402
from fewshot_core.evaluation.oneclass import evaluate_oneclass, parse_shots  # noqa: E402
from fewshot_core.features.store import FeatureStore  # noqa: E402
from fewshot_core.methods import create  # noqa: E402
from fewshot_core.methods.components import nn_search  # noqa: E402
from fewshot_core.paths import shared_mvtec_root  # noqa: E402
from fewshot_core.sizes import WORKING_SIZE  # noqa: E402
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext  # noqa: E402
from fewshot_core.features.store import EmbedCompute, FeatureSpec  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.4f}±{v.std(ddof=1) if v.size > 1 else 0.0:.4f}"


def accuracy_table(dataset, partition, methods, shots_list, seeds, augment_shots, augment_methods,
                   params) -> list[dict]:
    out = []
    cache: dict = {}
    head = f"{'method':<10} {'shots':>5} {'augment':>7} " + " ".join(f"{m:>15}" for m in METRICS) + \
        f" {'fit_s':>8} {'score_s':>8} {'bank':>7}"
    print(head)
    print("-" * len(head))
    settings = [(m, s, "none") for m in methods for s in shots_list]
    settings += [(m, s, "images") for m in augment_methods for s in augment_shots]
    for method, shots, augment in settings:
        rows = evaluate_oneclass(dataset, partition, method, parse_shots(shots), seeds, params.get(method),
                                 options=EpisodeOptions(mask_size=WORKING_SIZE, augment=augment),
                                 context=EvalContext(cache=cache))
        summary = {"method": method, "shots": str(shots), "augment": augment, "seeds": list(seeds),
                   **{m: float(np.mean([r[m] for r in rows])) for m in METRICS if m in rows[0]},
                   **{f"{m}_std": float(np.std([r[m] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
                      for m in METRICS if m in rows[0]},
                   "fit_s": float(np.mean([r["fit_s"] for r in rows])),
                   "score_s": float(np.mean([r["score_s"] for r in rows])),
                   "bank_size": int(rows[0]["bank_size"]), "rows": rows}
        out.append(summary)
        print(f"{method:<10} {str(shots):>5} {augment:>7} " + " ".join(f"{_ms([r.get(m) for r in rows]):>15}"
                                                                     for m in METRICS)
              + f" {summary['fit_s']:>8.2f} {summary['score_s']:>8.2f} {summary['bank_size']:>7}", flush=True)
    return out


def speed(dataset, partition, shots, params, repeats: int = 3) -> dict:
    """PatchCore fit (coreset) time and patches searched per second vs the raw backend on the same arrays."""
    episode = sample_oneclass(dataset, parse_shots(shots), 0)
    support = partition.patch(list(episode.support_ids))
    query = partition.patch(list(episode.query_ids))
    flat = query.reshape(-1, query.shape[-1])
    model = create("patchcore", **params)
    t0 = time.perf_counter()
    model.fit(support)
    fit_s = time.perf_counter() - t0
    model.score(query[:2])  # warm-up (thread pools, GPU context)
    ours = min(_timed(lambda: model.score(query)) for _ in range(repeats))
    backend = model.nn_.effective_kind
    bank = model.bank_
    if nn_search.faiss is not None and not backend.startswith("torch"):
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        if model.nn_.use_gpu and nn_search.gpu_available():
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
        raw_name = "faiss IndexFlatL2"
        raw = min(_timed(lambda: index.search(flat, 1)) for _ in range(repeats))
    else:
        raw_index = nn_search.TorchFlatIndex(bank, "cuda" if "cuda" in backend else "cpu")
        raw_name = f"raw torch flat ({'cuda' if 'cuda' in backend else 'cpu'})"
        raw = min(_timed(lambda: raw_index.search(flat, 1)) for _ in range(repeats))
    result = {"shots": str(shots), "support_patches": int(support.shape[0] * np.prod(support.shape[1:3])),
              "bank": int(len(bank)), "dim": int(bank.shape[1]), "query_patches": int(len(flat)),
              "coreset_fit_s": fit_s, "backend": backend, "raw": raw_name,
              "patchcore_patches_per_s": len(flat) / ours, "raw_patches_per_s": len(flat) / raw,
              "ratio": raw / ours}
    print(f"\nspeed (PatchCore, shots={shots}, params {params}):")
    print(f"  coreset + index build: {fit_s:.2f} s for {result['support_patches']} support patches -> bank "
          f"{result['bank']} x {result['dim']}")
    print(f"  PatchCore.score: {result['patchcore_patches_per_s']:,.0f} patches/s ({backend}); "
          f"{raw_name} alone: {result['raw_patches_per_s']:,.0f} patches/s; ratio {result['ratio']:.3f}")
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, help="MVTec AD root (default ../shared/data/mvtec_ad)")
    p.add_argument("--store", type=Path, default=None, help="feature store (default $FSAD_HOME/features)")
    p.add_argument("--weights", default="auto")
    p.add_argument("--image-size", type=int, default=WORKING_SIZE)
    p.add_argument("--methods", nargs="*", default=["patchcore", "knn", "ldknn"])
    p.add_argument("--shots", nargs="*", default=["1", "2", "4", "8", "16", "full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--augment-shots", nargs="*", default=["1"], help="shots also run with --augment images")
    p.add_argument("--augment-methods", nargs="*", default=["patchcore"], help="methods run with augmentation")
    p.add_argument("--speed-shots", default="full", help="support size for the speed section ('' to skip)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=JSON",
                   help="e.g. patchcore.coreset_ratio=0.01")
    p.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 16))
    params: dict = {}
    for item in args.param:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        params.setdefault(method, {})[name] = json.loads(value)
    root = args.root or shared_mvtec_root()
    if root is None:
        print("no MVTec AD root: pass --root or set MVTEC_ROOT", file=sys.stderr)
        return 2
    dataset = load_dataset(root, "bottle")
    t0 = time.perf_counter()
    partition = FeatureStore(args.store).build(dataset, FeatureSpec(image_size=args.image_size, weights=args.weights),
                                               EmbedCompute(progress=False))
    cuda = torch.cuda.is_available()
    print(f"bottle: {len(dataset.train_good())} train/good, {len(dataset.test())} test; partition {partition.key} "
          f"(grid {partition.grid}, d={partition.patch_dim}, {time.perf_counter() - t0:.1f} s to open/build); "
          f"device {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'}; seeds {args.seeds}\n", flush=True)
    results = {"accuracy": accuracy_table(dataset, partition, args.methods, args.shots, args.seeds,
                                          args.augment_shots, args.augment_methods, params)}
    if args.speed_shots:
        results["speed"] = speed(dataset, partition, args.speed_shots, params.get("patchcore", {}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
