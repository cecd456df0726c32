"""``fsad store verify``: check every feature-store partition against the checksums in its ``meta.json``."""

from __future__ import annotations

from fewshot_core.cli.args import folder
from fewshot_core.errors import FsadError


def register(subparsers) -> None:
    p = subparsers.add_parser("store", help="inspect the feature store",
                              description="Feature-store maintenance.")
    sub = p.add_subparsers(dest="store_command", required=True)
    v = sub.add_parser("verify", help="hash every partition's files against meta.json",
                       description="Verify every block of every partition's files against the checksums "
                                   "recorded when it was built. Exit 0 when all are intact, 1 when any is "
                                   "damaged (the next `fsad embed` or evaluation rebuilds it).")
    v.add_argument("--store", type=folder, default=None, help="feature store folder (default $FSAD_HOME/features)")
    v.add_argument("--quick", action="store_true",
                   help="the cheap check done on every load (sizes and sampled blocks) instead of every block")
    v.set_defaults(func=run_verify)


def run_verify(args) -> int:
    from fewshot_core.features.store import FeatureStore  # torch: not for --help

    store = FeatureStore(args.store)
    if not store.root.is_dir():
        raise FsadError(f"{store.root}: no feature store here; pass --store DIR or build one with `fsad embed`")
    results = store.verify(full=not args.quick)
    damaged = 0
    for key, problems in results.items():
        if problems:
            damaged += 1
            print(f"DAMAGED {key}: {'; '.join(problems)}")
        else:
            print(f"ok      {key}")
    how = "sampled" if args.quick else "every block"
    print(f"{len(results)} partitions in {store.root}, {damaged} damaged ({how} verified)"
          + ("; the next build of each rebuilds it" if damaged else ""))
    return 1 if damaged else 0
