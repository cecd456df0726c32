"""Large banks: approximate nearest-neighbour search and coreset selection against the exact baseline.

All rows of one table run in one process on the same arrays, so ratios are comparable even on a busy
machine. For each index (faiss IVF with several ``nprobe``, HNSW with several ``efSearch``):

* recall@1 against exact search (the fraction of query patches whose nearest distance is the exact one's,
  up to float rounding; by distance, since duplicated bank rows tie)
  and the relative error of the nearest distance;
* search time and its ratio to exact search;
* the detector's image AUROC with that index and its gap to exact search (target: within 0.005).

The bank is the support patches of ``--shots`` images of ``--category`` (0: every good training image),
optionally with the support images flipped and rotated and embedded again (``--augment images``, the
rotated-support bank) or their grid flips and rotations (``--augment features``, the cheap stand-in).

``--tables coreset`` gives the coreset table: PatchCore (or the method given) fitted with the exact greedy
selection (``lazy``) and the partitioned one, with fit seconds, the coverage of the support by the bank
(largest and mean distance of a support patch to its nearest bank patch) and the image AUROC gap.

    FSAD_HOME=/tmp/fsad python benchmarks/bank_speed.py --shots 16 --augment images --method ldknn
    FSAD_HOME=/tmp/fsad python benchmarks/bank_speed.py --shots 0 --method patchcore --tables coreset
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
from fewshot_core.features.store import FeatureStore  # noqa: E402
from fewshot_core.evaluation.augment import TRANSFORMS  # noqa: E402
from fewshot_core.evaluation.support_views import bank_input, support_views  # noqa: E402
from fewshot_core.methods import registry  # noqa: E402
from fewshot_core.methods.components.nn_search import NearestNeighbors, parse_index  # noqa: E402
from fewshot_core.metrics import image_metrics  # noqa: E402
from fewshot_core.paths import shared_mvtec_root  # noqa: E402
from fewshot_core.features.store import EmbedCompute, FeatureSpec  # noqa: E402

INDEXES = (("flat", {}), ("ivf", {"nprobe": 4}), ("ivf", {"nprobe": 16}), ("ivf", {"nprobe": 64}),
           ("hnsw", {"ef_search": 32}), ("hnsw", {"ef_search": 128}))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def search_table(bank: np.ndarray, queries: np.ndarray, seed: int = 0, indexes=INDEXES) -> list[dict]:
    """recall@1 / distance error / build and search seconds of every index against the exact one."""
    rows, exact = [], None
    q_norm = np.einsum("ij,ij->i", queries, queries)
    for kind, opts in indexes:
        nn, build_s = _timed(lambda: NearestNeighbors(kind, use_gpu=False, seed=seed, **opts).fit(bank))
        (dist, idx), search_s = _timed(lambda: nn.search(queries, 1))
        if exact is None:
            exact = (dist[:, 0], idx[:, 0], search_s)
        # by distance, not by index: duplicated bank rows (flips of flat regions) tie exactly; the tolerance
        # is float32 cancellation in |q|^2 + |b|^2 - 2 q.b, which scales with the norms, not the distance
        recall = float((dist[:, 0] <= exact[0] + 1e-5 * (q_norm + exact[0])).mean())
        err = float(np.median(np.abs(np.sqrt(dist[:, 0]) - np.sqrt(exact[0])) / np.maximum(np.sqrt(exact[0]), 1e-12)))
        rows.append({"index": kind, **opts, "effective": nn.effective_kind, "recall@1": recall,
                     "median_rel_dist_err": err, "build_s": build_s, "search_s": search_s,
                     "speedup": exact[2] / search_s})
    return rows


def detector_table(method: str, support: np.ndarray, queries: np.ndarray, labels: np.ndarray,
                   params: dict, indexes=INDEXES) -> list[dict]:
    """Fit + score seconds and image AUROC of ``method`` with each index, and the AUROC gap to exact."""
    rows, exact = [], None
    for kind, opts in indexes:
        spec = kind + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
        model = registry.create(method, index=spec, **params)
        _, fit_s = _timed(lambda: model.fit(support))
        (scores, _), score_s = _timed(lambda: model.score(queries))
        auroc = image_metrics(labels, scores)["image_auroc"]
        if exact is None:
            exact = (auroc, fit_s + score_s)
        rows.append({"index": kind, **opts, "image_auroc": auroc, "auroc_gap": auroc - exact[0], "fit_s": fit_s,
                     "score_s": score_s, "speedup": exact[1] / (fit_s + score_s)})
    return rows


SELECTIONS = ("lazy", "partitioned")  # the exact greedy rule first: the gaps are against it


def coreset_table(method: str, support: np.ndarray, queries: np.ndarray, labels: np.ndarray,
                  params: dict) -> list[dict]:
    """Fit + score seconds, coverage and image AUROC of ``method`` with each coreset selection."""
    import faiss

    flat = support.reshape(-1, support.shape[-1])
    probe = flat[:: max(1, len(flat) // 50_000)]
    rows, exact = [], None
    for selection in SELECTIONS:
        model = registry.create(method, coreset_selection=selection, **params)
        _, fit_s = _timed(lambda: model.fit(support))
        (scores, _), score_s = _timed(lambda: model.score(queries))
        auroc = image_metrics(labels, scores)["image_auroc"]
        index = faiss.IndexFlatL2(flat.shape[1])
        index.add(np.ascontiguousarray(model.bank_, dtype=np.float32))
        cover = np.sqrt(np.maximum(index.search(probe, 1)[0][:, 0], 0))
        if exact is None:
            exact = (auroc, fit_s)
        rows.append({"selection": selection, "bank": len(model.bank_), "fit_s": fit_s, "score_s": score_s,
                     "fit_speedup": exact[1] / fit_s, "cover_max": float(cover.max()),
                     "cover_mean": float(cover.mean()), "image_auroc": auroc, "auroc_gap": auroc - exact[0]})
    return rows


def _print(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--category", default="bottle")
    p.add_argument("--shots", type=int, default=16, help="support images (0: every good training image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="none", choices=["none", "features", "images"],
                   help="6x the bank: support images flipped/rotated and re-embedded, or their grid maps")
    p.add_argument("--grid-augment", action="store_true", help="same as --augment features")
    p.add_argument("--tables", nargs="+", default=["search", "detector"], choices=["search", "detector", "coreset"],
                   help="search: recall and speed per index; detector: the method's AUROC and seconds per index; "
                        "coreset: PatchCore-style banks per coreset selection")
    p.add_argument("--indexes", nargs="+", default=None, metavar="SPEC",
                   help="index specs to compare, exact first (default: flat, ivf nprobe 4/16/64, hnsw ef 32/128)")
    p.add_argument("--method", default="ldknn", choices=["patchcore", "knn", "ldknn"])
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    params = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.param)}
    try:
        indexes = INDEXES if args.indexes is None else [parse_index(spec) for spec in args.indexes]
    except ValueError as exc:
        p.error(f"--indexes: {exc}")
    if indexes[0][0] != "flat":
        p.error("--indexes: put flat (the exact search) first; the gaps are against it")
    params.setdefault("seed", args.seed)

    root = args.root or shared_mvtec_root()
    if root is None:
        print("no MVTec AD root: pass --root or set MVTEC_ROOT", file=sys.stderr)
        return 2
    ds = load_dataset(root, args.category)
    part = FeatureStore(args.store).build(ds, FeatureSpec(image_size=args.image_size), EmbedCompute(progress=False))
    ep = sample_oneclass(ds, args.shots or None, args.seed)
    augment = "features" if args.grid_augment else args.augment
    # the bank the one-class protocol fits on (stored maps, then their augmented views)
    support = bank_input(support_views(ds, part, ep, augment, TRANSFORMS, {}), augment).astype(np.float32)
    queries = np.asarray(part.patch(list(ep.query_ids)), dtype=np.float32)
    labels = np.array([ds.by_id(i).label for i in ep.query_ids])
    flat_q = queries.reshape(-1, queries.shape[-1])
    print(f"# {args.category}@{args.image_size}, {len(ep.support_ids)} shots"
          f"{'' if augment == 'none' else f' x6 ({augment} augmented)'}: "
          f"{support.shape[0] * support.shape[1] * support.shape[2]} support patches, {len(flat_q)} query patches, "
          f"d={support.shape[-1]}")
    out = {}
    if "search" in args.tables:
        print("\n## search against exact (bank = every support patch)")
        out["search"] = search_table(support.reshape(-1, support.shape[-1]), flat_q, args.seed, indexes)
        _print(out["search"], ["index", "nprobe", "ef_search", "effective", "recall@1", "median_rel_dist_err",
                               "build_s", "search_s", "speedup"])
    if "detector" in args.tables:
        print(f"\n## {args.method} {params} with each index")
        out["detector"] = detector_table(args.method, support, queries, labels, params, indexes)
        _print(out["detector"], ["index", "nprobe", "ef_search", "image_auroc", "auroc_gap", "fit_s", "score_s",
                                 "speedup"])
    if "coreset" in args.tables:
        print(f"\n## {args.method} {params} with each coreset selection")
        out["coreset"] = coreset_table(args.method, support, queries, labels, params)
        _print(out["coreset"], ["selection", "bank", "fit_s", "score_s", "fit_speedup", "cover_max", "cover_mean",
                                "image_auroc", "auroc_gap"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
