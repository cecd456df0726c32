"""``TrainedDetector``: the base of the one-class detectors that train on the support images (EfficientAD,
GLASS, REB).

``fit`` first looks for this very model in ``<artifacts>/<method>/<key>/``, a folder in the one save
format of every method (``methods/components/persistence.py``), keyed by a hash of the parameters (seed
included), the backbone weights and the support images; it trains only on a miss and saves what it trained.
The loop, image loading and backbone features it builds on are in ``methods/components/``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fewshot_core.backbones import resolve_weights
from fewshot_core.methods.base import Detector
from fewshot_core.methods.components.images import images_fingerprint, is_image_batch, load_images
from fewshot_core.methods.components.persistence import cached_fit, config_hash
from fewshot_core.methods.components.training import seeded


class TrainedDetector(Detector):
    """Base of the one-class detectors that train on the support images.

    Subclasses hold their hyper-parameters as ``__init__`` keyword arguments (``image_size``, ``seed``,
    ``backbone``, ``backbone_weights`` among them) and implement ``_setup()`` (the untrained parts:
    frozen backbone, synthesis helpers), ``_train(x, gen) -> info`` (x: float [n, 3, S, S] on the device,
    under ``seeded(seed)``), ``get_state()`` / ``set_state()`` (extending this class's) and
    ``_score(x) -> (scores [m], maps [m, S, S])`` as tensors.

    ``fit`` reloads the trained weights from the runtime's artifact folder when they are there and trains
    only on a miss; ``fit_info_`` says what happened (steps, stopped_by, fit_s of the original training,
    loaded_from_artifact, device, and the method's own details). Maps come back at ``image_size`` pixels,
    already smoothed: ``map_sigma`` is 0, so ``anomaly_maps`` only rescales them.
    """

    input_kind = "images"
    map_sigma = 0.0
    # fit_info_ entries about this process, not about the trained model (never saved)
    _VOLATILE = ("loaded_from_artifact", "artifact", "device")

    def _setup(self) -> None:
        raise NotImplementedError

    def _train(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ identity
    @property
    def backbone_name(self) -> str | None:
        """The frozen backbone's timm name (the ``backbone`` parameter)."""
        return self.backbone

    @property
    def bank_size(self) -> int:
        """The rows of a memory bank a detector builds from its trained features (``fit_info_["bank"]``)."""
        return int(self.fit_info_.get("bank", 0))

    def weights_info(self):
        """The resolved backbone weights (source, sha256, path) this detector starts from."""
        return resolve_weights(self.backbone, self.backbone_weights)

    def provenance(self) -> dict:
        info = self.weights_info()
        return {"backbone": self.backbone, "weights": {"source": info.source, "sha256": info.sha256}}

    def cache_key(self, x: torch.Tensor) -> str:
        """Hash of everything that shapes the trained weights: parameters (seed included), backbone weights
        and the support images; never the runtime (device, threads, artifact folder)."""
        return config_hash({"method": self.name, "version": self.version, "params": self.get_params(),
                            "provenance": self.provenance(), "support": images_fingerprint(x)})

    # ------------------------------------------------------------------ fit / score
    def fit(self, X) -> "TrainedDetector":
        """Train on good images ``X`` (float [n, 3, S, S] in [0, 1], or paths / PIL images / arrays)."""
        x = load_images(X, self.image_size)
        self.device_ = self.runtime.torch_device()
        root = self.runtime.artifacts
        folder = None if root is None else root / self.name / self.cache_key(x)

        def train():
            self._setup()
            t0 = time.perf_counter()
            with seeded(self.seed, self.device_) as gen:
                info = dict(self._train(x.to(self.device_), gen) or {})
            info.update(fit_s=round(time.perf_counter() - t0, 3), n_support=len(x))
            self.fit_info_ = {**info, "loaded_from_artifact": False}

        with self.runtime.thread_limit():
            cached_fit(self, folder, train)
        self.fit_info_.update(device=str(self.device_))
        if folder is not None:
            self.fit_info_["artifact"] = str(folder)
        return self

    @torch.no_grad()
    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [m] and anomaly maps [m, image_size, image_size] (float32, higher = more anomalous)."""
        self._check_fitted()
        items = torch.from_numpy(np.ascontiguousarray(X)) if is_image_batch(X) else X
        items = items if isinstance(items, torch.Tensor) else list(items)
        batch = int(self.runtime.score_batch)
        scores, maps = [], []
        with self.runtime.thread_limit():
            for i in range(0, len(items), batch):
                x = load_images(items[i:i + batch], self.image_size).to(self.device_)
                s, m = self._score(x)
                scores.append(s.float().cpu().numpy())
                maps.append(m.float().cpu().numpy())
        return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)

    # ------------------------------------------------------------------ persistence (extended by subclasses)
    def get_state(self) -> dict:
        return {"info": {"fit": {k: v for k, v in self.fit_info_.items() if k not in self._VOLATILE}}}

    def set_state(self, state: dict) -> None:
        """The fitted state back (from ``get_state``); subclasses rebuild their networks after this."""
        self.device_ = self.runtime.torch_device()
        self.fit_info_ = {**(state.get("info") or {}).get("fit", {}), "loaded_from_artifact": True}
        self._setup()
