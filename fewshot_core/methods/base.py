"""What every one-class method shares: input checks, the pooled image score, and saving the fitted state.

A one-class method is fitted on the patch features of good support images and scores query images:

    fit(support: float32 [n, h, w, d]) -> self
    score(query: float32 [m, h, w, d]) -> (image_scores [m], patch_maps [m, h, w])

``save(path)`` writes the fitted state (memory bank and friends) and the constructor parameters to one
``.npz`` file (atomically), so MLflow can log it; ``load(path)`` rebuilds a ready-to-score method.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_core.atomic import atomic_write
from fewshot_core.errors import FsadError


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


class OneClassMethod:
    """Base class: subclasses set ``name``, implement ``fit``/``score``, ``_state``/``_set_state``."""

    name = "base"

    def __init__(self, **params):
        self.params = dict(params)

    def get_params(self) -> dict:
        return dict(self.params)

    def fit(self, support) -> OneClassMethod:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, query) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    # --- persistence -------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def _set_state(self, state: dict[str, np.ndarray]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(support) first")

    def save(self, path) -> Path:
        """Write the fitted state and the parameters to ``path`` (.npz), atomically."""
        self._check_fitted()
        header = json.dumps({"method": self.name, "params": self.get_params()})
        # suffix .npz: np.savez appends it to any other name, and the rename would miss the file
        return atomic_write(path, lambda tmp: np.savez(tmp, __header__=np.array(header), **self._state()),
                            suffix=".npz")

    @classmethod
    def load(cls, path) -> OneClassMethod:
        """Rebuild a fitted method from ``save``'s file."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["__header__"]))
                state = {k: data[k] for k in data.files if k != "__header__"}
        except (OSError, KeyError, ValueError) as exc:
            raise FsadError(f"{path}: not a saved fsad method ({exc}); save one with method.save(path)") from exc
        if header["method"] != cls.name and cls is not OneClassMethod:
            raise FsadError(f"{path}: holds a {header['method']!r} method, not {cls.name!r}; load it with that class")
        if cls is OneClassMethod:
            from fewshot_core.methods import get_method_class

            cls = get_method_class(header["method"])
        method = cls(**header["params"])
        method._set_state(state)
        return method
