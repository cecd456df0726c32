"""A deployable model: a fitted method's save folder plus what it needs to score raw images end to end.

The folder is the one save/load format (``methods/components/persistence.py``); its manifest's ``extra.deploy``
adds the featurizer spec (feature-based methods) or the pixel size (methods trained on images; with the
backbone whose normalisation they expect for those fine-tuning a backbone, P>M>F), the
decision threshold, and the audit trail: category, support image ids, dataset digest, partition key,
code version and commit. ``DeployedModel`` loads such a folder and scores image files or encoded images:

* one-class detectors: ``image_score`` (higher = more anomalous), ``decision`` = score above the
  threshold (None where the threshold could not be set), optionally the anomaly map at image size;
* supervised classifiers: ``image_score`` = anomaly log-odds ``log P(not good) - log P(good)`` (the
  score their AUROC ranks by), ``decision`` = the predicted class is not ``good``, ``label`` = that class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.special import logsumexp

from fewshot_core.backbones import build_transform
from fewshot_core.data.imageio import load_rgb
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.aligned import align_pixels, foreground_from_record, foreground_record, to_original
from fewshot_core.evaluation.threshold import Threshold
from fewshot_core.methods.base import Detector
from fewshot_core.methods.components.persistence import MANIFEST, load_model, read_manifest
from fewshot_core.methods.components.images import load_images
from fewshot_core.methods import registry
from fewshot_core.models.featurizer import Featurizer, FeaturizerSpec
from fewshot_core.tracking.versions import code_version, git_commit

DEPLOY = "deploy"
GOOD = "good"


@dataclass(frozen=True)
class Provenance:
    """What a deployed model was fitted on, as its deploy record keeps it: the category, the support image
    ids, the protocol, and the dataset's name, digest and source when known (the MLflow dataset input)."""

    category: str
    support_ids: Sequence[str]
    protocol: str
    dataset: dict | None = None


@dataclass(frozen=True)
class ModelInputs:
    """How a deployed model reads raw images: through ``featurizer`` (feature-based methods: the spec of
    the partition it was fitted on), or as pixels at ``image_size`` (methods trained on images), normalised
    for the backbone ``pixels`` names (``{"backbone": name}``, methods that fine-tune one: P>M>F)."""

    featurizer: FeaturizerSpec | None = None
    image_size: int | None = None
    pixels: dict | None = None
    align: dict | None = None  # fitted on aligned parts: the foreground estimate that poses new images

    @classmethod
    def of(cls, model, protocol: str, partition=None) -> "ModelInputs":
        """The inputs of fitted ``model``: its own ``input_size`` (and, fine-tuned under the supervised
        protocol, its ``backbone_name``) for a method that reads images, else the partition's featurizer."""
        if model.input_kind != registry.IMAGES:
            foreground = getattr(partition, "foreground", None)  # an aligned episode's partition
            return cls(featurizer=FeaturizerSpec.from_partition(partition) if partition is not None else None,
                       align={"foreground": foreground_record(foreground)} if foreground is not None else None)
        pixels = {"backbone": model.backbone_name} if protocol == registry.SUPERVISED else None
        return cls(image_size=int(model.input_size), pixels=pixels)


def save_deployable(model, folder, provenance: Provenance, inputs: ModelInputs, threshold: Threshold | None = None,
                    extra: dict | None = None) -> Path:
    """Save fitted ``model`` into ``folder`` with its deploy record (see the module docstring): where it came
    from (``provenance``), how it reads images (``inputs``), its decision ``threshold`` and any ``extra``."""
    if inputs.featurizer is None and inputs.image_size is None:
        raise ValueError("a deployable model needs a featurizer spec (feature-based) or an image size (pixels)")
    deploy = {
        "protocol": provenance.protocol, "input_kind": model.input_kind, "category": provenance.category,
        "support_ids": list(provenance.support_ids),
        "featurizer": inputs.featurizer.to_dict() if inputs.featurizer else None,
        "image_size": int(inputs.image_size if inputs.image_size is not None else inputs.featurizer.image_size),
        "threshold": threshold.to_dict() if threshold is not None else None,
        "dataset": provenance.dataset, "code_version": code_version(), "git_commit": git_commit(),
        "pixels": dict(inputs.pixels) if inputs.pixels else None, "align": inputs.align, **(extra or {}),
    }
    return model.save(folder, extra={DEPLOY: deploy})


def deploy_record(folder) -> dict:
    """The deploy record of a saved folder; a plain saved method (no record) is a one-line error."""
    record = (read_manifest(folder).get("extra") or {}).get(DEPLOY)
    if not record:
        raise FsadError(f"{Path(folder) / MANIFEST}: a fitted method without a deploy record (featurizer, "
                        "threshold); save it with fewshot_core.models.save_deployable or rerun the evaluation")
    return record


@dataclass
class Scores:
    """Per-image outputs, aligned with the inputs."""

    image_score: np.ndarray
    decision: list  # bool or None per image
    threshold: float | None
    label: list | None = None  # supervised: the predicted class
    anomaly_map: np.ndarray | None = None  # [n, H, W] at the model's input shape


class DeployedModel:
    """A saved deployable folder, loaded for scoring (``score(images)``)."""

    def __init__(self, folder, runtime=None, device=None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.record = deploy_record(self.folder)
        self.method = load_model(self.folder, runtime)
        self.threshold = Threshold.from_dict(self.record.get("threshold"))
        self.image_size = int(self.record["image_size"])
        spec = self.record.get("featurizer")
        self.featurizer = Featurizer(FeaturizerSpec.from_dict(spec), device=device) if spec else None
        align = self.record.get("align")
        self.poser = foreground_from_record(align["foreground"]) if align else None
        self._transform = None

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def is_detector(self) -> bool:
        return isinstance(self.method, Detector)

    def prepare(self, images: Sequence):
        """The part of scoring that needs no model: decoded images resized (and for pixel methods
        normalised) to the model's input. Thread-safe, so a caller can prepare the next batch while
        ``score(..., prepared=...)`` runs the current one."""
        kind = self.record.get("input_kind", "patches")
        if kind == "images" and self.record.get("pixels"):
            return self._normalised(images)
        if kind == "images":
            return load_images(list(images), self.image_size)
        return self.featurizer.pixels(list(images))

    def _inputs(self, images: Sequence, prepared=None):
        """The method's inputs for one batch (patch features, global embeddings or pixels [n, 3, S, S]) and,
        for a model fitted on aligned parts, each image's pose (else None)."""
        prepared = self.prepare(images) if prepared is None else prepared
        kind = self.record.get("input_kind", "patches")
        if kind == "images":
            return prepared, None
        patch, pooled = self._embed(images, prepared)
        poses = None
        if self.poser is not None:  # posed from its own features, then embedded in its part's frame
            prepared, poses = align_pixels(prepared, patch, self.poser, self.featurizer.spec.shape)
            patch, pooled = self._embed(images, prepared)
        return (patch if kind == "patches" else pooled), poses

    def _embed(self, images: Sequence, prepared):
        # A lone image is embedded beside a copy of itself: CPU kernels pick another algorithm for a batch
        # of one, whose float16-rounded features differ in a few last digits from the store's batches.
        pad = len(images) == 1
        patch, pooled = self.featurizer(list(images) * 2 if pad else list(images),
                                        batch=torch.cat([prepared, prepared]) if pad else prepared)
        return (patch[:1], pooled[:1]) if pad else (patch, pooled)

    def _normalised(self, images: Sequence):
        """Pixels as the evaluation fed them: decoded, resized and normalised for the record's backbone."""
        if self._transform is None:
            self._transform = build_transform(self.record["pixels"]["backbone"], self.image_size)
        return torch.stack([self._transform(item if isinstance(item, Image.Image)
                                            else load_rgb(item, max_side=4 * self.image_size)) for item in images])

    def score(self, images: Sequence, maps: bool = False, prepared=None) -> Scores:
        """Score image paths or decoded PIL images (one batch; ``score_many`` for long lists); ``prepared``:
        what ``prepare(images)`` returned for them, if it ran already."""
        if not len(images):
            raise FsadError("no images to score")
        x, poses = self._inputs(images, prepared)
        if self.is_detector:
            scores, raw = self.method.score(x)
            scores = np.asarray(scores, dtype=np.float64)
            decided = self.threshold.decide(scores) if self.threshold is not None else None
            shape = self.featurizer.spec.shape if self.featurizer is not None else self.image_size
            amap = self.method.anomaly_maps(raw, shape) if maps else None
            if amap is not None and poses is not None:  # back to each image's own frame
                amap = to_original(amap, poses, shape, shape)
            return Scores(scores, [None] * len(scores) if decided is None else [bool(d) for d in decided],
                          self.threshold.value if self.threshold is not None and self.threshold.usable else None,
                          anomaly_map=amap)

        logp = np.asarray(self.method.predict_log_proba(x), dtype=np.float64)
        classes = np.asarray(self.method.classes_).astype(str)
        good = np.flatnonzero(classes == GOOD)
        if not len(good) or len(classes) < 2:
            raise FsadError(f"{self.folder}: a classifier without a 'good' class and another cannot score anomalies")
        score = logsumexp(np.delete(logp, good[0], axis=1), axis=1) - logp[:, good[0]]
        labels = classes[np.argmax(logp, axis=1)]
        return Scores(score, [bool(lab != GOOD) for lab in labels], None, label=[str(lab) for lab in labels])
