"""Which methods a sweep runs and under which settings. Every question about a method's kind goes to
``fewshot_core.methods.registry``; no method name is tested here or anywhere else in ``pipelines``."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from fewshot_core.methods import registry
from fewshot_core.settings import Setting

# Methods the default sweep runs when they exist, in this order: cheap from cached features. The trained
# detectors (minutes of training per episode on a CPU) and the meta-trained learners join through a config
# file, e.g. ``- {id: efficientad, method: efficientad, params: {steps: 300}}``.
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
class MethodSpec:
    """A method as the sweep runs it. ``protocol`` defaults to the method's family; a one-class method on
    patch features may be given ``protocol: supervised`` to run on the good shots of the binary settings."""

    id: str
    method: str
    params: dict = field(default_factory=dict)
    protocol_override: str | None = None
    meta_pool: str | None = None  # meta-trained methods: categories | synthetic[:N] | another root's path

    @cached_property
    def entry(self):
        """The registry's ``MethodEntry``: the sweep turns the method's name into it once, here."""
        return registry.get(self.method)

    @property
    def protocol(self) -> str:
        return self.protocol_override or self.entry.family

    @property
    def input_kind(self) -> str:
        return self.entry.input_kind

    def runs(self, setting: Setting) -> bool:
        """Whether this method answers ``setting`` (its protocol, and a label mode it can name)."""
        if setting.protocol != self.protocol:
            return False
        return setting.label_mode is None or setting.label_mode in self.entry.label_modes


def default_specs() -> list[MethodSpec]:
    """``DEFAULT_METHODS`` that the registry knows."""
    known = set(registry.names())
    return [MethodSpec(m["id"], m["method"], dict(m.get("params", {})), m.get("protocol"))
            for m in DEFAULT_METHODS if m["method"] in known]
