"""The sweep configuration: which data, categories, backbones, methods, shots, ratios and seeds.

The default (no file) is the embedded demo: synthetic data (or ``MVTEC_ROOT`` when set), the offline
EfficientNet-Lite0 backbone, the fast methods that exist, a small shots grid and two seeds, so that
``fsad run`` finishes in a few minutes on a laptop CPU. A YAML file (``fsad run --config FILE`` or the
``FSAD_SWEEP_CONFIG`` environment variable for ``dagster dev``) overrides any field, e.g.::

    name: bottle-sweep
    data: {source: mvtec, root: ../shared/data/mvtec_ad, categories: [bottle]}
    # or your own folders, one layout YAML per category (image-level when it names no masks):
    # data: {source: layout, layouts: [parts/housing.yaml, parts/gasket.yaml]}
    backbones: [tf_efficientnet_lite0]
    image_size: 224
    oneclass: {shots: [1, 2, 4, 8], seeds: [0, 1, 2, 3, 4]}
    supervised: {ratios: [[1, 1], [5, 1], [10, 1]], label_modes: [binary, multiclass], seeds: [0, 1, 2]}
    methods:
      - {id: patchcore, method: patchcore}
      - {id: protonet-cosine, method: protonet, params: {distance: cosine}}

Setting keys (one Dagster partition dimension) encode protocol, shots, good:bad ratio, label mode and seed:
``oc-k4-s0`` (one-class, 4 good shots, seed 0) and ``sup-g10b1-bin-s0`` (supervised, 10 good : 1 bad,
binary labels, seed 0).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fewshot_core.errors import FsadError
from fewshot_core.paths import PROJECT_ROOT

ONECLASS = "oneclass"
SUPERVISED = "supervised"
LABEL_MODE_CODES = {"binary": "bin", "multiclass": "multi"}
_CODE_TO_MODE = {v: k for k, v in LABEL_MODE_CODES.items()}
_OC_RE = re.compile(r"^oc-k(\d+)-s(\d+)$")
_SUP_RE = re.compile(r"^sup-g(\d+)b(\d+)-(bin|multi)-s(\d+)$")

# Methods the default job runs when they exist, in this order: cheap from cached features. The trained
# detectors (efficientad, glass, reb: minutes of training per episode on a CPU) and the meta-trained ones
# (pmf, caml) join through a config file, e.g. ``- {id: efficientad, method: efficientad, params: {steps: 300}}``.
DEFAULT_METHODS = (
    {"id": "patchcore", "method": "patchcore"},
    {"id": "knn", "method": "knn"},
    {"id": "ldknn", "method": "ldknn"},
    {"id": "protonet-euclidean", "method": "protonet", "params": {"distance": "euclidean"}},
    {"id": "protonet-cosine", "method": "protonet", "params": {"distance": "cosine"}},
    # PatchCore on the good shots of the same supervised binary episodes: few-shot learning and the
    # one-class anomaly detector side by side in one table (the thesis's first research question)
    {"id": "patchcore-supervised", "method": "patchcore", "protocol": "supervised"},
)


@dataclass(frozen=True)
class Setting:
    """One few-shot setting including its seed; ``key`` is the partition key."""

    protocol: str
    k_good: int
    k_bad: int
    seed: int
    label_mode: str | None = None

    @property
    def key(self) -> str:
        if self.protocol == ONECLASS:
            return f"oc-k{self.k_good}-s{self.seed}"
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
        raise FsadError(f"setting {key!r}: not a setting key; use oc-k<shots>-s<seed> or "
                        "sup-g<good>b<bad>-bin|multi-s<seed>")


def supervised_method_names() -> set[str]:
    """Methods the supervised protocol runs (supervised learners and one-class methods on patch features)."""
    from fewshot_core.methods import registry

    return set(registry.names(protocol=registry.SUPERVISED))


def image_method_names() -> set[str]:
    """One-class methods trained on the support images (EfficientAD, GLASS, REB), not on cached features."""
    from fewshot_core.methods import registry

    return set(registry.names(family=registry.ONECLASS, input_kind=registry.IMAGES))


def known_methods() -> set[str]:
    from fewshot_core.methods import registry

    return set(registry.names())


@dataclass(frozen=True)
class MethodSpec:
    """A method as the sweep runs it. ``protocol`` defaults to the method's family; a one-class method
    may be given ``protocol: supervised`` to run on the good shots of the supervised binary settings."""

    id: str
    method: str
    params: dict = field(default_factory=dict)
    protocol_override: str | None = None

    @property
    def protocol(self) -> str:
        from fewshot_core.methods import registry

        if self.protocol_override:
            return self.protocol_override
        return registry.get(self.method).family


@dataclass
class SweepConfig:
    name: str = "fsad-default"
    # data.source: auto (MVTEC_ROOT when set, else synthetic) | synthetic | mvtec | download | layout
    data_source: str = "auto"
    data_root: str | None = None
    data_layouts: list[str] | None = None  # source "layout": one layout YAML per category (fewshot_core.data.layouts)
    categories: list[str] | None = None  # None: every category found under the root
    synth: dict = field(default_factory=lambda: {"categories": 2, "seed": 0, "size": 112, "n_train": 12,
                                                  "n_test_good": 6, "n_test_per_defect": 3})
    backbones: list[str] = field(default_factory=lambda: ["tf_efficientnet_lite0"])
    image_size: int = 112
    shots: list[int] = field(default_factory=lambda: [1, 2, 4])
    oneclass_seeds: list[int] = field(default_factory=lambda: [0, 1])
    ratios: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1), (3, 1), (1, 2), (3, 2)])
    label_modes: list[str] = field(default_factory=lambda: ["binary", "multiclass"])
    supervised_seeds: list[int] = field(default_factory=lambda: [0, 1])
    methods: list[MethodSpec] | None = None  # None: DEFAULT_METHODS that exist
    work_dir: str | None = None  # feature store, tables, report; default <dagster_home>/fsad
    source_file: str | None = None

    # -- derived ------------------------------------------------------------------------------------
    def oneclass_settings(self) -> list[Setting]:
        return [Setting(ONECLASS, k, 0, s) for k in self.shots for s in self.oneclass_seeds]

    def supervised_settings(self) -> list[Setting]:
        return [Setting(SUPERVISED, g, b, s, mode) for mode in self.label_modes for g, b in self.ratios
                for s in self.supervised_seeds]

    def method_specs(self) -> list[MethodSpec]:
        if self.methods is not None:
            return list(self.methods)
        known = known_methods()
        return [MethodSpec(m["id"], m["method"], dict(m.get("params", {})), m.get("protocol"))
                for m in DEFAULT_METHODS if m["method"] in known]

    def resolved_work_dir(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        home = Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / "dagster_home")
        return home / "fsad"


def _fail(path, problem: str, fix: str):
    raise FsadError(f"{path}: {problem}; {fix}")


def load_config(path: str | Path | None = None) -> SweepConfig:
    """The default sweep, overridden by the YAML file ``path`` (or ``FSAD_SWEEP_CONFIG``) when given."""
    path = path or os.environ.get("FSAD_SWEEP_CONFIG") or None
    cfg = SweepConfig()
    if path is None:
        return cfg
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        _fail(path, "sweep config not found", "pass an existing YAML file with --config")
    except yaml.YAMLError as exc:
        _fail(path, f"not valid YAML ({str(exc).splitlines()[0]})", "fix the syntax")
    if not isinstance(raw, dict):
        _fail(path, "top level must be a mapping", "write `key: value` lines (see pipelines/config.py)")
    known = {"name", "data", "backbones", "image_size", "oneclass", "supervised", "methods", "work_dir"}
    if unknown := sorted(set(raw) - known):
        _fail(path, f"unknown key(s) {', '.join(unknown)}", f"use only {', '.join(sorted(known))}")
    cfg.source_file = str(path.resolve())
    base = path.resolve().parent
    try:
        cfg.name = str(raw.get("name", cfg.name))
        data = raw.get("data", {}) or {}
        cfg.data_source = str(data.get("source", cfg.data_source))
        if cfg.data_source not in ("auto", "synthetic", "mvtec", "download", "layout"):
            _fail(path, f"data.source {cfg.data_source!r} unknown", "use auto, synthetic, mvtec, download or layout")
        if cfg.data_source == "layout":
            if not data.get("layouts"):
                _fail(path, "data.source layout needs data.layouts", "list one layout YAML per category "
                      "(keys: name, good_dir, defect_dirs, ...; see fewshot_core/data/layouts.py)")
            cfg.data_layouts = [str((base / os.path.expanduser(str(f))).resolve()) for f in data["layouts"]]
        if data.get("root"):
            cfg.data_root = str((base / Path(os.path.expanduser(str(data["root"])))).resolve())
        if data.get("categories") is not None:
            cfg.categories = [str(c) for c in data["categories"]]
        cfg.synth.update(data.get("synth", {}) or {})
        if "backbones" in raw:
            cfg.backbones = [str(b) for b in raw["backbones"]]
        cfg.image_size = int(raw.get("image_size", cfg.image_size))
        oc = raw.get("oneclass", {}) or {}
        cfg.shots = [int(k) for k in oc.get("shots", cfg.shots)]
        cfg.oneclass_seeds = [int(s) for s in oc.get("seeds", cfg.oneclass_seeds)]
        sup = raw.get("supervised", {}) or {}
        cfg.ratios = [(int(g), int(b)) for g, b in sup.get("ratios", cfg.ratios)]
        cfg.label_modes = [str(m) for m in sup.get("label_modes", cfg.label_modes)]
        cfg.supervised_seeds = [int(s) for s in sup.get("seeds", cfg.supervised_seeds)]
        if raw.get("methods") is not None:
            cfg.methods = [MethodSpec(str(m.get("id", m["method"])), str(m["method"]), dict(m.get("params") or {}),
                                      m.get("protocol"))
                           for m in raw["methods"]]
        if raw.get("work_dir"):
            cfg.work_dir = str((base / str(raw["work_dir"])).resolve())
    except FsadError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        _fail(path, f"malformed value ({type(exc).__name__}: {exc})", "compare with the example in pipelines/config.py")
    if bad := [m for m in cfg.label_modes if m not in LABEL_MODE_CODES]:
        _fail(path, f"supervised.label_modes {bad} unknown", "use binary and/or multiclass")
    if any(k < 1 for k in cfg.shots) or any(g < 1 or b < 0 for g, b in cfg.ratios):
        _fail(path, "shots must be >= 1 and ratios [good >= 1, bad >= 0]", "fix oneclass.shots / supervised.ratios")
    from fewshot_core.methods import registry

    known = known_methods()
    if unknown := [m.method for m in cfg.method_specs() if m.method not in known]:
        _fail(path, f"unknown method(s) {', '.join(unknown)}", f"choose from {', '.join(sorted(known))}")
    if bad := [m.id for m in cfg.method_specs() if m.protocol not in (ONECLASS, SUPERVISED)
               or m.protocol not in registry.get(m.method).protocols]:
        _fail(path, f"methods {bad}: protocol must be oneclass (one-class methods only) or supervised",
              "fix their protocol: field")
    ids = [m.id for m in cfg.method_specs()]
    if len(set(ids)) != len(ids) or any(not re.fullmatch(r"[A-Za-z0-9_\-]+", i) for i in ids):
        _fail(path, f"method ids {ids} must be unique and use letters, digits, - and _", "rename the duplicates")
    return cfg
