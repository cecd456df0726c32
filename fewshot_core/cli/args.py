"""Argument types and actions shared by the sub-commands.

Bad values are refused by argparse itself (one ``fsad <command>: error: ...`` line, exit 2) instead of
surfacing later as a traceback or, worse, a silently skewed result: a repeated seed would repeat its
row and bias mean ± std, a repeated ``--param`` key would silently keep only the last value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_core.errors import FsadError
from fewshot_core.outputs import require_file_path, require_folder
from fewshot_core.sizes import WORKING_SIZE


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def workers(text: str) -> int:
    """Image decoding processes: 0 decodes in the main process."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more (0 decodes images in-process)")
    return value


def folder(text: str) -> Path:
    """A folder to write into (created when missing): refused when it, or a folder above it, is a file."""
    try:
        return require_folder(Path(text), "pass a folder (it is created when missing)")
    except FsadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def file_path(text: str) -> Path:
    """A file to write: refused when it is an existing folder or a folder above it is a file."""
    try:
        return require_file_path(Path(text), "pass a file name, e.g. manifest.parquet")
    except FsadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def first_duplicate(values) -> object | None:
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def stage_indices(text: str) -> tuple[int, ...]:
    """``--layers 2,3``: backbone stage indices, each once."""
    try:
        layers = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give stage indices like 2,3") from None
    if (dup := first_duplicate(layers)) is not None:  # would concatenate the same stage twice
        raise argparse.ArgumentTypeError(f"{text!r}: stage {dup} given twice; give each stage once")
    return layers


class UniqueValues(argparse.Action):
    """``nargs='+'`` (or ``action='extend'``-like with ``extend=True``) that refuses a value given twice."""

    def __init__(self, option_strings, dest, extend: bool = False, **kwargs):
        self.extend = extend
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if self.extend:
            earlier = getattr(namespace, self.dest, None)
            # the default is not a value the user gave: start afresh on the first use
            if earlier is not None and earlier is not self.default:
                values = list(earlier) + values
        dup = first_duplicate(values)
        if dup is not None:
            parser.error(f"argument {option_string}: {dup} given twice; give each value once")
        setattr(namespace, self.dest, values)


class UniqueKeys(argparse.Action):
    """Repeatable ``KEY=VALUE`` option (``type`` returns a (key, value) pair) refusing a key given twice."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        items = [] if earlier is None or earlier is self.default else list(earlier)
        key = values[0]
        if any(k == key for k, _ in items):
            parser.error(f"argument {option_string}: key {key!r} given twice; give each key once")
        setattr(namespace, self.dest, items + [values])


def add_size_arguments(group) -> None:
    """``--image-size`` and ``--aspect``: the working shape of the feature-store partition (one wording for
    every command that builds one)."""
    group.add_argument("--image-size", type=int, default=WORKING_SIZE,
                       help=f"short side of the resize, no crop (default {WORKING_SIZE}; 384 for parts with small "
                            "defects)")
    group.add_argument("--aspect", default="auto", metavar="auto|square|H/W",
                       help="auto (default): keep the category's height/width ratio (its good training images' "
                            "median; near-square images stay square); square: squash every image to a square; "
                            "or a height/width ratio such as 2.5")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are three short lines: a short usage, the error, where help is.

    argparse's own usage block lists every option (a screenful for ``evaluate``) above the one line
    that matters; sub-parsers made by ``add_subparsers`` inherit this class."""

    def short_usage(self) -> str:
        words = []
        for action in self._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:  # positionals and the sub-command choice
                name = action.metavar or ("COMMAND" if isinstance(action, argparse._SubParsersAction) else action.dest)
                optional = action.nargs in ("?", "*") or (isinstance(action, argparse._SubParsersAction)
                                                          and not action.required)
                words.append(f"[{name}]" if optional else str(name) + (" ..." if action.nargs == "+" else ""))
            elif action.required:
                words.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
        if any(a.option_strings and not a.required and not isinstance(a, argparse._HelpAction)
               for a in self._actions):
            words.append("[options]")
        return f"usage: {self.prog} {' '.join(words)}".rstrip()

    def error(self, message: str):
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\nsee `{self.prog} --help`\n")
