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


def test_a_model_reads_its_inputs_at_its_own_declared_size():
    """The deploy record's inputs follow from the method contract: a method trained on images at its
    ``input_size`` (normalised for its ``backbone_name`` when fine-tuned under the supervised protocol), a
    feature-based one through the partition's featurizer."""
    import torch

    from fewshot_core.models.deployable import ModelInputs

    trained = ModelInputs.of(registry.create("efficientad", image_size=96), registry.ONECLASS)
    assert (trained.image_size, trained.pixels, trained.featurizer) == (96, None, None)
    tuned = ModelInputs.of(registry.create("pmf", backbone="resnet18", image_size=64), registry.SUPERVISED)
    assert (tuned.image_size, tuned.pixels) == (64, {"backbone": "resnet18"})
    assert not publishable(registry.create("pmf", backbone=torch.nn.Identity()), registry.SUPERVISED)  # nothing to rebuild
    assert ModelInputs.of(registry.create("patchcore"), registry.ONECLASS) == ModelInputs()  # no partition: none


def test_publishing_and_saving_take_few_parameters():
    import inspect

    from fewshot_core.models.deployable import save_deployable
    from fewshot_core.models.publish import publish_model

    for func in (save_deployable, publish_model):
        assert len(inspect.signature(func).parameters) <= 7, func.__name__
