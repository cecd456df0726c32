"""``fsad evaluate``: run a few-shot protocol from the cached features, one row per seed, then mean ± std.

One-class (default): ``fsad evaluate ROOT --category bottle --method patchcore --shots 1 --seeds 0 1 2``.
Supervised (thesis protocol): ``--protocol supervised --method protonet --k-good 5 --k-bad 5``.
Transductive: ``--protocol transductive --method musc --shots 0``: the unlabeled test images are scored
against each other, with 0 or more good shots beside them.
The feature-store partition is built on first use and reused afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.cli.args import (UniqueKeys, UniqueValues, add_size_arguments, folder, non_negative_int,
                                   positive_int, stage_indices, workers)
from fewshot_core.data import list_categories
from fewshot_core.data.layouts import add_layout_arguments, dataset_from_args
from fewshot_core.data.mvtec import split_class_warnings
from fewshot_core.errors import FsadError
from fewshot_core.methods import registry
from fewshot_core.paths import default_work_dir
from fewshot_core.schema import PROTOCOLS, SHOWN, Protocol


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. coreset_ratio=0.01")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # plain strings need no quotes: index=ivf


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="run the one-class, supervised or transductive protocol",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", metavar="ROOT", help="MVTec-layout root (or use the layout flags)")
    p.add_argument("--category", help="category to evaluate (with layout flags: its name)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=Protocol.ONECLASS.value)
    p.add_argument("--method", required=True, help=_method_help())
    p.add_argument("--param", type=_param, action=UniqueKeys, default=[], metavar="KEY=VALUE",
                   help="method parameter (repeatable; JSON values), e.g. --param coreset_ratio=0.01 --param k=5")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", action=UniqueValues, default=[0, 1, 2, 3, 4],
                   metavar="S", help="episode seeds, each once (default 0 1 2 3 4)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows with every field")
    g = p.add_argument_group("one-class protocol")
    g.add_argument("--shots", default=None,
                   help="good support images per episode: a number or 'full' (transductive: 0 or more)")
    g.add_argument("--mask-size", type=positive_int, default=None,
                   help="short side of masks and anomaly maps, at the features' aspect (default: the model's "
                        "working size, i.e. --image-size, or a detector trained on images' own)")
    g.add_argument("--config", choices=("default", "auto"), default="default",
                   help="auto: each episode picks its augmentation and object-centric scoring from its good "
                        "support images (synthetic anomalies in held-out shots; needs 2+ shots), recorded in "
                        "each row's config column")
    g.add_argument("--align", choices=("auto", "always", "none"), default="auto",
                   help="rotate and crop each image to its part (axis upright, part filling the input) before "
                        "embedding, from the support's foreground estimate; auto, the default: only when the "
                        "support shows an elongated part at varying poses (round parts, fixed poses and textures "
                        "stay as they are; each row's align column says which); always: every part")
    g.add_argument("--augment", choices=("auto", "none", "features", "images"), default="auto",
                   help="add flipped/rotated support images to the bank (images: re-embedded; features: grid "
                        "approximation; auto, the default: images for "
                        f"{', '.join(sorted(n for n, e in registry.REGISTRY.items() if e.augment == 'images'))} "
                        "up to 16 shots)")
    g = p.add_argument_group("supervised protocol")
    g.add_argument("--k-good", type=int, default=None, help="good support images")
    g.add_argument("--k-bad", type=int, default=None, help="defective support images")
    g.add_argument("--label-mode", choices=("binary", "multiclass"), default="binary")
    g.add_argument("--distance", choices=("euclidean", "cosine"), default=None, help="ProtoNet distance")
    g.add_argument("--pool", choices=("test", "all"), default="test", help="where shots and queries are drawn from")
    g.add_argument("--meta-pool", default=None, metavar="SOURCE",
                   help="what a meta-trained method (caml) learns from, never the evaluated category: 'synthetic' "
                        "(or 'synthetic:N', N generated categories), 'root' (the other categories of ROOT) or a "
                        "PATH to another MVTec-layout root; default: 'root' when ROOT has other categories, "
                        "else 'synthetic'")
    g = p.add_argument_group("features (the store partition)")
    g.add_argument("--backbone", default=None, help=f"timm model name (default {DEFAULT_BACKBONE})")
    add_size_arguments(g)
    g.add_argument("--layers", type=stage_indices, default=None, help="stage indices, e.g. 2,3 (default stride 8 and 16)")
    g.add_argument("--patch-dim", type=int, default=None, help="reduce patch features to this many dims")
    g.add_argument("--weights", default="auto", help="auto, a local checkpoint PATH, or random")
    g.add_argument("--store", type=folder, default=None, help="feature store folder (default $FSAD_HOME/features)")
    g.add_argument("--device", default=None, help="embedding device: cpu, cuda (default: cuda when available)")
    g.add_argument("--num-workers", type=workers, default=2, help="image decoding processes when embedding")
    add_layout_arguments(p)
    p.set_defaults(func=run, write_fix="pass --store DIR and set FSAD_HOME (trained-model artifacts) to writable folders")


def _partition(args, dataset):
    from fewshot_core.features.store import EmbedCompute, FeatureSpec, FeatureStore  # torch: not for --help

    spec = FeatureSpec(backbone=args.backbone or DEFAULT_BACKBONE, image_size=args.image_size, layers=args.layers,
                       weights=args.weights, patch_dim=args.patch_dim, aspect=args.aspect)
    return FeatureStore(args.store).build(dataset, spec, EmbedCompute(num_workers=args.num_workers, device=args.device,
                                                                      progress=False))


def _method_help() -> str:
    """The methods per protocol, as the registry lists them (no import of any method's module)."""
    words = {registry.ONECLASS: "one-class", registry.SUPERVISED: "supervised", registry.TRANSDUCTIVE: "transductive"}
    return "; ".join(f"{label}: {', '.join(registry.names(protocol=p))}" for p, label in words.items()
                     if registry.names(protocol=p))


def _rows(args, dataset, partition, entry) -> list[dict]:
    from fewshot_core.evaluation.options import EpisodeOptions, EvalContext, SupervisedDraw  # numpy: not at --help

    params = dict(args.param)
    if args.protocol == Protocol.ONECLASS:
        from fewshot_core.evaluation.oneclass import evaluate_oneclass, parse_shots  # torch: not for --help

        if args.shots is None:
            raise FsadError("fsad evaluate: --shots is required for the one-class protocol; give a number or 'full'")
        options = EpisodeOptions(mask_size=args.mask_size, augment=args.augment, config=args.config,
                                 align=args.align)
        return evaluate_oneclass(dataset, partition, entry, parse_shots(args.shots), args.seeds, params, options)
    if args.protocol == Protocol.TRANSDUCTIVE:
        from fewshot_core.evaluation.transductive import evaluate_transductive  # torch: not for --help

        shots = 0 if args.shots is None else args.shots
        if not str(shots).isdigit():
            raise FsadError(f"fsad evaluate: --shots {shots}: the transductive protocol takes 0 or more good shots")
        return evaluate_transductive(dataset, partition, entry, int(shots), args.seeds, params,
                                     EpisodeOptions(mask_size=args.mask_size))
    if args.k_good is None or args.k_bad is None:
        raise FsadError("fsad evaluate: the supervised protocol needs --k-good G and --k-bad B")
    if args.distance is not None:
        params["distance"] = args.distance
    try:
        from fewshot_core.evaluation.supervised import evaluate_supervised  # torch, faiss: not for --help
    except ImportError as exc:
        raise FsadError(f"supervised protocol unavailable ({exc}); install the project with its dependencies") from exc
    draw = SupervisedDraw(args.k_good, args.k_bad, label_mode=args.label_mode, pool=args.pool)
    return evaluate_supervised(dataset, partition, entry, draw, args.seeds, params,
                               EvalContext(meta_pool=_meta_pool(args, dataset, partition, params, entry)))


def _meta_pool(args, dataset, partition, params: dict, entry):
    """The meta-training pool for a meta-trained method (None for the others, or with a checkpoint)."""
    from fewshot_core.evaluation import meta_pool as pools  # with the store: torch, not for --help
    from fewshot_core.features.store import EmbedCompute, FeatureSpec, FeatureStore

    if not entry.meta_pool or params.get("checkpoint"):
        return None
    others = [c for c in list_categories(dataset.root) if c != dataset.category] if dataset.root.is_dir() else []
    if args.meta_pool is None:
        source = pools.PoolSource("others" if others else "synthetic")
    else:
        source = pools.parse_source(args.meta_pool, others="root", where="--meta-pool")
    store = FeatureStore(args.store)
    spec = FeatureSpec(partition.meta.get("backbone"), partition.image_size, layers=args.layers, weights=args.weights,
                       patch_dim=args.patch_dim)
    compute = EmbedCompute(num_workers=args.num_workers, device=args.device)

    def root_others():
        if not others:
            raise FsadError(f"--meta-pool root: {dataset.root} has no category besides {dataset.category!r}; "
                            "use --meta-pool synthetic or a PATH to another root")
        return pools.root_pool(dataset.root, store, spec, compute, categories=others)

    return pools.build_pool(source, store, spec, default_work_dir(), others=root_others, compute=compute)


def _needs_features(protocol: str, entry) -> bool:
    """Whether the method reads the feature store (the registry's input kind), i.e. a partition must exist."""
    return protocol == Protocol.SUPERVISED or entry.input_kind != registry.IMAGES


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict], protocol: str) -> str:
    """One line per seed and a mean ± std line (sample std over seeds) for the protocol's shown metrics
    (``schema.SHOWN``) and the times."""
    supervised = protocol == Protocol.SUPERVISED
    wanted = (*SHOWN[Protocol(protocol)], "fit_s", "score_s")
    cols = [c for c in wanted if any(c in r for r in rows)]
    lead = ["seed", "k_good", "k_bad"] if supervised else ["seed", "shots"]
    header = lead + cols
    lines = [[_fmt(r.get(c, "-")) for c in header] for r in rows]
    stats = ["mean±std", "", ""] if supervised else ["mean±std", ""]
    for c in cols:
        vals = [float(r[c]) for r in rows if isinstance(r.get(c), (int, float)) and math.isfinite(r[c])]
        if not vals:
            stats.append("-")
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        stats.append(f"{mean:.4f}±{std:.4f}")
    table = [header] + lines + [stats]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table)


def _warn_copies(dataset, partition) -> None:
    """Byte-identical images (the store's content hashes, already computed): a copy across splits is
    train/test leakage, copies inside a split skew episodes and counts; ``fsad data validate`` refuses the
    first, here both are warnings so a deliberate experiment still runs."""
    from fewshot_core.data.validate import copy_findings  # the validator: not for --help

    if "sha256" not in partition.index:
        return
    sha = dict(zip(partition.index["image_id"], partition.index["sha256"]))
    problems, warnings = copy_findings(dataset.records, lambda r: (sha.get(r.image_id), None))
    for line in problems + warnings:
        print(f"warning: {line}", file=sys.stderr)


def json_rows(rows: list[dict]) -> str:
    """The rows as valid JSON: a value that could not be computed (NaN, e.g. the balanced accuracy without
    a threshold) is ``null``, never the ``NaN`` token JSON parsers refuse."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(rows), indent=2, default=str, allow_nan=False)


def run(args) -> int:
    dataset = dataset_from_args(args)
    for warning in split_class_warnings(dataset.records, f"{dataset.category}"):
        print(f"warning: {warning}", file=sys.stderr)
    entry = registry.get(args.method, protocol=args.protocol)  # the name becomes its entry once, here
    partition = None
    if _needs_features(args.protocol, entry):
        partition = _partition(args, dataset)
        _warn_copies(dataset, partition)
    rows = _rows(args, dataset, partition, entry)
    if args.json:
        print(json_rows(rows))
        return 0
    shown = json.loads(rows[0].get("params", "{}")) if rows else {}
    shown.pop("seed", None)  # follows each row's episode seed
    features = (f"{partition.meta.get('backbone')} @ {'x'.join(map(str, partition.input_shape))}px" if partition
                else "trained on images")
    pool = rows[0].get("meta_pool") if rows else ""
    print(f"{args.protocol} · {dataset.category} · {args.method} · {features} · params "
          f"{json.dumps(shown, sort_keys=True)}" + (f" · meta-trained on {pool}" if pool else ""))
    print(format_table(rows, args.protocol))
    aligned = sum(r.get("align") == "aligned" for r in rows)
    if aligned:  # the default decided it from the support: say so, with the way back
        print(f"parts registered (align={args.align}) in {aligned} of {len(rows)} seeds: rotated and cropped to "
              "their axis before embedding; --align none leaves the images as they are")
    return 0
