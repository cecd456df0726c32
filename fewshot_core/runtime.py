"""How a method computes, never what: device, artifact folder, progress, threads, mixed precision.

A ``Runtime`` is handed to a method explicitly (``registry.create(name, runtime=...)`` or
``method.set_runtime(...)``); it is never part of a model's identity, its parameters or an artifact key,
so the same model trained on a GPU and reloaded on a laptop is the same model. Methods never change
global state themselves: thread limits are scoped by ``thread_limit()`` and restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fewshot_core.device import resolve_device
from fewshot_core.errors import FsadError
from fewshot_core.paths import default_work_dir

AUTO = "auto"


@dataclass(frozen=True)
class Runtime:
    """``device``: cpu, cuda, cuda:N or None (CUDA when present). ``artifact_dir``: where trained weights
    are cached and reloaded (None: train without caching; ``"auto"``: ``$FSAD_HOME/artifacts``).
    ``threads``: torch intra-op threads while a method runs (None: torch's choice). ``faiss_gpu``: "auto"
    (GPU nearest-neighbour search when faiss has one), True or False. ``score_batch``: images per forward
    pass when a detector that trains on images scores (bounds GPU and CPU memory)."""

    device: str | None = None
    artifact_dir: str | Path | None = AUTO
    progress: bool = True
    threads: int | None = None
    amp: bool = True
    faiss_gpu: bool | str = AUTO
    score_batch: int = 8

    def __post_init__(self):
        if self.threads is not None and int(self.threads) < 1:
            raise FsadError(f"threads={self.threads}: give a positive number of threads (or none for torch's choice)")
        if int(self.score_batch) < 1:
            raise FsadError(f"score_batch={self.score_batch}: give a positive number of images per batch")

    def replace(self, **changes) -> "Runtime":
        return replace(self, **changes)

    @property
    def artifacts(self) -> Path | None:
        """The resolved artifact folder, or None when caching is off."""
        if self.artifact_dir is None:
            return None
        if str(self.artifact_dir) == AUTO:
            return default_work_dir() / "artifacts"
        return Path(self.artifact_dir)

    def torch_device(self):
        return resolve_device(self.device)

    @contextlib.contextmanager
    def thread_limit(self):
        """Cap torch's intra-op threads for the duration, then restore the caller's setting."""
        if not self.threads:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(int(self.threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)


DEFAULT_RUNTIME = Runtime()
