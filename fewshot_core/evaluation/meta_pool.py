"""Meta-training pools: the embeddings of *other* categories a meta-trained method (CAML) learns from.

A pool is data, given to the protocol explicitly (``evaluate_supervised(..., context=EvalContext(meta_pool=...))``),
and every row records which pool was used (``meta_pool`` column). Three sources:

* ``pool_from_partitions(pairs)``: categories already embedded, e.g. the other categories of a sweep;
* ``root_pool(root, store, ...)``: every category of another MVTec-layout root;
* ``synthetic_pool(store, ...)``: generated categories (``fewshot_core.data.synth``), made once under the
  work folder and embedded with the same backbone and size, so a root with one category (bottle) can
  still meta-train.

The evaluated category is left out by the method before any sampling (and a model that saw it is refused).
What the user writes for a source (``fsad evaluate --meta-pool``, a sweep's ``meta_pool:``) is read by
``parse_source`` alone and built by ``build_pool``; each front end only says what its "other categories" are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from fewshot_core.data import list_categories, load_dataset
from fewshot_core.data.records import GOOD
from fewshot_core.data.synth import generate
from fewshot_core.errors import FsadError
from fewshot_core.features.store import EmbedCompute, FeatureSpec

SYNTHETIC = "synthetic"
GENERATED = 4  # categories ``synthetic`` generates when no count is given


@dataclass(frozen=True)
class MetaPool:
    """``source`` says where the categories came from; ``embeddings`` maps category -> (X [n, D], labels [n])
    with labels ``good`` or the defect type."""

    source: str
    embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]]

    @property
    def categories(self) -> list[str]:
        return sorted(self.embeddings)

    def describe(self, exclude: str | None = None) -> str:
        cats = [c for c in self.categories if c != exclude]
        return f"{self.source}: {', '.join(cats)}"


def pool_from_partitions(pairs: Iterable[tuple], source: str = "categories") -> MetaPool:
    """A pool from (dataset, feature partition) pairs: every image's global embedding and label."""
    embeddings = {}
    for dataset, partition in pairs:
        ids = [r.image_id for r in dataset.records]
        labels = np.array([GOOD if r.label == 0 else r.defect_type for r in dataset.records])
        embeddings[dataset.category] = (partition.global_(ids), labels)
    if not embeddings:
        raise FsadError(f"meta-training pool ({source}): no categories; give another root or use 'synthetic'")
    return MetaPool(source, embeddings)


def root_pool(root, store, spec: FeatureSpec, compute: EmbedCompute | None = None,
              categories: list[str] | None = None) -> MetaPool:
    """Every category (or ``categories``) of the MVTec-layout ``root``, embedded in ``store`` as ``spec`` says."""
    root = Path(root).expanduser().resolve()
    names = categories or list_categories(root)
    if not names:
        raise FsadError(f"{root}: no MVTec-layout categories for the meta-training pool; pass a root with "
                        "<category>/train/good folders or use --meta-pool synthetic")
    pairs = []
    for name in names:
        ds = load_dataset(root, name)
        pairs.append((ds, store.build(ds, spec, replace(compute or EmbedCompute(), progress=False))))
    return pool_from_partitions(pairs, source=f"root {root}")


def synthetic_pool(store, spec: FeatureSpec, work_dir, compute: EmbedCompute | None = None, categories: int = 4,
                   seed: int = 0) -> MetaPool:
    """``categories`` generated categories (made once under ``work_dir``), embedded in ``store`` as ``spec`` says."""
    if categories < 1:
        raise FsadError(f"synthetic meta-training pool: categories={categories}; give 1 or more")
    root = Path(work_dir) / "meta_pool" / f"synthetic-c{categories}-s{seed}"
    generate(root, categories=categories, seed=seed)  # idempotent: categories already written are kept
    pairs = []
    for name in list_categories(root):
        ds = load_dataset(root, name)
        pairs.append((ds, store.build(ds, spec, replace(compute or EmbedCompute(), progress=False))))
    return pool_from_partitions(pairs, source=f"{SYNTHETIC} ({categories} generated, seed {seed})")


@dataclass(frozen=True)
class PoolSource:
    """Where a pool comes from: ``others`` (the other categories the front end already has: the evaluated
    root's for ``fsad evaluate``, the sweep's for a sweep), ``synthetic`` (``count`` generated categories)
    or ``root`` (every category of another MVTec-layout root)."""

    kind: Literal["others", "synthetic", "root"]
    count: int = GENERATED
    root: Path | None = None


def parse_source(text: str, others: str, where: str, base=None) -> PoolSource:
    """The user's ``text``: the word ``others`` (``root`` on the command line, ``categories`` in a sweep
    file), ``synthetic`` or ``synthetic:N`` (N >= 1), else the path of another root (relative to ``base``,
    else the working folder), which must be a folder. ``where`` (the flag or file key) starts the one-line
    error."""
    if text == others:
        return PoolSource("others")
    word, colon, count = text.partition(":")
    if word == SYNTHETIC:
        if colon and (not count.isdigit() or int(count) < 1):
            raise FsadError(f"{where} {text}: not a count of generated categories; give {SYNTHETIC}:N with N >= 1")
        return PoolSource("synthetic", int(count) if colon else GENERATED)
    root = (Path(base or ".") / Path(text).expanduser()).resolve()
    if not root.is_dir():
        raise FsadError(f"{where} {text}: not a folder ({root}), nor {others!r} or {SYNTHETIC}[:N]; pass an "
                        "existing folder or one of those words")
    return PoolSource("root", root=root)


def build_pool(source: PoolSource, store, spec: FeatureSpec, work_dir, others: Callable[[], MetaPool],
               compute: EmbedCompute | None = None) -> MetaPool:
    """The pool ``source`` names, embedded in ``store`` as ``spec`` says; ``others()`` builds the front end's
    other categories."""
    if source.kind == "others":
        return others()
    if source.kind == "synthetic":
        return synthetic_pool(store, spec, work_dir, compute, categories=source.count)
    return root_pool(source.root, store, spec, compute)
