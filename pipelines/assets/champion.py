"""Champion stage: after the report, the best method per category becomes ``fsad-<category>@champion``
in the MLflow registry (one library call: ``fewshot_core.models.champion.promote_champions``)."""

import dagster as dg
import pandas as pd

from fewshot_core.models.champion import ChampionCriterion, promote_champions
from pipelines.assets.reports import report_path
from pipelines.config import SweepConfig
from pipelines.resources import MlflowTracking


def build_champion_asset(cfg: SweepConfig, html_report) -> dg.AssetsDefinition:
    criterion = ChampionCriterion(**cfg.champion)  # the sweep's champion: key; default balanced accuracy, largest shots
    @dg.asset(group_name="reports", kinds={"mlflow"}, deps=[html_report],
              ins={"benchmark_table": dg.AssetIn()},
              description="Registers the best method per category as fsad-<category> with the alias champion "
                          f"(criterion {criterion.key()}; ties to the higher {criterion.tiebreak}, then the faster "
                          "scorer; the HTML report names the same one); a worse rerun leaves the alias where it is.")
    def champion(context: dg.AssetExecutionContext, benchmark_table: pd.DataFrame,
                 mlflow: MlflowTracking) -> dg.MaterializeResult:
        results = promote_champions(mlflow.tracker(), benchmark_table, criterion,
                                    report=str(report_path(cfg)))
        lines = [f"- {r['name']} v{r['version']}: {r['candidate']['method']} "
                 f"{'(new champion)' if r['moved'] else '(alias kept: not better)'} {r['value']:.4f}"
                 for r in results]
        return dg.MaterializeResult(metadata={"champions": dg.MetadataValue.md("\n".join(lines) or "none"),
                                              "moved": sum(r["moved"] for r in results)})

    return champion
