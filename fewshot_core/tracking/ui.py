"""The MLflow UI address report and Dagster links point at, and the links themselves."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from fewshot_core.errors import FsadError

MLFLOW_UI_ENV = "FSAD_MLFLOW_UI"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_ui_url() -> str:
    """The MLflow UI address report links point at: ``FSAD_MLFLOW_UI`` when set, else 127.0.0.1:5000.

    ``fsad mlflow-ui`` serves on the same host and port by default, so the links and the server agree.
    """
    url = (os.environ.get(MLFLOW_UI_ENV) or DEFAULT_MLFLOW_UI).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FsadError(f"{MLFLOW_UI_ENV}={url!r}: not an http(s) address; set it like http://127.0.0.1:5000")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise FsadError(f"{MLFLOW_UI_ENV}={url!r}: bad port; set it like http://127.0.0.1:5000") from None
    return url


def mlflow_ui_host_port() -> tuple[str, int]:
    """(host, port) of ``mlflow_ui_url()``, the defaults of ``fsad mlflow-ui``."""
    parts = urlsplit(mlflow_ui_url())
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


# MLflow's UI (3.x) opens every experiment in its GenAI view unless the link asks for the model-training one
UI_VIEW = "workflowType=machine_learning"


def run_url(experiment_id, run_id, ui_base: str | None = None) -> str:
    """The MLflow UI page of one run, in the UI's model-training view (runs, metrics, models)."""
    return f"{ui_base or mlflow_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def experiment_url(experiment_id, ui_base: str | None = None) -> str:
    """The MLflow UI page of one experiment's runs, in the model-training view."""
    return f"{ui_base or mlflow_ui_url()}/#/experiments/{experiment_id}?{UI_VIEW}"

