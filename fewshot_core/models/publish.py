"""One call per evaluation episode: save the fitted method as a deployable folder, log it as the run's
MLflow Model and the category's manifest as the run's dataset input."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from fewshot_core.methods import registry

MODEL_URI_TAG = "fsad.model_uri"


def publish_model(tracker, run_id: str, dataset, model, support_ids: Sequence[str], protocol: str,
                  partition=None, threshold=None, image_size: int | None = None, tags: dict | None = None) -> dict:
    """Log ``model`` (fitted on ``support_ids`` of ``dataset``) into run ``run_id``.

    Feature-based methods need the ``partition`` they were fitted on (its featurizer spec goes into the
    model); methods trained on pixels need ``image_size``. Returns ``{"model_uri", "model_id",
    "dataset_digest"}``, or ``{}`` for a model the registry cannot rebuild from its folder (nothing is
    logged then).
    """
    from fewshot_core import tracking
    from fewshot_core.models.deployable import save_deployable
    from fewshot_core.models.featurizer import FeaturizerSpec
    from fewshot_core.models.mlflow_model import log_model

    from fewshot_core.methods.base import Method

    if not isinstance(model, Method) or model.name not in registry.REGISTRY:  # not (yet) on the contract
        return {}
    if protocol == registry.SUPERVISED and model.input_kind == registry.IMAGES:
        return {}  # P>M>F reads backbone-normalised pixels; its preprocessing is not in the deploy record yet
    data = tracking.log_dataset_input(tracker, run_id, dataset)
    spec = FeaturizerSpec.from_partition(partition) if partition is not None and model.input_kind != "images" else None
    with tempfile.TemporaryDirectory(prefix="fsad-model-") as tmp:
        folder = save_deployable(model, Path(tmp) / "model", category=dataset.category, support_ids=support_ids,
                                 protocol=protocol, featurizer=spec, image_size=image_size, threshold=threshold,
                                 dataset={"name": data.name, "digest": data.digest, "source": str(dataset.root)})
        example = dataset.by_id(support_ids[0]).path if support_ids else None
        info = log_model(tracker.tracking_uri, run_id, folder, example_image=example, tags=tags)
    tracker.client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return {"model_uri": info.model_uri, "model_id": getattr(info, "model_id", None), "dataset_digest": data.digest}


FULL_DATA_ALIAS = "full-data"


def publish_full_data(tracker, experiment: str, dagster_run_id: str, dataset, partition, method: str = "patchcore",
                      params: dict | None = None, threshold=None) -> dict:
    """Fit ``method`` on every good training image of ``dataset`` (the production candidate beside the few-shot
    episodes), set its threshold from the training images (holdout: no test image is used), log it into a run
    of its own and register it as a version of ``fsad-<category>`` with the alias ``full-data``.

    Returns the ``publish_model`` result plus ``run_id``, ``version`` and the fitted ``model``."""
    import mlflow

    from fewshot_core import tracking
    from fewshot_core.evaluation.oneclass import support_threshold
    from fewshot_core.evaluation.threshold import ThresholdConfig
    from fewshot_core.models.champion import registered_name
    from fewshot_core.models.mlflow_model import _fluent

    params = dict(params or {})
    train = [r.image_id for r in dataset.train_good()]
    support = partition.patch(train)
    model = registry.create(method, **params).fit(support)
    cut = support_threshold(method, params, support, None, threshold or ThresholdConfig(rule="holdout"))
    tags = {tracking.KIND_TAG: "full-data", "fsad.category": dataset.category, "fsad.method": method}
    run_id = tracker.log_evaluation(experiment, dagster_run_id, f"{method}|{dataset.category}|full-data",
                                    {"method": method, "category": dataset.category, "n_support": len(train),
                                     "feature_key": partition.key, "threshold_rule": cut.rule},
                                    {"threshold": cut.value if cut.usable else float("nan")}, tags)
    out = publish_model(tracker, run_id, dataset, model, train, "oneclass", partition=partition, threshold=cut,
                        tags=tags)
    name = registered_name(dataset.category)
    with _fluent(tracker.tracking_uri):
        version = mlflow.register_model(out["model_uri"], name, tags={"fsad.mlflow_run_id": run_id,
                                                                      "fsad.kind": "full-data"})
    tracker.client.set_registered_model_alias(name, FULL_DATA_ALIAS, version.version)
    return {**out, "run_id": run_id, "version": version.version, "model": model, "threshold": cut}
