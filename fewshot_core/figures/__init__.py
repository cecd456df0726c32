"""The figures of one evaluated episode, logged with its MLflow run: the ROC curve, the confusion matrix and
the anomaly-map gallery (``episode.py``, ``gallery.py``). The sweep report's figures are
``fewshot_core/reports/plots.py``; both render through ``png.to_png``.

Apart from ``reports/`` so that an evaluation draws its figures without loading the report (pandas, the
HTML page, the tracking module).
"""

import matplotlib

matplotlib.use("Agg")  # no display on servers and in Dagster workers; set before any module imports pyplot
