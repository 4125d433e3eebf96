"""DETR variants with knowledge sharing. `build_model(cfg, num_classes)` gives (model, criterion).

Model inputs: images (B, 3, H, W) zero-padded on the bottom/right, padding_mask (B, H, W) True on
padding, and for the teacher branches `targets` as made by `model_targets` (labels; boxes as
normalised cxcywh for the loss; boxes_xyxy as absolute xyxy pixels for the GT Fg-Bg mask).
"""
import importlib

from torchvision.ops import box_convert

from .criterion import SetCriterion
from .matcher import HungarianMatcher

VARIANTS = {
    "dab_detr": "models.dab_detr",
    "conditional_detr": "models.conditional_detr",
    "dn_detr": "models.dn_detr",
    "deformable_detr": "models.deformable_detr",
    "dn_deformable_detr": "models.dn_deformable_detr",
}


def build_model(cfg, num_classes):
    """cfg: the resolved `model` section of a run configuration."""
    variant = cfg["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown model.variant {variant!r}; expected one of {sorted(VARIANTS)}")
    model = importlib.import_module(VARIANTS[variant]).build(cfg, num_classes)
    matcher = HungarianMatcher(**cfg["matcher"])
    criterion = SetCriterion(num_classes, matcher, **cfg["loss"])
    return model, criterion


def model_targets(targets, device=None):
    """Data set targets (absolute xyxy `boxes` in the transformed image, `size` (h, w)) to model
    targets: `boxes` normalised cxcywh (DETR convention), `boxes_xyxy` the absolute boxes."""
    out = []
    for t in targets:
        h, w = (float(s) for s in t["size"])
        xyxy = t["boxes"].to(device)
        scale = xyxy.new_tensor([w, h, w, h])
        out.append({**t, "labels": t["labels"].to(device), "boxes_xyxy": xyxy,
                    "boxes": box_convert(xyxy, "xyxy", "cxcywh") / scale})
    return out


def is_teacher_parameter(name):
    """Parameters that exist only for the KS teachers (dropped at inference)."""
    return ".teacher." in f".{name}"
