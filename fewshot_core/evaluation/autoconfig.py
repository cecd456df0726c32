"""``config="auto"``: a one-class episode picks its configuration from its good support images alone.

The levers that help differ by category: rotated supports help parts that lie at any pose and can hurt
parts whose orientation is itself checked; object-centric scoring helps posed objects and is moot on
textures. With k >= 2 good shots each candidate (``CANDIDATES``) is fitted on k - 1 of them and scores the
held-out image against synthetic anomalies drawn into that image (DefectMaker's scars, clumps and
rectangles, filled with noise or a piece of another support image); the candidate whose fits rank the
anomalies above the held-out good image most often, averaged over up to ``FOLDS`` held-out images, is
chosen. Near-ties keep the earlier candidate (the defaults come first). The test split, its labels and its
images are never read. One shot leaves no image to hold out: the defaults stand and the choice says so.

Everything random (which images are held out, the synthetic defects) follows the episode's seed, so the
choice is reproducible.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from fewshot_core.episode_cache import AnomaliesKey, EpisodeCache
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.augment import TRANSFORMS, embed_images, working_image
from fewshot_core.evaluation.support_views import bank_input, resolve_augment, support_views
from fewshot_core.methods import registry
from fewshot_core.methods.components.defectmaker import DefectMaker

CONFIGS = ("default", "auto")
FOLDS = 4  # held-out support images: bounds the cost at candidates x FOLDS fits
ANOMALIES = 8  # synthetic anomalies drawn into each held-out image
MARGIN = 0.02  # a later candidate must beat the best earlier one by this much


@dataclass(frozen=True)
class Candidate:
    """A named configuration: the support augmentation and method parameters over the user's."""

    name: str
    augment: str
    params: Mapping = field(default_factory=dict)


CANDIDATES = (
    Candidate("default", "auto"),
    Candidate("no-rotations", "none"),
    Candidate("whole-image", "auto", {"foreground": "none"}),
    Candidate("plain", "none", {"foreground": "none"}),
)


@dataclass
class Choice:
    """What ``choose`` picked: the candidate, the augmentation and parameters to run, each candidate's
    score and why (recorded in the row and the saved model)."""

    name: str
    augment: str
    params: dict
    scores: dict
    reason: str

    def record(self) -> dict:
        return {"config": self.name, "config_scores": json.dumps(self.scores, sort_keys=True),
                "config_reason": self.reason}


def check_config(config: str) -> str:
    if config not in CONFIGS:
        raise FsadError(f"config {config!r}: unknown; use one of {', '.join(CONFIGS)}")
    return config


def candidates_for(method, params: Mapping) -> list[Candidate]:
    """The candidates ``method`` can take: parameters it does not have, or that the user fixed, are not
    varied (a user's ``foreground=none`` stays)."""
    known = set(registry.get(method).load_class()._param_names())
    out = []
    for cand in CANDIDATES:
        if any(k not in known or k in params for k in cand.params):
            continue
        out.append(cand)
    return out


def _rng(seed: int, *keys) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(str(k) for k in (seed, *keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def synthetic_anomalies(dataset, partition, image_id: str, seed: int, cache: EpisodeCache, n: int = ANOMALIES,
                        donors=()) -> np.ndarray:
    """Patch features [n, h, w, d] of ``n`` DefectMaker anomalies drawn into ``image_id`` at the working
    shape (cached per partition, image and seed)."""
    key = AnomaliesKey(partition.meta["key"], image_id, seed, n, tuple(donors))
    if key not in cache:
        image = np.asarray(working_image(partition, dataset.by_id(image_id).path, cache).convert("RGB"))
        others = [np.asarray(working_image(partition, dataset.by_id(d).path, cache).convert("RGB")) for d in donors]
        maker, rng = DefectMaker(), _rng(seed, "anomalies", image_id)
        fg = maker.foreground(image)
        made = [maker.make(image, rng, donors=others or None, fg=fg)[0] for _ in range(n)]
        cache[key] = embed_images(partition, [Image.fromarray(m) for m in made], cache)
    return cache[key]


def choose(dataset, partition, episode, method, params: Mapping, cache: EpisodeCache, runtime=None,
           augment_transforms=None) -> Choice:
    """The configuration for ``episode`` (see the module docstring)."""
    support_ids = list(episode.support_ids)
    k = len(support_ids)
    cands = candidates_for(method, params)
    first = cands[0]
    if k < 2 or len(cands) < 2:
        why = "1 good shot: no image to hold out" if k < 2 else "nothing to choose: the parameters are fixed"
        return Choice(first.name, first.augment, dict(first.params), {}, f"defaults ({why})")
    transforms = augment_transforms or TRANSFORMS
    views_by_mode = {}
    held = sorted(_rng(episode.seed, "folds", *support_ids).choice(k, min(FOLDS, k), replace=False).tolist())
    queries = {}
    for j in held:
        good = partition.patch([support_ids[j]])
        donors = [support_ids[i] for i in range(k) if i != j][:2]
        queries[j] = np.concatenate([good, synthetic_anomalies(dataset, partition, support_ids[j], episode.seed,
                                                               cache, donors=donors)])
    scores = {}
    for cand in cands:
        mode = resolve_augment(method, cand.augment, k)
        if mode not in views_by_mode:
            views_by_mode[mode] = support_views(dataset, partition, episode, mode, transforms, cache)
        views = views_by_mode[mode]
        cls = registry.get(method).load_class()
        copy_params = cls.threshold_copy_params({**dict(params), **dict(cand.params), "seed": episode.seed},
                                                views.shape)
        ranks = []
        for j in held:
            train = [i for i in range(k) if i != j]
            model = registry.create(method, runtime=runtime, **copy_params).fit(bank_input(views[train], mode))
            s = np.asarray(model.score(queries[j])[0], dtype=np.float64)
            ranks.append(float(np.mean(s[1:] > s[0]) + 0.5 * np.mean(s[1:] == s[0])))
        scores[cand.name] = round(float(np.mean(ranks)), 4)
    best = cands[0]
    for cand in cands[1:]:
        if scores[cand.name] > scores[best.name] + MARGIN:
            best = cand
    reason = (f"synthetic anomalies in {len(held)} held-out support images: {best.name} ranks them above the "
              f"good image {scores[best.name]:.3f} of the time")
    return Choice(best.name, best.augment, dict(best.params), scores, reason)
