"""The detector contract every method follows (scikit-learn conventions).

* Hyper-parameters are the keyword arguments of ``__init__`` and stored under the same names; ``get_params``
  reads them back from the signature, so a model can always be rebuilt from its parameters.
* ``fit`` takes data only: ``Detector.fit(X)`` on good images (patch features [n, h, w, d] or images
  [n, 3, S, S], as the registry entry's input kind says); ``Classifier.fit(X, y)`` on labelled shots.
  Fitted state ends with an underscore (``bank_``, ``classes_``).
* How to compute (device, artifact folder, threads, progress) is a ``Runtime`` (``set_runtime``), never a
  parameter.
* ``Detector.score(X) -> (image_scores [m], maps [m, h, w])`` at the method's own map resolution;
  ``anomaly_maps(maps, size)`` is the one shared post-processing to image resolution (bilinear, then a
  Gaussian of ``map_sigma`` pixels: 4 for patch-level maps, 0 for maps a method already smoothed).
* ``input_size``: the square size a method reads images at (None: it reads the store's features at the
  partition's working shape); ``protocol_params`` fills parameters a protocol knows and the user did not give.
* Everything a protocol, saved model or pipeline reads of a method is declared here with a default
  (``input_kind``, ``fitted_``, ``fit_info_``, ``input_size``, ``backbone_name``; ``Detector.bank_`` /
  ``bank_size``; ``Classifier.trained_on``) and read as a plain attribute, never through ``getattr`` defaults.
* ``save(folder)`` / ``Method.load(folder)``: one format for every method (``methods/components/persistence.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_core.errors import FsadError
from fewshot_core.methods.components.anomaly_map import DEFAULT_SIGMA, to_image_maps
from fewshot_core.methods.components.nn_search import ivf_lists
from fewshot_core.methods.components.persistence import load_model, save_model
from fewshot_core.runtime import DEFAULT_RUNTIME, Runtime


def as_patch_array(x, what: str = "features") -> np.ndarray:
    """Validate a [n, h, w, d] feature array and return it as C-contiguous float32 (no copy when already so)."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[0] == 0 or min(arr.shape) == 0:
        raise ValueError(f"{what} must be a non-empty float array [n, h, w, d], got shape {arr.shape}")
    return arr


def pooled_max(patch_maps: np.ndarray, kernel: int = 3, stride: int | None = None) -> np.ndarray:
    """Image score = max of the average-pooled patch map (REB's rule; stride defaults to the kernel, as there).

    A kernel of 1 (or a grid smaller than the kernel) is the plain maximum.
    """
    maps = torch.from_numpy(np.ascontiguousarray(patch_maps, dtype=np.float32))
    h, w = maps.shape[1:]
    if kernel <= 1 or h < kernel or w < kernel:
        return maps.flatten(1).amax(1).numpy()
    pooled = F.avg_pool2d(maps.unsqueeze(1), kernel, stride=stride or kernel)
    return pooled.flatten(1).amax(1).numpy()


class NotFittedError(RuntimeError):
    pass


class Method:
    """Base of every method: parameters, runtime, fitted check, save/load."""

    name = "base"
    # Bump when the saved state of this method changes meaning; older folders then ask to be rebuilt.
    version = 1
    _runtime: Runtime = DEFAULT_RUNTIME
    # What fit and score read: "patches", "embeddings" or "images" (the registry entry says the same).
    input_kind: str
    # True once fit (or set_state) has run.
    fitted_: bool = False
    # What the last fit did (steps, timings, choices made on the support); a row and a saved model record
    # it. Read-only and empty until a method's fit assigns its own dict.
    fit_info_: Mapping[str, object] = MappingProxyType({})

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "Method":
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown parameter(s) {', '.join(unknown)}")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    def set_runtime(self, runtime: Runtime | None) -> "Method":
        self._runtime = runtime or DEFAULT_RUNTIME
        return self

    @property
    def input_size(self) -> int | None:
        """The square size (px) this method reads images at: its ``image_size`` parameter when it has one
        (the detectors and classifiers that train on pixels); None for a method that reads the feature
        store, whose features come at the partition's working shape. The protocols, the saved model and the
        pipeline read a method's size here and nowhere else."""
        size = self.image_size if "image_size" in self._param_names() else None
        return int(size) if size else None

    @property
    def backbone_name(self) -> str | None:
        """The timm name of the backbone this method embeds images with itself (its images are preprocessed
        as that backbone's config says); None for a method that reads the feature store's features (the
        partition names their backbone) or whose backbone was passed in as a module (nothing to rebuild)."""
        return None

    @classmethod
    def protocol_params(cls, params: dict, *, store_backbone: str | None = None, preloaded: bool = False) -> dict:
        """``params`` completed from the protocol's context: ``store_backbone`` is the feature store's
        backbone, ``preloaded`` whether the images come ready (no local weights needed). Most methods take
        their parameters as given; one that must agree with the store (a fine-tuned backbone) says so here."""
        return params

    def is_fitted(self) -> bool:
        return bool(self.fitted_)

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit first")

    # --- persistence (methods/components/persistence.py) ----------------------------------------
    def get_state(self) -> dict:
        """The fitted state: ``{"arrays": {name: ndarray}, "tensors": {name: tensor or state dict},
        "info": JSON-able dict}`` (any part may be missing)."""
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def provenance(self) -> dict:
        """What a saved model records about its inputs beyond its parameters (backbone, weights hash)."""
        return {}

    def save(self, folder, extra: dict | None = None) -> Path:
        return save_model(self, folder, extra)

    @classmethod
    def load(cls, folder, runtime: Runtime | None = None) -> "Method":
        model = load_model(folder, runtime)
        if cls is not Method and cls not in (Detector, Classifier) and not isinstance(model, cls):
            raise FsadError(f"{folder}: holds a {model.name!r} model, not {cls.name!r}; load it with Method.load")
        return model


class Detector(Method):
    """A one-class detector: ``fit(X)`` on good images, ``score(X) -> (image_scores, maps)``."""

    input_kind = "patches"
    map_sigma: float = DEFAULT_SIGMA
    # The fitted memory bank [rows, d] of the methods that keep one (PatchCore, kNN, LDKNN); None otherwise.
    bank_: np.ndarray | None = None

    @property
    def bank_size(self) -> int:
        """Rows of the fitted memory bank, as a row reports it; 0 for a detector without one."""
        return 0 if self.bank_ is None else len(self.bank_)

    def fit(self, X) -> "Detector":  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, X) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def anomaly_maps(self, maps: np.ndarray, size, sigma: float | None = None) -> np.ndarray:
        """``score``'s maps at image resolution ``size``: the shared post-processing of every detector."""
        return to_image_maps(maps, size, self.map_sigma if sigma is None else sigma)

    @classmethod
    def threshold_copy_params(cls, params: dict, support_shape: tuple | None = None) -> dict:
        """Parameters of the held-out copies that set the decision threshold (one fit per held-out image
        under leave-one-out; ``support_shape`` [n, views, h, w, d]): the model's own unless a method has a
        cheaper stand-in."""
        return params

    # Optional capability, the bank detectors' (``methods/components/heldout.py``): ``heldout_scores(X, left_out)``, the
    # image scores of X by this fitted model with the bank rows from the fitted maps ``left_out`` removed,
    # no refit (the threshold's held-out good scores); where ``can_score_heldout()`` is False the threshold
    # refits held-out copies instead.
    def can_score_heldout(self) -> bool:
        return False


def exact_copy_index(params: dict, support_shape: tuple | None = None) -> dict:
    """Params for a held-out copy, which scores one image: on ``index="auto"`` it searches exactly when
    that image has no more patches than an IVF index of its bank would have lists (``ivf_lists``), since
    assigning every bank row to a list costs about as much as the exact search of that many queries
    (256 px, 16 rotated shots: 1024 patches against 1213 lists, exact; 512 px: 4096 against 2427, IVF).
    ``support_shape`` is the support's [n, views, h, w, ...]; an index the user chose is kept."""
    if params.get("index", "auto") != "auto" or support_shape is None:
        return params
    n, views, h, w = support_shape[:4]
    rows = max(n - 1, 1) * views * h * w
    return {**params, "index": "flat"} if h * w <= ivf_lists(rows) else params


class Classifier(Method):
    """A supervised few-shot learner: ``fit(X, y)``, ``predict_log_proba(X) -> [m, C]`` over ``classes_``."""

    input_kind = "embeddings"
    # The categories a meta-trained classifier learnt from (the protocol refuses one that saw the evaluated
    # category); empty for a classifier that learns from its support alone.
    trained_on: tuple[str, ...] = ()

    def fit(self, X, y) -> "Classifier":  # pragma: no cover - interface
        raise NotImplementedError

    def predict_log_proba(self, X) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        return np.asarray(self.classes_)[np.argmax(self.predict_log_proba(X), axis=1)]
