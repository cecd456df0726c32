"""The ``fsad`` command. Each sub-command lives in its own module and registers itself here.

Errors meant for users (``FsadError``) print one line on stderr and exit with their code, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fewshot_core.errors import FsadError

# Modules that define ``register(subparsers)``; each adds its sub-commands with ``set_defaults(func=...)``.
_COMMAND_MODULES = (
    "fewshot_core.cli.data",
    "fewshot_core.cli.embed",
    "fewshot_core.cli.evaluate",
    "fewshot_core.cli.run",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsad", description="Few-shot industrial anomaly detection benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # sub-command not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FsadError as exc:
        print(f"fsad: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fsad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
