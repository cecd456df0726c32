"""The one device rule: CUDA when present, else CPU; an explicit device that is absent is a user error."""

from __future__ import annotations

import torch

from fewshot_core.errors import FsadError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise FsadError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FsadError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device
