"""One call per evaluation episode: save the fitted method as a deployable folder, log it as the run's
MLflow Model and the category's manifest as the run's dataset input."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot_core.errors import FsadError
from fewshot_core.evaluation.oneclass import SCORE_BATCH, score_in_batches, support_threshold
from fewshot_core.evaluation.threshold import ThresholdConfig, decision_metrics
from fewshot_core.methods import registry
from fewshot_core.methods.base import Method
from fewshot_core.methods.components.persistence import jsonable
from fewshot_core.metrics import image_metrics
from fewshot_core.models.champion import registered_name
from fewshot_core.models.deployable import ModelInputs, Provenance, save_deployable
from fewshot_core.models.mlflow_model import log_model, quiet_advice, register_model
from fewshot_core.tracking.runs import KIND_TAG, log_dataset_input

MODEL_URI_TAG = "fsad.model_uri"


def publishable(model, protocol: str) -> bool:
    """Whether ``model`` can be logged as an MLflow Model: the registry rebuilds it from its folder. A
    one-class detector run under the supervised protocol (``OneClassClassifier``) is not a registry method,
    a P>M>F backbone passed as a module names nothing to rebuild, and a transductive method needs the
    other test images to score one."""
    if not isinstance(model, Method) or model.name not in registry.REGISTRY:
        return False
    if protocol == registry.TRANSDUCTIVE:  # scores a batch of parts against each other: no one-part model
        return False
    if protocol == registry.SUPERVISED and model.input_kind == registry.IMAGES:
        return model.backbone_name is not None
    return True


def model_name(text: str) -> str:
    """A logged model's name from ``text``: letters, digits, ``.``, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


@dataclass(frozen=True)
class ModelRun:
    """Where a model is logged: the tracker (``fewshot_core.tracking``), the MLflow run, the tags the logged
    model carries and its ``name`` in MLflow's Models tab (e.g. method, category and setting)."""

    tracker: Any
    run_id: str
    tags: dict | None = None
    name: str | None = None


def publish_model(target: ModelRun, dataset, model, support_ids: Sequence[str], protocol: str, partition=None,
                  threshold=None) -> dict:
    """Log ``model`` (fitted on ``support_ids`` of ``dataset``) into ``target``'s run.

    Feature-based methods need the ``partition`` they were fitted on (its featurizer spec goes into the
    model); methods trained on pixels are saved at their ``input_size`` (``deployable.ModelInputs.of``).
    The dataset input is logged for every run. Returns ``{"model_uri", "model_id", "dataset_digest"}``, or
    only ``{"dataset_digest"}`` for a model the registry cannot rebuild from its folder (``publishable``).
    """
    tracker, run_id = target.tracker, target.run_id
    with quiet_advice():
        data = log_dataset_input(tracker, run_id, dataset)  # every run names its data, model or not
    if not publishable(model, protocol):
        return {"dataset_digest": data.digest}
    provenance = Provenance(dataset.category, support_ids, protocol,
                            {"name": data.name, "digest": data.digest, "source": str(dataset.root)})
    with quiet_advice(), tempfile.TemporaryDirectory(prefix="fsad-model-") as tmp:
        folder = save_deployable(model, Path(tmp) / "model", provenance, ModelInputs.of(model, protocol, partition),
                                 threshold)
        example = dataset.by_id(support_ids[0]).path if support_ids else None
        info = log_model(tracker.tracking_uri, run_id, folder, example_image=example, tags=target.tags,
                         **({"name": model_name(target.name)} if target.name else {}))
    tracker.client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return {"model_uri": info.model_uri, "model_id": getattr(info, "model_id", None), "dataset_digest": data.digest}


FULL_DATA_ALIAS = "full-data"
FULL_DATA_KIND = "full-data"


def publish_full_data(tracker, experiment: str, batch_id: str, dataset, partition, method: str = "patchcore",
                      params: dict | None = None, threshold=None, runtime=None, tags: dict | None = None) -> dict:
    """Fit ``method`` on every good training image of ``dataset`` (the production candidate beside the few-shot
    episodes), set its threshold from the training images alone (holdout by default), report what it gives on
    the test split, log it into a run of its own and register it as a version of ``fsad-<category>`` with the
    alias ``full-data``; the run's parent is the batch ``batch_id`` (``Tracker.parent_run``).

    Returns the ``publish_model`` result plus ``run_id``, ``version``, ``metrics``, ``threshold`` and the
    fitted ``model``."""
    entry = registry.get(method, protocol=registry.ONECLASS)
    if entry.input_kind == registry.IMAGES:
        raise FsadError(f"full-data model {method!r}: trains on images; choose a feature-based detector "
                        "(patchcore, knn, ldknn)")
    params = dict(params or {})
    params.setdefault("seed", 0)
    train = [r.image_id for r in dataset.train_good()]
    if not train:
        raise FsadError(f"{dataset.root}: category {dataset.category} has no good training images; "
                        "add train/good images or leave the full-data model out (full_data: null)")
    support = partition.patch(train)
    t0 = time.perf_counter()
    model = registry.create(method, runtime=runtime, **params).fit(support)
    fit_s = time.perf_counter() - t0
    cut = support_threshold(method, params, support, runtime, threshold or ThresholdConfig(rule="holdout"),
                            model=model)
    del support
    test = [r.image_id for r in dataset.test()]
    metrics: dict = {"fit_seconds": fit_s, "threshold": cut.value if cut.usable else float("nan")}
    if test:
        scores, _maps, score_s = score_in_batches(test, partition.patch, model.score, SCORE_BATCH)
        labels = [dataset.by_id(i).label for i in test]
        metrics.update(image_metrics(labels, scores))
        decided = decision_metrics(labels, scores, cut)
        decided.pop("threshold_rule", None)  # a param of the run (the rule), not a metric
        metrics.update(decided)
        metrics["score_seconds"] = score_s
    run_tags = {KIND_TAG: FULL_DATA_KIND, "fsad.category": dataset.category, "fsad.method": method,
                **(tags or {})}
    run_id = tracker.log_evaluation(experiment, batch_id, f"{method}|{dataset.category}|full-data",
                                    {"method": method, "category": dataset.category, "n_support": len(train),
                                     "n_query": len(test), "feature_key": partition.key,
                                     "threshold_rule": cut.rule, "method_params": json.dumps(jsonable(params), sort_keys=True)},
                                    metrics, run_tags, stage=FULL_DATA_KIND)
    out = publish_model(ModelRun(tracker, run_id, run_tags, f"{method}-{dataset.category}-{FULL_DATA_KIND}"),
                        dataset, model, train, registry.ONECLASS, partition=partition, threshold=cut)
    name = registered_name(dataset.category)
    version = register_model(tracker.tracking_uri, out["model_uri"], name,
                             {"fsad.mlflow_run_id": run_id, "fsad.kind": FULL_DATA_KIND})
    tracker.client.set_registered_model_alias(name, FULL_DATA_ALIAS, version.version)
    return {**out, "run_id": run_id, "version": version.version, "model": model, "threshold": cut,
            "metrics": metrics}
