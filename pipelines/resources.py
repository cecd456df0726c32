"""Dagster resources: the feature store, MLflow tracking and the compute device.

Each is a thin configurable wrapper around a ``fewshot_core`` object, so assets stay free of paths and
environment look-ups and tests can point them at temporary folders.
"""

from __future__ import annotations

import dagster as dg

from fewshot_core.runtime import Runtime
from fewshot_core.tracking.runs import Tracker

# Which Dagster step logged an MLflow run: the worker's cleanup of a redelivered step finds its runs by them
PARTITION_TAG = "dagster.partition_key"
ASSET_TAG = "dagster.asset_key"


class DeviceResource(dg.ConfigurableResource):
    """Where tensors run. ``torch_threads`` > 0 caps intra-op threads (2-core machines: leave 1-2)."""

    device: str = "auto"
    torch_threads: int = 0

    def setup_for_execution(self, context) -> None:
        if self.torch_threads > 0:
            import torch  # the code location loads without torch; a step brings it

            torch.set_num_threads(self.torch_threads)

    def resolve(self) -> str:
        from fewshot_core.device import resolve_device  # torch: the code location loads without it

        return str(resolve_device(self.device))

    def runtime(self, artifact_dir):
        """The ``fewshot_core.runtime.Runtime`` methods compute on: this device, trained weights cached in
        ``artifact_dir``, no progress bars (the step log is the progress)."""
        return Runtime(device=self.resolve(), artifact_dir=artifact_dir, progress=False,
                       threads=self.torch_threads or None)


class FeatureStoreResource(dg.ConfigurableResource):
    """The on-disk feature store; a complete partition is reused, never recomputed."""

    root: str
    image_size: int  # the sweep's resolution (pipelines.config.SweepConfig.resolved_image_size)
    aspect: str = "auto"  # fewshot_core.data.aspect: "auto", "square" or a height/width ratio as text
    batch_size: int = 16
    num_workers: int = 2  # DataLoader decode workers: decoding overlaps the forward pass (the store's default)

    def store(self):
        from fewshot_core.features import FeatureStore  # torch: the code location loads without it

        return FeatureStore(self.root)

    def build(self, dataset, backbone: str, device: str = "cpu"):
        """The partition for ``dataset`` x ``backbone``: opened from disk when complete, else built."""
        from fewshot_core.features.store import EmbedCompute, FeatureSpec  # torch: the code location loads without it

        return self.store().build(dataset, FeatureSpec(backbone, self.image_size, aspect=self.aspect),
                                  EmbedCompute(self.batch_size, self.num_workers, device, progress=False))


class MlflowTracking(dg.ConfigurableResource):
    """MLflow via plain client calls; empty ``tracking_uri`` = ``MLFLOW_TRACKING_URI`` or the SQLite default
    in the Dagster home."""

    tracking_uri: str = ""
    experiment: str = "fsad-default"

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri or None)

    @staticmethod
    def step_tags(context: dg.AssetExecutionContext, partition_key: str) -> dict[str, str]:
        """The tags that tie a run to the Dagster step and partition that logged it."""
        return {PARTITION_TAG: partition_key, ASSET_TAG: context.asset_key.to_user_string()}
