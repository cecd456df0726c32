"""One few-shot setting end to end: sample its episode, run the protocol, and build what describes it.

``evaluate_setting`` is the per-partition work of the pipeline's evaluation assets, and what any other
front end (``fsad evaluate``, a notebook) calls for the same numbers and the same artifacts: the row of
metrics from ``run_oneclass_episode`` / ``run_supervised_episode`` (typed results: ``evaluation/results.py``),
the ROC curve or confusion matrix, the anomaly-map gallery, the fitted model's folder and the episode itself
(support, queries, scores). Pure library code: no Dagster, no MLflow, nothing written outside a temporary
folder.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fewshot_core import schema
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext, context_of
from fewshot_core.settings import Setting


@dataclass
class SettingResult:
    """``row``: the protocol's row; ``artifacts``: file name -> bytes or text (``plots/roc_curve.png``,
    ``plots/anomaly_maps.png``, ``model/...``, ``episode.json``); ``episode``: the sampled episode."""

    row: dict
    artifacts: dict = field(default_factory=dict)
    episode: object = None
    model: object = None  # the fitted method (for fewshot_core.models.publish_model)
    partition: object = None  # the features it was fitted on, where they are not the store's (aligned parts)
    threshold: object = None  # one-class: its decision threshold (evaluation.threshold.Threshold)

    @property
    def metrics(self) -> dict[str, float]:
        return schema.metrics_of(self.row)

    @property
    def fit_seconds(self) -> float:
        return float(self.row.get("fit_s", np.nan))

    @property
    def score_seconds(self) -> float:
        return float(self.row.get("score_s", np.nan))

    @property
    def overlap(self) -> int:
        """Images that are both support and query (0 for a valid episode)."""
        return len(set(self.episode.support_ids) & set(self.episode.query_ids))


def evaluate_setting(dataset, partition, method, setting: Setting, method_params: Mapping | None = None, *,
                     options: EpisodeOptions | None = None, context: EvalContext | None = None,
                     title: str | None = None) -> SettingResult:
    """Run ``method`` (a ``MethodEntry`` or its name) on ``setting``'s episode of ``dataset`` (features from
    ``partition``) and describe it.

    ``options`` (``EpisodeOptions``, one-class and transductive): ``mask_size`` defaults to the partition's
    working shape (``oneclass.mask_shape``); ``context`` (``EvalContext``): the runtime, the cache shared
    across the settings of one category (masks, images, meta-trained models) and the meta-training pool of
    the methods that need one. A ``support.BankedPartition`` as ``partition`` supplies the support features
    (``support.build_support_bank``, shared with the other methods of the setting); it is checked against
    the episode. ``title`` heads the plots (default: method, category and setting).
    """
    # deferred: the protocols bring scipy, sklearn and faiss, which the code location's load does without
    from fewshot_core.evaluation.oneclass import mask_shape, run_oneclass_episode
    from fewshot_core.evaluation.supervised import run_supervised_episode
    from fewshot_core.evaluation.support import BankedPartition, sample_episode
    from fewshot_core.evaluation.transductive import run_transductive_episode
    from fewshot_core.methods import registry

    method = registry.get(method, protocol=setting.protocol)
    context, options = context_of(context), options or EpisodeOptions()
    # without a partition (a detector trained on images) the protocol resolves None to the model's own size
    if partition is not None:
        options = replace(options, mask_size=mask_shape(options.mask_size, partition))
    title = title or f"{method.name} · {dataset.category} · {setting.key}"
    episode = sample_episode(dataset, setting)
    if isinstance(partition, BankedPartition):
        partition.check(episode)
    params = dict(method_params or {})
    if setting.protocol == schema.Protocol.SUPERVISED:
        return _supervised(episode, run_supervised_episode(dataset, partition, episode, method, params, context),
                           title)
    # the loader (store features or decoded images) follows the registry's input kind
    run = run_transductive_episode if setting.protocol == schema.Protocol.TRANSDUCTIVE else run_oneclass_episode
    return _scored(dataset, episode, run(dataset, partition, episode, method, params, options, context), title)


def _model_files(model) -> dict[str, bytes]:
    """The fitted model's save folder as ``model/<file>`` artifacts (its manifest, arrays, weights)."""
    with tempfile.TemporaryDirectory(prefix="fsad-model-") as tmp:
        saved = Path(model.save(Path(tmp) / "model"))
        return {f"model/{f.name}": f.read_bytes() for f in sorted(saved.iterdir()) if f.is_file()}


def _scored(dataset, episode, res, title: str) -> SettingResult:
    """A one-class or transductive episode's result described: a ROC curve and a gallery of its maps."""
    # deferred: the figures bring sklearn, which the code location's load does without
    from fewshot_core.figures import episode as figures, gallery

    scores, labels, query_ids = res.image_scores, np.asarray(res.labels), list(res.query_ids)
    artifacts: dict = {"plots/roc_curve.png": figures.roc_curve_png(labels, scores, title)}
    picks = gallery.pick_examples(labels, scores)
    if picks:
        cut = res.threshold
        artifacts[gallery.GALLERY_ARTIFACT] = gallery.render_gallery(
            dataset, query_ids, scores, res.image_maps(res.patch_maps[picks], [query_ids[i] for i in picks]), picks,
            res.shape, title, threshold=cut.value if cut is not None and cut.usable else None)
    artifacts.update(_model_files(res.model))
    artifacts["episode.json"] = json.dumps({"episode_id": episode.episode_id, "support_ids": episode.support_ids,
                                            "query_ids": query_ids, "labels": labels.tolist(),
                                            "scores": [float(s) for s in scores]}, indent=1)
    return SettingResult(res.row, artifacts, episode, model=res.model, threshold=res.threshold,
                         partition=res.partition)


def _supervised(episode, res, title: str) -> SettingResult:
    """A supervised episode's result described: its confusion matrix."""
    # deferred: the figures bring sklearn, which the code location's load does without
    from fewshot_core.figures import episode as figures

    row = res.row
    classes, matrix = json.loads(row["classes"]), json.loads(row["confusion"])
    artifacts = {"plots/confusion_matrix.png": figures.confusion_matrix_png(matrix, classes, title),
                 "episode.json": json.dumps({"episode_id": episode.episode_id, "classes": classes,
                                             "support_ids": episode.support_ids,
                                             "support_labels": episode.support_labels,
                                             "query_ids": episode.query_ids, "query_labels": episode.query_labels,
                                             "confusion": matrix, "fit_info": json.loads(row.get("info", "{}"))},
                                            indent=1)}
    return SettingResult(row, artifacts, episode, model=res.model)
