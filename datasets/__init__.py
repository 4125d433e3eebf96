"""COCO-format detection data: loader, DETR augmentation, COCO evaluation, synthetic data set."""
from .coco import CocoDetection, build_dataset, collate
from .coco_eval import CocoEvaluator
from .transforms import make_transforms

__all__ = ["CocoDetection", "build_dataset", "collate", "CocoEvaluator", "make_transforms",
           "generate", "ensure_synthetic"]


def __getattr__(name):
    # Imported lazily so that `python -m datasets.synthetic` does not import the module twice
    # (runpy warns when the package __init__ already imported it).
    if name in ("generate", "ensure_synthetic"):
        from . import synthetic
        return getattr(synthetic, name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")
