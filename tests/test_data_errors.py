"""Bad data gives one clear DataError when the data set is built (or, for an undecodable image, when
it is loaded, also through DataLoader workers), never a traceback from deep inside an epoch."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import CocoDetection, DataError, build_split, collate, ensure_synthetic, generate
from .datasets_helpers import DATA_CFG, TINY_ANNOTATIONS, TINY_IMAGES, write_coco


def tiny(tmp_path, images=TINY_IMAGES, annotations=TINY_ANNOTATIONS, split="train"):
    return write_coco(tmp_path, split, images, annotations)


def edit_json(ann_file, change):
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))


def test_data_error_is_exported_value_error():
    assert datasets.DataError is DataError and issubclass(DataError, ValueError)
    assert issubclass(datasets.DataNotFoundError, DataError) and issubclass(datasets.DataNotFoundError, FileNotFoundError)
    assert str(DataError("plain message")) == "plain message"


def test_truncated_json_names_file_and_position(tmp_path):
    img_dir, ann_file = tiny(tmp_path)
    text = ann_file.read_text()
    ann_file.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=re.escape(str(ann_file)) + r" is not valid JSON: .* line 1 column \d+") as err:
        CocoDetection(img_dir, ann_file)
    assert "truncated" in str(err.value)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_that_is_not_coco_names_missing_key(tmp_path, key):
    img_dir, ann_file = tiny(tmp_path)
    edit_json(ann_file, lambda data: data.pop(key))
    with pytest.raises(DataError, match=re.escape(str(ann_file)) + f".*no '{key}' key"):
        CocoDetection(img_dir, ann_file)
    ann_file.write_text("[1, 2, 3]")
    with pytest.raises(DataError, match=re.escape(str(ann_file)) + ".*top level is a JSON list"):
        CocoDetection(img_dir, ann_file)


def test_missing_image_found_at_construction(tmp_path):
    img_dir, ann_file = tiny(tmp_path)
    (img_dir / "000002.png").unlink()
    with pytest.raises(DataError, match=re.escape(f"image folder {img_dir}: 1 of 2 images listed in {ann_file} are "
                                                  f"missing (first: 000002.png (image id 2))")):
        CocoDetection(img_dir, ann_file)


def test_missing_image_in_a_subfolder(tmp_path):
    img_dir, ann_file = tiny(tmp_path)
    (img_dir / "sub").mkdir()
    (img_dir / "000002.png").rename(img_dir / "sub" / "000002.png")
    edit_json(ann_file, lambda data: data["images"][1].update(file_name="sub/000002.png"))
    assert len(CocoDetection(img_dir, ann_file)) == 2
    edit_json(ann_file, lambda data: data["images"][0].update(file_name="sub/000001.png"))
    with pytest.raises(DataError, match=re.escape("1 of 2 images") + ".*" + re.escape("sub/000001.png (image id 1)")):
        CocoDetection(img_dir, ann_file)


def test_unknown_category_names_annotation_and_image(tmp_path):
    annotations = TINY_ANNOTATIONS + [{"image_id": 2, "category_id": 4, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    img_dir, ann_file = tiny(tmp_path, annotations=annotations)
    n = len(annotations)
    with pytest.raises(DataError, match=re.escape(f"{ann_file}: annotation id {n} (image 2) has category_id 4, which "
                                                  f"is not among the categories (known category ids: 2, 5, 9)")):
        CocoDetection(img_dir, ann_file)


def test_degenerate_boxes_noted_once_dropped_in_targets_kept_for_evaluation(tmp_path, capsys):
    annotations = TINY_ANNOTATIONS + [{"image_id": 2, "category_id": 5, "bbox": [3.0, 4.0, 5.0, -1.0]}]
    img_dir, ann_file = tiny(tmp_path, annotations=annotations)
    ds = CocoDetection(img_dir, ann_file)
    err = capsys.readouterr().err
    assert err.count("note:") == 1, err
    assert (f"note: {ann_file}: 2 of 7 annotations have a box of zero or negative width or height "
            f"(first: annotation id 4, image 1); they are dropped in training and stay in evaluation") in err
    # dropped from the targets (image 1 keeps its three usable boxes, image 2 has none) ...
    assert len(ds[0][1]["boxes"]) == 3 and len(ds[1][1]["boxes"]) == 0
    # ... and still in the ground truth that evaluation reads
    assert ds.coco.anns[4]["bbox"][2] == 0 and ds.coco.anns[7]["bbox"][3] == -1
    assert [a["id"] for a in ds.coco.imgToAnns[2]] == [7]
    assert capsys.readouterr().err == ""  # loading items adds no further notes


@pytest.mark.parametrize("bbox", [[1.0, 2.0, 3.0], "1,2,3,4", [1.0, 2.0, "3", 4.0]])
def test_malformed_bbox(tmp_path, bbox):
    annotations = TINY_ANNOTATIONS[:1] + [{"image_id": 2, "category_id": 5, "bbox": [1.0, 1.0, 2.0, 2.0]}]
    img_dir, ann_file = tiny(tmp_path, annotations=annotations)
    edit_json(ann_file, lambda data: data["annotations"][1].update(bbox=bbox))
    with pytest.raises(DataError, match=re.escape(f"{ann_file}: annotation id 2 (image 2) has bbox ") + ".*4 finite"):
        CocoDetection(img_dir, ann_file)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["annotations"][1].pop("bbox"), "annotation #1 (id 2) has no 'bbox'"),
    (lambda d: d["annotations"][1].update(id=1), "annotation #1 (id 1) repeats annotation id 1"),
    (lambda d: d["annotations"][1].update(image_id="2"), "annotation #1 (id 2) has image_id '2', not an integer"),
    (lambda d: d["images"][1].update(id=1), "image #1 (id 1) repeats image id 1"),
    (lambda d: d["images"][1].pop("file_name"), "image #1 (id 2) has no 'file_name' string"),
    (lambda d: d["images"][1].pop("height"), "image #1 (id 2) has no positive 'height'"),
    (lambda d: d["categories"].append({"name": "x"}), "category #3 has no integer 'id'"),
])
def test_malformed_entries_name_the_entry(tmp_path, change, expected):
    annotations = TINY_ANNOTATIONS[:1] + [{"image_id": 2, "category_id": 5, "bbox": [1.0, 1.0, 2.0, 2.0]}]
    img_dir, ann_file = tiny(tmp_path, annotations=annotations)
    edit_json(ann_file, change)
    with pytest.raises(DataError, match=re.escape(f"annotation file {ann_file}: {expected}")):
        CocoDetection(img_dir, ann_file)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_image_names_file_directly_and_through_workers(tmp_path, suffix):
    img_dir, ann_file = tiny(tmp_path)
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)  # image 1 is 40x30
    bad = img_dir / f"broken.{suffix}"
    Image.fromarray(noise).save(bad)
    truncate(bad)
    edit_json(ann_file, lambda data: data["images"][0].update(file_name=bad.name))
    ds = CocoDetection(img_dir, ann_file)  # present on disk: construction does not decode images
    assert ds[1][1]["image_id"] == 2
    with pytest.raises(DataError, match=re.escape(f"image {bad} (image id 1) cannot be read: ")) as direct:
        ds[0]
    message = str(direct.value)
    assert "\n" not in message
    assert error_through_worker(ds) == (DataError, message)


def error_through_worker(ds):
    """(type, message) of the exception that loading the first batch through one DataLoader worker raises.

    The traceback (whose frames hold the iterator, and the re-raised exception itself) is dropped, so
    that reference counting frees the iterator here: torch shuts its worker down promptly then, but
    only after a 5 s timeout when the garbage collector frees it later.
    """
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate))
    try:
        next(batches)
    except Exception as e:  # noqa: BLE001 - the caller checks the type
        e.__traceback__ = None
        return type(e), str(e)
    return None, None


def test_data_error_keeps_a_plain_message_that_mentions_tracebacks():
    text = "Caught nothing here.\nOriginal Traceback (most recent call last):\nbut no error line"
    assert str(DataError(text)) == text


def shared_folder_set(tmp_path):
    """One image folder and two annotation files with arbitrary names, as explicit paths."""
    images = tmp_path / "all_images"
    write_coco(tmp_path / "a", "x", TINY_IMAGES[:1], TINY_ANNOTATIONS[:2])
    write_coco(tmp_path / "b", "x", TINY_IMAGES[1:], [])
    (tmp_path / "a" / "x").rename(images)
    for p in (tmp_path / "b" / "x").iterdir():
        p.rename(images / p.name)
    train_json, val_json = tmp_path / "labels_fold1.json", tmp_path / "holdout.json"
    (tmp_path / "a" / "annotations" / "instances_x.json").rename(train_json)
    (tmp_path / "b" / "annotations" / "instances_x.json").rename(val_json)
    return dict(DATA_CFG, root=None, train_split="train2017", val_split="val2017",
                train_images=str(images), train_annotations=str(train_json),
                val_images=str(images), val_annotations=str(val_json))


def test_build_split_with_explicit_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    cfg = shared_folder_set(tmp_path)
    train, val = build_split(cfg, "train"), build_split(cfg, "val")
    assert train.img_dir == val.img_dir == tmp_path / "all_images"
    assert train.ids == [1] and val.ids == [2]
    assert train.ann_file.name == "labels_fold1.json" and val.ann_file.name == "holdout.json"
    image, target = val[0]
    # test transforms: 20x50 image, shorter side 20 -> 128 would make the longer 320 > 200, so 200 x 80
    assert image.shape == (3, 200, 80) and target["image_id"] == 2
    assert train[0][1]["image_id"] == 1 and len(train.coco.anns) == 2


@pytest.mark.parametrize("part", ["train", "val"])
def test_build_split_half_given_paths_name_missing_key(tmp_path, part):
    cfg = shared_folder_set(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"data.{part}_annotations is not set but data.{part}_images is: "
                                                  f"give both")):
        build_split(dict(cfg, **{f"{part}_annotations": None}), part)
    with pytest.raises(DataError, match=re.escape(f"data.{part}_images is not set but data.{part}_annotations is: "
                                                  f"give both")):
        build_split(dict(cfg, **{f"{part}_images": None}), part)
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"annotation file {missing} does not exist "
                                                          f"(data.{part}_annotations)")):
        build_split(dict(cfg, **{f"{part}_annotations": str(missing)}), part)


def test_build_split_missing_split_folder_names_split_key(tmp_path):
    tiny(tmp_path)  # root/train and root/annotations/instances_train.json
    cfg = dict(DATA_CFG, root=str(tmp_path), train_split="train", val_split="val2017")
    assert len(build_split(cfg, "train")) == 2
    with pytest.raises(DataError) as err:
        build_split(cfg, "val")
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert f"image folder {tmp_path / 'val2017'} does not exist (data.val_split = 'val2017'" in message
    assert "train/" in message and "data.val_images and data.val_annotations" in message and "\n" not in message
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "annotations" / "instances_val2017.json"))
                       + r".*data\.val_split = 'val2017'.*instances_train\.json"):
        build_split(cfg, "val")


def test_ensure_synthetic_on_a_coco_folder_suggests_coco_and_never_delete(tmp_path):
    coco = tmp_path / "coco"
    write_coco(coco, "val2017", TINY_IMAGES, TINY_ANNOTATIONS)
    (coco / "train2017").mkdir()
    before = sorted(p.relative_to(coco) for p in coco.rglob("*"))
    with pytest.raises(DataError, match="looks like a COCO-format data set") as err:
        ensure_synthetic(coco, 4, 2, seed=0, size=64)
    assert "data.dataset=coco" in str(err.value) and "delete" not in str(err.value)
    assert "annotations/instances_val2017.json" in str(err.value) and "train2017/" in str(err.value)
    assert sorted(p.relative_to(coco) for p in coco.rglob("*")) == before
    # COCO-format files with the synthetic set's own names, but no meta.json of the generator
    named_alike = tmp_path / "alike"
    write_coco(named_alike, "train", TINY_IMAGES, TINY_ANNOTATIONS)
    write_coco(named_alike, "val", TINY_IMAGES, TINY_ANNOTATIONS)
    with pytest.raises(DataError, match="data.dataset=coco") as err:
        ensure_synthetic(named_alike, 4, 2, seed=0, size=64)
    assert "delete" not in str(err.value)
    # some other folder: choose another one, never delete
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="choose another folder") as err:
        ensure_synthetic(other, 4, 2, seed=0, size=64)
    assert "delete" not in str(err.value) and "data.dataset=coco" not in str(err.value)


def test_ensure_synthetic_unfinished_own_folder_may_be_deleted(tmp_path):
    root = generate(tmp_path / "s", 2, 1, seed=0, size=48)
    (root / "annotations" / "instances_val.json").unlink()
    with pytest.raises(DataError, match="unfinished synthetic data set.*delete it"):
        ensure_synthetic(root, 2, 1, seed=0, size=48)


def test_boxes_outside_their_image_are_counted_in_the_one_note(tmp_path, capsys):
    """TINY_ANNOTATIONS has one box sticking out of its 40x30 image (clamped in training) and one
    wholly outside it (dropped); the crowd box is not counted (training drops it anyway)."""
    img_dir, ann_file = tiny(tmp_path, annotations=TINY_ANNOTATIONS + [
        {"image_id": 2, "category_id": 5, "bbox": [-3.0, 40.0, 10.0, 10.0]},  # 20x50: out on the left and bottom
        {"image_id": 2, "category_id": 5, "bbox": [0.0, -12.0, 5.0, 12.0]}])  # above the image, touching it
    ds = CocoDetection(img_dir, ann_file)
    err = capsys.readouterr().err
    assert err.count("note:") == 1, err
    assert ("; 2 of 8 annotations have a box partly outside its image (first: annotation id 5, image 1); training "
            "clamps them to the image, evaluation uses them as they are; 2 of 8 annotations have a box wholly "
            "outside its image (first: annotation id 6, image 1); they are dropped in training") in err, err
    assert ds[1][1]["boxes"].tolist() == [[0.0, 40.0, 7.0, 50.0]]


def test_an_exif_orientation_is_noted_and_not_applied(tmp_path, capsys, monkeypatch):
    """COCO-format boxes are in the stored pixel frame: an image with an EXIF orientation (here 6,
    'rotate 90 degrees to view') is read as stored, and the first one read is named once."""
    import datasets.images

    monkeypatch.setattr(datasets.images, "_orientation_noted", False)
    img_dir, ann_file = tiny(tmp_path, annotations=TINY_ANNOTATIONS[:2])
    stored = np.zeros((30, 40, 3), np.uint8)  # image 1 is 40 wide, 30 high
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(img_dir / "000001.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(img_dir / "000002.png", exif=exif)  # an eXIf chunk (image 2 is listed 20x50)
    edit_json(ann_file, lambda data: data["images"][0].update(file_name="000001.jpg"))
    ds = CocoDetection(img_dir, ann_file)
    assert capsys.readouterr().err == ""  # building the set opens no image
    image, target = ds[0]
    assert capsys.readouterr().err == (
        f"note: image {img_dir / '000001.jpg'} (image id 1) has the EXIF orientation 6; it is used as stored, not "
        f"rotated, since COCO-format boxes are in the stored pixel frame (other such images are not named)\n")
    assert image.shape == (3, 30, 40) and target["orig_size"].tolist() == [30, 40]
    assert image[:, :, :18].mean() > 0.95 and image[:, :, 22:].mean() < 0.05  # the left half is white, as stored
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0], [20.0, 10.0, 25.5, 16.0]]
    ds[1]  # another turned image (a PNG with an eXIf chunk): not named again
    ds[0]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(datasets.images, "_orientation_noted", False)
    exif[0x0112] = 1  # upright: nothing to say
    Image.fromarray(stored).save(img_dir / "000001.jpg", exif=exif)
    ds[0]
    assert capsys.readouterr().err == ""
    _, _ = ds[1]  # the PNG still has orientation 6
    assert "000002.png (image id 2) has the EXIF orientation 6" in capsys.readouterr().err
