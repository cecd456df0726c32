"""What fsad trusts when it loads a model, and the check that holds a model folder to it.

Trusted: the installed fsad package and its dependencies. Not trusted: anything inside a model folder (a
local folder, a run's artifacts, a registry version), since whoever can write to the store can change it.
So a model folder holds no code of its own and no pickle: its ``python_model`` is a copy of
``pyfunc_entry.py``, which only imports the wrapper from the installed fsad; its state is JSON, ``npz``
without pickles and torch tensors read with ``weights_only``. ``verify_logged_model`` refuses, before
anything of the folder is imported, unpickled or scored:

* a pickle anywhere in the folder (the wrapper of older fsad versions, or one put there);
* a ``python_function`` flavor that loads anything but ``pyfunc_entry.py`` (a pickle, other code, extra
  code paths), or a code file that differs from the installed one by a byte;
* a deployable folder outside ``artifacts/`` of the model folder, a manifest whose own checksum fails, and
  ``MLmodel`` metadata that disagrees with the manifest (an edited threshold in either).

fsad's loader never runs the folder's code file; MLflow's loaders (``mlflow.pyfunc.load_model``,
``mlflow models serve``) do, so ``download_verified`` makes a checked local copy to serve from.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fewshot_core.checksums import sha256_file
from fewshot_core.errors import FsadError
from fewshot_core.methods.components.persistence import MANIFEST, read_manifest
from fewshot_core.tracking.store import default_tracking_uri, fluent_uri, no_progress_bars

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
ARTIFACT = "fsad_model"  # the deployable folder inside the MLflow model's artifacts
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader for models-from-code
MLMODEL = "MLmodel"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle")
RELOG = "log it again with this fsad (rerun the evaluation that produced it)"


def verify_logged_model(model_dir) -> Path:
    """Check the MLflow model folder ``model_dir`` (see the module docstring); returns its deployable folder."""
    from mlflow.models import Model  # mlflow: fsad predict --help imports this module

    model_dir = Path(model_dir)
    mlmodel = model_dir / MLMODEL
    if not mlmodel.is_file():
        raise FsadError(f"{model_dir}: not an MLflow model ({MLMODEL} missing); give models:/fsad-<category>@champion, "
                        "runs:/<run>/model or a model folder")
    pickles = sorted(str((Path(top) / name).relative_to(model_dir))  # os.walk: symbolic links not followed
                     for top, _dirs, names in os.walk(model_dir) for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise FsadError(f"{model_dir}: holds a pickle ({', '.join(pickles)}), which fsad never loads (unpickling "
                        f"runs whatever code it carries); {RELOG}")
    try:
        meta = Model.load(str(mlmodel))  # YAML, read with safe_load
    except Exception as exc:  # MlflowException, YAML errors: a damaged file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FsadError(f"{mlmodel}: damaged ({reason}); {RELOG}") from None
    conf = meta.flavors.get("python_function") or {}
    if (conf.get("loader_module") != CODE_LOADER or Path(str(conf.get("model_code_path"))).name != ENTRY.name
            or "python_model" in conf or conf.get("code")):
        raise FsadError(f"{mlmodel}: its python_function flavor does not load fsad's {ENTRY.name} alone (a model "
                        f"of an older fsad, of another tool, or edited); {RELOG}")
    code = model_dir / ENTRY.name
    if not code.is_file() or code.is_symlink() or sha256_file(code) != sha256_file(ENTRY):
        raise FsadError(f"{code}: differs from the {ENTRY.name} of the installed fsad (replaced or damaged); "
                        f"refused without running it; {RELOG}")
    artifacts = conf.get("artifacts") or {}
    rel = Path(str((artifacts.get(ARTIFACT) or {}).get("path")))
    folder = model_dir / rel
    if (list(artifacts) != [ARTIFACT] or rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != ("artifacts",)
            or any(p.is_symlink() for p in [folder, *folder.parents] if model_dir in p.parents)):
        raise FsadError(f"{mlmodel}: its artifacts are not fsad's one model folder under artifacts/ (edited); "
                        f"{RELOG}")
    recorded = (meta.metadata or {}).get("fsad")
    actual = model_metadata(folder)  # reads the manifest: its own checksum is verified there
    if not isinstance(recorded, dict) or _canon(recorded) != _canon(actual):
        fields = sorted(k for k in set(actual) | set(recorded or {})
                        if _canon((recorded or {}).get(k)) != _canon(actual.get(k)))
        raise FsadError(f"{mlmodel}: damaged: its fsad metadata and {rel / MANIFEST} disagree on "
                        f"{', '.join(fields) or 'the record'}; {RELOG}")
    return folder


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True)  # NaN equals NaN here, as it should for a recorded value


def _download(uri: str, dst, tracking_uri: str | None) -> Path:
    import mlflow.artifacts  # mlflow: fsad predict --help imports this module

    with fluent_uri(tracking_uri or default_tracking_uri()), no_progress_bars():
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        except Exception as exc:  # MlflowException, OSError: not found, no such alias, no registry
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FsadError(f"{uri}: cannot load the model ({reason}); check the URI (models:/fsad-<category>"
                            "@champion, runs:/<run>/model or a local folder) and MLFLOW_TRACKING_URI") from None


def download_verified(uri: str, dst, tracking_uri: str | None = None) -> Path:
    """Download the MLflow model ``uri`` (models:/..., runs:/..., a local folder) into the folder ``dst`` and
    verify it; returns the local model folder, to serve with ``mlflow models serve -m``."""
    local = _download(uri, dst, tracking_uri)
    verify_logged_model(local)
    return local


def load_verified(uri: str, tracking_uri: str | None = None, runtime=None):
    """The ``DeployedModel`` behind a model URI, a logged MLflow model folder or a deployable folder, loaded
    only after ``verify_logged_model`` passed (a deployable folder: after its manifest checksum)."""
    from fewshot_core.models.deployable import DeployedModel  # torch: fsad predict --help imports this module

    local = Path(uri)
    if (local / MANIFEST).is_file():
        return DeployedModel(local, runtime)
    if local.is_dir():
        return DeployedModel(verify_logged_model(local), runtime)
    if "://" not in uri and ":/" not in uri:
        raise FsadError(f"{uri}: model not found; give models:/fsad-<category>@champion, runs:/<run>/model or a "
                        "model folder")
    # The loaded model keeps its state in memory, so the downloaded copy goes once it is loaded.
    with tempfile.TemporaryDirectory(prefix="fsad-model-") as tmp:
        local = _download(uri, tmp, tracking_uri)
        try:
            return DeployedModel(verify_logged_model(local), runtime)
        except FsadError as exc:  # named by the URI the user gave, not by the temporary copy
            raise FsadError(str(exc).replace(str(local), uri)) from None


def model_metadata(folder) -> dict:
    """What the MLflow model records for rebuilding and audit (from the deployable folder's manifest)."""
    manifest = read_manifest(folder)
    record = manifest["extra"]["deploy"]
    spec = record.get("featurizer") or {}
    threshold = record.get("threshold") or {}
    return {"fsad_method": manifest["method"], "fsad_params": json.dumps(manifest.get("params", {}), sort_keys=True),
            "category": record["category"], "protocol": record["protocol"], "input_kind": record["input_kind"],
            "backbone": spec.get("backbone") or manifest.get("provenance", {}).get("backbone"),
            "weights_source": spec.get("weights_source"), "weights_sha256": spec.get("weights_sha256"),
            "image_size": record["image_size"], "layers": spec.get("layers"), "patch_dim": spec.get("patch_dim"),
            "partition_key": spec.get("partition_key"), "code_version": record.get("code_version"),
            "git_commit": record.get("git_commit"), "support_ids": record.get("support_ids"),
            "threshold": threshold.get("value"), "threshold_rule": threshold.get("rule") or "argmax",
            "dataset_digest": (record.get("dataset") or {}).get("digest")}
