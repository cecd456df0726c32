"""The support as a memory bank: each support image's stored features, then its augmented views.

Shared by the one-class protocol, its threshold copies and the automatic configuration choice, so all
three fit on exactly the same bank.
"""

from __future__ import annotations

import numpy as np

from fewshot_core.episode_cache import EpisodeCache
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.augment import AUGMENT_MODES, augment_feature_maps, embed_augmented, transforms_for
from fewshot_core.methods import registry

AUTO = "auto"
# "auto" augments supports of at most this many images: the remedy is for small supports, and a full-shot
# bank already holds many poses (six times its size would only slow the coreset and the search)
AUGMENT_MAX_SHOTS = 16


def resolve_augment(method, augment: str, n_support: int) -> str:
    """The support augmentation a one-class episode uses: ``augment`` itself, or for ``"auto"`` the
    method's registry default (``MethodEntry.augment``) when the support is small, else none."""
    if augment == AUTO:
        return registry.get(method).augment if n_support <= AUGMENT_MAX_SHOTS else "none"
    if augment not in AUGMENT_MODES:
        raise FsadError(f"augment {augment!r}: unknown; use one of {AUTO}, {', '.join(AUGMENT_MODES)}")
    return augment


def support_views(dataset, partition, episode, augment: str, transforms, cache: EpisodeCache) -> np.ndarray:
    """Support features [n, views, h, w, d]: each image's stored features, then its augmented views (the
    transforms that keep the partition's working shape)."""
    support = partition.patch(list(episode.support_ids))
    transforms = transforms_for(support.shape[1:3], transforms)
    n = len(support)
    if augment == "features":  # transform-major [orig..., t1..., t2...]
        extra = augment_feature_maps(support, transforms)[n:]
        extra = extra.reshape(-1, n, *support.shape[1:]).swapaxes(0, 1)
    elif augment == "images":  # image-major [i1 t1, i1 t2, ..., i2 t1, ...]
        extra = embed_augmented(dataset, partition, episode.support_ids, transforms, cache=cache)
        extra = extra.reshape(n, -1, *support.shape[1:])
    else:
        return support[:, None]
    return np.concatenate([support[:, None], extra], axis=1)


def bank_input(views: np.ndarray, augment: str) -> np.ndarray:
    """[n, views, h, w, d] -> what the detector is fitted on [n * views, h, w, d]: the stored maps first,
    then the augmented ones (grouped by transform for ``features``, by image for ``images``)."""
    if views.shape[1] == 1:
        return views[:, 0]
    rest = views[:, 1:].swapaxes(0, 1) if augment == "features" else views[:, 1:]
    return np.concatenate([views[:, 0], rest.reshape(-1, *views.shape[2:])])


def bank_groups(views_shape: tuple[int, int], augment: str) -> np.ndarray:
    """The support image of each map ``bank_input`` gives for views of shape [n, views, ...], in its order
    (an augmented view belongs to its image): what a held-out image's rows are left out by."""
    n, v = int(views_shape[0]), int(views_shape[1])
    image = np.arange(n)
    if v == 1:
        return image
    rest = np.tile(image, v - 1) if augment == "features" else np.repeat(image, v - 1)
    return np.concatenate([image, rest])
