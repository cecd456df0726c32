"""The champion per category: the best method of a benchmark, registered as ``fsad-<category>@champion``.

Criterion (``ChampionCriterion``, configurable): among the rows of the largest shot count of the sweep
(per category and protocol), the method (and backbone) whose decisions are best: the highest mean
``metric`` over seeds, by default ``balanced_accuracy`` at the model's own threshold, since a deployed
model is judged by what it flags, not by how it ranks. Ties go to the better mean ``tiebreak`` (default
``image_auroc``), then to the faster scorer (mean ``score_seconds`` per query image). A method without
the metric (no threshold, e.g. one good shot or a detector trained on images) ranks below every method
with it, among its peers by the tiebreak. Its model is the one of its lowest seed. ``rank_candidates``
gives the whole order (the report names the runner-up from it); ``pick_champions`` its first.

Promotion (``promote``): the registered model ``fsad-<category>`` gets a new version from the logged
model and the alias ``champion`` only when the candidate beats the current champion on the same
criterion (strictly better in that order). A rerun that is worse, equal, or the same model leaves the
alias where it is. Version tags point back to the MLflow run and the report.
Aliases only; MLflow's deprecated stages are never used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pandas as pd

from fewshot_core.errors import FsadError
from fewshot_core.schema import Protocol

ALIAS = "champion"
PREFIX = "fsad-"


@dataclass(frozen=True)
class ChampionCriterion:
    metric: str = "balanced_accuracy"  # higher is better
    protocol: str = Protocol.ONECLASS.value
    tiebreak: str = "image_auroc"  # higher is better; also orders the methods that lack ``metric``
    shots: int | None = None  # None: the largest shot count of the sweep per category

    def key(self) -> str:
        return f"{self.protocol}:{self.metric}@{'max' if self.shots is None else self.shots}"


@dataclass(frozen=True)
class Candidate:
    category: str
    method: str
    backbone: str | None
    shots: int
    value: float  # mean metric over seeds (NaN: no row of the method has it)
    seconds_per_image: float
    n_seeds: int
    model_uri: str
    run_id: str
    criterion: str
    tiebreak_value: float = math.nan  # mean tiebreak metric over seeds

    def beats(self, value: float, seconds_per_image: float, tiebreak_value: float = math.nan) -> bool:
        """Strictly better than a candidate with these values, in the criterion's order."""
        return _order(self.value, self.tiebreak_value, self.seconds_per_image) > _order(
            value, tiebreak_value, seconds_per_image)


def _order(value: float, tiebreak: float, seconds: float) -> tuple:
    """Larger is better: having the metric, the metric, the tiebreak, then speed."""
    def finite(x):
        return x if math.isfinite(x) else -math.inf

    return (math.isfinite(value), finite(value), finite(tiebreak), -seconds if math.isfinite(seconds) else -math.inf)


def registered_name(category: str) -> str:
    return f"{PREFIX}{category}"


def rank_candidates(table: pd.DataFrame, criterion: ChampionCriterion | None = None) -> dict[str, list[Candidate]]:
    """Every candidate per category of a benchmark table (one row per episode with ``model_uri``), best first."""
    criterion = criterion or ChampionCriterion()
    need = {"category", "method", "shots", "seed", "model_uri", "mlflow_run_id"}
    if not len(table) or need - set(table.columns) or not {criterion.metric, criterion.tiebreak} & set(table.columns):
        return {}
    rows = table[(table["protocol"] == criterion.protocol) & table["model_uri"].notna()].copy()
    for col in (criterion.metric, criterion.tiebreak):
        if col not in rows:
            rows[col] = math.nan
    rows = rows[rows[criterion.metric].notna() | rows[criterion.tiebreak].notna()]
    if not len(rows):
        return {}
    per_image = rows.get("score_seconds", pd.Series(0.0, index=rows.index)).fillna(0.0)
    rows["seconds_per_image"] = per_image / rows.get("n_query", pd.Series(1, index=rows.index)).clip(lower=1)
    if "backbone" not in rows:
        rows["backbone"] = None
    out = {}
    for category, g in rows.groupby("category", sort=True):
        shots = int(g["shots"].max()) if criterion.shots is None else int(criterion.shots)
        g = g[g["shots"] == shots]
        cands = []
        for (method, backbone), m in g.groupby(["method", g["backbone"].fillna("")], sort=True):
            first = m.sort_values("seed").iloc[0]
            cands.append(Candidate(str(category), str(method), backbone or None, shots,
                                   _mean(m[criterion.metric]), float(m["seconds_per_image"].mean()),
                                   int(len(m)), str(first["model_uri"]), str(first["mlflow_run_id"]),
                                   criterion.key(), _mean(m[criterion.tiebreak])))
        if cands:  # stable sort: equal candidates keep the method order
            out[str(category)] = sorted(cands, key=lambda c: _order(c.value, c.tiebreak_value, c.seconds_per_image),
                                        reverse=True)
    return out


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if values.notna().any() else math.nan


def pick_champions(table: pd.DataFrame, criterion: ChampionCriterion | None = None) -> dict[str, Candidate]:
    """The best candidate per category of a benchmark table (``rank_candidates``' first)."""
    return {category: ranked[0] for category, ranked in rank_candidates(table, criterion).items()}


def current_champion(client, name: str):
    """The version holding the alias, or None (no registered model or no alias yet)."""
    from mlflow.exceptions import MlflowException  # mlflow: the report imports this module without it

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def promote(tracker, candidate: Candidate, report: str | None = None) -> dict:
    """Register ``candidate`` and move the alias to it if it beats the current champion (see module doc)."""
    from mlflow.exceptions import MlflowException  # mlflow: the report imports this module without it

    from fewshot_core.models.mlflow_model import register_model

    client = tracker.client
    name = registered_name(candidate.category)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"fsad champion models of category {candidate.category!r}")
    current = current_champion(client, name)
    if current is not None:
        tags = current.tags or {}
        same = tags.get("fsad.model_uri") == candidate.model_uri
        comparable = tags.get("fsad.criterion") == candidate.criterion
        value = float(tags.get("fsad.criterion_value", "nan"))
        speed = float(tags.get("fsad.seconds_per_image", "inf"))
        tiebreak = float(tags.get("fsad.tiebreak_value", "nan"))
        if same or (comparable and not candidate.beats(value, speed, tiebreak)):
            return {"name": name, "moved": False, "version": current.version, "value": candidate.value,
                    "champion_value": value}
    tags = {"fsad.model_uri": candidate.model_uri, "fsad.mlflow_run_id": candidate.run_id,
            "fsad.run_url": tracker.run_url(candidate.run_id), "fsad.criterion": candidate.criterion,
            "fsad.criterion_value": repr(candidate.value), "fsad.tiebreak_value": repr(candidate.tiebreak_value),
            "fsad.seconds_per_image": repr(candidate.seconds_per_image),
            "fsad.method": candidate.method, "fsad.backbone": str(candidate.backbone), "fsad.shots": str(candidate.shots),
            "fsad.n_seeds": str(candidate.n_seeds), **({"fsad.report": str(report)} if report else {})}
    try:
        version = register_model(tracker.tracking_uri, candidate.model_uri, name, tags)
    except MlflowException as exc:
        raise FsadError(f"{candidate.model_uri}: cannot register as {name} ({str(exc).splitlines()[0][:160]}); "
                        "rerun the evaluation that logged it") from None
    client.set_registered_model_alias(name, ALIAS, version.version)
    return {"name": name, "moved": True, "version": version.version, "value": candidate.value,
            "champion_value": None if current is None else float((current.tags or {}).get("fsad.criterion_value", "nan"))}


def promote_champions(tracker, table: pd.DataFrame, criterion: ChampionCriterion | None = None,
                      report: str | None = None) -> list[dict]:
    """``pick_champions`` then ``promote`` each; one result dict per category (with the candidate)."""
    return [{**promote(tracker, cand, report), "candidate": asdict(cand)}
            for cand in pick_champions(table, criterion).values()]
