"""Which fitted methods become MLflow Models, and the names they get in the Models tab."""

from __future__ import annotations

from fewshot_core.evaluation.oneclass_classifier import OneClassClassifier
from fewshot_core.methods import registry
from fewshot_core.models.publish import model_name, publishable


def test_registry_methods_are_publishable_and_the_supervised_one_class_wrapper_is_not():
    assert publishable(registry.create("patchcore"), registry.ONECLASS)
    assert publishable(registry.create("protonet"), registry.SUPERVISED)
    assert not publishable(OneClassClassifier("patchcore"), registry.SUPERVISED)
    assert not publishable(object(), registry.ONECLASS)


def test_model_names_keep_only_safe_characters():
    assert model_name("patchcore-bottle-oc-k4-s0") == "patchcore-bottle-oc-k4-s0"
    assert model_name("knn|my part/a b") == "knn-my-part-a-b"
    assert model_name("///") == "model"
