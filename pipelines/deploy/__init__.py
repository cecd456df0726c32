"""The launcher of the deployment profiles beside the embedded default: ``python -m pipelines.deploy`` starts,
checks and stops the ``cluster`` profile's services (PostgreSQL instance, run queue with pools, Celery workers
on Redis, an MLflow tracking server, shared stores) and submits the sweep to it. What a profile means for the
code location (executor, pools, step tags) is ``pipelines/placement/``, which never imports this package."""
