"""Few-shot setting keys: the one codec for protocol, shots, good:bad ratio, label mode and seed.

``oc-k4-s0`` is the one-class protocol with 4 good shots and seed 0; ``sup-g10b1-bin-s0`` the supervised
protocol with 10 good : 1 bad shots per class, binary labels, seed 0; ``td-k0-s0`` the transductive
protocol with no good shot (the test images scored against each other) and seed 0. The pipeline uses the
key as a Dagster partition key, the report groups seeds by ``Setting.name`` (the key without its seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fewshot_core.errors import FsadError
from fewshot_core.schema import Protocol

ONECLASS = Protocol.ONECLASS
SUPERVISED = Protocol.SUPERVISED
TRANSDUCTIVE = Protocol.TRANSDUCTIVE
LABEL_MODE_CODES = {"binary": "bin", "multiclass": "multi"}
_CODE_TO_MODE = {v: k for k, v in LABEL_MODE_CODES.items()}
_OC_RE = re.compile(r"^oc-k(\d+)-s(\d+)$")
_SUP_RE = re.compile(r"^sup-g(\d+)b(\d+)-(bin|multi)-s(\d+)$")
_TD_RE = re.compile(r"^td-k(\d+)-s(\d+)$")


@dataclass(frozen=True)
class Setting:
    """One few-shot setting including its seed; ``key`` is its string form."""

    protocol: str
    k_good: int
    k_bad: int
    seed: int
    label_mode: str | None = None

    @property
    def key(self) -> str:
        if self.protocol == ONECLASS:
            return f"oc-k{self.k_good}-s{self.seed}"
        if self.protocol == TRANSDUCTIVE:
            return f"td-k{self.k_good}-s{self.seed}"
        return f"sup-g{self.k_good}b{self.k_bad}-{LABEL_MODE_CODES[self.label_mode]}-s{self.seed}"

    @property
    def name(self) -> str:
        """The seed-free setting name, used to group seeds in the report."""
        return self.key.rsplit("-s", 1)[0]

    @classmethod
    def parse(cls, key: str) -> Setting:
        if m := _OC_RE.match(key):
            return cls(ONECLASS, int(m[1]), 0, int(m[2]))
        if m := _SUP_RE.match(key):
            return cls(SUPERVISED, int(m[1]), int(m[2]), int(m[4]), _CODE_TO_MODE[m[3]])
        if m := _TD_RE.match(key):
            return cls(TRANSDUCTIVE, int(m[1]), 0, int(m[2]))
        raise FsadError(f"setting {key!r}: not a setting key; use oc-k<shots>-s<seed>, "
                        "sup-g<good>b<bad>-bin|multi-s<seed> or td-k<shots>-s<seed>")
