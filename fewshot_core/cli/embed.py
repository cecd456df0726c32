"""``fsad embed``: build (or reuse) the feature-store partition of one category."""

from __future__ import annotations

from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.cli.args import add_size_arguments, folder, positive_int, stage_indices, workers
from fewshot_core.data.layouts import add_layout_arguments, dataset_from_args
from fewshot_core.errors import FsadError


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="extract and cache patch + global features for one category",
                              description="Embed every image of a category (train and test) once into the "
                                          "feature store; a second call returns the cached partition.")
    p.add_argument("root", nargs="?", metavar="ROOT",
                   help="MVTec-layout root holding <category>/train, <category>/test (or use the layout flags)")
    p.add_argument("--category", help="category to embed (with layout flags: its name)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm model name (default {DEFAULT_BACKBONE})")
    add_size_arguments(p)
    p.add_argument("--layers", type=stage_indices, default=None,
                   help="stage indices into the backbone's feature_info, e.g. 2,3 (default: stride 8 and 16)")
    p.add_argument("--patch-dim", type=int, default=None,
                   help="reduce patch features to this many dims (default: keep the concatenation)")
    p.add_argument("--weights", default="auto",
                   help="auto (bundled Lite0-2 or timm download), a local checkpoint PATH, or random")
    p.add_argument("--store", type=folder, default=None, help="feature store folder (default $FSAD_HOME/features)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--num-workers", type=workers, default=2, help="image decoding processes (0 = in-process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_layout_arguments(p)
    p.set_defaults(func=run, write_fix="pass --store DIR (or set FSAD_HOME) to a writable folder")


def run(args) -> int:
    from fewshot_core.features.store import EmbedCompute, FeatureSpec, FeatureStore  # torch: not for --help

    if args.batch_size < 1 or args.num_workers < 0:
        raise FsadError(f"--batch-size {args.batch_size} / --num-workers {args.num_workers}: "
                        f"need batch size >= 1 and workers >= 0")
    dataset = dataset_from_args(args)
    store = FeatureStore(args.store)
    spec = FeatureSpec(backbone=args.backbone, image_size=args.image_size, layers=args.layers, weights=args.weights,
                       patch_dim=args.patch_dim, aspect=args.aspect)
    part = store.build(dataset, spec, EmbedCompute(batch_size=args.batch_size, num_workers=args.num_workers,
                                                   device=args.device, progress=not args.no_progress))
    meta = part.meta
    shape = f"input {part.input_shape[0]}x{part.input_shape[1]} px, grid {part.grid[0]}x{part.grid[1]} (stride {part.stride}) x {part.patch_dim}-d patches, {meta['global_dim']}-d global"
    flag = "  [RANDOM WEIGHTS]" if part.is_random else ""
    if part.cache_hit:
        print(f"cache hit: {part.key} ({len(part)} images, {shape}) already at {part.path}; nothing recomputed{flag}")
    else:
        build = meta["build"]
        print(f"built {part.key}: {len(part)} images in {build['seconds']:.1f} s = {build['images_per_s']:.2f} images/s "
              f"on {build['device']}; {shape}; weights {meta['weights']['source']} "
              f"sha256 {str(meta['weights']['sha256'])[:12]}; -> {part.path}{flag}")
    return 0
