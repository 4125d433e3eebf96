"""Shared helpers for the datasets tests: tiny hand-written COCO data sets."""
import json

import numpy as np
from PIL import Image

TINY_CATEGORIES = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]


def write_coco(root, split, images, annotations, categories=TINY_CATEGORIES):
    """Write root/<split>/*.png (grey images of the listed sizes) and root/annotations/instances_<split>.json.

    images: list of (image_id, width, height); annotations: list of dicts with image_id, category_id,
    bbox and optionally iscrowd (ids, area and segmentation are filled in).
    """
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    coco_images = []
    for image_id, width, height in images:
        name = f"{image_id:06d}.png"
        Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(root / split / name)
        coco_images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    coco_anns = []
    for i, ann in enumerate(annotations, 1):
        x, y, w, h = ann["bbox"]
        coco_anns.append({"id": i, "area": float(w * h), "iscrowd": 0,
                          "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], **ann})
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": coco_images, "annotations": coco_anns, "categories": categories}))
    return root / split, root / "annotations" / f"instances_{split}.json"


# Image 1 (40x30): one normal box per category plus a crowd box, a zero-width box, a box sticking out of
# the image (clamped) and one entirely outside it (removed). Image 2 (20x50): no annotations.
TINY_IMAGES = [(1, 40, 30), (2, 20, 50)]
TINY_ANNOTATIONS = [
    {"image_id": 1, "category_id": 5, "bbox": [2.0, 3.0, 10.0, 8.0]},
    {"image_id": 1, "category_id": 9, "bbox": [20.0, 10.0, 5.5, 6.0]},
    {"image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 40.0, 30.0], "iscrowd": 1},
    {"image_id": 1, "category_id": 2, "bbox": [15.0, 5.0, 0.0, 10.0]},       # zero width
    {"image_id": 1, "category_id": 2, "bbox": [30.0, 25.0, 20.0, 20.0]},     # clamped to 30,25,40,30
    {"image_id": 1, "category_id": 9, "bbox": [45.0, 5.0, 10.0, 10.0]},      # entirely outside
]
# Expected model targets for image 1 with no transforms: (xyxy box, category id).
TINY_EXPECTED = [([2.0, 3.0, 12.0, 11.0], 5), ([20.0, 10.0, 25.5, 16.0], 9), ([30.0, 25.0, 40.0, 30.0], 2)]

DATA_CFG = {
    "train_scales": [96, 112, 128, 144, 160], "train_max_size": 200,
    "crop_resize_scales": [100, 120], "crop_size": [60, 110],
    "test_size": 128, "test_max_size": 200,
}
