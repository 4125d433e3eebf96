"""DETR augmentation: boxes stay on their objects through flip, resize and crop."""
import pytest
import torch
from torchvision import tv_tensors

from datasets.transforms import RandomSizeCrop, denormalize, make_transforms
from .datasets_helpers import DATA_CFG

HEIGHT, WIDTH = 120, 160
# label -> (colour, xyxy box); red near the top-left corner, blue near the bottom-right one, so that
# crops often cut or remove one of them.
OBJECTS = {0: ((1.0, 0.0, 0.0), (8, 10, 48, 50)), 1: ((0.0, 0.0, 1.0), (110, 70, 150, 112))}


def sample():
    image = torch.full((3, HEIGHT, WIDTH), 128, dtype=torch.uint8)
    for colour, (x1, y1, x2, y2) in OBJECTS.values():
        image[:, y1:y2, x1:x2] = (torch.tensor(colour) * 255).to(torch.uint8).view(3, 1, 1)
    boxes = torch.tensor([box for _, box in OBJECTS.values()], dtype=torch.float32)
    return tv_tensors.Image(image), {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(HEIGHT, WIDTH)),
        "labels": torch.tensor(list(OBJECTS), dtype=torch.int64),
    }


def pixel_box(image, colour):
    """Tight xyxy box of the pixels that are more than half the given pure colour (None if none)."""
    channel = colour.index(1.0)
    others = [c for c in range(3) if c != channel]
    # a mix of fraction f of the pure colour with grey 0.5 has (own - other channel) = f
    mask = image[channel] - image[others].amax(0) > 0.5
    if not mask.any():
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_train_transforms_keep_boxes_on_objects():
    transforms = make_transforms(DATA_CFG, train=True)
    flipped = unflipped = removed = truncated = cropped_shape = 0
    for seed in range(150):
        torch.manual_seed(seed)
        image, target = transforms(*sample())
        assert image.dtype == torch.float32 and image.ndim == 3
        h, w = image.shape[1:]
        assert target["boxes"].canvas_size == (h, w)
        # shorter side from train_scales, unless the longer side hit train_max_size
        assert min(h, w) in DATA_CFG["train_scales"] or max(h, w) == DATA_CFG["train_max_size"]
        cropped_shape += abs(w / h - WIDTH / HEIGHT) > 0.05
        image = denormalize(image)
        labels = target["labels"].tolist()
        assert len(labels) == len(target["boxes"])
        for label, (colour, _) in OBJECTS.items():
            found = pixel_box(image, colour)
            if label not in labels:
                removed += 1
                assert found is None, f"seed {seed}: label {label} removed but its object is still visible"
                continue
            box = target["boxes"][labels.index(label)]
            if found is None:  # a sliver thinner than the colour threshold can see
                assert min(box[2] - box[0], box[3] - box[1]) < 2, f"seed {seed}: box {box} has no object"
                continue
            assert torch.allclose(box, found, atol=1.0), f"seed {seed}, label {label}: box {box} vs pixels {found}"
            bw, bh = (box[2] - box[0]).item(), (box[3] - box[1]).item()
            truncated += abs(bw / bh - 1) > 0.15  # both objects are (nearly) square when whole
            if label == 0:
                centre = (box[0] + box[2]).item() / 2
                flipped += centre > w / 2
                unflipped += centre < w / 2
    # every branch happened: flips, crops that changed the aspect ratio, cut and removed objects
    assert flipped > 10 and unflipped > 10
    assert cropped_shape > 10 and removed > 3 and truncated > 10


def test_test_transforms_are_deterministic():
    transforms = make_transforms(DATA_CFG, train=False)
    out1 = transforms(*sample())
    torch.manual_seed(123)
    out2 = transforms(*sample())
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1]["boxes"], out2[1]["boxes"])
    image, target = out1
    assert image.shape == (3, 128, 171)  # shorter side 120 -> 128, longer 160 -> 170.67 -> 171
    scale = torch.tensor([171 / WIDTH, 128 / HEIGHT, 171 / WIDTH, 128 / HEIGHT])
    expected = torch.tensor([box for _, box in OBJECTS.values()], dtype=torch.float32) * scale
    assert torch.allclose(target["boxes"], expected, atol=1e-4)
    for label, (colour, _) in OBJECTS.items():
        assert torch.allclose(pixel_box(denormalize(image), colour), expected[label], atol=1.0)


def test_test_transforms_cap_longer_side():
    transforms = make_transforms(dict(DATA_CFG, test_size=150, test_max_size=180), train=False)
    image, _ = transforms(*sample())
    assert image.shape == (3, 135, 180)  # 120x160 -> shorter side would be 150, longer side capped at 180


def test_random_size_crop_ranges_and_box_clamping():
    crop = RandomSizeCrop(60, 110)
    for seed in range(50):
        torch.manual_seed(seed)
        image, target = crop(*sample())
        h, w = image.shape[1:]
        assert 60 <= h <= 110 and 60 <= w <= 110
        boxes = target["boxes"]
        assert boxes.canvas_size == (h, w)
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
    # sides shorter than min_size are kept whole; the position is then fixed
    image, target = RandomSizeCrop(200, 300)(*sample())
    assert image.shape[1:] == (HEIGHT, WIDTH)
    assert torch.equal(target["boxes"], sample()[1]["boxes"])


def test_missing_config_key_is_named():
    cfg = {k: v for k, v in DATA_CFG.items() if k != "crop_size"}
    with pytest.raises(KeyError, match="crop_size"):
        make_transforms(cfg, train=True)
    make_transforms(cfg, train=False)  # the test transforms do not need it
