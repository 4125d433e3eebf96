"""COCO box AP with pycocotools' COCOeval."""
import contextlib
import io
import math

import torch
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six COCOeval stats, in order
# Rounding of `CocoEvaluator.results()`. Measured on 200 synthetic 192-px images (four demo_ladder
# checkpoints): the metrics recomputed from boxes rounded to 0.01 px moved by up to 7e-4 (IoU
# thresholds and area ranges of small boxes), from scores rounded to 5 decimals by up to 1e-4
# (ties); these two kept all six metrics within 1e-7 of the unrounded ones.
BOX_DECIMALS = 3  # of a pixel
SCORE_DECIMALS = 6


def _as_list(x):
    return x.detach().cpu().tolist() if isinstance(x, torch.Tensor) else list(x)


class CocoEvaluator:
    """Collects detections and computes COCO bbox AP on the images that were updated.

    To merge results of several processes, extend ``detections`` (and ``image_ids``, so images for
    which a process produced no detection still count) with the other processes' lists.
    """

    def __init__(self, coco_gt, category_ids):
        self.coco_gt = coco_gt
        self.category_ids = list(category_ids)
        self.detections = []
        self.image_ids = []

    def update(self, image_ids, boxes, scores, labels):
        """Add the detections of a batch: per image, xyxy boxes in ORIGINAL image pixels, scores and
        contiguous labels (lists or tensors)."""
        for image_id, img_boxes, img_scores, img_labels in zip(image_ids, boxes, scores, labels):
            image_id = int(image_id)
            self.image_ids.append(image_id)
            for (x1, y1, x2, y2), score, label in zip(_as_list(img_boxes), _as_list(img_scores),
                                                      _as_list(img_labels)):
                self.detections.append({
                    "image_id": image_id,
                    "category_id": self.category_ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                })

    def results(self, box_decimals=BOX_DECIMALS, score_decimals=SCORE_DECIMALS):
        """The detections in COCO's results format, what pycocotools' ``COCO.loadRes`` takes: a list
        of {"image_id", "category_id" (the data set's own category id), "bbox" [x, y, w, h] in
        original image pixels, "score"} of plain floats, grouped by image id (ascending; each image's
        detections in the order they were given), boxes rounded to `box_decimals` and scores to
        `score_decimals` decimals (None: unrounded). New dicts: ``summarize()``, which lets
        ``loadRes`` add keys to ``self.detections``, leaves them as they are."""
        def rounded(x, decimals):
            return float(x) if decimals is None else round(float(x), decimals)

        return [{"image_id": d["image_id"], "category_id": d["category_id"],
                 "bbox": [rounded(v, box_decimals) for v in d["bbox"]], "score": rounded(d["score"], score_decimals)}
                for d in sorted(self.detections, key=lambda d: d["image_id"])]

    def moved_to_other_images(self, offset=1):
        """A new evaluator holding these detections, each image's given to another image: image k of
        the evaluated images (sorted by id) passes its detections to image k + offset (cyclically),
        boxes rescaled from its size to the receiver's. A detector that reads nothing from the image
        (every image gets the same boxes and scores, the "dataset prior") scores the same AP both
        ways; the gap between the two is what the detector takes from the image."""
        ids = sorted(set(self.image_ids) | {d["image_id"] for d in self.detections})
        if len(ids) < 2:
            raise ValueError("moving detections to other images needs at least two evaluated images")
        receiver = {a: ids[(k + offset) % len(ids)] for k, a in enumerate(ids)}
        size = {i: (self.coco_gt.imgs[i]["width"], self.coco_gt.imgs[i]["height"]) for i in ids}
        moved = CocoEvaluator(self.coco_gt, self.category_ids)
        moved.image_ids = list(ids)
        for d in self.detections:
            to = receiver[d["image_id"]]
            sx, sy = size[to][0] / size[d["image_id"]][0], size[to][1] / size[d["image_id"]][1]
            x, y, w, h = d["bbox"]
            moved.detections.append({**d, "image_id": to, "bbox": [x * sx, y * sy, w * sx, h * sy]})
        return moved

    def summarize(self, quiet=True):
        """Return {AP, AP50, AP75, APs, APm, APl} in [0, 1]; NaN where undefined (no GT in that range).

        With no detections at all every metric is 0.
        """
        if not self.detections:
            return {name: 0.0 for name in METRICS}
        image_ids = sorted(set(self.image_ids) | {d["image_id"] for d in self.detections})
        out = io.StringIO() if quiet else None
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            coco_dt = self.coco_gt.loadRes(self.detections)
            evaluator = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {name: (math.nan if value < 0 else float(value)) for name, value in zip(METRICS, evaluator.stats)}
