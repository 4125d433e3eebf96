"""Synthetic COCO-format data set: determinism, format, content statistics, ensure_synthetic."""
import json
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datasets import ensure_synthetic, generate
from datasets import synthetic
from datasets.synthetic import render_image, size_range


def load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def pixels(root, split):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / split).glob("*.png"))}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Modest data sets at 256 and 192 px (40 train + 40 val images each)."""
    base = tmp_path_factory.mktemp("synthetic")
    return {size: generate(base / str(size), 40, 40, seed=0, size=size) for size in (256, 192)}


def test_same_seed_is_identical_and_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", 6, 3, seed=1, size=128)
    b = generate(tmp_path / "b", 6, 3, seed=1, size=128)
    c = generate(tmp_path / "c", 6, 3, seed=2, size=128)
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "annotations/instances_train.json").read_bytes() != (c / "annotations/instances_train.json").read_bytes()
    for split in ("train", "val"):
        pa, pb, pc = pixels(a, split), pixels(b, split), pixels(c, split)
        assert len(pa) == {"train": 6, "val": 3}[split] and pa.keys() == pb.keys()
        assert all(np.array_equal(pa[k], pb[k]) for k in pa)
        assert not any(pa[k].shape == pc[k].shape and np.array_equal(pa[k], pc[k]) for k in pa)
    # the validation images do not depend on the number of training images
    d = generate(tmp_path / "d", 2, 3, seed=1, size=128)
    assert load(a, "val") == load(d, "val")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_coco_format_and_tight_boxes(sets):
    root = sets[256]
    for split in ("train", "val"):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        cat_ids = sorted(coco.getCatIds())
        assert len(cat_ids) >= 5 and cat_ids != list(range(1, len(cat_ids) + 1))  # ids have gaps
        sizes = set()
        for image in coco.dataset["images"]:
            width, height = Image.open(root / split / image["file_name"]).size
            assert (width, height) == (image["width"], image["height"])
            assert 0.75 * 256 - 1 <= min(width, height) and max(width, height) <= 256
            sizes.add((width, height))
        assert len(sizes) > 10  # sizes vary, so batches need padding
        for ann in coco.dataset["annotations"]:
            image = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            # bbox is the tight box and area the pixel count of the visible mask
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"]
            assert list(mask_utils.toBbox(coco.annToRLE(ann))) == ann["bbox"]


def test_size_ranges_empty_images_and_crowds(sets):
    for size, root in sets.items():
        meta = json.loads((root / "meta.json").read_text())
        for split in ("train", "val"):
            data = load(root, split)
            objects = [a for a in data["annotations"] if not a["iscrowd"]]
            ranges = {size_range(a["area"]) for a in objects}
            assert ranges == {"small", "medium", "large"}, (size, split)
            per_image = {image["id"]: 0 for image in data["images"]}
            for a in objects:
                per_image[a["image_id"]] += 1
            assert max(per_image.values()) <= 8
            n_empty = sum(n == 0 for n in per_image.values())
            n_crowd = sum(a["iscrowd"] == 1 for a in data["annotations"])
            assert 1 <= n_empty <= 4 and 1 <= n_crowd <= 4, (size, split, n_empty, n_crowd)
            counts = meta["counts"][split]
            assert counts["objects"] == len(objects) and counts["crowd"] == n_crowd
            assert counts["empty_images"] == n_empty
            assert sum(counts["size_ranges"].values()) == len(objects)
            assert sum(counts["categories"].values()) == len(objects)


def test_objects_mostly_visible_and_colour_independent_of_class():
    colours = {}
    for index in range(30):
        img, objects = render_image(3, "train", index, size=160)
        for obj in objects:
            # each object keeps at least half of its own pixels
            assert obj["visible"].sum() >= 0.5 * obj["full"]
            if not obj["crowd"]:
                colours.setdefault(obj["category"]["name"], []).append(img[obj["visible"]].mean(0))
    # every class shows a wide spread of colours (objects are not colour-coded)
    for name, values in colours.items():
        assert np.ptp(np.array(values), axis=0).max() > 100, name


def test_ensure_synthetic_reuses_and_refuses(tmp_path):
    root = ensure_synthetic(tmp_path / "s", 4, 2, seed=5, size=96)
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path / "s", 4, 2, seed=5, size=96) == root
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=re.escape(f"{root} was generated") + ".*seed: existing 5 vs requested 6"):
        ensure_synthetic(tmp_path / "s", 4, 2, seed=6, size=96)
    with pytest.raises(ValueError, match="n_val"):
        ensure_synthetic(tmp_path / "s", 4, 3, seed=5, size=96)
    with pytest.raises(FileExistsError):
        generate(tmp_path / "s", 4, 2, seed=5, size=96)
    # a folder with other content is never overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="other"):
        ensure_synthetic(tmp_path / "other", 4, 2, seed=5, size=96)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real_write_split = synthetic._write_split

    def fail_on_val(root, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real_write_split(root, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "s", 3, 2, seed=0, size=64)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder is left
    monkeypatch.undo()
    root = ensure_synthetic(tmp_path / "s", 3, 2, seed=0, size=64)
    assert len(load(root, "val")["images"]) == 2


def test_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--train", "3", "--val", "2", "--seed", "1", "--size", "64"])
    assert "data set ready" in capsys.readouterr().out
    assert len(load(tmp_path / "cli", "train")["images"]) == 3
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path / "cli"), "--train", "4", "--val", "2", "--seed", "1", "--size", "64"])
    assert exit_info.value.code == 2 and "n_train" in capsys.readouterr().err
