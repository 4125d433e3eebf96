"""COCO evaluation wrapper: perfect, shifted, missing and mislabelled detections."""
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import CocoEvaluator
from .datasets_helpers import write_coco

CATEGORIES = [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]
# Three images 300x200 with small (<32^2), medium and large (>96^2) boxes; image 3 has a crowd box.
GT = [
    {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0]},     # small
    {"image_id": 1, "category_id": 8, "bbox": [50.0, 40.0, 60.0, 50.0]},     # medium
    {"image_id": 2, "category_id": 8, "bbox": [100.0, 20.0, 150.0, 120.0]},  # large
    {"image_id": 2, "category_id": 3, "bbox": [5.0, 150.0, 25.0, 20.0]},     # small
    {"image_id": 3, "category_id": 3, "bbox": [30.0, 30.0, 100.0, 100.0]},   # large
    {"image_id": 3, "category_id": 3, "bbox": [200.0, 10.0, 80.0, 60.0], "iscrowd": 1},
]


@pytest.fixture
def coco_gt(tmp_path):
    _, ann_file = write_coco(tmp_path, "val", [(i, 300, 200) for i in (1, 2, 3)], GT, CATEGORIES)
    return COCO(str(ann_file))


def run(coco_gt, shift=0.0, labels_of=None, image_ids=(1, 2, 3), use_tensors=True):
    """Feed the non-crowd GT boxes back as detections (score 1), optionally shifted or relabelled."""
    evaluator = CocoEvaluator(coco_gt, [3, 8])
    for image_id in image_ids:
        anns = [a for a in GT if a["image_id"] == image_id and not a.get("iscrowd")]
        boxes = [[x + shift, y, x + w + shift, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        labels = [labels_of(a) if labels_of else [3, 8].index(a["category_id"]) for a in anns]
        scores = [1.0] * len(anns)
        if use_tensors:
            boxes, labels, scores = torch.tensor(boxes), torch.tensor(labels), torch.tensor(scores)
        evaluator.update([image_id], [boxes], [scores], [labels])
    return evaluator


def test_perfect_predictions_give_ap_one(coco_gt, capsys):
    for use_tensors in (True, False):
        metrics = run(coco_gt, use_tensors=use_tensors).summarize()
        assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        for name, value in metrics.items():
            assert value == pytest.approx(1.0), name
    assert capsys.readouterr().out == ""  # quiet by default


def test_shifted_boxes_lower_ap(coco_gt):
    metrics = run(coco_gt, shift=4.0).summarize()
    # a 4 px shift ruins the 20 px boxes (IoU 0.67); the large ones keep IoU > 0.9 (only the 0.95
    # threshold fails)
    assert metrics["APs"] < 0.5 and metrics["AP"] < 0.8
    assert metrics["APl"] == pytest.approx(0.9)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP"] < run(coco_gt, shift=1.0).summarize()["AP"] < 1.0


def test_wrong_labels_and_no_predictions(coco_gt):
    wrong = run(coco_gt, labels_of=lambda a: 1 - [3, 8].index(a["category_id"])).summarize()
    assert all(value == 0.0 for value in wrong.values())
    empty = CocoEvaluator(coco_gt, [3, 8])
    empty.update([1, 2], [torch.zeros(0, 4), []], [torch.zeros(0), []], [torch.zeros(0, dtype=torch.long), []])
    assert empty.detections == []
    assert empty.summarize() == {name: 0.0 for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_restricted_to_updated_images_and_undefined_is_nan(coco_gt):
    # image 1 has no large object; the large GT of images 2 and 3 must not count as missed
    metrics = run(coco_gt, image_ids=[1]).summarize()
    assert metrics["AP"] == pytest.approx(1.0)
    assert math.isnan(metrics["APl"])


def test_detections_merge_with_extend(coco_gt):
    part1, part2 = run(coco_gt, image_ids=[1]), run(coco_gt, image_ids=[2, 3])
    part1.detections.extend(part2.detections)
    part1.image_ids.extend(part2.image_ids)
    assert part1.summarize() == pytest.approx(run(coco_gt).summarize())
    assert part2.detections[0]["category_id"] == 8 and part2.detections[0]["bbox"] == [100.0, 20.0, 150.0, 120.0]


def test_not_quiet_prints_summary(coco_gt, capsys):
    run(coco_gt).summarize(quiet=False)
    assert "Average Precision" in capsys.readouterr().out


def test_detections_moved_to_other_images(coco_gt, tmp_path):
    own = run(coco_gt)
    moved = own.moved_to_other_images()
    # image 1's boxes now sit on image 2, 2's on 3, 3's on 1: nothing matches any more
    assert [d["image_id"] for d in moved.detections] == [2, 2, 3, 3, 1]
    assert moved.summarize()["AP50"] == pytest.approx(0.0)
    assert own.summarize()["AP50"] == pytest.approx(1.0)  # the original is untouched
    # a "prior" detector giving every image the same boxes scores the same either way
    prior = CocoEvaluator(coco_gt, [3, 8])
    for image_id in (1, 2, 3):
        prior.update([image_id], [torch.tensor([[30.0, 30.0, 130.0, 130.0], [10.0, 10.0, 30.0, 30.0]])],
                     [torch.tensor([0.9, 0.5])], [torch.tensor([0, 0])])
    assert prior.summarize() == pytest.approx(prior.moved_to_other_images(offset=2).summarize(), nan_ok=True)
    # boxes are rescaled to the receiving image's size
    _, ann_file = write_coco(tmp_path / "sizes", "val", [(1, 100, 50), (2, 200, 150)], [], CATEGORIES)
    sized = CocoEvaluator(COCO(str(ann_file)), [3, 8])
    sized.update([1, 2], [torch.tensor([[10.0, 5.0, 30.0, 25.0]]), torch.zeros(0, 4)], [[1.0], []], [[0], []])
    assert sized.moved_to_other_images().detections[0]["bbox"] == pytest.approx([20.0, 15.0, 40.0, 60.0])
    with pytest.raises(ValueError, match="at least two"):
        run(coco_gt, image_ids=(1,)).moved_to_other_images()


def test_results_in_coco_results_format(coco_gt, tmp_path):
    import json

    evaluator = run(coco_gt, shift=1.0, image_ids=[2, 3])
    evaluator.update([1], [torch.tensor([[10.00049, 10.0, 30.0, 30.123456]])], [torch.tensor([0.123456789])],
                     [torch.tensor([1])])
    metrics = evaluator.summarize()  # loadRes adds keys (area, id, segmentation...) to the evaluator's dicts
    results = evaluator.results()
    assert [d["image_id"] for d in results] == [1, 2, 2, 3]  # by image, each image's in the given order
    assert results[0] == {"image_id": 1, "category_id": 8, "bbox": [10.0, 10.0, 20.0, 20.123], "score": 0.123457}
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in results)
    assert results[1]["bbox"] == [101.0, 20.0, 150.0, 120.0] and results[1]["category_id"] == 8
    assert all(type(v) is float for d in results for v in d["bbox"] + [d["score"]])
    unrounded = evaluator.results(box_decimals=None, score_decimals=None)
    assert unrounded[0]["bbox"][0] == pytest.approx(10.00049) and unrounded[0]["score"] == pytest.approx(0.123456789)

    path = tmp_path / "detections.json"
    path.write_text(json.dumps(results))
    coco_dt = coco_gt.loadRes(str(path))  # what pycocotools reads as it is
    e = COCOeval(coco_gt, coco_dt, iouType="bbox")
    e.params.imgIds = [1, 2, 3]
    e.evaluate()
    e.accumulate()
    e.summarize()
    recomputed = {name: (math.nan if v < 0 else v) for name, v in zip(metrics, e.stats)}
    assert recomputed == pytest.approx(metrics, abs=1e-9, nan_ok=True)
