"""Features: PatchCore patch features, global embeddings and the on-disk feature store."""

from fewshot_core.features.extract import embed_batch, iter_embeddings
from fewshot_core.features.patch import local_aggregate, patch_features
from fewshot_core.features.store import (
    EmbedCompute,
    FeaturePartition,
    FeatureSpec,
    FeatureStore,
    PartitionDamaged,
    dataset_fingerprint,
    partition_key,
    verify_partition,
)

__all__ = [
    "EmbedCompute",
    "FeaturePartition",
    "FeatureSpec",
    "FeatureStore",
    "PartitionDamaged",
    "dataset_fingerprint",
    "embed_batch",
    "iter_embeddings",
    "local_aggregate",
    "partition_key",
    "patch_features",
    "verify_partition",
]
