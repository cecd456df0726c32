"""The method contract (``methods/base.py``) declares every attribute the protocols, the saved model and the
pipeline read of a method; every registered method exposes it: after a fit on tiny data where that is cheap
(the feature methods), as declared attributes and their unfitted values for the ones that train."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from fewshot_core.methods import registry
from fewshot_core.methods.base import Classifier, Detector, Method

COMMON = ("input_kind", "fitted_", "fit_info_", "input_size", "backbone_name")
PER_BASE = {Detector: ("bank_size", "bank_", "map_sigma"), Classifier: ("trained_on",)}


def _declared(cls) -> tuple[str, ...]:
    return COMMON + next(attrs for base, attrs in PER_BASE.items() if issubclass(cls, base))


@pytest.mark.parametrize("name", registry.names())
def test_every_method_declares_the_contract(name):
    cls = registry.get(name).load_class()
    missing = [a for a in _declared(cls) if not hasattr(cls, a)]
    assert not missing, f"{name}: {missing} not declared on its class"


def _cheap(entry) -> bool:
    return entry.input_kind != registry.IMAGES and not entry.meta_pool


@pytest.mark.parametrize("name", [n for n in registry.names() if _cheap(registry.get(n))])
def test_feature_methods_expose_the_contract_after_fit(name):
    entry = registry.get(name)
    rng = np.random.default_rng(0)
    model = registry.create(entry, seed=0) if "seed" in entry.load_class()._param_names() else registry.create(entry)
    if entry.input_kind == registry.PATCHES:
        model.fit(rng.random((3, 4, 4, 8), dtype=np.float32))
    else:
        model.fit(rng.random((6, 8), dtype=np.float32), np.array(["good", "bad"] * 3))
    assert model.is_fitted() and model.fitted_
    assert isinstance(model.fit_info_, Mapping)
    assert model.input_kind == entry.input_kind
    assert model.input_size is None and model.backbone_name is None  # it reads the store's features
    if isinstance(model, Detector):
        assert isinstance(model.bank_size, int)
        assert model.bank_size == (0 if model.bank_ is None else len(model.bank_))
        if name in ("patchcore", "knn", "ldknn"):
            assert model.bank_size > 0
    else:
        assert model.trained_on == ()


@pytest.mark.parametrize("name", registry.names(input_kind=registry.IMAGES))
def test_image_methods_declare_their_size_and_backbone(name):
    model = registry.create(name, backbone="resnet18", image_size=64)
    assert model.input_size == 64 and model.backbone_name == "resnet18"
    assert not model.is_fitted() and dict(model.fit_info_) == {}
    if isinstance(model, Detector):
        assert model.bank_size == 0  # a trained detector reports its bank from fit_info_, empty before fit


def test_the_unfitted_defaults_are_shared_safely():
    with pytest.raises(TypeError):  # a read-only mapping: no method can fill another's fit_info_
        Method.fit_info_["steps"] = 1  # type: ignore[index]
    assert Detector.bank_ is None and Classifier.trained_on == ()


def test_a_backbone_passed_as_a_module_names_nothing_to_rebuild():
    import torch

    model = registry.create("pmf", backbone=torch.nn.Identity())
    assert model.backbone_name is None
