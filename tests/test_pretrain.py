"""Backbone pretraining on the synthetic generator and `model.backbone.weights: synthetic`."""
import re

import numpy as np
import pytest
import torch

from datasets import synthetic
from datasets.transforms import denormalize
from experiments import pretrain
from experiments.config import ConfigError, Manifest
from models.backbone import SYNTHETIC_WEIGHTS, Backbone, WeightsError, build_backbone, file_sha256
from models.serialization import CHECKSUM, content_checksum

TINY = dict(steps=3, batch_size=4, image_size=64, crop_size=32, images=6, pool_size=64, held_out=4, workers=1,
            log_every=1)


@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "trunk.pth"
    meta = pretrain.pretrain("segmentation", path, **TINY)
    return path, meta


def test_pretraining_writes_a_half_precision_trunk_with_its_record(trunk_file):
    path, meta = trunk_file
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = state["state_dict"]
    assert {k.split(".")[0] for k in weights} == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    assert state["meta"]["task"] == "segmentation" and state["meta"]["steps"] == 3
    assert state["meta"]["generator_split"] == "train"
    assert [h["step"] for h in meta["history"]] == [1, 2, 3] and "held_out_accuracy" in meta["final"]


def test_the_backbone_loads_the_pretrained_trunk(trunk_file):
    path, _ = trunk_file
    weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    bb = Backbone("resnet18", weights="synthetic", weights_path=str(path), freeze_at=0, out_stages=("layer3",),
                  norm="batch_norm")
    for name, value in bb.body.state_dict().items():
        torch.testing.assert_close(value, weights[name].to(value.dtype), rtol=0, atol=0, msg=name)
    assert bb.init == f"synthetic:{path.name} sha256:{file_sha256(path)[:16]} (segmentation)"
    # FrozenBatchNorm2d takes the same statistics (it has no num_batches_tracked)
    frozen = Backbone("resnet18", weights="synthetic", weights_path=str(path), out_stages=("layer2", "layer3"))
    torch.testing.assert_close(frozen.body.layer3[0].bn1.running_var, weights["layer3.0.bn1.running_var"].float())


def test_bad_synthetic_weights_are_clear_errors(trunk_file, tmp_path):
    path, _ = trunk_file
    with pytest.raises(ValueError, match=r"no weights for \['layer4'\].*pretrained up to layer3"):
        Backbone("resnet18", weights="synthetic", weights_path=str(path), out_stages=("layer4",))
    with pytest.raises(ValueError, match="holds a resnet18 trunk, but model.backbone.name is 'resnet50'"):
        Backbone("resnet50", weights="synthetic", weights_path=str(path), out_stages=("layer3",))
    with pytest.raises(FileNotFoundError, match=r"no file .*nowhere\.pth.*python -m experiments pretrain"):
        Backbone("resnet18", weights="synthetic", weights_path=str(tmp_path / "nowhere.pth"))
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a weights file of `python -m experiments pretrain`"):
        Backbone("resnet18", weights="synthetic", weights_path=str(tmp_path / "other.pth"))
    written = torch.load(path, map_location="cpu", weights_only=True)
    assert written[CHECKSUM] == content_checksum(written)
    changed = {**written, "state_dict": {**written["state_dict"]}}
    changed["state_dict"]["layer1.0.conv1.weight"] = changed["state_dict"]["layer1.0.conv1.weight"].clone()
    changed["state_dict"]["layer1.0.conv1.weight"][0, 0, 0, 0] += 1
    good = {k: v for k, v in written.items() if k != CHECKSUM}  # as the files written before checksums
    conv = "conv1.weight"
    malformed = {  # each a file that unpickles, but whose contents are not a trunk: an error naming file and key
        "changed": (changed, "is damaged: its contents do not match the checksum recorded when it was written"),
        "unknown_key": ({**good, "stat_dict": {}},
                        r"is damaged: it has no checksum, and keys no pretrained trunk has \(stat_dict\)"),
        "meta_list": ({**good, "meta": ["resnet18"]}, r"'meta' is a list, expected the dict"),
        "weights_list": ({**good, "state_dict": [1, 2]}, r"'state_dict' is a list, expected a dict of tensors"),
        "not_tensor": ({**good, "state_dict": {**good["state_dict"], conv: [0.5]}},
                       r"'state_dict' holds 1 entries that are not tensors by parameter name, e.g. \['conv1.weight'\]"),
        "shape": ({**good, "state_dict": {**good["state_dict"], conv: torch.zeros(3, 3)}},
                  r"'state_dict' has 1 weights of another shape, e.g. conv1.weight \(3, 3\) \(expected \(64, 3, 7, 7\)\)"),
    }
    for name, (state, message) in malformed.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(WeightsError, match=message) as e:
            Backbone("resnet18", weights="synthetic", weights_path=str(tmp_path / f"{name}.pth"), out_stages=("layer3",))
        assert f"{name}.pth" in str(e.value)
    with pytest.raises(ValueError, match="must be one of"):
        build_backbone({"name": "swin_t", "weights": "synthetic", "weights_path": None, "freeze_at": 0,
                        "norm": "frozen_bn", "drop_path": 0.0}, ("layer3",))


def test_configuration_takes_synthetic_weights():
    cfg = Manifest("demo").resolve("def_r18", ["model.backbone.weights=synthetic"])
    assert cfg["model"]["backbone"]["weights"] == "synthetic"
    with pytest.raises(ConfigError, match="model.backbone.weights"):
        Manifest("demo").resolve("def_r18", ["model.backbone.weights=coco"])


def test_the_pool_draws_the_train_stream_and_labels_every_visible_pixel(monkeypatch):
    seen = []
    real = synthetic.render_image

    def spy(seed, split, index, size=256):
        seen.append((seed, split, index))
        return real(seed, split, index, size)

    monkeypatch.setattr(pretrain, "render_image", spy)
    pool = pretrain.make_pool(3, seed=5, size=96, workers=1, start=10)
    assert seen == [(5, "train", 10), (5, "train", 11), (5, "train", 12)]
    img, objects = real(5, "train", 11, 96)
    _, labels, boxes = pool[1]
    expected = np.zeros(img.shape[:2], np.uint8)
    for obj in objects:
        expected[obj["visible"]] = pretrain.IGNORE if obj["crowd"] else pretrain.LABEL_OF[obj["category"]["id"]]
    np.testing.assert_array_equal(labels, expected)
    assert len(boxes) == sum(not o["crowd"] for o in objects)


def test_crop_batches_label_objects_and_background():
    pool = pretrain.make_pool(4, seed=3, size=128, workers=1)
    objects = [(i, b) for i, (_, _, boxes) in enumerate(pool) for b in boxes]
    x, y = pretrain.crop_batch(pool, objects, 16, 32, 0.5, np.random.default_rng(0))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    assert set(y.tolist()) <= set(range(len(synthetic.CATEGORIES) + 1)) and (y == 0).any() and (y > 0).any()
    xs, ys = pretrain.segmentation_batch(pool, 2, 48, pretrain.SCALES, np.random.default_rng(0))
    assert xs.shape == (2, 3, 48, 48) and ys.shape == (2, 48, 48) and ys.dtype == torch.int64


def test_pretrain_command_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "w.pth"
    out.write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--out", str(out), "--steps", "1"])
    assert exit_info.value.code == 2 and "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"x"


@pytest.mark.skipif(not SYNTHETIC_WEIGHTS.is_file(), reason="the committed synthetic backbone is missing")
def test_the_committed_trunk_fits_the_demo_and_the_synthetic_experiments_page_names_its_sha256():
    state = torch.load(SYNTHETIC_WEIGHTS, map_location="cpu", weights_only=True)
    assert SYNTHETIC_WEIGHTS.stat().st_size <= 12 * 2**20
    cfg = Manifest("demo").resolve("def_r18")["model"]["backbone"]
    assert cfg["weights"] == "synthetic"
    bb = build_backbone(cfg, (cfg["last_stage"],))
    assert bb.init.startswith("synthetic:resnet18_synthetic.pth")
    page = (SYNTHETIC_WEIGHTS.parents[2] / "docs" / "synthetic_experiments.md").read_text()
    assert file_sha256(SYNTHETIC_WEIGHTS) in page
    assert state["meta"]["command"] and re.sub(r"\s+", " ", state["meta"]["command"]) in re.sub(r"\s+", " ", page)


def test_segmentation_crops_keep_images_and_labels_aligned():
    """Crops, flips and resizing move image and label together: inside a region of one label, the
    image pixel has that label's colour."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (6, 3)).astype(np.uint8)
    pool = []
    for _ in range(3):
        lab = np.kron(rng.integers(0, 6, (12, 12)), np.ones((16, 16), np.int64)).astype(np.uint8)  # 192 px
        pool.append((palette[lab], lab, []))
    images, labels = pretrain.segmentation_batch(pool, 8, 96, pretrain.SCALES, np.random.default_rng(1))
    colours = denormalize(images) * 255  # (B, 3, S, S)
    # pixels whose 5x5 neighbourhood inside the crop has one label: away from the label edges that
    # resizing blurs and from the crop's border (the label just outside it is unknown)
    padded = torch.nn.functional.pad(labels[:, None].float(), (2, 2, 2, 2), value=-1)
    windows = padded.unfold(2, 5, 1).unfold(3, 5, 1)[:, 0]  # (B, S, S, 5, 5)
    interior = (windows == labels[..., None, None]).flatten(-2).all(-1)
    assert interior.float().mean() > 0.5
    expected = torch.from_numpy(palette).float()[labels].permute(0, 3, 1, 2)
    err = (colours - expected).abs().amax(1)[interior]
    assert err.max() < 2.0, err.max()
    # a label flipped against its image would not pass
    err_flipped = (colours - expected.flip(-1)).abs().amax(1)[interior & interior.flip(-1)]
    assert err_flipped.mean() > 20


def test_the_experiments_command_sends_pretrain_its_own_way(capsys):
    from experiments.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--results", "somewhere", "pretrain", "--steps", "1"])
    assert exit_info.value.code == 2 and "pretrain writes its weights to its --out file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--backbone", "resnet7"])
    assert exit_info.value.code == 2 and "invalid choice: 'resnet7'" in capsys.readouterr().err
