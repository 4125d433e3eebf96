"""COCO-format detection data: loader, DETR augmentation, COCO evaluation, synthetic data set."""
from .coco import CocoDetection, build_dataset, build_split, collate, split_paths
from .coco_eval import CocoEvaluator
from .errors import DataError, DataNotFoundError
from .transforms import make_transforms

__all__ = ["CocoDetection", "build_dataset", "build_split", "split_paths", "collate", "CocoEvaluator",
           "make_transforms", "DataError", "DataNotFoundError", "generate", "ensure_synthetic"]


def __getattr__(name):
    # Imported lazily so that `python -m datasets.synthetic` does not import the module twice
    # (runpy warns when the package __init__ already imported it).
    if name in ("generate", "ensure_synthetic"):
        from . import synthetic
        return getattr(synthetic, name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")
