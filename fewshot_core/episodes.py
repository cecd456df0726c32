"""Few-shot episode sampler: one-class (k good shots) and supervised (the thesis protocol).

Works on any ``Dataset`` (``.category``, ``.train_good()``, ``.test()``, ``.defect_types()``; records
with ``image_id``, ``label``, ``defect_type``). Deterministic on any machine: ids are sorted before
sampling, and each class draws from its own numpy Generator seeded through SHA-256 of (seed, category,
protocol, pool, class) -- never Python's salted ``hash()``. Because the shot count is not part of that
key, supports are nested: for the same seed the 2-shot support is contained in the 4-shot one, so shot
curves compare like with like, and binary/multiclass episodes of the same shots share their support.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot_core.data.records import GOOD
from fewshot_core.errors import FsadError

LABEL_MODES = ("binary", "multiclass")
POOLS = ("test", "all")


@dataclass(frozen=True)
class OneClassEpisode:
    """k good training images as support; the whole test split as query."""

    episode_id: str
    category: str
    shots: int | None  # None: every train/good image
    seed: int
    support_ids: tuple[str, ...]
    query_ids: tuple[str, ...]


@dataclass(frozen=True)
class SupervisedEpisode:
    """``k_good`` good + ``k_bad`` per defect type as labelled support; every other pool image as query."""

    episode_id: str
    category: str
    k_good: int
    k_bad: int
    seed: int
    label_mode: str  # "binary" | "multiclass"
    pool: str  # "test" | "all" (test split + train/good)
    classes: tuple[str, ...]  # label i is classes[i]
    support_ids: tuple[str, ...]
    support_labels: tuple[int, ...]
    query_ids: tuple[str, ...]
    query_labels: tuple[int, ...]


def _rng(*keys) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def _content_hash(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:8]


def _where(dataset) -> str:
    root = getattr(dataset, "root", None)
    return str(Path(root) / dataset.category) if root is not None else str(dataset.category)


def _check_seed(dataset, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FsadError(f"{_where(dataset)}: seed={seed!r} is invalid; use an integer >= 0")
    return int(seed)


def _check_shots(dataset, name: str, k, available: int, what: str, hint: str = "") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise FsadError(f"{_where(dataset)}: {name}={k!r} is not an integer; pass a whole number of shots")
    if k < 1:
        raise FsadError(f"{_where(dataset)}: {name}={k} asks for fewer than one shot; use {name} >= 1")
    if k > available:
        raise FsadError(
            f"{_where(dataset)}: {name}={k} asks for more shots than exist ({available} {what}); "
            f"use {name} <= {available}{hint}"
        )
    return int(k)


def _draw(ids: list[str], k: int, *key) -> list[str]:
    """The first k of a seeded permutation of the sorted ids (so smaller k is a prefix: nested supports).
    Callers salt ``key`` with the protocol's name as a literal ("oneclass", "supervised"), not
    ``schema.Protocol``: renaming a protocol must never redraw the episodes."""
    ids = sorted(ids)
    order = _rng(*key).permutation(len(ids))
    return [ids[i] for i in order[:k]]


def sample_oneclass(dataset, shots: int | None, seed: int) -> OneClassEpisode:
    """``shots`` good images from ``train/good`` (None: all of them); query = the whole test split."""
    seed = _check_seed(dataset, seed)
    train = sorted(r.image_id for r in dataset.train_good())
    if not train:
        raise FsadError(f"{_where(dataset)}: no train/good images; add good training images")
    if shots is None:
        support = train
    else:
        shots = _check_shots(dataset, "shots", shots, len(train), "train/good images")
        support = sorted(_draw(train, shots, seed, dataset.category, "oneclass", GOOD))
    query = sorted(r.image_id for r in dataset.test())
    if not query:
        raise FsadError(f"{_where(dataset)}: no test images; add test/good and defect folders")
    k = "all" if shots is None else f"k{shots}"
    episode_id = f"oneclass-{dataset.category}-{k}-s{seed}-{_content_hash(support)}"
    return OneClassEpisode(episode_id, dataset.category, shots, seed, tuple(support), tuple(query))


def sample_supervised(
    dataset, k_good: int, k_bad: int, seed: int, label_mode: str = "binary", pool: str = "test"
) -> SupervisedEpisode:
    """The thesis protocol: ``k_good`` good shots + ``k_bad`` shots per defect type from the labelled pool.

    ``pool="test"`` labels the test split; ``pool="all"`` adds train/good (more good images for the
    imbalance settings). The query is every other pool image; it never overlaps the support.
    """
    where = _where(dataset)
    if label_mode not in LABEL_MODES:
        raise FsadError(f"{where}: unknown label_mode {label_mode!r}; use one of {', '.join(LABEL_MODES)}")
    if pool not in POOLS:
        raise FsadError(f"{where}: unknown pool {pool!r}; use 'test' (test split) or 'all' (test + train/good)")
    seed = _check_seed(dataset, seed)
    records = list(dataset.test()) + (list(dataset.train_good()) if pool == "all" else [])
    by_class: dict[str, list[str]] = {GOOD: []}
    for r in records:
        by_class.setdefault(GOOD if r.label == 0 else r.defect_type, []).append(r.image_id)
    defects = sorted(dataset.defect_types())
    if not defects:
        raise FsadError(f"{where}: no defect images; the supervised protocol needs test/<defect> folders")

    n_train_good = len(dataset.train_good())
    hint = f", or pool='all' to add the {n_train_good} train/good images" if pool == "test" and n_train_good else ""
    k_good = _check_shots(dataset, "k_good", k_good, len(by_class[GOOD]), f"good images in the {pool} pool", hint)
    for d in defects:
        k_bad = _check_shots(dataset, "k_bad", k_bad, len(by_class.get(d, [])), f"'{d}' images")

    classes = (GOOD, "anomalous") if label_mode == "binary" else (GOOD, *defects)

    def label(cls: str) -> int:
        return 0 if cls == GOOD else (1 if label_mode == "binary" else classes.index(cls))

    support: dict[str, int] = {}
    for cls in (GOOD, *defects):
        k = k_good if cls == GOOD else k_bad
        for image_id in _draw(by_class[cls], k, seed, dataset.category, "supervised", pool, cls):
            support[image_id] = label(cls)
    query = {i: label(cls) for cls, ids in by_class.items() for i in ids if i not in support}
    if not query:
        raise FsadError(f"{where}: the support takes every image of the {pool} pool, leaving no query; use fewer shots")
    s_ids, q_ids = sorted(support), sorted(query)
    episode_id = f"sup-{dataset.category}-g{k_good}b{k_bad}-{label_mode}-{pool}-s{seed}-{_content_hash(s_ids)}"
    return SupervisedEpisode(
        episode_id=episode_id,
        category=dataset.category,
        k_good=k_good,
        k_bad=k_bad,
        seed=seed,
        label_mode=label_mode,
        pool=pool,
        classes=classes,
        support_ids=tuple(s_ids),
        support_labels=tuple(support[i] for i in s_ids),
        query_ids=tuple(q_ids),
        query_labels=tuple(query[i] for i in q_ids),
    )
