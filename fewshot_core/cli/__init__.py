"""The ``fsad`` command. Each sub-command lives in its own module and registers itself here.

The library's own commands are listed below; packages built on it (the Dagster pipeline's ``run`` and
``mlflow-ui``) add theirs through the ``fsad.commands`` entry-point group, so this package never imports
them. Errors meant for users (``FsadError``) print one line on stderr and exit with their code, never a
traceback. So do write failures (read-only folder, no permission, full disk) that reach the top: the line
names the folder and the fix the sub-command registered as ``write_fix``; and so does a file met where a
folder belongs (or the reverse). Argument errors show a short usage line and where help is
(``cli.args.Parser``), not argparse's full usage block.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from fewshot_core.cli.args import Parser
from fewshot_core.errors import FsadError
from fewshot_core.outputs import is_write_error, path_kind_error, write_error
from fewshot_core.paths import default_store_dir

# Modules that define ``register(subparsers)``; each adds its sub-commands with ``set_defaults(func=...)``.
_COMMAND_MODULES = (
    "fewshot_core.cli.data",
    "fewshot_core.cli.embed",
    "fewshot_core.cli.evaluate",
    "fewshot_core.cli.predict",
    "fewshot_core.cli.store",
)
ENTRY_POINT_GROUP = "fsad.commands"  # value: "module:register"


def _registrars():
    yield from (importlib.import_module(name).register for name in _COMMAND_MODULES)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        yield ep.load()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fsad", description="Few-shot industrial anomaly detection benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    return parser


def _output_folder(args: argparse.Namespace):
    """Where a command writes, for a write error that names no file (a full disk fails in ``write()``)."""
    for attr in ("out", "store", "dagster_home"):
        if getattr(args, attr, None):
            return getattr(args, attr)
    if args.command in ("embed", "evaluate"):
        return default_store_dir()
    return getattr(args, "root", None) if args.command == "data" else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and not any(entry_points(group=ENTRY_POINT_GROUP)):
        known = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        if argv[0] not in known:  # e.g. `run` from a checkout whose install predates the entry point
            print(f"fsad: error: unknown command {argv[0]!r} and no {ENTRY_POINT_GROUP} entry points are "
                  "installed; reinstall fsad (pip install -e .) to register the pipeline's commands", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FsadError as exc:
        print(f"fsad: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if (mixed := path_kind_error(exc, getattr(args, "write_fix", None))) is not None:
            print(f"fsad: error: {mixed}", file=sys.stderr)
            return mixed.exit_code
        if not is_write_error(exc):
            raise
        err = write_error(exc, exc.filename or _output_folder(args), getattr(args, "write_fix", None))
        print(f"fsad: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fsad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
