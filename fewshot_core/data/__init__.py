"""Data layer: MVTec-layout and config-declared datasets as ``Dataset`` objects of ``ImageRecord``s.

``load_dataset(source, category)`` takes an MVTec root, a layout YAML or a ``LayoutConfig``.
Validation (``fewshot_core.data.validate``) and the Parquet manifest (``fewshot_core.data.manifest``)
are imported on demand to keep this import light.
"""

from fewshot_core.data.layouts import LayoutConfig, dataset_from_args, load_dataset, load_datasets
from fewshot_core.data.mvtec import Dataset, list_categories, load_category
from fewshot_core.data.records import GOOD, ImageRecord

__all__ = [
    "GOOD",
    "Dataset",
    "ImageRecord",
    "LayoutConfig",
    "dataset_from_args",
    "list_categories",
    "load_category",
    "load_dataset",
    "load_datasets",
]
