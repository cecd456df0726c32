"""Benchmark reports: aggregation over seeds (mean with a bootstrap CI, or the range below five seeds), plots,
and the HTML report (which model to deploy, errors and time per image, the research questions)."""

from fewshot_core.reports.aggregate import aggregate, bootstrap_ci, metric_columns
from fewshot_core.reports.html import render_report, write_report

__all__ = ["aggregate", "bootstrap_ci", "metric_columns", "render_report", "write_report"]
