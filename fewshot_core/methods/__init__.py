"""Few-shot methods, one file each, found by name through a registry.

One-class methods (``fit(support [n,h,w,d])`` / ``score(query) -> (image_scores, patch_maps)``) are in
``ONECLASS_METHODS``; supervised ones (``fit(X, y)`` / ``predict_proba``) in ``SUPERVISED_METHODS``.
Each entry maps a name to ``"module:Class"``; the module is imported only when the method is asked for,
so adding a method is one line here and heavy dependencies load lazily.
"""

from __future__ import annotations

import importlib

from fewshot_core.errors import FsadError

ONECLASS_METHODS: dict[str, str] = {
    "patchcore": "fewshot_core.methods.patchcore:PatchCore",
    "knn": "fewshot_core.methods.knn:KNN",
    "ldknn": "fewshot_core.methods.ldknn:LDKNN",
}

SUPERVISED_METHODS: dict[str, str] = {
    "protonet": "fewshot_core.methods.protonet:ProtoNet",
    # P>M>F and CAML need a backbone or a trained sequence model: evaluation.supervised builds them.
}

# Image-trained one-class methods (``fit_images`` / ``score_images``); evaluation runs them through
# ``methods.training.run_image_episode`` instead of the feature store.
IMAGE_METHODS: dict[str, str] = {
    "efficientad": "fewshot_core.methods.efficientad:EfficientAD",
    "glass": "fewshot_core.methods.glass:GLASS",
    "reb": "fewshot_core.methods.reb:REB",
}


def method_names() -> list[str]:
    return sorted({**ONECLASS_METHODS, **SUPERVISED_METHODS})


def get_method_class(name: str):
    target = ONECLASS_METHODS.get(name) or SUPERVISED_METHODS.get(name)
    if target is None:
        raise FsadError(f"method {name!r}: unknown; choose one of {', '.join(method_names())}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def get_method(name: str, **params):
    """A new, unfitted method ``name`` built with ``params``; bad parameters raise FsadError."""
    cls = get_method_class(name)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise FsadError(f"method {name!r}: bad parameters {params} ({exc}); see {cls.__module__}") from exc

