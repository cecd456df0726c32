"""The pool, Celery queue and k8s pod resources a step gets: plain tags, inert under the in-process executor,
read by the cluster and k8s profiles' executors (``profile.py``)."""

from __future__ import annotations

CPU_POOL, GPU_POOL = "cpu", "gpu"
CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG, without the import
K8S_CONFIG_TAG = "dagster-k8s/config"


def pool_for_method(entry) -> str:
    """The worker pool of a method (its ``MethodEntry``): the registry says whether it trains on pixels
    (``needs_accelerator``: GPU workers); the rest run from cached features on CPU workers."""
    return GPU_POOL if entry.needs_accelerator else CPU_POOL


def step_placement(pool: str) -> dict:
    """``pool`` and ``op_tags`` for an asset decorator: the Dagster pool (its limit caps steps across runs), the
    Celery queue of the same name, and the pod resources a k8s step of that pool asks for. All three are inert
    under the in-process executor (pools only limit when a limit is set on the instance)."""
    k8s: dict = {"container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}}
    if pool == GPU_POOL:
        k8s = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"},
                                                  "requests": {"cpu": "4", "memory": "16Gi"}}},
               # GPU nodes are usually tainted so that only pods asking for a GPU land there
               "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                    "effect": "NoSchedule"}]}}
    return {"pool": pool, "op_tags": {CELERY_QUEUE_TAG: pool, K8S_CONFIG_TAG: k8s}}
