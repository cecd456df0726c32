"""fsad core library: data, backbones, features, few-shot methods, metrics and reports.

This package never imports Dagster; the orchestration lives in ``pipelines/``.
"""

import os

# OpenMP worker threads (torch, faiss, scikit-learn) sleep between parallel regions instead of spinning:
# an evaluation alternates torch, faiss and BLAS calls, and Dagster runs several such processes at once,
# where spinning threads hold the cores the next call needs (docs/benchmarks.md, "`fsad evaluate` at 16 shots").
# It must be set before an OpenMP runtime loads; a setting of the user's own wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
