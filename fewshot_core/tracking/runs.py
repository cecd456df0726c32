"""``Tracker``: the fsad run layout on ``MlflowClient``: one experiment per sweep, one parent run per batch
(the code location passes its Dagster run id), one child run per evaluation or full-data model."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from fewshot_core.tracking.store import (default_artifact_root, default_tracking_uri, ensure_tracking_db,
                                         no_progress_bars)
from fewshot_core.tracking.ui import run_url
from fewshot_core.tracking.versions import code_version, git_commit

PARENT_RUN_TAG = "mlflow.parentRunId"
KIND_TAG = "fsad.kind"  # PARENT_KIND for parents, "evaluation" or "full-data" for children
# The batch a parent stands for. Key and kind keep the names of the code location's batches (Dagster runs):
# they are stored data, which older runs, the cleanup of redelivered steps and saved UI filters search by.
BATCH_TAG = "dagster.run_id"
PARENT_KIND = "dagster-run"
CODE_VERSION_TAG = "fsad.code_version"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
STAGE_TAG = "fsad.stage"
# A re-materialised partition leaves its older runs behind: they carry "true", the latest "false", so
# ``tags.fsad.superseded = 'false'`` in the MLflow UI shows exactly the runs behind the current tables.
SUPERSEDED_TAG = "fsad.superseded"
SUPERSEDED_BY_TAG = "fsad.superseded_by"
# MLflow 3 opens an experiment without this tag in its GenAI (traces) view; fsad logs model evaluations.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def parent_run_name(experiment: str, stage: str | None, batch_id: str) -> str:
    """``<sweep> · <stage>`` (e.g. ``fsad-default · evaluation 2/3``), the batch's short id only when
    the stage is unknown."""
    return f"{experiment} · {stage}" if stage else f"{experiment} · dagster {batch_id[:8]}"


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param value limit


class Tracker:
    """A thin wrapper over ``MlflowClient`` that knows the fsad run layout."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient  # mlflow: seconds to import; see the package docstring

        self.tracking_uri = tracking_uri or default_tracking_uri()
        ensure_tracking_db(self.tracking_uri)
        self.artifact_root = artifact_root or default_artifact_root(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)

    # -- experiments and parents -------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag was set
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by a concurrent step: read it back
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def parent_run(self, experiment: str, batch_id: str, tags: Mapping[str, str] | None = None,
                   stage: str | None = None) -> str:
        """The parent run of one batch, created on first use and found again afterwards; named by
        sweep (the experiment) and stage."""
        exp_id = self.experiment_id(experiment)
        found = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.`{BATCH_TAG}` = '{batch_id}' and tags.`{KIND_TAG}` = '{PARENT_KIND}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        all_tags = {KIND_TAG: PARENT_KIND, BATCH_TAG: batch_id, CODE_VERSION_TAG: code_version()}
        if stage:
            all_tags[STAGE_TAG] = stage
        if (commit := git_commit()) is not None:
            all_tags[GIT_COMMIT_TAG] = commit
        all_tags.update(tags or {})
        run = self.client.create_run(exp_id, tags=all_tags,
                                     run_name=parent_run_name(experiment, stage, batch_id))
        return run.info.run_id

    # -- evaluation children -----------------------------------------------------------------------
    def log_evaluation(
        self,
        experiment: str,
        batch_id: str,
        run_name: str,
        params: Mapping[str, object],
        metrics: Mapping[str, float],
        tags: Mapping[str, str] | None = None,
        artifacts: Mapping[str, bytes | str | Path] | None = None,
        stage: str | None = None,
    ) -> str:
        """Create a new child run under the batch's parent and log everything into it.

        Earlier runs of the same name and kind (the same method, category and setting: a re-materialised
        partition; or the same category's full-data model) are tagged superseded by the new one once it has
        finished.

        ``artifacts`` maps an artifact file name (``plots/roc.png``) to bytes, text, or a local path.
        Non-finite metrics are skipped (MLflow stores NaN, but a metric that could not be computed must be
        absent, not NaN). Returns the child run id.
        """
        from mlflow.entities import Metric, Param  # mlflow: see the package docstring

        parent = self.parent_run(experiment, batch_id, stage=stage)
        exp_id = self.experiment_id(experiment)
        all_tags = {KIND_TAG: "evaluation", PARENT_RUN_TAG: parent, BATCH_TAG: batch_id,
                    CODE_VERSION_TAG: code_version(), SUPERSEDED_TAG: "false"}
        if (commit := git_commit()) is not None:
            all_tags[GIT_COMMIT_TAG] = commit
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            ms = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                  if v is not None and math.isfinite(float(v))]
            ps = [Param(k, _param_value(v)) for k, v in params.items()]
            for i in range(0, max(len(ms), len(ps), 1), 100):  # MLflow batch limits
                self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])
            if artifacts:
                self._log_artifacts(run_id, artifacts)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        self.client.set_terminated(parent, "FINISHED")  # keeps the parent's end time at its last child
        self._supersede(exp_id, run_name, run_id, all_tags[KIND_TAG])
        return run_id

    def _supersede(self, exp_id: str, run_name: str, latest: str, kind: str = "evaluation") -> None:
        """Tag every other current run of ``kind`` named ``run_name`` as superseded by ``latest``."""
        name = run_name.replace("'", "\\'")
        kind = kind.replace("'", "\\'")
        flt = (f"tags.`{KIND_TAG}` = '{kind}' and tags.`{SUPERSEDED_TAG}` = 'false' "
               f"and attributes.run_name = '{name}'")
        for run in self.client.search_runs([exp_id], filter_string=flt, max_results=1000):
            if run.info.run_id != latest:
                self.client.set_tag(run.info.run_id, SUPERSEDED_TAG, "true")
                self.client.set_tag(run.info.run_id, SUPERSEDED_BY_TAG, latest)

    def _log_artifacts(self, run_id: str, artifacts: Mapping[str, bytes | str | Path]) -> None:
        with tempfile.TemporaryDirectory(prefix="fsad-mlflow-") as tmp:
            for name, content in artifacts.items():
                if isinstance(content, Path):
                    self.client.log_artifact(run_id, str(content), artifact_path=_dirname(name))
                    continue
                local = Path(tmp) / name
                local.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    local.write_bytes(content)
                else:
                    local.write_text(content)
                self.client.log_artifact(run_id, str(local), artifact_path=_dirname(name))

    # -- reading back ------------------------------------------------------------------------------
    def evaluation_runs(self, experiment: str, batch_id: str | None = None) -> list:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        flt = f"tags.`{KIND_TAG}` = 'evaluation'"
        if batch_id:
            flt += f" and tags.`{BATCH_TAG}` = '{batch_id}'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000,
                                           page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def artifact_bytes(self, run_id: str, path: str) -> bytes | None:
        """The content of one logged artifact file, or None when the run has no such file."""
        with tempfile.TemporaryDirectory(prefix="fsad-mlflow-") as tmp, no_progress_bars():
            try:
                local = self.client.download_artifacts(run_id, path, tmp)
            except Exception:  # MLflow raises its own, store-specific errors for a missing file
                return None
            return Path(local).read_bytes() if Path(local).is_file() else None

    def run_url(self, run_id: str, experiment_id: str | None = None, ui_base: str | None = None) -> str:
        if experiment_id is None:
            experiment_id = self.client.get_run(run_id).info.experiment_id
        return run_url(experiment_id, run_id, ui_base)


def _dirname(name: str) -> str | None:
    parent = str(Path(name).parent)
    return None if parent in ("", ".") else parent


def category_dataset(dataset):
    """The category's manifest as an MLflow dataset (name, digest over the records, source = its folder)."""
    import mlflow.data  # mlflow and pandas: seconds to import, only when a dataset is logged
    import pandas as pd

    frame = pd.DataFrame([r.to_row() for r in dataset.records]).sort_values("image_id", ignore_index=True)
    return mlflow.data.from_pandas(frame, source=str(Path(dataset.root).resolve()), name=dataset.category)


def log_dataset_input(tracker: "Tracker", run_id: str, dataset, context: str = "evaluation"):
    """Log the category's manifest as the run's dataset input (MLflow's Dataset column); returns it."""
    from mlflow.entities import DatasetInput, InputTag  # mlflow: see the package docstring

    data = category_dataset(dataset)
    tracker.client.log_inputs(run_id, datasets=[DatasetInput(data._to_mlflow_entity(),
                                                             tags=[InputTag("mlflow.data.context", context)])])
    return data

