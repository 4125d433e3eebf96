"""DETR augmentation with torchvision.transforms.v2.

The transforms take and return ``(image, target)`` where image is a ``tv_tensors.Image`` and target a
dict with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, absolute pixels) and ``labels``; the boxes
follow every geometric step, are clamped to the image, and empty boxes are dropped with their labels.

Train (as DETR / detrex; docs/authors_code.md, "Family settings"): horizontal flip (p=0.5), then with p=0.5 either
(a) shorter side -> random choice of ``train_scales`` (longer side capped at ``train_max_size``), or
(b) shorter side -> random choice of ``crop_resize_scales`` -> random crop -> (a).
Test: shorter side ``test_size``, longer side at most ``test_max_size``.
"""
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResizeShortestSide(v2.RandomShortestSize):
    """v2.RandomShortestSize, but rounding the new size as detectron2 does.

    torchvision truncates ``int(side * ratio)``, so a requested 112 can come out as 111.
    """

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        short = self.min_size[int(torch.randint(len(self.min_size), ()))]
        ratio = short / min(height, width)
        if self.max_size is not None:
            ratio = min(ratio, self.max_size / max(height, width))
        return dict(size=(int(height * ratio + 0.5), int(width * ratio + 0.5)))


class RandomSizeCrop(v2.Transform):
    """Crop of random size: h and w drawn uniformly in [min_size, min(side, max_size)], random position.

    A side shorter than min_size is kept whole (detectron2's "absolute_range" crop does the same).
    """

    def __init__(self, min_size, max_size):
        super().__init__()
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)

        def draw(side):
            lo, hi = min(side, self.min_size), min(side, self.max_size)
            return int(torch.randint(lo, hi + 1, ()))

        h, w = draw(height), draw(width)
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt, params):
        # F.crop clamps boxes to the crop; boxes left with no width/height are removed by drop_empty_boxes.
        return self._call_kernel(F.crop, inpt, **params)


def drop_empty_boxes(image, target):
    """Remove boxes with x2 <= x1 or y2 <= y1 together with their labels.

    This is DETR's (and detectron2's) rule; v2.SanitizeBoundingBoxes cannot go below a 1 px minimum.
    """
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, dict(target, boxes=tv_tensors.wrap(boxes[keep], like=boxes), labels=target["labels"][keep])


def _cfg(data_cfg, key, purpose):
    if key not in data_cfg:
        raise KeyError(f"data config is missing key {key!r} (needed for the {purpose} transforms)")
    return data_cfg[key]


def make_transforms(data_cfg, train):
    """Return the v2 pipeline for training (random) or testing (deterministic) from the data config."""
    if train:
        scales = [int(s) for s in _cfg(data_cfg, "train_scales", "train")]
        max_size = int(_cfg(data_cfg, "train_max_size", "train"))
        crop_scales = [int(s) for s in _cfg(data_cfg, "crop_resize_scales", "train")]
        crop_min, crop_max = (int(s) for s in _cfg(data_cfg, "crop_size", "train"))
        geometry = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomChoice([
                ResizeShortestSide(scales, max_size=max_size),
                v2.Compose([
                    ResizeShortestSide(crop_scales),
                    RandomSizeCrop(crop_min, crop_max),
                    ResizeShortestSide(scales, max_size=max_size),
                ]),
            ]),
        ]
    else:
        test_size = int(_cfg(data_cfg, "test_size", "test"))
        test_max = int(_cfg(data_cfg, "test_max_size", "test"))
        geometry = [ResizeShortestSide(test_size, max_size=test_max)]  # one size: deterministic
    return v2.Compose([
        *geometry,
        v2.ClampBoundingBoxes(),
        drop_empty_boxes,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def denormalize(image):
    """Undo Normalize on a (..., 3, H, W) tensor (for visualisation and tests)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return image * std + mean

