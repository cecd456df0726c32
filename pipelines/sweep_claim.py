"""One sweep per home and per MLflow experiment.

A Dagster home holds one sweep's runs, materialisations, tables and MLflow store; an experiment (named after
the sweep) holds its runs. Materialising another sweep's data into them (the synthetic demo's 112 px quick
look into a home of real 256 px runs, say) would mix two benchmarks in one report and one champion. So the
first ``fsad run`` records what the home holds (``CLAIM``: sweep name, data source and root, image size and
aspect), the experiment gets the same record as a tag, and a later run, or ``dagster dev`` loading the code
location, with other data is refused in one line naming the fix. Methods, shots and seeds may change: they
add rows to the same benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fewshot_core.atomic import atomic_write_text
from fewshot_core.errors import FsadError
from pipelines.assets.data import resolve_data

CLAIM = "fsad-sweep.json"
EXPERIMENT_TAG = "fsad.sweep_data"


def identity(cfg, data_root, source: str) -> dict:
    """What makes two runs the same benchmark: the sweep's name, its data and the resolution it is seen at.

    Generated data is named by its generator settings, not by the folder it was written to: two work
    folders regenerate the same images, so they are one benchmark.
    """
    root = ("generated " + json.dumps(cfg.synth, sort_keys=True)) if source == "synthetic" else str(data_root)
    return {"sweep": cfg.name, "data": source, "root": root, "image_size": int(cfg.resolved_image_size()),
            "aspect": str(cfg.aspect)}


def _describe(ident: dict) -> str:
    where = ident["root"] if ident["root"].startswith("generated ") else f"at {ident['root']}"
    return (f"sweep {ident['sweep']!r} on {ident['data']} data {where} ({ident['image_size']} px, "
            f"aspect {ident['aspect']})")


def check_home(home: Path, ident: dict, write: bool = False) -> None:
    """Refuse ``ident`` in a home that holds another sweep's data; with ``write``, claim an unclaimed home."""
    path = Path(home) / CLAIM
    try:
        held = json.loads(path.read_text())
    except FileNotFoundError:
        held = None
    except (OSError, ValueError):
        raise FsadError(f"{path}: unreadable sweep record; delete it if this home holds one sweep's runs") from None
    if held is not None and held != ident:
        raise FsadError(f"{home}: holds {_describe(held)}, not {_describe(ident)}; run this sweep with another "
                        f"--dagster-home (or DAGSTER_HOME), or delete {home} to start over")
    if held is None and write:
        atomic_write_text(path, json.dumps(ident, indent=1, sort_keys=True) + "\n")


def check_experiment(tracker, ident: dict) -> None:
    """Refuse ``ident`` in an MLflow experiment tagged with another sweep's data; tag it otherwise."""
    exp_id = tracker.experiment_id(ident["sweep"])
    held = tracker.client.get_experiment(exp_id).tags.get(EXPERIMENT_TAG)
    mine = json.dumps(ident, sort_keys=True)
    if held is not None and held != mine:
        raise FsadError(f"MLflow experiment {ident['sweep']!r} ({tracker.tracking_uri}): holds "
                        f"{_describe(json.loads(held))}, not {_describe(ident)}; give this sweep another name "
                        f"(name: in its YAML) or another MLFLOW_TRACKING_URI")
    if held is None:
        tracker.client.set_experiment_tag(exp_id, EXPERIMENT_TAG, mine)


def check_loaded_home(cfg) -> None:
    """For ``dagster dev``: refuse to load ``cfg`` against a ``DAGSTER_HOME`` that ``fsad run`` claimed for
    another sweep's data (read only; a home without a record is left alone)."""
    home = os.environ.get("DAGSTER_HOME")
    if home and (Path(home) / CLAIM).is_file():
        check_home(Path(home), identity(cfg, *resolve_data(cfg)))
