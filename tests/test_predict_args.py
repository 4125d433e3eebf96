"""Arguments of `predict` (--batch-size, --out) and the --out of `import-weights`: one `error:` line
each, before any work; and predict's pictures of large images, drawn at a bounded size."""
import copy
import errno
import os
import tempfile

import numpy as np
import pytest
import yaml
from matplotlib import colors
from PIL import Image

from datasets.drawing import class_colour
from experiments import predict as predict_module
from experiments.__main__ import main

from .authors_helpers import FIXTURES, MODELS, TINY, TINY_BACKBONE, import_argv
from .helpers import ROW

pytestmark = pytest.mark.usefixtures("tiny_backbone")  # conftest.py: the fixtures' backbone


def no_work(*args, **kwargs):
    raise AssertionError("work began before the arguments were checked")


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_batch_size_below_one_is_an_error(trained, size, tmp_path, monkeypatch):
    results, data_root = trained
    monkeypatch.setattr(predict_module, "load_checkpoint", no_work)  # refused before the checkpoint is read
    image = sorted((data_root / "val").iterdir())[0]
    message = error_of(["predict", "demo", "--row", ROW, str(image), "--batch-size", size, "--out", str(tmp_path / "p"),
                        "--results", str(results)])
    assert message == f"error: --batch-size must be at least 1 (images per forward), got {size}"
    assert not (tmp_path / "p").exists()


def test_an_out_that_is_a_file_is_an_error(trained, tmp_path):
    results, data_root = trained
    image = sorted((data_root / "val").iterdir())[0]
    taken = tmp_path / "taken.txt"
    taken.write_text("mine\n")
    message = error_of(["predict", "demo", "--row", ROW, str(image), "--out", str(taken), "--results", str(results)])
    assert message == f"error: --out {taken} is a file; --out names a folder for detections.json and the pictures"
    assert taken.read_text() == "mine\n"


def test_a_results_folder_that_cannot_be_written_is_an_error_suggesting_out(trained, tmp_path, monkeypatch):
    results, data_root = trained
    image = sorted((data_root / "val").iterdir())[0]
    checkpoint = results / "runs" / "demo" / ROW / "checkpoint.pth"
    # the default --out under a results folder below a file: mkdir would fail with ENOTDIR
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file\n")
    message = error_of(["predict", "demo", "--row", ROW, str(image), "--checkpoint", str(checkpoint),
                        "--results", str(blocker / "results")])
    assert message.startswith(f"error: the output folder {blocker}/results/predictions/demo/{ROW}/")
    assert message.endswith(f" cannot be written (Not a directory: {blocker}); pass --out DIR to write the "
                            f"predictions elsewhere")
    # a read-only results folder (a read-only mount stops root too): its own message, nothing written
    read_only = tmp_path / "read_only"
    read_only.mkdir()

    def refuse(*args, dir=None, **kwargs):
        if str(dir).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kwargs)

    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    message = error_of(["predict", "demo", "--row", ROW, str(image), "--checkpoint", str(checkpoint),
                        "--results", str(read_only)])
    assert f"error: the output folder {read_only}/predictions/demo/{ROW}/" in message
    assert message.endswith(f"cannot be written (Read-only file system: {read_only}); pass --out DIR to write the "
                            f"predictions elsewhere")
    assert list(read_only.iterdir()) == []
    # a given --out there: "name another"
    message = error_of(["predict", "demo", "--row", ROW, str(image), "--checkpoint", str(checkpoint),
                        "--out", str(read_only / "mine"), "--results", str(results)])
    assert message == (f"error: --out {read_only / 'mine'} cannot be written (Read-only file system: {read_only}); "
                       f"name another --out folder")


def colour_extent(picture, colour, below):
    """(x0, y0, x1, y1) of the picture's pixels of `colour` (within 40 of 255 per channel) in rows
    >= `below` (under the label)."""
    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    rgb = np.array([round(255 * c) for c in colors.to_rgb(colour)])
    ys, xs = np.nonzero(np.abs(pixels - rgb).max(axis=2) <= 40)
    keep = ys >= below
    return xs[keep].min(), ys[keep].min(), xs[keep].max(), ys[keep].max()


def test_a_large_image_is_drawn_at_the_bounded_size_with_its_boxes_scaled(tmp_path, monkeypatch):
    assert predict_module.picture_scale(6000, 6000) * 6000 == predict_module.MAX_PICTURE_SIDE == 2048
    assert predict_module.picture_scale(100, 50) * 100 == predict_module.MIN_PICTURE_SIDE == 800
    assert predict_module.picture_scale(1000, 700) == 1
    # the same bound at a cheaper size: a 600 x 400 image, pictures of at most 300 pixels
    monkeypatch.setattr(predict_module, "MIN_PICTURE_SIDE", 100)
    monkeypatch.setattr(predict_module, "MAX_PICTURE_SIDE", 300)
    image = Image.new("RGB", (600, 400), "white")
    boxes = np.array([[100.0, 120.0, 500.0, 360.0]])  # xyxy in the image's pixels
    detections = {"boxes": boxes, "scores": np.array([0.9]), "labels": np.array([1])}
    fig = predict_module.draw_picture(tmp_path / "big.png", image, detections, ["a", "b"])
    with Image.open(tmp_path / "big.png") as picture:
        assert picture.size == (300, 200)
    x0, y0, x1, y1 = colour_extent(tmp_path / "big.png", class_colour(1), below=65)
    assert abs(x0 - 50) <= 2 and abs(x1 - 250) <= 2 and abs(y1 - 180) <= 2  # the box, halved with the image
    assert fig.axes[0].images[0].get_array().shape[:2] == (200, 300)  # reduced before matplotlib drew it


def test_predict_writes_the_bounded_picture(trained, tmp_path, monkeypatch):
    results, data_root = trained
    image = sorted((data_root / "val").iterdir())[0]
    monkeypatch.setattr(predict_module, "MAX_PICTURE_SIDE", 48)
    found, out, _ = predict_module.predict("demo", ROW, [image], score=0, out=tmp_path / "p", results=results,
                                           quiet=True)
    entry = found[str(image)]
    with Image.open(out / entry["picture"]) as picture:
        assert max(picture.size) == 48 < max(entry["width"], entry["height"])


def tiny_authors_manifest(tmp_path):
    """A manifest whose one row, ks_dab, is the model of the authors' tiny KS-DAB-DETR fixture."""
    manifest = tmp_path / "authors_tiny.yaml"
    model = {**copy.deepcopy(TINY), **copy.deepcopy(MODELS["ks_dab_detr_r50_triple"][0])}
    model["backbone"]["name"] = TINY_BACKBONE
    manifest.write_text(yaml.safe_dump({"defaults": {
        "model": model, "data": {"dataset": "synthetic", "root": str(tmp_path / "synthetic")}},
        "rows": [{"name": "ks_dab"}]}))
    return manifest


def test_import_weights_out_naming_a_folder_is_an_error_even_with_force(tmp_path):
    manifest = tiny_authors_manifest(tmp_path)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine\n")
    fixture = FIXTURES / "ks_dab_detr_r50_triple_state_dict.pth"
    for force in (["--force"], []):
        message = error_of(import_argv(fixture, "ks_dab", manifest, "--out", str(folder), *force,
                                       "--results", str(tmp_path)))
        assert message == (f"error: --out {folder} is a folder; --out names the checkpoint file to write, e.g. "
                           f"{folder / 'authors_checkpoint.pth'}")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
