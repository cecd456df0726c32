"""The cache the episodes of one category share within one process, and the one definition of its keys.

The protocols (``evaluation/oneclass.py``, ``supervised.py``, ``transductive.py``), the support views, the
automatic configuration, the alignment and the support augmentation (``evaluation/augment.py``) all keep
what they computed once here: masks, decoded images, embedded views, the backbone extractor, synthetic
anomalies, meta-trained models. Each kind of entry has its own key class, so two modules can never
collide on a tuple or read each other's entries by accident. Process memory only; nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class MaskKey:
    """Boolean masks [n, H, W] of the queries ``ids`` at ``shape`` (one-class, transductive)."""

    root: str
    category: str
    ids: tuple[str, ...]
    shape: tuple[int, int]


@dataclass(frozen=True)
class ImageKey:
    """One decoded image tensor [3, S, S] at ``size`` (detectors that train on images)."""

    root: str
    category: str
    image_id: str
    size: int


@dataclass(frozen=True)
class PreprocessedImagesKey:
    """Image id -> tensor preprocessed for ``backbone`` at ``image_size`` (supervised image methods)."""

    backbone: str
    image_size: int


@dataclass(frozen=True)
class MetaTrainedKey:
    """A meta-trained estimator; the evaluated category is part of the key, so a cache shared across
    categories never hands one category the model meta-trained with it in its pool."""

    method: str
    category: str
    params: str  # JSON
    pool: str | None  # the meta-pool's source


@dataclass(frozen=True)
class ViewKey:
    """Patch features of one augmented view (``transform``) of a support image of ``partition``."""

    partition: str
    image_id: str
    transform: str


@dataclass(frozen=True)
class ExtractorKey:
    """``partition``'s backbone: (extractor, preprocessing config, normalisation)."""

    partition: str


@dataclass(frozen=True)
class AnomaliesKey:
    """Patch features of synthetic anomalies drawn into one image (``config="auto"``)."""

    partition: str
    image_id: str
    seed: int
    n: int
    donors: tuple[str, ...]


@dataclass(frozen=True)
class AlignedKey:
    """Patch features of one image embedded at its pose (``align="auto"``)."""

    partition: str
    image_id: str
    pose: str


CacheKey = (MaskKey | ImageKey | PreprocessedImagesKey | MetaTrainedKey | ViewKey | ExtractorKey | AnomaliesKey
            | AlignedKey)
_KEYS = CacheKey.__args__


class EpisodeCache:
    """What the episodes of one category share (pass one per category; a fresh one per call by default)."""

    def __init__(self) -> None:
        self._items: dict = {}

    @staticmethod
    def _check(key) -> None:
        if not isinstance(key, _KEYS):
            raise TypeError(f"EpisodeCache key {key!r}: use one of the key classes of fewshot_core/episode_cache.py")

    def __contains__(self, key: CacheKey) -> bool:
        self._check(key)
        return key in self._items

    def __getitem__(self, key: CacheKey) -> Any:
        self._check(key)
        return self._items[key]

    def __setitem__(self, key: CacheKey, value: Any) -> None:
        self._check(key)
        self._items[key] = value

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list:
        return list(self._items)

    def get(self, key: CacheKey, default: Any = None) -> Any:
        self._check(key)
        return self._items.get(key, default)

    def get_or_make(self, key: CacheKey, make: Callable[[], T]) -> T:
        """The entry of ``key``, made by ``make()`` on first use."""
        if key not in self:
            self._items[key] = make()
        return self._items[key]


def episode_cache(cache: EpisodeCache | None) -> EpisodeCache:
    """``cache``, or a fresh one for None; anything else (a plain dict) is refused with the fix."""
    if cache is None:
        return EpisodeCache()
    if not isinstance(cache, EpisodeCache):
        raise TypeError(f"cache: give a fewshot_core.episode_cache.EpisodeCache, not {type(cache).__name__}")
    return cache
