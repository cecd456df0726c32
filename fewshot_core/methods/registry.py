"""The method registry: one entry per method, and every question about a method is asked here.

An entry says what a method *is* (family, input kind, which label modes it can answer) and how to build
it; protocols, the CLI, the sweep schema and the pipeline ask the registry instead of testing names.
The class is imported only when the method is built, so heavy dependencies load lazily.

Adding a method: write ``methods/<name>.py`` (see docs/architecture.md) and add one ``MethodEntry`` below
(or ``register`` it from outside the package). This module imports nothing heavy: ``fsad --help`` lists
the names from it without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

from fewshot_core.errors import FsadError
from fewshot_core.schema import Protocol

Family = Protocol  # a method's family is the protocol it answers (the names live in fewshot_core/schema.py)
InputKind = Literal["patches", "embeddings", "images"]
ONECLASS = Protocol.ONECLASS
SUPERVISED = Protocol.SUPERVISED
TRANSDUCTIVE = Protocol.TRANSDUCTIVE  # scores the unlabeled test images against each other (own protocol)
PATCHES: InputKind = "patches"  # the store's patch features [n, h, w, d]
EMBEDDINGS: InputKind = "embeddings"  # the store's global embeddings [n, D]
IMAGES: InputKind = "images"  # pixels, float [n, 3, S, S] in [0, 1] (the method trains on them)


@dataclass(frozen=True)
class MethodEntry:
    """What the registry knows of one method.

    ``family``: ``oneclass`` methods fit on good images and score anomalies; ``supervised`` ones fit on
    labelled good and defective shots and classify; ``transductive`` ones score the unlabeled test
    images against each other (optionally with good shots) under their own protocol. A one-class method on patch features also runs under
    the supervised protocol (binary only, fitted on the good shots). ``factory`` is ``"module:Class"``;
    ``defaults`` are parameters the protocols pass unless the user overrides them.
    """

    name: str
    family: Family
    input_kind: InputKind
    factory: str
    summary: str
    defaults: dict = field(default_factory=dict)
    paper: str = ""
    # meta-trains on other categories before an episode (``meta_fit(pool, exclude=category)``): the protocol
    # hands it a pool unless it is given a checkpoint. The one source of this fact (CLI, protocol, sweep).
    meta_pool: bool = False
    # the one-class protocol's support augmentation when the caller asks for "auto" (small supports only;
    # chosen on benchmarks/hard_suite.py and bottle together, see docs/benchmarks.md)
    augment: str = "none"

    @property
    def label_modes(self) -> tuple[str, ...]:
        return ("binary", "multiclass") if self.family == SUPERVISED else ("binary",)

    @property
    def protocols(self) -> tuple[Family, ...]:
        """Protocols this method runs under (its own family first)."""
        if self.family == ONECLASS and self.input_kind == PATCHES:
            return (ONECLASS, SUPERVISED)
        return (self.family,)

    @property
    def needs_accelerator(self) -> bool:
        """Methods that train a network on the pixels (input kind ``images``) want a GPU; the pipeline's
        worker pool follows from this."""
        return self.input_kind == IMAGES

    def load_class(self):
        module, _, cls = self.factory.partition(":")
        return getattr(importlib.import_module(module), cls)


_ENTRIES = (
    MethodEntry("patchcore", ONECLASS, PATCHES, "fewshot_core.methods.patchcore:PatchCore",
                "coreset memory bank, nearest-neighbour patch distance", paper="Roth et al., CVPR 2022",
                augment="images"),
    MethodEntry("knn", ONECLASS, PATCHES, "fewshot_core.methods.knn:KNN",
                "mean distance to the k nearest support patches (REB's baseline)", augment="images"),
    MethodEntry("ldknn", ONECLASS, PATCHES, "fewshot_core.methods.ldknn:LDKNN",
                "local-density kNN on the support patches", paper="Lyu et al., REB", augment="images"),
    MethodEntry("efficientad", ONECLASS, IMAGES, "fewshot_core.methods.efficientad:EfficientAD",
                "student-teacher + autoencoder, trained on the support images", paper="Batzner et al., WACV 2024"),
    MethodEntry("glass", ONECLASS, IMAGES, "fewshot_core.methods.glass:GLASS",
                "discriminator on global and local synthetic anomalies", paper="Chen et al., ECCV 2024"),
    MethodEntry("reb", ONECLASS, IMAGES, "fewshot_core.methods.reb:REB",
                "DefectMaker fine-tuning, then LDKNN on the fine-tuned features", paper="Lyu et al., REB"),
    MethodEntry("protonet", SUPERVISED, EMBEDDINGS, "fewshot_core.methods.protonet:ProtoNet",
                "nearest class mean, Euclidean or cosine", paper="Snell et al., NeurIPS 2017"),
    MethodEntry("caml", SUPERVISED, EMBEDDINGS, "fewshot_core.methods.caml:CAML",
                "in-context sequence model over support embeddings", paper="Fifty et al., ICLR 2024",
                meta_pool=True),
    MethodEntry("pmf", SUPERVISED, IMAGES, "fewshot_core.methods.pmf:PMF",
                "pre-train, meta-train, fine-tune a ProtoNet backbone", paper="Hu et al., CVPR 2022"),
    MethodEntry("musc", TRANSDUCTIVE, PATCHES, "fewshot_core.methods.musc:MutualScoring",
                "transductive: each test image's patches scored against the other test images (+ support)",
                paper="Li et al., MuSc, ICLR 2024"),
)
REGISTRY: dict[str, MethodEntry] = {e.name: e for e in _ENTRIES}


def register(entry: MethodEntry) -> MethodEntry:
    """Add ``entry`` (a method outside this package, e.g. a plug-in or a test's; it must not shadow one)."""
    if entry.name in REGISTRY and REGISTRY[entry.name] != entry:
        raise FsadError(f"method {entry.name!r}: already registered; pick another name")
    REGISTRY[entry.name] = entry
    return entry


def names(family: Family | None = None, input_kind: InputKind | None = None,
          protocol: Family | None = None) -> list[str]:
    """Registered method names, optionally only those of a family, input kind or protocol."""
    return sorted(n for n, e in REGISTRY.items()
                  if (family is None or e.family == family) and (input_kind is None or e.input_kind == input_kind)
                  and (protocol is None or protocol in e.protocols))


def get(name: str | MethodEntry, protocol: Family | None = None) -> MethodEntry:
    """The entry of ``name``; an unknown name, or one that does not run under ``protocol``, is a user error.

    Front ends turn the user's name into an entry once, here; the library passes that entry on (an entry
    given comes back as it is, checked against ``protocol``)."""
    entry = name if isinstance(name, MethodEntry) else REGISTRY.get(name)
    if entry is None:
        raise FsadError(f"method {name!r}: unknown; choose one of {', '.join(names())}")
    name = entry.name
    if protocol is not None and protocol not in entry.protocols:
        raise FsadError(f"method {name!r}: not available under the {protocol} protocol; use one of "
                        f"{', '.join(names(protocol=protocol))}")
    return entry


def create(name: str | MethodEntry, runtime=None, **params):
    """A new, unfitted ``name`` (a name or an entry) built with its defaults overridden by ``params`` and
    computing on ``runtime`` (a ``fewshot_core.runtime.Runtime``; None: the default). Bad parameters are a
    one-line FsadError."""
    entry = get(name)
    cls = entry.load_class()
    merged = {**entry.defaults, **params}
    try:
        model = cls(**merged)
    except (TypeError, ValueError) as exc:
        raise FsadError(f"method {entry.name!r}: bad parameters {merged} ({exc}); see {cls.__module__}") from exc
    return model.set_runtime(runtime)
