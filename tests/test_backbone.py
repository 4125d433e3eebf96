"""Backbones: torchvision ResNet-50/101 (FrozenBatchNorm2d, stem frozen) and Swin-T, single- and
multi-scale outputs, ImageNet weight loading (torchvision files, official Swin checkpoints) with clear
errors, and the initialisation record."""
import pytest
import torch
import torchvision.models as tvm
from torchvision.ops.misc import FrozenBatchNorm2d

from experiments.config import DEFAULTS, merge
from models import build_model
from models.backbone import (Backbone, SwinBackbone, WeightsError, build_backbone, cached_weights_file,
                             swin_state_dict_from_official)

from .model_helpers import NUM_CLASSES, family_config, tiny_batch

MULTI = ("layer2", "layer3", "layer4")


def backbone_cfg(**kw):
    return merge(DEFAULTS, {"model": {"backbone": {"weights": None, **kw}}}, "test")["model"]["backbone"]


@pytest.mark.parametrize("name,channels", [("resnet50", [512, 1024, 2048]), ("resnet101", [512, 1024, 2048])])
def test_resnets_single_and_multi_scale(name, channels):
    with torch.device("meta"):  # shapes only: no memory, no compute
        single = build_backbone(backbone_cfg(name=name), ("layer4",))
        multi = build_backbone(backbone_cfg(name=name), MULTI)
        images = torch.zeros(2, 3, 256, 320)
        outs = multi(images, torch.zeros(2, 256, 320, dtype=torch.bool))
    assert single.num_channels == [2048] and single.strides == [32]
    assert multi.num_channels == channels and multi.strides == [8, 16, 32]
    assert [tuple(f.shape) for f, _ in outs] == [(2, c, 256 // s, 320 // s) for c, s in zip(channels, [8, 16, 32])]
    assert [tuple(m.shape) for _, m in outs] == [(2, 256 // s, 320 // s) for s in [8, 16, 32]]
    # FrozenBatchNorm2d everywhere; the stem (conv1) frozen, res2 (layer1) on trained: detectron2 freeze_at=1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in single.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in single.modules()) > 50
    assert not single.body.conv1.weight.requires_grad
    assert all(p.requires_grad for p in single.body.layer1.parameters())
    blocks = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}[name]
    assert [len(getattr(single.body, f"layer{i}")) for i in range(1, 5)] == blocks


def test_resnet_padding_masks_follow_the_images():
    bb = build_backbone(backbone_cfg(name="resnet18"), ("layer3", "layer4")).eval()
    images, padding, _ = tiny_batch()
    (f3, m3), (f4, m4) = bb(images, padding)
    assert m3.shape == (2, 6, 8) and f3.shape[2:] == (6, 8) and m4.shape == (2, 3, 4)
    # nearest sampling of the padding mask (image 1: rows 80+, columns 100+ padded)
    assert not m3[0].any()
    assert m3[1].nonzero().tolist() == [[r, c] for r in range(6) for c in range(8) if r == 5 or c == 7]
    assert not m4.any()  # stride 32 samples rows 0, 32, 64 and columns 0, 32, 64, 96 only


def test_swin_t_single_and_multi_scale():
    torch.manual_seed(0)
    bb = build_backbone(backbone_cfg(name="swin_t", drop_path=0.1, freeze_at=0), MULTI).eval()
    assert isinstance(bb, SwinBackbone) and bb.init == "random"
    assert bb.num_channels == [192, 384, 768] and bb.strides == [8, 16, 32]
    images = torch.randn(2, 3, 64, 96)
    padding = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding[1, :, 64:] = True
    with torch.no_grad():
        outs = bb(images, padding)
    assert [tuple(f.shape) for f, _ in outs] == [(2, 192, 8, 12), (2, 384, 4, 6), (2, 768, 2, 3)]
    assert outs[2][1][1].tolist() == [[False, False, True], [False, False, True]]
    # each output stage has its own new LayerNorm: normalised channels
    f = outs[2][0].permute(0, 2, 3, 1)
    torch.testing.assert_close(f.mean(-1), torch.zeros(f.shape[:-1]), rtol=0, atol=1e-4)
    # stochastic depth rises linearly over the 12 blocks to drop_path
    probs = [m.p for m in bb.modules() if type(m).__name__ == "StochasticDepth"]
    assert len(probs) == 12 and probs[0] == 0 and abs(probs[-1] - 0.1) < 1e-9

    single = build_backbone(backbone_cfg(name="swin_t"), ("layer4",))
    assert single.num_channels == [768] and len(single.features) == 8


def test_swin_t_pad_to_patch_pads_as_detectron2():
    """pad_to_patch: the image is zero-padded to a multiple of 4 before the patch embedding (detectron2's
    PatchEmbed): the features of a 62 x 93 image are those of the image padded to 64 x 96 by hand."""
    torch.manual_seed(0)
    bb = build_backbone(backbone_cfg(name="swin_t", pad_to_patch=True), ("layer2",)).eval()
    images = torch.randn(1, 3, 62, 93)
    padded = torch.nn.functional.pad(images, (0, 3, 0, 2))
    with torch.no_grad():
        (ours, mask), = bb(images, torch.zeros(1, 62, 93, dtype=torch.bool))
        (by_hand, _), = bb(padded, torch.zeros(1, 64, 96, dtype=torch.bool))
        bb.pad_to_patch = False
        (floored, _), = bb(images, torch.zeros(1, 62, 93, dtype=torch.bool))
    assert ours.shape == (1, 192, 8, 12) and mask.shape == (1, 8, 12)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    assert floored.shape == (1, 192, 8, 12) and not torch.allclose(floored, ours)  # 15 x 23 patches


def test_swin_t_freeze_at():
    bb = build_backbone(backbone_cfg(name="swin_t", freeze_at=2), ("layer4",)).train()
    frozen = {name.split(".")[1] for name, p in bb.named_parameters() if not p.requires_grad}
    assert frozen == {"0", "1", "2"}  # patch embedding, stage 1 and its patch merging
    assert all(p.requires_grad for p in bb.out_norms.parameters())
    assert not bb.features[1].training and bb.features[3].training


def test_models_run_on_swin_t():
    torch.manual_seed(0)
    cfg = family_config("dab_detr", "triple", backbone={"name": "swin_t", "weights": None, "freeze_at": 0})
    model, criterion = build_model(cfg, NUM_CLASSES)
    images, padding, targets = tiny_batch()
    out = model.train()(images, padding, targets)
    assert torch.isfinite(criterion(out, targets)["loss"])
    assert model.backbone.init == "random"


def test_missing_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"resnet101-.*\.pth") as e:
        Backbone("resnet101", weights="imagenet")
    assert str(tmp_path) in str(e.value) and "weights_path" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"swin_t-.*\.pth"):
        SwinBackbone("swin_t", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        SwinBackbone("swin_t", weights="imagenet", weights_path=str(tmp_path / "nowhere.pth"))


def test_torchvision_weights_from_the_cache_and_a_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    source = tvm.resnet18()
    cached = cached_weights_file(tvm.ResNet18_Weights.IMAGENET1K_V1)
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    bb = Backbone("resnet18", weights="imagenet")
    assert bb.init == f"imagenet:{cached.name}"
    assert torch.equal(bb.body.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(bb.body.bn1.running_var, source.bn1.running_var)

    swin = tvm.swin_t()
    path = tmp_path / "my_swin.pth"
    torch.save(swin.state_dict(), path)
    bb = SwinBackbone("swin_t", weights="imagenet", weights_path=str(path))
    assert bb.init == "imagenet:my_swin.pth (torchvision)"
    assert torch.equal(bb.features[5][3].attn.qkv.weight, swin.features[5][3].attn.qkv.weight)


def test_imagenet_files_that_do_not_fit_name_the_file_and_the_keys(tmp_path):
    resnet = tvm.resnet18().state_dict()
    swin = tvm.swin_t().state_dict()
    cases = [  # (backbone, contents, message)
        ("resnet18", [resnet["conv1.weight"]], r"the file is a list, expected a dict of tensors"),
        ("resnet18", {**resnet, "fc.bias": "zero"},
         r"holds 1 entries that are not tensors by parameter name, e.g. \['fc.bias'\]"),
        ("resnet18", {**resnet, "fc.weight": torch.zeros(10, 512)},
         r"has 1 weights of another shape, e.g. fc.weight \(10, 512\) \(expected \(1000, 512\)\)"),
        ("resnet18", {k: v for k, v in resnet.items() if k != "layer4.1.conv2.weight"},
         r"do not fit resnet18: missing \['layer4.1.conv2.weight'\], unexpected \[\]"),
        ("resnet18", {**resnet, "extra.weight": torch.zeros(1)}, r"missing \[\], unexpected \['extra.weight'\]"),
        ("swin_t", torch.zeros(3), r"the file is a Tensor, expected a dict of tensors"),
        ("swin_t", {"model": {**swin, 7: torch.zeros(1)}}, r"'model' holds 1 entries that are not tensors"),
        ("swin_t", {**swin, "features.0.0.weight": torch.zeros(96, 3, 2, 2)},
         r"weights of another shape, e.g. features.0.0.weight"),
        ("swin_t", {"patch_embed.proj.weight": torch.zeros(1), "layers": torch.zeros(1)},
         r"has patch_embed.\* keys, but is not an official Swin checkpoint"),
    ]
    for i, (name, contents, message) in enumerate(cases):
        path = tmp_path / f"weights{i}.pth"
        torch.save(contents, path)
        build = SwinBackbone if name == "swin_t" else Backbone
        with pytest.raises(WeightsError, match=message) as e:
            build(name, weights="imagenet", weights_path=str(path))
        assert str(path) in str(e.value), i


def official_swin_layout(tv_state):
    """torchvision Swin state -> the official Swin repository's key names (written out independently
    of the converter: patch_embed, layers.{i}.blocks.{j}, layers.{i}.downsample, mlp.fc1/fc2)."""
    out = {}
    for key, value in tv_state.items():
        p = key.split(".")
        if p[0] == "features":
            k = int(p[1])
            if k == 0:
                new = {"0": "patch_embed.proj", "2": "patch_embed.norm"}[p[2]] + "." + p[3]
            elif k % 2 == 1:
                rest = ".".join(p[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
                new = f"layers.{(k - 1) // 2}.blocks.{p[2]}.{rest}"
            else:
                new = f"layers.{(k - 2) // 2}.downsample." + ".".join(p[2:])
        else:
            new = key
        out[new] = value
    return out


def test_official_swin_checkpoint_is_converted(tmp_path):
    torch.manual_seed(0)
    swin = tvm.swin_t()
    official = official_swin_layout(swin.state_dict())
    official["head.weight"] = torch.zeros(21841, 768)  # an IN-22k head: not used, not loaded
    official["head.bias"] = torch.zeros(21841)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # computed buffer of the official code
    assert "layers.2.blocks.5.mlp.fc2.weight" in official and "layers.1.downsample.reduction.weight" in official
    path = tmp_path / "swin_tiny_patch4_window7_224_22kto1k_finetune.pth"
    torch.save({"model": official}, path)
    bb = SwinBackbone("swin_t", weights="imagenet", weights_path=str(path), out_stages=MULTI)
    assert bb.init == "imagenet:swin_tiny_patch4_window7_224_22kto1k_finetune.pth (official Swin checkpoint)"
    mine = bb.features.state_dict()
    for key, value in swin.features.state_dict().items():
        assert torch.equal(mine[key], value), key
    with pytest.raises(KeyError, match="unexpected key"):
        swin_state_dict_from_official({"backbone.weird": torch.zeros(1)})


@pytest.mark.parametrize("name,norm", [("resnet18", "batch_norm"), ("resnet18", "frozen_bn"), ("swin_t", "batch_norm")])
def test_bfloat16_autocast_gives_float32_features_close_to_float32(name, norm):
    torch.manual_seed(0)
    plain = build_backbone(backbone_cfg(name=name, norm=norm, freeze_at=0), ("layer3",))
    cast = build_backbone(backbone_cfg(name=name, norm=norm, freeze_at=0, autocast="bfloat16"), ("layer3",))
    cast.load_state_dict(plain.state_dict())
    plain.eval(), cast.eval()
    images, padding = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, :, 96:] = True
    (ref, ref_mask), = plain(images, padding)
    (out, out_mask), = cast(images, padding)
    assert out.dtype == torch.float32 and torch.equal(out_mask, ref_mask)
    # bfloat16 keeps 8 significant bits: elementwise agreement to a few percent of the feature scale
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    assert not torch.equal(out, ref)  # it really ran in bfloat16
    out.square().mean().backward()
    grads = [p.grad for p in cast.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_unknown_autocast_dtype_is_an_error():
    with pytest.raises(ValueError, match=r"key 'model.backbone.autocast' must be one of \[None, 'bfloat16'\]"):
        backbone_cfg(name="resnet18", autocast="float16")
    with pytest.raises(ValueError, match="model.backbone.autocast must be one of"):
        Backbone("resnet18", out_stages=("layer3",)).set_autocast("float16")
