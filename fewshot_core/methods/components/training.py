"""The training loop the detectors that train on images share (EfficientAD, GLASS, REB).

What every loop must do the same way: scoped seeding, mixed precision, a step/time budget with progress,
the learning-rate schedule, and the weights copied off the device.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from fewshot_core.errors import FsadError


# ---------------------------------------------------------------- seeding, precision

@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """torch's global RNG seeded with ``seed`` for the duration, the caller's RNG state restored afterwards.

    Module initialisation and dropout draw from the global RNG, so a fit seeds it, but only inside this
    scope; the method's own draws use the yielded CPU generator (seeded alike).
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU, where fp32 is faster.

    bf16 needs no loss scaling, so the loops stay simple; fp16 users get ``grad_scaler``.
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    use = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=use)


# ---------------------------------------------------------------- budget + progress

@dataclass
class TrainLoop:
    """Iterate training steps until ``max_steps`` or ``time_budget_s`` runs out, whichever is first.

    ``for step in loop: ...; loop.log(loss=...)`` shows a progress line every ``log_every`` steps on
    stderr and keeps the history; ``summary()`` says how and when training stopped.
    """

    max_steps: int
    time_budget_s: float | None = None
    desc: str = "train"
    log_every: int = 25
    progress: bool = True
    history: list[dict] = field(default_factory=list)
    stopped_by: str = "not-started"
    steps_done: int = 0
    elapsed_s: float = 0.0

    def __post_init__(self):
        if self.max_steps < 0:
            raise FsadError(f"{self.desc}: steps={self.max_steps} is negative; give steps >= 0")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise FsadError(f"{self.desc}: time budget {self.time_budget_s}s is not positive; give a positive number")

    def __iter__(self) -> Iterator[int]:
        # The first step always runs and its time is not charged to the budget: on CUDA it pays the
        # one-off kernel loading and autotuning, which would otherwise eat a short budget whole.
        self._t0 = time.perf_counter()
        budget_t0 = self._t0
        self.stopped_by = "steps"
        for step in range(self.max_steps):
            now = time.perf_counter()
            if step == 1:
                budget_t0 = now
            if self.time_budget_s is not None and step > 0 and now - budget_t0 >= self.time_budget_s:
                self.stopped_by = "time"
                self._print(f"time budget {self.time_budget_s:.0f}s reached after {step} steps")
                break
            yield step
            self.steps_done = step + 1
        self.elapsed_s = time.perf_counter() - self._t0

    def log(self, **values: float) -> None:
        row = {"step": self.steps_done, **{k: float(v) for k, v in values.items()}}
        self.history.append(row)
        step = self.steps_done + 1
        if step == 1 or step % self.log_every == 0 or step == self.max_steps:
            parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            self._print(f"step {step}/{self.max_steps} {parts} ({time.perf_counter() - self._t0:.1f}s)")

    def _print(self, text: str) -> None:
        if self.progress:
            print(f"[{self.desc}] {text}", file=sys.stderr, flush=True)

    def mean(self, key: str, first: bool) -> float:
        """Mean of ``key`` over the first/last tenth of the logged steps (1 to 20 steps)."""
        vals = [r[key] for r in self.history if key in r]
        if not vals:
            return float("nan")
        n = min(20, max(1, len(vals) // 10))
        part = vals[:n] if first else vals[-n:]
        return float(np.mean(part))

    def summary(self) -> dict:
        keys = sorted({k for r in self.history for k in r if k != "step"})
        return {
            "steps": self.steps_done,
            "max_steps": self.max_steps,
            "time_budget_s": self.time_budget_s,
            "stopped_by": self.stopped_by,
            "elapsed_s": round(self.elapsed_s, 3),
            **{f"{k}_first": self.mean(k, True) for k in keys},
            **{f"{k}_last": self.mean(k, False) for k in keys},
        }


def cosine_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], step: int, total: int) -> None:
    """Cosine decay to 0 over ``total`` steps (REB's schedule), set in place."""
    factor = 0.5 * (1 + np.cos(np.pi * min(step, total) / max(total, 1)))
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * factor


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
