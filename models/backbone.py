"""Backbones: torchvision ResNets with FrozenBatchNorm2d, returning padding masks per stage.

Weights: `weights: null` gives a random initialisation; `weights: imagenet` loads torchvision's
ImageNet-1k weights from the torch hub cache (`$TORCH_HOME/hub/checkpoints/`, as torchvision's own
download would place them) or from `weights_path`. Nothing is downloaded here: a missing file is an
error that names the file and where it comes from.
"""
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

RESNETS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
}
SWIN = {"swin_t"}  # torchvision Swin-T: not built yet
BACKBONE_NAMES = sorted(RESNETS) + sorted(SWIN)
STAGES = ["layer1", "layer2", "layer3", "layer4"]
# FrozenBatchNorm2d (the reference) for ImageNet-initialised backbones; trainable BatchNorm2d helps
# a backbone trained from a random initialisation (the CPU demo).
NORMS = {"frozen_bn": FrozenBatchNorm2d, "batch_norm": nn.BatchNorm2d}
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def cached_weights_file(weights_enum):
    """Where torchvision's downloader would have put this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def load_imagenet_state_dict(name, weights_enum, weights_path=None):
    path = Path(weights_path) if weights_path else cached_weights_file(weights_enum)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for backbone {name!r} not found at {path}. They are torchvision's "
            f"{weights_enum} ({weights_enum.url}); put that file in the torch hub cache "
            f"({cached_weights_file(weights_enum).parent}, set TORCH_HOME to move it) or set "
            f"model.backbone.weights_path to a copy.")
    return torch.load(path, map_location="cpu", weights_only=True), path


class Backbone(nn.Module):
    """ResNet trunk. forward(images, padding_mask) returns a list of (feature, mask) pairs, one per
    requested stage (in order), where mask is the nearest-downsampled padding mask (True = padding).

    freeze_at: 0 trains everything, 1 freezes the stem (the reference: detectron2 freeze_at=1), 2 the
    stem and layer1 (original DETR), and so on. Frozen BatchNorm2d layers also keep their statistics.
    """

    def __init__(self, name="resnet50", weights=None, weights_path=None, freeze_at=1,
                 out_stages=("layer4",), norm="frozen_bn"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.backbone.norm must be one of {sorted(NORMS)}, got {norm!r}")
        if name in SWIN:
            raise NotImplementedError(f"backbone {name!r} is not available yet")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONE_NAMES}")
        if weights not in (None, "imagenet"):
            raise ValueError(f"model.backbone.weights must be null or 'imagenet', got {weights!r}")
        bad = [s for s in out_stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown backbone stages {bad}; expected some of {STAGES}")
        builder, weights_enum, channels = RESNETS[name]
        body = builder(weights=None, norm_layer=NORMS[norm])
        self.init = "random"
        if weights == "imagenet":
            state, path = load_imagenet_state_dict(name, weights_enum, weights_path)
            body.load_state_dict(state)
            self.init = f"imagenet:{path.name}"
        del body.fc, body.avgpool
        for stage in STAGES[STAGES.index(out_stages[-1]) + 1:]:  # stages after the last one used
            delattr(body, stage)
        self.body = body
        self.out_stages = list(out_stages)
        self.num_channels = [channels[STAGES.index(s)] for s in self.out_stages]
        self.strides = [STRIDES[s] for s in self.out_stages]
        groups = [["conv1", "bn1"]] + [[s] for s in STAGES if hasattr(self.body, s)]
        self.frozen = [getattr(self.body, m) for group in groups[:freeze_at] for m in group]
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, images, padding_mask):
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        outs = []
        for stage in STAGES[:STAGES.index(self.out_stages[-1]) + 1]:
            x = getattr(b, stage)(x)
            if stage in self.out_stages:
                mask = F.interpolate(padding_mask[None].float(), size=x.shape[-2:])[0].bool()
                outs.append((x, mask))
        return outs
