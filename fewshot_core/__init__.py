"""fsad core library: data, backbones, features, few-shot methods, metrics and reports.

This package never imports Dagster; the orchestration lives in ``pipelines/``.
"""

__version__ = "0.1.0"
