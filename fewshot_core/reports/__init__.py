"""Benchmark reports: aggregation over seeds (mean ± bootstrap interval), plots, and the HTML report."""

from fewshot_core.reports.aggregate import aggregate, bootstrap_ci, metric_columns
from fewshot_core.reports.html import render_report, write_report

__all__ = ["aggregate", "bootstrap_ci", "metric_columns", "render_report", "write_report"]
