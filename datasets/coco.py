"""COCO detection data set, dataset builder and batch collation.

Works on the COCO 2017 layout (``root/train2017``, ``root/val2017``,
``root/annotations/instances_{train2017,val2017}.json``) and on the synthetic one (split folders
``train``/``val``, see datasets/synthetic.py).
"""
import contextlib
import io
import os
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .transforms import make_transforms


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection images with DETR-style targets.

    ``dataset[i]`` returns ``(image, target)``: image a float32 (3, H, W) tensor (after transforms;
    scaled to [0, 1] when transforms is None) and target a dict with
    ``boxes`` (n, 4) float32 absolute xyxy pixels in the frame of the returned image,
    ``labels`` (n,) int64 contiguous 0..K-1, ``image_id`` int, ``orig_size`` and ``size`` int64 (h, w).
    Crowd annotations are dropped; boxes are clamped to the image and empty ones removed.
    """

    def __init__(self, img_dir, ann_file, transforms=None):
        self.img_dir = Path(img_dir)
        self.transforms = transforms
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(ann_file))
        self.ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.getCatIds())
        self.num_classes = len(self.category_ids)
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}

    def __len__(self):
        return len(self.ids)

    def label_to_category_id(self, labels):
        """Map contiguous labels (int, list or tensor) back to COCO category ids (int or list)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        if isinstance(labels, int):
            return self.category_ids[labels]
        return [self.category_ids[int(label)] for label in labels]

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        with Image.open(self.img_dir / info["file_name"]) as pil:
            image = tv_tensors.Image(F.pil_to_tensor(pil.convert("RGB")))
        height, width = image.shape[-2:]

        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        labels = torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
        }

        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = F.to_dtype(image, torch.float32, scale=True)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).to(torch.float32),
            "labels": target["labels"],
            "image_id": int(image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
        }


def _missing(path, what):
    return FileNotFoundError(
        f"COCO data not found: {what} {path} does not exist. Set data.root in the manifest (or the COCO_ROOT "
        f"environment variable) to a folder holding <split>/ images and annotations/instances_<split>.json, "
        f"or generate the synthetic set with `python -m datasets.synthetic --out DIR --train N --val M --seed S`.")


def build_dataset(data_cfg, split, train):
    """CocoDetection for images ``root/<split>`` and ``root/annotations/instances_<split>.json``.

    ``data_cfg['root']`` falls back to the COCO_ROOT environment variable when None or empty;
    ``train`` selects the random train transforms or the deterministic test transforms.
    """
    root = data_cfg.get("root") or os.environ.get("COCO_ROOT")
    if not root:
        raise FileNotFoundError(
            "no COCO data root: data.root is not set in the manifest and COCO_ROOT is not set. Set either, "
            "or generate the synthetic set with `python -m datasets.synthetic --out DIR --train N --val M --seed S` "
            "and use DIR as data.root.")
    root = Path(root).expanduser()
    img_dir, ann_file = root / split, root / "annotations" / f"instances_{split}.json"
    for path, what in ((root, "data root"), (img_dir, "image folder"), (ann_file, "annotation file")):
        if not path.exists():
            raise _missing(path, what)
    return CocoDetection(img_dir, ann_file, make_transforms(data_cfg, train))


def collate(batch):
    """Stack (image, target) pairs into a zero-padded batch.

    Returns ``images`` (B, 3, Hmax, Wmax) float32 padded at the bottom/right, ``padding_mask``
    (B, Hmax, Wmax) bool, True on padding, and ``targets`` (list of target dicts). Each image keeps its
    top-left origin, so box pixel coordinates are also batch coordinates.
    """
    images = [image for image, _ in batch]
    h_max = max(image.shape[1] for image in images)
    w_max = max(image.shape[2] for image in images)
    padded = images[0].new_zeros((len(images), 3, h_max, w_max))
    padding_mask = torch.ones((len(images), h_max, w_max), dtype=torch.bool)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        padded[i, :, :h, :w] = image
        padding_mask[i, :h, :w] = False
    return {"images": padded, "padding_mask": padding_mask, "targets": [target for _, target in batch]}
