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
