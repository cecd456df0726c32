"""How fast: time per image end to end (backbone + scoring) and the machine it was measured on.

A feature-based method's episode never runs the backbone: its features come from the feature store, so
its ``score_seconds`` covers scoring the episode's ``n_query`` test images from cached features only. The
backbone's share per image is the store partition's build rate (``meta.json`` ``build.images_per_s``,
decoding included); the end-to-end time per image is the sum. A method that reads pixels (the trained
detectors) runs its own network inside scoring, so its scoring time is already end to end.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from fewshot_core import schema
from fewshot_core.errors import FsadError
from fewshot_core.methods import registry

SCORE_NOTE = ("score_seconds is the time to score all n_query test images of an episode from cached features "
              "(backbone excluded; methods that read pixels include their own network); fit_seconds fits the "
              "support. Time per image end to end = backbone per image (the feature store's build rate, "
              "image decoding included) + score_seconds / n_query.")
TIME_COLUMNS = schema.PER_IMAGE_TIMING  # the columns add_timings adds


def reads_images(method_name) -> bool:
    """Whether the registered method reads pixels itself (no store features)."""
    try:
        return registry.get(str(method_name)).input_kind == registry.IMAGES
    except Exception:  # noqa: BLE001 - a method no longer registered keeps its rows
        return False


def embed_rates(store_root: str | Path, keys) -> dict[str, dict]:
    """``{feature key: {"images_per_s", "device"}}`` from the store partitions' build records (keys whose
    partition or record is missing are left out: their backbone time is unknown, not zero)."""
    from fewshot_core.features.store import read_meta  # torch: the code location loads reports without it

    out = {}
    for key in {str(k) for k in keys if isinstance(k, str) and k}:
        try:
            build = read_meta(Path(store_root) / key).get("build") or {}
        except FsadError:
            continue
        if build.get("images_per_s"):
            out[key] = {"images_per_s": float(build["images_per_s"]), "device": str(build.get("device", "?"))}
    return out


def add_timings(rows: pd.DataFrame, rates: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """``rows`` with ``score_ms_per_image``, ``embed_ms_per_image`` (0 for methods that read pixels, NaN
    where the partition's rate is unknown) and ``ms_per_image`` (their sum) per row."""
    if not len(rows) or "score_seconds" not in rows:
        return rows
    rates = rates or {}
    n = rows["n_query"].astype(float).where(rows["n_query"] > 0) if "n_query" in rows else np.nan
    score = 1000.0 * rows["score_seconds"].astype(float) / n
    names = rows["method_name"] if "method_name" in rows else rows["method"].str.split("-").str[0]
    keys = rows["feature_key"] if "feature_key" in rows else pd.Series(None, index=rows.index)
    embed = [0.0 if reads_images(name) else
             (1000.0 / rates[key]["images_per_s"] if key in rates else np.nan) for name, key in zip(names, keys)]
    out = rows.assign(score_ms_per_image=score, embed_ms_per_image=np.asarray(embed, dtype=float))
    return out.assign(ms_per_image=out["score_ms_per_image"] + out["embed_ms_per_image"])


def machine() -> str:
    """``CPU model, N cores; GPU name`` of this host."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores usable ({os.cpu_count()} in the host); GPU: {gpu() or 'none'}"


def gpu() -> str | None:
    try:
        import torch  # the code location loads reports without it

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no torch or a broken driver: report no GPU rather than fail the report
        return None
    return None
