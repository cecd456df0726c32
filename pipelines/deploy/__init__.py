"""Deployment profiles beside the embedded default: ``cluster`` (PostgreSQL instance, run queue with pools,
Celery workers on Redis, an MLflow tracking server, shared stores) and ``k8s`` (the official Dagster Helm chart,
``k8s_job_executor``). Selected by ``FSAD_PROFILE``; unset or ``embedded`` keeps everything in-process."""
