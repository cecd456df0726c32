"""The cluster profile's secrets: one ``secrets.env`` file (mode 0600) in the cluster home.

``up`` generates it once (``secrets.token_urlsafe``, written atomically); every command reads it again, and an
environment variable of the same name wins over the file, so a worker on another machine either gets a copy
of the file in its own ``--home`` or has the variables exported. What each key opens:

* ``FSAD_POSTGRES_PASSWORD``: PostgreSQL role ``fsad``, owner of the ``dagster`` and ``mlflow`` databases
  (Dagster's instance, the MLflow server's backend store); not a superuser.
* ``FSAD_REDIS_PASSWORD``: Redis (``requirepass``): the Celery broker, its results and the step leases.
* ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: the MLflow server's basic-auth account; MLflow's
  client reads these very names from the environment.
* head only: ``FSAD_POSTGRES_ADMIN_PASSWORD`` (superuser ``postgres``; ``up`` creates the role and databases
  with it) and ``MLFLOW_FLASK_SERVER_SECRET_KEY`` (the MLflow server's CSRF key).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from fewshot_core.atomic import atomic_write_text
from fewshot_core.errors import FsadError

SECRETS_FILE = "secrets.env"
MLFLOW_USER = "fsad"
# What every process of the profile needs (workers on other machines too)
CLIENT_KEYS = ("FSAD_POSTGRES_PASSWORD", "FSAD_REDIS_PASSWORD", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD")
# What only the head's `up` needs to start the services
SERVER_KEYS = ("FSAD_POSTGRES_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
ALL_KEYS = CLIENT_KEYS + SERVER_KEYS


def secrets_path(home: Path) -> Path:
    return Path(home) / SECRETS_FILE


def _generate() -> dict[str, str]:
    values = {key: secrets.token_urlsafe(32) for key in ALL_KEYS}
    values["MLFLOW_TRACKING_USERNAME"] = MLFLOW_USER
    return values


def _read_file(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if not stat.S_ISREG(mode):
        raise FsadError(f"{path}: not a regular file; remove it (`up` writes a new one) or copy the head's file")
    if mode & 0o077:
        raise FsadError(f"{path}: readable by other users (mode {stat.S_IMODE(mode):04o}); `chmod 600 {path}`")
    values = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ALL_KEYS:
            raise FsadError(f"{path}:{n}: expected KEY=VALUE with KEY one of {', '.join(ALL_KEYS)}; fix the line")
        values[key.strip()] = value.strip()
    return values


def load_secrets(home: Path, keys=CLIENT_KEYS, environ=None) -> dict[str, str]:
    """``keys`` from the environment, else from ``<home>/secrets.env``; FsadError naming what is missing."""
    environ = os.environ if environ is None else environ
    path = secrets_path(home)
    values = {k: v for k, v in _read_file(path).items() if v}
    values.update({k: environ[k] for k in ALL_KEYS if environ.get(k)})
    if missing := [k for k in keys if not values.get(k)]:
        where = f"{path} has no {', '.join(missing)}" if path.exists() else f"{path} not found"
        raise FsadError(f"{where}; run `python -m pipelines.deploy up --home {home}` on the head, then copy its "
                        f"secrets.env to this --home (chmod 600) or export {', '.join(missing)}")
    return {k: values[k] for k in keys}


def ensure_secrets(home: Path) -> tuple[dict[str, str], bool]:
    """Every secret for ``up``: generated into ``<home>/secrets.env`` (0600) when the file does not exist yet.
    Returns the secrets and whether they were made just now."""
    path = secrets_path(home)
    created = not path.exists()
    if created:
        body = "".join(f"{k}={v}\n" for k, v in _generate().items())
        atomic_write_text(path, "# fsad cluster secrets (python -m pipelines.deploy up); keep private\n" + body,
                          mode=0o600)
    return load_secrets(home, ALL_KEYS), created
