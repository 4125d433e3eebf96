"""COCO loader: targets, crowd/degenerate box handling, label mapping, build_dataset errors, collate."""
import json
import re

import pytest
import torch

from datasets import CocoDetection, DataError, build_dataset, collate
from datasets.synthetic import generate
from .datasets_helpers import DATA_CFG, TINY_ANNOTATIONS, TINY_EXPECTED, TINY_IMAGES, write_coco


@pytest.fixture
def tiny(tmp_path):
    write_coco(tmp_path, "train", TINY_IMAGES, TINY_ANNOTATIONS)
    return tmp_path


def test_targets_drop_crowd_and_degenerate_boxes(tiny):
    ds = CocoDetection(tiny / "train", tiny / "annotations" / "instances_train.json")
    assert len(ds) == 2 and ds.category_ids == [2, 5, 9] and ds.num_classes == 3
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert torch.allclose(image, torch.full_like(image, 100 / 255))
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # crowd, zero-width and outside boxes are gone; the protruding box is clamped
    expected_boxes = torch.tensor([box for box, _ in TINY_EXPECTED])
    assert torch.allclose(target["boxes"], expected_boxes)
    assert target["labels"].tolist() == [1, 2, 0]
    assert ds.label_to_category_id(target["labels"]) == [cat for _, cat in TINY_EXPECTED]
    assert ds.label_to_category_id(2) == 9


def test_empty_image_gives_empty_targets(tiny):
    for transforms in (None, "train", "test"):
        cfg = dict(DATA_CFG, root=str(tiny))
        ds = (CocoDetection(tiny / "train", tiny / "annotations" / "instances_train.json") if transforms is None
              else build_dataset(cfg, "train", train=transforms == "train"))
        image, target = ds[1]
        assert target["image_id"] == 2
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["size"].tolist() == list(image.shape[1:])


def test_test_transforms_scale_boxes_with_image(tiny):
    ds = build_dataset(dict(DATA_CFG, root=str(tiny)), "train", train=False)
    image, target = ds[0]
    # 40x30 image: shorter side 30 -> 128 (test_size), longer side 40 * 128/30 = 170.67 -> 171 (<= 200)
    assert image.shape == (3, 128, 171) and target["size"].tolist() == [128, 171]
    assert target["orig_size"].tolist() == [30, 40]
    scale = torch.tensor([171 / 40, 128 / 30, 171 / 40, 128 / 30])
    expected = torch.tensor([box for box, _ in TINY_EXPECTED]) * scale
    assert torch.allclose(target["boxes"], expected, atol=1e-4)
    # normalised with the ImageNet statistics
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(image * std + mean, torch.full_like(image, 100 / 255), atol=1e-3)


def test_synthetic_targets_match_annotations(tmp_path):
    root = generate(tmp_path / "syn", 40, 2, seed=4, size=96)
    ds = build_dataset(dict(DATA_CFG, root=str(root), test_size=96, test_max_size=96), "train", train=False)
    anns = json.loads((root / "annotations" / "instances_train.json").read_text())["annotations"]
    n_crowd = 0
    for i in range(len(ds)):
        _, target = ds[i]
        image_anns = [a for a in anns if a["image_id"] == target["image_id"]]
        crowd = [a for a in image_anns if a["iscrowd"]]
        n_crowd += len(crowd)
        kept = [a for a in image_anns if not a["iscrowd"]]
        assert len(target["boxes"]) == len(kept)
        h, w = target["orig_size"].tolist()
        sh, sw = target["size"].tolist()
        expected = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in kept)])
        expected = expected.reshape(-1, 4) * torch.tensor([sw / w, sh / h, sw / w, sh / h])
        assert torch.allclose(target["boxes"], expected, atol=1e-3)
        assert ds.label_to_category_id(target["labels"]) == [a["category_id"] for a in kept]
    assert n_crowd > 0  # the set does contain crowd annotations, and none reached a target


def test_build_dataset_missing_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="COCO_ROOT"):
        build_dataset(dict(DATA_CFG, root=None), "val2017", train=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as err:
        build_dataset(dict(DATA_CFG, root=str(missing)), "val2017", train=False)
    assert "datasets.synthetic" in str(err.value) and "data.root" in str(err.value)
    assert isinstance(err.value, DataError)  # also a DataError (a ValueError), one line
    assert "\n" not in str(err.value)
    write_coco(tmp_path, "train", TINY_IMAGES, TINY_ANNOTATIONS)
    with pytest.raises(FileNotFoundError, match="image folder .*val2017"):
        build_dataset(dict(DATA_CFG, root=str(tmp_path)), "val2017", train=False)
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match=r"annotation file .*instances_val2017\.json"):
        build_dataset(dict(DATA_CFG, root=str(tmp_path)), "val2017", train=False)


def test_build_dataset_uses_coco_root(tiny, monkeypatch):
    monkeypatch.setenv("COCO_ROOT", str(tiny))
    for root in (None, ""):
        ds = build_dataset(dict(DATA_CFG, root=root), "train", train=True)
        assert ds.img_dir == tiny / "train" and len(ds) == 2


def test_collate_pads_bottom_right(tiny):
    ds = CocoDetection(tiny / "train", tiny / "annotations" / "instances_train.json")
    batch = collate([ds[0], ds[1]])  # 30x40 and 50x20 images
    images, mask = batch["images"], batch["padding_mask"]
    assert images.shape == (2, 3, 50, 40) and images.dtype == torch.float32
    assert mask.shape == (2, 50, 40) and mask.dtype == torch.bool
    for i, (h, w) in enumerate([(30, 40), (50, 20)]):
        assert torch.equal(images[i, :, :h, :w], ds[i][0])
        assert not mask[i, :h, :w].any() and mask[i].sum() == 50 * 40 - h * w
        assert (images[i][:, mask[i]] == 0).all()
    assert [t["image_id"] for t in batch["targets"]] == [1, 2]


def test_16_bit_greyscale_png_is_scaled_to_8_bits(tiny):
    """PIL's convert('RGB') clips 16-bit values at 255 (an all-white image): each value keeps its
    high byte instead, as PIL reads 16-bit colour PNGs, repeated over the three channels."""
    import numpy as np
    from PIL import Image

    values = np.random.default_rng(0).integers(0, 65536, (30, 40), dtype=np.uint16)  # image 1 is 40x30
    values[0, :4] = [0, 255, 256, 65535]
    path = tiny / "train" / "000001.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as pil:
        assert pil.mode == "I;16"  # a real 16-bit PNG
    image, _ = CocoDetection(tiny / "train", tiny / "annotations" / "instances_train.json")[0]
    expected = torch.from_numpy((values >> 8).astype(np.float32) / 255).expand(3, -1, -1)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
    assert (image[:, 0, :4] * 255).round().tolist() == [[0, 0, 1, 255]] * 3


def test_floating_point_pixels_are_a_data_error(tiny):
    import numpy as np
    from PIL import Image

    path = tiny / "train" / "000001.tif"
    Image.fromarray(np.full((30, 40), 0.5, np.float32)).save(path)
    ann_file = tiny / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = path.name
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(f"image {path} (image id 1) has floating-point pixels (PIL mode "
                                                  f"F), which have no agreed 8-bit scale")):
        CocoDetection(tiny / "train", ann_file)[0]
