"""The sweep configuration: which data, categories, backbones, methods, shots, ratios and seeds.

The default (no file) is the embedded demo: synthetic data (or ``MVTEC_ROOT`` when set), the offline
EfficientNet-Lite2 backbone, the fast methods that exist, a small shots grid and two seeds, so that
``fsad run`` finishes in a few minutes on a laptop CPU. A YAML file (``fsad run --config FILE`` or the
``FSAD_SWEEP_CONFIG`` environment variable for ``dagster dev``) overrides any field, e.g.::

    name: bottle-sweep
    data: {source: mvtec, root: ../shared/data/mvtec_ad, categories: [bottle]}
    # or your own folders, one layout YAML per category (image-level when it names no masks):
    # data: {source: layout, layouts: [parts/housing.yaml, parts/gasket.yaml]}
    backbones: [tf_efficientnet_lite2]
    image_size: 224     # the short side; aspect: auto (each category's own height/width), square, or a ratio
    oneclass: {shots: [1, 2, 4, 8], seeds: [0, 1, 2, 3, 4]}
    supervised: {ratios: [[1, 1], [5, 1], [10, 1]], label_modes: [binary, multiclass], seeds: [0, 1, 2]}
    transductive: {shots: [0, 1], seeds: [0, 1]}   # for transductive methods (musc): 0 = test images only
    methods:
      - {id: patchcore, method: patchcore}
      - {id: protonet-cosine, method: protonet, params: {distance: cosine}}
      # meta-trained methods learn from other categories: the sweep's (default; generated ones when it has
      # only one), generated ones (synthetic or synthetic:N), or another root's (a path)
      - {id: caml, method: caml, meta_pool: synthetic}
      - {id: musc, method: musc}     # transductive: scores the test images against each other
    # the champion per category: best mean metric over seeds at the largest (or given) shot count
    champion: {metric: balanced_accuracy, tiebreak: image_auroc, protocol: oneclass, shots: null}
    # the full-data model per category, registered as fsad-<category>@full-data (null: none)
    full_data: {method: patchcore, params: {}, backbone: null}

Every key is checked (``pipelines/sweep_schema.py``): an unknown or misspelt key, a non-integer shot or a
repeated value is refused in one line. ``image_size`` left out means the library's working size
(``fewshot_core.sizes.WORKING_SIZE``, the methods' standard) on real data and a 112 px quick look on the
synthetic demo (the report header says which). Setting keys (``fewshot_core.settings``) name one few-shot
setting with its seed: ``oc-k4-s0``, ``sup-g10b1-bin-s0``, ``td-k0-s0``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from fewshot_core.errors import FsadError
from fewshot_core.evaluation import meta_pool as pools
from fewshot_core.methods import registry
from fewshot_core.paths import dagster_home
from fewshot_core.settings import ONECLASS, SUPERVISED, TRANSDUCTIVE, Setting
from fewshot_core.sizes import WORKING_SIZE
from pipelines.methods import MethodSpec, default_specs
from pipelines.sweep_schema import SweepFile, describe

STANDARD_IMAGE_SIZE = WORKING_SIZE  # the library's default: the resolution the methods' papers report at
QUICK_LOOK_IMAGE_SIZE = 112  # the synthetic demo: minutes on a laptop CPU (the pipeline's own choice)


@dataclass
class SweepConfig:
    name: str = "fsad-default"
    # data.source: auto (MVTEC_ROOT when set, else synthetic) | synthetic | mvtec | download | layout
    data_source: str = "auto"
    data_root: str | None = None
    data_layouts: list[str] | None = None  # source "layout": one layout YAML per category (fewshot_core.data.layouts)
    categories: list[str] | None = None  # None: every category found under the root
    synth: dict = field(default_factory=lambda: SweepFile().data.synth.model_dump())
    backbones: list[str] = field(default_factory=lambda: list(SweepFile().backbones))
    image_size: int | None = None  # None: STANDARD_IMAGE_SIZE on real data, QUICK_LOOK_IMAGE_SIZE on synthetic
    aspect: str | float = "auto"  # the long side: the category's own aspect, "square", or a height/width ratio
    # the grids: the sweep file's defaults (pipelines/sweep_schema.py), the one place they are set
    shots: list[int] = field(default_factory=lambda: list(SweepFile().oneclass.shots))
    oneclass_seeds: list[int] = field(default_factory=lambda: list(SweepFile().oneclass.seeds))
    ratios: list[tuple[int, int]] = field(default_factory=lambda: [tuple(r) for r in SweepFile().supervised.ratios])
    label_modes: list[str] = field(default_factory=lambda: list(SweepFile().supervised.label_modes))
    supervised_seeds: list[int] = field(default_factory=lambda: list(SweepFile().supervised.seeds))
    transductive_shots: list[int] = field(default_factory=lambda: list(SweepFile().transductive.shots))  # 0: none
    transductive_seeds: list[int] = field(default_factory=lambda: list(SweepFile().transductive.seeds))
    methods: list[MethodSpec] | None = None  # None: the default methods that exist
    # the champion per category (ChampionCriterion fields): default balanced accuracy at the largest shot count
    champion: dict = field(default_factory=dict)
    # the full-data model per category ({method, params, backbone}); None: not built
    full_data: dict | None = field(default_factory=lambda: SweepFile().full_data.model_dump())
    work_dir: str | None = None  # feature store, tables, report; default <dagster_home>/fsad
    source_file: str | None = None

    # -- derived ------------------------------------------------------------------------------------
    def resolved_source(self) -> str:
        """``auto`` is ``mvtec`` when a root or MVTEC_ROOT is given, else ``synthetic``."""
        if self.data_source != "auto":
            return self.data_source
        return "mvtec" if (self.data_root or os.environ.get("MVTEC_ROOT")) else "synthetic"

    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return int(self.image_size)
        return QUICK_LOOK_IMAGE_SIZE if self.resolved_source() == "synthetic" else STANDARD_IMAGE_SIZE

    def image_size_note(self) -> str:
        """What the report header says about the resolution."""
        size = self.resolved_image_size()
        if size == STANDARD_IMAGE_SIZE:
            return f"{size} px (the methods' standard resolution)"
        return f"{size} px (quick look: numbers not comparable with papers at {STANDARD_IMAGE_SIZE} px)"

    def oneclass_settings(self) -> list[Setting]:
        return [Setting(ONECLASS, k, 0, s) for k in self.shots for s in self.oneclass_seeds]

    def supervised_settings(self) -> list[Setting]:
        return [Setting(SUPERVISED, g, b, s, mode) for mode in self.label_modes for g, b in self.ratios
                for s in self.supervised_seeds]

    def transductive_settings(self) -> list[Setting]:
        return [Setting(TRANSDUCTIVE, k, 0, s) for k in self.transductive_shots for s in self.transductive_seeds]

    def all_settings(self) -> list[Setting]:
        """Every protocol's grid, in one order (the banks' partitions follow it)."""
        return self.oneclass_settings() + self.supervised_settings() + self.transductive_settings()

    def settings_for(self, spec: MethodSpec) -> list[Setting]:
        """The settings ``spec`` runs: its protocol's grid, in the label modes the method can answer."""
        return [s for s in self.all_settings() if spec.runs(s)]

    def method_specs(self) -> list[MethodSpec]:
        return list(self.methods) if self.methods is not None else default_specs()

    def full_data_backbone(self) -> str | None:
        if self.full_data is None:
            return None
        return self.full_data.get("backbone") or self.backbones[0]

    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else dagster_home() / "fsad"


def _fail(path, problem: str, fix: str):
    raise FsadError(f"{path}: {problem}; {fix}")


def load_config(path: str | Path | None = None) -> SweepConfig:
    """The default sweep, overridden by the YAML file ``path`` (or ``FSAD_SWEEP_CONFIG``) when given."""
    path = path or os.environ.get("FSAD_SWEEP_CONFIG") or None
    if path is None:
        return SweepConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        _fail(path, "sweep config not found", "pass an existing YAML file with --config")
    except yaml.YAMLError as exc:
        _fail(path, f"not valid YAML ({str(exc).splitlines()[0]})", "fix the syntax")
    if not isinstance(raw, dict):
        _fail(path, "top level must be a mapping", "write `key: value` lines (see pipelines/config.py)")
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as exc:
        _fail(path, *describe(exc))
    return _from_file(sweep, path)


def _from_file(sweep: SweepFile, path: Path) -> SweepConfig:
    """Relative paths resolve against the YAML file's folder; methods are checked against the registry."""
    base = path.resolve().parent
    resolve = lambda p: str((base / os.path.expanduser(str(p))).resolve())  # noqa: E731
    data = sweep.data
    if data.source == "layout" and not data.layouts:
        _fail(path, "data.source layout needs data.layouts", "list one layout YAML per category "
              "(keys: name, good_dir, defect_dirs, ...; see fewshot_core/data/layouts.py)")
    methods = None
    if sweep.methods is not None:
        methods = []
        for item in sweep.methods:
            if item.method not in registry.names():
                _fail(path, f"unknown method {item.method!r}", f"choose from {', '.join(registry.names())}")
            pool = item.meta_pool
            if pool is not None:
                source = pools.parse_source(pool, others="categories", base=base,
                                            where=f"{path}: method {item.id or item.method}: meta_pool")
                pool = str(source.root) if source.kind == "root" else pool
            spec = MethodSpec(item.id or item.method, item.method, dict(item.params), item.protocol, pool)
            if pool is not None and not spec.entry.meta_pool:
                _fail(path, f"method {spec.id}: meta_pool is for meta-trained methods", "remove the meta_pool key")
            if spec.protocol not in spec.entry.protocols:
                _fail(path, f"method {spec.id}: protocol {spec.protocol} not available for {spec.method}",
                      f"use protocol: {' or '.join(spec.entry.protocols)}")
            methods.append(spec)
    full_data = sweep.full_data.model_dump() if sweep.full_data is not None else None
    if full_data is not None:
        method = full_data["method"]
        if method not in registry.names():
            _fail(path, f"full_data.method {method!r} is unknown", f"choose from {', '.join(registry.names())}")
        entry = registry.get(method)
        if registry.ONECLASS not in entry.protocols or entry.input_kind == registry.IMAGES:
            _fail(path, f"full_data.method {method!r} is not a feature-based one-class detector",
                  "use patchcore, knn or ldknn, or full_data: null to build none")
        if full_data["backbone"] is not None and full_data["backbone"] not in sweep.backbones:
            _fail(path, f"full_data.backbone {full_data['backbone']!r} is not one of the sweep's backbones",
                  f"use one of {', '.join(sweep.backbones)}")
    return SweepConfig(
        name=sweep.name, data_source=data.source, data_root=resolve(data.root) if data.root else None,
        data_layouts=[resolve(f) for f in data.layouts] if data.source == "layout" else None,
        categories=list(data.categories) if data.categories is not None else None,
        synth=data.synth.model_dump(), backbones=list(sweep.backbones), image_size=sweep.image_size,
        aspect=sweep.aspect,
        shots=list(sweep.oneclass.shots), oneclass_seeds=list(sweep.oneclass.seeds),
        ratios=[tuple(r) for r in sweep.supervised.ratios], label_modes=list(sweep.supervised.label_modes),
        supervised_seeds=list(sweep.supervised.seeds), transductive_shots=list(sweep.transductive.shots),
        transductive_seeds=list(sweep.transductive.seeds), methods=methods,
        champion=sweep.champion.model_dump(), full_data=full_data,
        work_dir=resolve(sweep.work_dir) if sweep.work_dir else None, source_file=str(path.resolve()))
