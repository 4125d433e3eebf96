"""Detections in COCO's results format: evaluate(..., detections=...), write_detections, the files of
`python -m experiments eval`, and eval into a results folder that cannot be written."""
import contextlib
import errno
import io
import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from experiments import checkpoints, distributed, evaluation, records
from experiments.build import build_data
from experiments.training import to_device
from models.postprocess import postprocess

from .helpers import ROW

def same(a, b):
    """The same {branch: {metric: value}}, NaN equal to NaN."""
    return list(a) == list(b) and all(a[k] == pytest.approx(b[k], abs=0, rel=0, nan_ok=True) for k in a)


def coco_metrics(coco_gt, path, image_ids):
    """The six COCO metrics of a detections file, computed with pycocotools alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(str(path))
        e = COCOeval(coco_gt, coco_dt, iouType="bbox")
        e.params.imgIds = sorted(image_ids)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return {name: (math.nan if v < 0 else float(v)) for name, v in zip(records.METRICS, e.stats)}


def test_evaluate_hands_back_detections_that_reproduce_the_metrics(trained, tmp_path):
    results, data_root = trained
    ck = checkpoints.load_checkpoint("demo", ROW, overrides=[f"data.root={data_root}"], results=results)
    ctx = distributed.Context(device=torch.device("cpu"))
    _, val_set = build_data(ck.cfg, ctx)
    model = ck.build_model(val_set.num_classes)
    loader = evaluation.make_eval_loader(val_set, 2, 0, ctx)
    teachers, topk = ("attn3", "attn2"), ck.cfg["model"]["eval_topk"]
    plain = evaluation.evaluate(model, loader, val_set, "cpu", teachers, topk, moved=True)
    dets = {}
    metrics = evaluation.evaluate(model, loader, val_set, "cpu", teachers, topk, moved=True, detections=dets)
    assert same(metrics, plain)  # asking for the detections changes nothing else
    assert list(dets) == ["attn1", "attn3", "attn2"]  # no attn1_moved: not detections

    paths = evaluation.write_detections(tmp_path / "new", "x.", dets)
    assert [p.name for p in paths] == [f"x.detections-{b}.json" for b in dets]
    image_ids = [int(i) for i in val_set.coco.getImgIds()]
    category_ids = {c["id"] for c in val_set.coco.dataset["categories"]}
    assert category_ids != set(range(len(category_ids)))  # the synthetic set's ids are not the labels
    for branch, path in zip(dets, paths):
        written = json.loads(path.read_text())
        assert written == dets[branch] and len(written) == len(image_ids) * topk
        for d in written:
            assert set(d) == {"image_id", "category_id", "bbox", "score"}
            assert d["category_id"] in category_ids and d["image_id"] in image_ids
            assert len(d["bbox"]) == 4 and all(type(v) is float for v in d["bbox"] + [d["score"]])
        recomputed = coco_metrics(val_set.coco, path, image_ids)
        assert recomputed == pytest.approx(metrics[branch], abs=1e-6, nan_ok=True), branch
    assert any(v > 0 for m in metrics.values() for v in m.values())  # not only zeros compared

    # the student's boxes are [x, y, w, h] in original-image pixels, labels mapped to category ids
    images, mask, targets = to_device(next(iter(loader)), "cpu")
    with torch.no_grad():
        out = model(images, mask)
    pp = postprocess(out["pred_logits"], out["pred_boxes"], torch.stack([t["orig_size"] for t in targets]), topk)
    first = int(targets[0]["image_id"])
    mine = [d for d in dets["attn1"] if d["image_id"] == first]
    x1, y1, x2, y2 = pp[0]["boxes"].unbind(-1)
    torch.testing.assert_close(torch.tensor([d["bbox"] for d in mine]),
                               torch.stack([x1, y1, x2 - x1, y2 - y1], -1), atol=1e-3, rtol=0)
    ids = val_set.category_ids
    assert [d["category_id"] for d in mine] == [ids[int(label)] for label in pp[0]["labels"]]
    torch.testing.assert_close(torch.tensor([d["score"] for d in mine]), pp[0]["scores"], atol=1e-6, rtol=0)


def test_eval_command_writes_its_detection_files_and_never_overwrites(trained, monkeypatch, capsys):
    from experiments.__main__ import main

    results, data_root = trained
    directory = records.run_dir("demo", ROW, results)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    stamp = "20240101-000000"  # every eval in the same second
    real_strftime = evaluation.time.strftime
    monkeypatch.setattr(evaluation.time, "strftime", lambda f, *a: stamp if f == "%Y%m%d-%H%M%S" else real_strftime(f, *a))
    (directory / f"eval-{stamp}").mkdir()  # left by an eval that stopped after writing its detections
    (directory / f"eval-{stamp}" / "detections-attn1.json").write_text("[]\n")
    main(["--results", str(results), "eval", "demo", "--row", ROW, "--teachers", "--moved", f"data.root={data_root}"])
    main(["--results", str(results), "eval", "demo", "--row", ROW, f"data.root={data_root}"])
    capsys.readouterr()

    first, second = directory / f"eval-{stamp}-2.json", directory / f"eval-{stamp}-3.json"
    assert (directory / f"eval-{stamp}" / "detections-attn1.json").read_text() == "[]\n"
    assert not (directory / f"eval-{stamp}.json").exists()
    one, two = json.loads(first.read_text()), json.loads(second.read_text())
    assert one["detections"] == {b: f"eval-{stamp}-2/detections-{b}.json" for b in ("attn1", "attn3", "attn2")}
    assert two["detections"] == {"attn1": f"eval-{stamp}-3/detections-attn1.json"}
    assert sorted(p.name for p in directory.glob("eval-*.json")) == [first.name, second.name]  # only metrics
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(data_root / "annotations" / "instances_val.json"))
    for record in (one, two):
        for branch, name in record["detections"].items():
            recomputed = coco_metrics(coco_gt, directory / name, coco_gt.getImgIds())
            assert recomputed == pytest.approx(record["metrics"][branch], abs=1e-6, nan_ok=True), (name, branch)
    assert json.loads((directory / one["detections"]["attn1"]).read_text()) == \
        json.loads((directory / two["detections"]["attn1"]).read_text())  # the same weights, the same detections
    for name, data in before.items():  # eval.json, DONE, log... untouched
        assert (directory / name).read_bytes() == data, name


def test_eval_into_a_folder_that_cannot_be_written_prints_the_metrics(trained, tmp_path, capsys, monkeypatch):
    results, data_root = trained
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the results folder's parent should be\n")
    out = evaluation.evaluate_row("demo", ROW, checkpoint=records.run_dir("demo", ROW, results) / "checkpoint.pth",
                                  overrides=[f"data.root={data_root}"], results=blocker / "results")
    err = capsys.readouterr().err
    directory = records.run_dir("demo", ROW, blocker / "results")
    assert f"cannot write to {directory} (Not a directory: {blocker}): the metrics are printed but not saved" in err
    assert err.count("cannot write to") == 1
    assert out.is_main and not out.saved and out.path is None and "Not a directory" in out.not_saved
    metrics, path = out  # unpacks as before
    assert path is None and list(metrics) == ["attn1"] and set(metrics["attn1"]) == set(records.METRICS)
    assert blocker.read_text().startswith("a file")  # nothing written, nothing replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]

    from experiments.__main__ import main

    main(["--results", str(blocker / "results"), "eval", "demo", "--row", ROW, "--checkpoint",
          str(records.run_dir("demo", ROW, results) / "checkpoint.pth"), f"data.root={data_root}"])
    printed = capsys.readouterr()
    assert "cannot write to" in printed.err and "not saved: see the note above" in printed.out
    assert f"{100 * metrics['attn1']['AP50']:.1f}" in printed.out  # the table is printed

    assert evaluation.unwritable(tmp_path / "new" / "deeper") is None  # would be created: fine
    assert evaluation.unwritable(tmp_path) is None and sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]

    # writable at the start, full at the end: the evaluation still returns its metrics
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "atomic_write", full)
    out = evaluation.evaluate_row("demo", ROW, overrides=[f"data.root={data_root}"], results=results)
    assert "(No space left on device): the metrics are printed but not saved" in capsys.readouterr().err
    assert out.is_main and out.path is None and same(out.metrics, metrics)
