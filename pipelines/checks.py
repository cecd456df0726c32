"""Asset checks that stand apart from an asset's own step.

The manifest check lives with the data assets (``assets/data.py``); the per-episode metric and
support/query checks are emitted by each evaluation step itself (``assets/evaluation.py``), because only
that step sees the episode. Here: a check over the whole benchmark table.
"""


import dagster as dg
import numpy as np
import pandas as pd

from fewshot_core.reports.aggregate import metric_columns


def build_table_checks(benchmark_table) -> list:
    @dg.asset_check(asset=benchmark_table, description="Every row has an MLflow run id, a unique "
                    "method x backbone x category x setting key, and every metric in [0, 1].")
    def benchmark_rows_valid(benchmark_table: pd.DataFrame) -> dg.AssetCheckResult:
        problems = []
        if len(benchmark_table):
            if benchmark_table["mlflow_run_id"].isna().any():
                problems.append("rows without an MLflow run id")
            dup = benchmark_table.duplicated(["method", "backbone", "category", "setting_key"])
            if dup.any():
                problems.append(f"{int(dup.sum())} duplicated evaluation keys")
            for m in metric_columns(benchmark_table):  # the schema's metrics: rates and areas in [0, 1]
                v = benchmark_table[m].to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if ((v < 0) | (v > 1)).any():
                    problems.append(f"{m} outside [0, 1]")
        return dg.AssetCheckResult(passed=not problems, metadata={
            "rows": len(benchmark_table), "problems": dg.MetadataValue.md("\n".join(problems) or "none")})

    return [benchmark_rows_valid]
