"""``fsad data``: validate, manifest, download and synth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fewshot_core.cli.args import UniqueValues, file_path, folder
from fewshot_core.data.layouts import add_layout_arguments, load_datasets, source_from_args
from fewshot_core.outputs import require_writable


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset tools: validate, manifest, download, synth")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("validate", help="check a dataset and print per-split/per-defect counts",
                       description="Decode every image and mask and report every problem at once. "
                                   "Exit 0 if usable, 2 with one line per problem otherwise.")
    p.add_argument("root", nargs="?", metavar="ROOT", help="MVTec-layout root (or use the layout flags)")
    p.add_argument("--category", help="only this category (with layout flags: its name)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_layout_arguments(p)
    p.set_defaults(func=_validate)

    p = sub.add_parser("manifest", help="write the image manifest (Parquet)")
    p.add_argument("root", nargs="?", metavar="ROOT", help="MVTec-layout root (or use the layout flags)")
    p.add_argument("out", metavar="OUT.parquet", type=file_path)
    p.add_argument("--category", help="only this category (with layout flags: its name)")
    add_layout_arguments(p)
    p.set_defaults(func=_manifest, write_fix="choose OUT.parquet in a writable folder")

    p = sub.add_parser("download", help="download official MVTec AD categories (checksummed)")
    p.add_argument("root", metavar="ROOT", type=folder)
    p.add_argument("--category", action=UniqueValues, extend=True, nargs="+", default=None, metavar="C",
                   help="categories to fetch (repeatable; default: all 15)")
    p.set_defaults(func=_download, write_fix="pass a writable ROOT (the archive and the categories go there)")

    p = sub.add_parser("synth", help="write a deterministic synthetic MVTec-layout dataset")
    p.add_argument("root", metavar="ROOT", type=folder)
    p.add_argument("--categories", type=int, default=None, metavar="N", help="number of categories")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--size", type=int, default=None, metavar="PX", help="image side in pixels")
    p.set_defaults(func=_synth, write_fix="pass a writable ROOT")


def _validate(args: argparse.Namespace) -> int:
    from fewshot_core.data.validate import validate  # the validator loads for its command, not for --help

    source = source_from_args(args)
    category = args.category if isinstance(source, Path) else None
    report = validate(source, category)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 2
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not report.ok:
        for problem in report.problems:
            print(problem)
        n = len(report.problems)
        print(f"fsad: {n} problem{'s' if n != 1 else ''} found; fix them and re-run `fsad data validate`",
              file=sys.stderr)
        return 2
    print(report.format_counts())
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from fewshot_core.data.manifest import build_manifest, write_manifest  # pandas: not for --help

    require_writable(Path(args.out).absolute().parent, args.write_fix)  # before reading every image
    source = source_from_args(args)
    category = args.category if isinstance(source, Path) else None
    df = build_manifest(load_datasets(source, category))
    out = write_manifest(df, Path(args.out))
    print(f"wrote {len(df)} images ({df['category'].nunique()} categories) to {out}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from fewshot_core.data.download import download_mvtec  # urllib, ssl, tarfile: not on every --help

    download_mvtec(Path(args.root), categories=args.category)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from fewshot_core.data.synth import generate  # the generator loads for its command, not for --help

    given = {k: getattr(args, k) for k in ("categories", "seed", "size") if getattr(args, k) is not None}
    result = generate(Path(args.root), **given)
    names = ", ".join(map(str, result)) if isinstance(result, (list, tuple)) else ""
    print(f"wrote synthetic dataset to {args.root}" + (f": {names}" if names else ""))
    return 0
