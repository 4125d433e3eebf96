"""`python -m experiments predict`: a trained row's student on image files gives the evaluation's
detections for the validation images, reads every kind of image as a viewer shows it, skips (and
names) files it cannot read, and draws exactly the detections it returns."""
import json

import numpy as np
import pytest
import torch
from matplotlib import patches
from PIL import Image

from datasets import DataError
from datasets.images import find_images, read_rgb
from experiments import predict as predict_module
from experiments.__main__ import main
from models.backbone import file_sha256

from .helpers import ROW

def by_score(dets):
    return sorted(dets, key=lambda d: (-d["score"], d["category_id"], d["bbox"]))


def val_images(data_root):
    return data_root / "val"


def test_predict_on_validation_images_gives_the_evaluations_detections(trained, tmp_path, capsys):
    results, data_root = trained
    val_dir = val_images(data_root)
    main(["eval", "demo", "--row", ROW, "--results", str(results)])
    evaluated = json.loads(next((results / "runs" / "demo" / ROW).glob("eval-*/detections-attn1.json")).read_text())
    out = tmp_path / "pred"
    main(["predict", "demo", "--row", ROW, str(val_dir), "--score", "0", "--out", str(out), "--results",
          str(results), "--no-pictures"])
    assert f"4 image(s), 80 detection(s) with score >= 0.0: {out / 'detections.json'}" in capsys.readouterr().out
    found = json.loads((out / "detections.json").read_text())
    files = sorted(val_dir.iterdir())
    checkpoint = results / "runs" / "demo" / ROW / "checkpoint.pth"
    # the checkpoint that made the detections, under a key no image path can have
    assert found.pop(predict_module.PROVENANCE) == {"path": str(checkpoint.resolve()),
                                                     "sha256": file_sha256(checkpoint)}
    assert list(found) == [str(f) for f in files]
    image_ids = sorted({d["image_id"] for d in evaluated})
    assert [found[str(f)]["image_id"] for f in files] == image_ids  # the set's own ids, read from its image list
    categories = {c["id"]: c["name"] for c in
                  json.loads((val_dir.parent / "annotations" / "instances_val.json").read_text())["categories"]}
    for f in files:
        entry = found[str(f)]
        expected = by_score([d for d in evaluated if d["image_id"] == entry["image_id"]])
        got = by_score(entry["detections"])
        assert len(got) == len(expected) == 20  # eval_topk of TINY_RUN
        assert [d["category_id"] for d in got] == [d["category_id"] for d in expected]
        assert [d["category_name"] for d in got] == [categories[d["category_id"]] for d in got]
        torch.testing.assert_close(torch.tensor([d["score"] for d in got]),
                                   torch.tensor([d["score"] for d in expected]), rtol=0, atol=2e-6)
        torch.testing.assert_close(torch.tensor([d["bbox"] for d in got]),
                                   torch.tensor([d["bbox"] for d in expected]), rtol=0, atol=2e-3)
        assert (entry["width"], entry["height"]) == Image.open(f).size


def test_the_drawn_boxes_are_the_returned_ones(trained, tmp_path, monkeypatch):
    results, data_root = trained
    val_dir = val_images(data_root)
    drawn = {}
    draw = predict_module.draw_picture

    def keep(path, image, detections, names, **kwargs):
        drawn[path.name] = (image, draw(path, image, detections, names, **kwargs))
        return drawn[path.name][1]

    monkeypatch.setattr(predict_module, "draw_picture", keep)
    image = sorted(val_dir.iterdir())[0]
    found, out, _ = predict_module.predict("demo", ROW, [image], score=0.02, out=tmp_path / "p", results=results,
                                           quiet=True)
    entry = found[str(image)]
    assert entry["picture"] == f"{image.stem}.png" and (out / entry["picture"]).is_file()
    pixels, fig = drawn[entry["picture"]]
    assert pixels.size == (entry["width"], entry["height"])
    np.testing.assert_array_equal(np.asarray(pixels), np.asarray(Image.open(image).convert("RGB")))
    rects = [p for p in fig.axes[0].patches if isinstance(p, patches.Rectangle) and p.get_gid() == "detection"]
    assert len(rects) == len(entry["detections"]) > 0
    xywh = torch.tensor([[r.get_x(), r.get_y(), r.get_width(), r.get_height()] for r in rects])
    torch.testing.assert_close(xywh, torch.tensor([d["bbox"] for d in entry["detections"]]), rtol=0, atol=1e-3)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == [f"{d['category_name']} {d['score']:.2f}" for d in entry["detections"]]
    assert all(d["score"] >= 0.02 for d in entry["detections"])


def test_unreadable_files_are_named_and_skipped(trained, tmp_path, capsys):
    results, data_root = trained
    val_dir = val_images(data_root)
    folder = tmp_path / "mine" / "sub"
    folder.mkdir(parents=True)
    good = sorted(val_dir.iterdir())[1]
    (folder / "good.png").write_bytes(good.read_bytes())
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "text.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("not looked at: no image suffix")
    assert find_images([tmp_path / "mine"]) == sorted(folder / n for n in ("good.png", "text.jpg", "truncated.png"))
    out = tmp_path / "out"
    main(["predict", "demo", "--row", ROW, str(tmp_path / "mine"), "--out", str(out), "--score", "0.01",
          "--results", str(results)])
    captured = capsys.readouterr()
    assert f"skipped: image {folder / 'text.jpg'} cannot be read: UnidentifiedImageError" in captured.err
    assert f"skipped: image {folder / 'truncated.png'} cannot be read" in captured.err
    assert "1 image(s)" in captured.out and "2 file(s) skipped" in captured.out
    found = json.loads((out / "detections.json").read_text())
    assert list(found) == [predict_module.PROVENANCE, str(folder / "good.png")]
    assert "image_id" not in found[str(folder / "good.png")]
    assert (out / "good.png").is_file()
    # an existing detections.json is never replaced
    with pytest.raises(SystemExit, match="detections.json exists: name another --out folder"):
        main(["predict", "demo", "--row", ROW, str(folder / "good.png"), "--out", str(out), "--results", str(results)])
    with pytest.raises(SystemExit, match="no such file or folder"):
        main(["predict", "demo", "--row", ROW, str(tmp_path / "absent.jpg"), "--results", str(results)])


def test_a_row_without_a_checkpoint_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "demo", "--row", ROW, str(tmp_path), "--results", str(tmp_path / "results")])
    assert str(e.value).startswith("error: ks_def_r18: no checkpoint at ")
    assert "train it with `python -m experiments run demo --row ks_def_r18`, or pass --checkpoint PATH" in str(e.value)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    viewed = np.asarray(read_rgb(tmp_path / "turned.png", as_viewed=True))
    np.testing.assert_array_equal(viewed, np.rot90(stored, k=-1))  # 40 high, 30 wide, the top half white
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "turned.png")), stored)  # data sets: as stored

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(read_rgb(tmp_path / "rgba.png", as_viewed=True))
    np.testing.assert_array_equal(got[:2], np.broadcast_to([200, 0, 0], (2, 4, 3)))
    np.testing.assert_array_equal(got[2:], np.full((2, 4, 3), 255))  # transparent: white, as a viewer shows it

    grey16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    got = np.asarray(read_rgb(tmp_path / "grey16.png", as_viewed=True))
    np.testing.assert_array_equal(got, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    Image.fromarray(np.full((3, 4), 77, np.uint8), "L").save(tmp_path / "grey.jpg", quality=100)
    assert np.asarray(read_rgb(tmp_path / "grey.jpg", as_viewed=True)).shape == (3, 4, 3)
    with pytest.raises(DataError, match=r"image .*absent.png cannot be read"):
        read_rgb(tmp_path / "absent.png", as_viewed=True)


def test_an_exif_turned_image_is_predicted_upright(trained, tmp_path):
    """The same pixels stored turned with an EXIF orientation, or turned by hand: the same detections."""
    results, data_root = trained
    val_dir = val_images(data_root)
    upright = np.asarray(Image.open(sorted(val_dir.iterdir())[2]).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to view"
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=-1))).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    found, _, _ = predict_module.predict("demo", ROW, [tmp_path / "turned.png", tmp_path / "upright.png"], score=0,
                                         out=tmp_path / "p", results=results, draw=False, quiet=True)
    turned, plain = found[str(tmp_path / "turned.png")], found[str(tmp_path / "upright.png")]
    assert (turned["height"], turned["width"]) == upright.shape[:2]
    assert turned["detections"] == plain["detections"]


def test_an_older_checkpoint_without_classes_gets_the_generators(trained, tmp_path):
    """Checkpoints written before they named their classes: the synthetic generator's categories."""
    results, data_root = trained
    state = torch.load(results / "runs" / "demo" / ROW / "checkpoint.pth", weights_only=True)
    classes = state.pop("classes")
    state.pop("checksum", None)  # checkpoints that did not name their classes had no checksum either
    torch.save(state, tmp_path / "old.pth")
    image = sorted(val_images(data_root).iterdir())[0]
    kwargs = dict(score=0, results=results, draw=False, quiet=True)
    old, _, _ = predict_module.predict("demo", ROW, [image], tmp_path / "old.pth", out=tmp_path / "a", **kwargs)
    new, _, _ = predict_module.predict("demo", ROW, [image], out=tmp_path / "b", **kwargs)
    assert old == new and {d["category_name"] for d in new[str(image)]["detections"]} <= {c["name"] for c in classes}
