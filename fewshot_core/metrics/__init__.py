"""Detection and localisation metrics, returned as plain ``dict[str, float]``.

Keys: ``image_auroc``, ``image_f1_max``, ``recall_<defect type>`` at a threshold (image.py);
``pixel_auroc``, ``pixel_f1_max``, ``aupro`` (pixel.py, aupro.py). A metric that cannot be computed (one
class only, no masks) is absent, not NaN.
Classification metrics for the supervised protocol live in ``classification.py``.
"""

from fewshot_core.metrics.aupro import FPR_LIMIT
from fewshot_core.metrics.image import f1_max, image_metrics, recall_per_defect_type
from fewshot_core.metrics.pixel import PixelAccumulator, aupro, pixel_metrics

__all__ = ["FPR_LIMIT", "PixelAccumulator", "aupro", "f1_max", "image_metrics", "pixel_metrics",
           "recall_per_defect_type"]
