"""The KS-DETR authors' fixtures (tests/fixtures/authors/README.md): their sizes, the models they
hold, their tiny backbone, and the `import-weights` arguments of one (the `tiny_backbone` fixture
that registers the backbone is in conftest.py)."""
from pathlib import Path

import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"
TINY_BACKBONE = "authors_tiny"
# The fixtures' sizes (their README, "Common tiny overrides") and the authors' evaluation.
TINY = {"hidden_dim": 32, "nheads": 4, "dim_feedforward": 64, "num_queries": 10, "eval_topk": 10, "enc_layers": 2,
        "dec_layers": 2, "eval_padding": "off_by_one", "eval_clip_boxes": True, "inverse_sigmoid_eps": 1e-3,
        "backbone": {"name": "resnet50", "weights": None}}
SINGLE_SCALE = {"decoder_padding_mask": False}
DEFORMABLE = {"activation": "relu", "pos_temperature": 10000, "pos_offset": -0.5}
# fixture id -> (this project's `model` settings, the Table 1 row of the full-size model)
MODELS = {
    "ks_dab_detr_r50_triple": ({"variant": "dab_detr", "ks": {"mode": "triple"}, **SINGLE_SCALE}, "dab_r50_ks"),
    "ks_conditional_detr_r50_triple": ({"variant": "conditional_detr", "activation": "relu", "pos_temperature": 10000,
                                        "dropout": 0.1, "ks": {"mode": "triple"}, **SINGLE_SCALE}, "cond_r50_ks"),
    "ks_dn_detr_r50_triple": ({"variant": "dn_detr", "ks": {"mode": "triple"}, **SINGLE_SCALE}, "dn_r50_ks"),
    "ks_deformable_detr_r50_triple": ({"variant": "deformable_detr", "dropout": 0.1, "ks": {"mode": "triple"},
                                       **DEFORMABLE}, "def_r50_12ep_ks"),
    "ks_dn_deformable_detr_r50_triple": ({"variant": "dn_deformable_detr", "ks": {"mode": "triple"},
                                          "deformable": {"box_refine": True}, **DEFORMABLE}, "dndef_r50_12ep_ks"),
    # detrex's own DAB-DETR (not the KS code's classes) evaluates without any padding mask
    "dab_detr_r50_plain": ({"variant": "dab_detr", "eval_padding": "none", **SINGLE_SCALE}, "dab_r50"),
}
KS_MODELS = [m for m in MODELS if m.startswith("ks_")]
NUM_CLASSES = 5


def tiny_resnet(weights=None, norm_layer=FrozenBatchNorm2d):
    """The fixtures' backbone in torchvision's layout: detectron2's R50 blocks (bottleneck, stride
    in the 3x3 conv, FrozenBN) with stem width 8, blocks (2, 1, 1, 1), bottleneck widths 4-32."""
    block = tvm.resnet.Bottleneck
    net = tvm.ResNet(block, [1, 1, 1, 1], norm_layer=norm_layer)
    net.inplanes = 8
    net.conv1, net.bn1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False), norm_layer(8)
    net.layer1 = net._make_layer(block, 4, 2)
    net.layer2 = net._make_layer(block, 8, 1, stride=2)
    net.layer3 = net._make_layer(block, 16, 1, stride=2)
    net.layer4 = net._make_layer(block, 32, 1, stride=2)
    return net


def import_argv(path, row="dab_r50_ks", manifest="table1", *extra):
    return ["import-weights", "--from", "ks-detr", str(path), str(manifest), "--row", row, *extra]
