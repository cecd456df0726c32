"""Argument types and actions shared by the sub-commands.

Bad values are refused by argparse itself (one ``fsad <command>: error: ...`` line, exit 2) instead of
surfacing later as a traceback or, worse, a silently skewed result: a repeated seed would repeat its
row and bias mean ± std, a repeated ``--param`` key would silently keep only the last value.
"""

from __future__ import annotations

import argparse


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


def first_duplicate(values) -> object | None:
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


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
    group.add_argument("--image-size", type=int, default=256,
                       help="short side of the resize, no crop (default 256; 384 for parts with small defects)")
    group.add_argument("--aspect", default="auto", metavar="auto|square|H/W",
                       help="auto (default): keep the category's height/width ratio (its good training images' "
                            "median; near-square images stay square); square: squash every image to a square; "
                            "or a height/width ratio such as 2.5")
