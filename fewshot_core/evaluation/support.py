"""Support banks: the features one few-shot setting's support images contribute, built once per category and
setting and shared by every method fitted on that support.

A bank holds the episode's support ids (and labels), its patch features (what PatchCore, kNN and LDKNN fit
their memory banks on), its global embeddings and, for the supervised settings, the class prototypes (mean
support embedding per class: ProtoNet's fitted state). ``BankedPartition`` serves a protocol the support
rows from the bank and everything else from the feature store, so a method fitted from a bank gives the very
numbers it gives from the store.
"""

from __future__ import annotations

import numpy as np

from fewshot_core.episodes import sample_oneclass, sample_supervised
from fewshot_core.errors import FsadError
from fewshot_core.settings import ONECLASS, TRANSDUCTIVE, Setting


def sample_episode(dataset, setting: Setting):
    """The episode ``setting`` draws from ``dataset`` (the one every protocol run of it uses)."""
    if setting.protocol == ONECLASS:
        return sample_oneclass(dataset, setting.k_good, setting.seed)
    if setting.protocol == TRANSDUCTIVE:  # the one-class episode's support (none for 0 shots), every test image
        from fewshot_core.evaluation.transductive import transductive_episode

        return transductive_episode(dataset, setting.k_good, setting.seed)
    return sample_supervised(dataset, setting.k_good, setting.k_bad, setting.seed, setting.label_mode, pool="test")


def build_support_bank(dataset, partition, setting: Setting) -> dict[str, np.ndarray]:
    """Arrays of ``setting``'s support: ids, patch features, embeddings (+ labels, classes, prototypes)."""
    episode = sample_episode(dataset, setting)
    ids = list(episode.support_ids)
    bank = {"setting_key": np.array(setting.key), "feature_key": np.array(partition.key),
            "support_ids": np.array(ids), "support_patches": partition.patch(ids),
            "support_embeddings": partition.global_(ids)}
    if setting.protocol not in (ONECLASS, TRANSDUCTIVE):
        labels = np.asarray(episode.support_labels, dtype=np.int64)
        emb = bank["support_embeddings"]
        present = sorted(set(labels.tolist()))
        bank.update(support_labels=labels, classes=np.array(episode.classes),
                    prototype_labels=np.array(present, dtype=np.int64),
                    prototypes=np.stack([emb[labels == c].mean(0) for c in present]).astype(np.float32))
    return bank


class BankedPartition:
    """A feature partition whose support rows come from a support bank (queries still from the store)."""

    def __init__(self, partition, bank: dict):
        if str(bank["feature_key"]) != partition.key:
            raise FsadError(f"support bank of {bank['setting_key']}: built from features {bank['feature_key']}, "
                            f"not {partition.key}; re-materialise memory_banks for this category")
        self._partition = partition
        self._rows = {str(i): r for r, i in enumerate(bank["support_ids"].tolist())}
        self._bank = bank
        self.support_ids = [str(i) for i in bank["support_ids"].tolist()]

    def __getattr__(self, name):  # everything else: the store partition's (meta, key, image_size, ...)
        return getattr(self._partition, name)

    def _serve(self, ids, array_name: str, fallback):
        if ids is not None and not isinstance(ids, str) and len(ids) and all(i in self._rows for i in ids):
            return np.ascontiguousarray(self._bank[array_name][[self._rows[i] for i in ids]], dtype=np.float32)
        return fallback(ids)

    def patch(self, ids=None) -> np.ndarray:
        return self._serve(ids, "support_patches", self._partition.patch)

    def global_(self, ids=None) -> np.ndarray:
        return self._serve(ids, "support_embeddings", self._partition.global_)

    def check(self, episode) -> None:
        """Refuse a bank whose support is not ``episode``'s (a stale bank after the data changed)."""
        if list(episode.support_ids) != self.support_ids:
            raise FsadError(f"support bank of {self._bank['setting_key']}: its support images differ from the "
                            "episode's (the data changed since it was built); re-materialise memory_banks")
