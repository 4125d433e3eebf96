"""Backbones: torchvision ResNets with FrozenBatchNorm2d and torchvision's Swin-T, returning padding
masks per stage.

Stages are named as torchvision's ResNet ones for every backbone: `layer1`..`layer4` (strides 4, 8,
16, 32). Single-scale models take the last stage, multi-scale ones the last three.

Weights (`model.backbone.weights`): `null` (random), `imagenet` (torchvision's ImageNet-1k weights
from the torch hub cache or `weights_path`; for Swin-T also an official Swin repository checkpoint,
converted on load) or `synthetic` (ResNets: the trunk of `python -m experiments pretrain`,
SYNTHETIC_WEIGHTS or `weights_path`). Nothing is downloaded here: a missing file is an error that
names the file and where it comes from. `backbone.init` says which initialisation was used (run
records).

`autocast: bfloat16` runs the backbone under torch.autocast in bfloat16 and hands float32 features to
the transformer, which stays in float32 (no loss scaling needed); measure the gain with
`python -m benchmarks.backbone_autocast`. More on both: docs/models.md, "Backbone weights".
"""
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .serialization import UnreadableFile, checksum_problem, load_plain

RESNETS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
}


def _swin_t(stochastic_depth_prob):
    """torchvision's swin_t architecture (whose builder fixes stochastic depth at 0.2)."""
    return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                               window_size=[7, 7], stochastic_depth_prob=stochastic_depth_prob)


SWIN = {"swin_t": (_swin_t, tvm.Swin_T_Weights.IMAGENET1K_V1, [96, 192, 384, 768])}
BACKBONE_NAMES = sorted(RESNETS) + sorted(SWIN)
STAGES = ["layer1", "layer2", "layer3", "layer4"]
# FrozenBatchNorm2d (the authors' code) for ImageNet-initialised backbones; trainable BatchNorm2d helps
# a backbone trained from a random initialisation (the CPU demo).
NORMS = {"frozen_bn": FrozenBatchNorm2d, "batch_norm": nn.BatchNorm2d}
AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16}
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
WEIGHTS = (None, "imagenet", "synthetic")
# The committed trunk for `weights: synthetic` (ResNet-18 up to layer3; see experiments/pretrain.py).
SYNTHETIC_WEIGHTS = Path(__file__).resolve().parent / "weights" / "resnet18_synthetic.pth"


def cached_weights_file(weights_enum):
    """Where torchvision's downloader would have put this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


class WeightsError(ValueError):
    """Pretrained backbone weights that cannot be used: the message names the file and the key."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """Pretrained backbone weights that are not where the configuration says."""


def checked_weights(path, weights, want, what):
    """`weights`, read from `path`, when it is a dict of tensors by parameter name whose entries for the
    keys of `want` (a module's state dict) have its shapes; WeightsError naming the file, the part of
    it (`what`) and the first offending keys otherwise. Missing and extra keys are the caller's rule."""
    if not isinstance(weights, dict):
        raise WeightsError(f"{path}: {what} is a {type(weights).__name__}, expected a dict of tensors by parameter name")
    not_tensors = [k for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise WeightsError(f"{path}: {what} holds {len(not_tensors)} entries that are not tensors by parameter name, "
                           f"e.g. {not_tensors[:3]}")
    shapes = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in want.items()
              if k in weights and weights[k].shape != v.shape]
    if shapes:
        raise WeightsError(f"{path}: {what} has {len(shapes)} weights of another shape, e.g. {'; '.join(shapes[:3])}")
    return weights


def load_imagenet_state_dict(name, weights_enum, weights_path=None):
    path = Path(weights_path) if weights_path else cached_weights_file(weights_enum)
    if not path.is_file():
        where = ("model.backbone.weights_path" if weights_path else
                 f"the torch hub cache ({cached_weights_file(weights_enum).parent}; set TORCH_HOME to move it)")
        raise WeightsNotFoundError(
            f"ImageNet weights for backbone {name!r} not found: no file {path} (from {where}). They are "
            f"torchvision's {weights_enum} ({weights_enum.url}); put that file in the torch hub cache "
            f"({cached_weights_file(weights_enum).parent}) or set model.backbone.weights_path to a copy.")
    try:
        return load_plain(path), path
    except UnreadableFile as e:
        raise WeightsError(str(e)) from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_synthetic_state_dict(name, body, weights_path=None):
    """Loads a trunk written by `python -m experiments pretrain` into the ResNet `body` (which has its
    unused stages removed already). Returns the `init` description: file name and sha256."""
    path = Path(weights_path) if weights_path else SYNTHETIC_WEIGHTS
    if not path.is_file():
        raise WeightsNotFoundError(
            f"synthetic-pretrained weights for backbone {name!r} not found: no file {path}"
            f"{' (model.backbone.weights_path)' if weights_path else ''}. Make them with `python -m experiments "
            f"pretrain --out {path}` (see docs/synthetic_experiments.md, 'Pretrained backbones without ImageNet').")
    try:
        state = load_plain(path)
    except UnreadableFile as e:
        raise WeightsError(str(e)) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise WeightsError(f"{path} is not a weights file of `python -m experiments pretrain` (no 'state_dict')")
    # files written before checksums (the committed trunks among them) hold only these two keys
    problem = checksum_problem(state, {"state_dict", "meta"}, "pretrained trunk")
    if problem:
        raise WeightsError(f"{path} is damaged: {problem}")
    meta = state.get("meta", {})
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: 'meta' is a {type(meta).__name__}, expected the dict `python -m experiments "
                           f"pretrain` writes")
    if meta.get("backbone", name) != name:
        raise WeightsError(f"{path} holds a {meta['backbone']} trunk, but model.backbone.name is {name!r}")
    want = body.state_dict()
    weights = checked_weights(path, state["state_dict"], want, "'state_dict'")
    missing = sorted({k.split(".")[0] for k in want if k not in weights})
    if missing:
        raise WeightsError(f"{path} has no weights for {missing} of {name} (it was pretrained up to "
                         f"{meta.get('last_stage', '?')}); use a model.backbone.last_stage it covers or pretrain "
                         f"with --last-stage")
    body.load_state_dict({k: weights[k].to(v.dtype) for k, v in want.items()})
    return f"synthetic:{path.name} sha256:{file_sha256(path)[:16]} ({meta.get('task', '?')})"


def build_backbone(cfg, out_stages):
    """The backbone a `model.backbone` configuration section asks for, giving `out_stages`."""
    if cfg["name"] in SWIN:
        backbone = SwinBackbone(cfg["name"], cfg["weights"], cfg["weights_path"], cfg["freeze_at"], out_stages,
                                cfg.get("drop_path", 0.0), cfg.get("pad_to_patch", False))
    else:
        backbone = Backbone(cfg["name"], cfg["weights"], cfg["weights_path"], cfg["freeze_at"], out_stages,
                            cfg["norm"])
    backbone.set_autocast(cfg.get("autocast"))
    return backbone


def check_stages(out_stages):
    bad = [s for s in out_stages if s not in STAGES]
    if bad or not out_stages:
        raise ValueError(f"unknown backbone stages {list(out_stages)}; expected some of {STAGES}")
    if list(out_stages) != sorted(out_stages, key=STAGES.index):
        raise ValueError(f"backbone stages must be in order, got {list(out_stages)}")


def downsample_mask(padding_mask, feature):
    """Nearest-downsampled padding mask (True = padding) at the feature's resolution."""
    return F.interpolate(padding_mask[None].float(), size=feature.shape[-2:])[0].bool()


# `model.eval_padding`: the padding mask a model uses outside training (docs/authors_code.md).
EVAL_PADDING = ("exact", "off_by_one", "none")


def eval_padding_mask(padding_mask, rule="exact"):
    """The image padding mask (B, H, W), True at padding, that a model uses in evaluation.
    `exact`: the mask as given (as in training). `off_by_one`: the last valid row and column of
    each image count as padding too, as in the KS-DETR code's evaluation (valid region [:h-1, :w-1]
    where training uses [:h, :w]). `none`: no padding at all (detrex's DAB-DETR evaluates with an
    all-zero mask). Images are padded on the bottom and right."""
    if rule == "exact":
        return padding_mask
    if rule == "none":
        return torch.zeros_like(padding_mask)
    if rule != "off_by_one":
        raise ValueError(f"model.eval_padding must be one of {list(EVAL_PADDING)}, got {rule!r}")
    H, W = padding_mask.shape[-2:]
    h = (~padding_mask[:, :, 0]).sum(1)
    w = (~padding_mask[:, 0, :]).sum(1)
    rows = torch.arange(H, device=padding_mask.device) >= (h - 1)[:, None]
    cols = torch.arange(W, device=padding_mask.device) >= (w - 1)[:, None]
    return padding_mask | rows[:, :, None] | cols[:, None, :]


class _StagedBackbone(nn.Module):
    """What every backbone here shares: the requested stages with their channels and strides, frozen
    parts that get no gradient and stay in eval mode (their norm statistics never update), and the
    optional autocast. forward(images, padding_mask) returns a list of float32 (feature, mask) pairs,
    one per requested stage, from the subclass's `stage_outputs`."""

    autocast_dtype = None

    @staticmethod
    def _check_weights_and_stages(weights, out_stages, allowed=WEIGHTS):
        if weights not in allowed:
            raise ValueError(f"model.backbone.weights must be one of {list(allowed)}, got {weights!r}")
        check_stages(out_stages)

    def set_autocast(self, name):
        if name not in AUTOCAST_DTYPES:
            raise ValueError(f"model.backbone.autocast must be one of {list(AUTOCAST_DTYPES)}, got {name!r}")
        self.autocast_dtype = AUTOCAST_DTYPES[name]

    def forward(self, images, padding_mask):
        if self.autocast_dtype is None:
            return self.stage_outputs(images, padding_mask)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype):
            outs = self.stage_outputs(images, padding_mask)
        return [(feature.float(), mask) for feature, mask in outs]

    def _set_stages(self, out_stages, channels):
        self.out_stages = list(out_stages)
        self.num_channels = [channels[STAGES.index(s)] for s in self.out_stages]
        self.strides = [STRIDES[s] for s in self.out_stages]

    def _freeze(self, modules):
        self.frozen = list(modules)
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


class Backbone(_StagedBackbone):
    """ResNet trunk. forward(images, padding_mask) returns a list of (feature, mask) pairs, one per
    requested stage (in order), where mask is the nearest-downsampled padding mask (True = padding).

    freeze_at: 0 trains everything, 1 freezes the stem (the authors': detectron2 freeze_at=1), 2 the
    stem and layer1 (original DETR), and so on. Frozen BatchNorm2d layers also keep their statistics.
    """

    def __init__(self, name="resnet50", weights=None, weights_path=None, freeze_at=1,
                 out_stages=("layer4",), norm="frozen_bn"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.backbone.norm must be one of {sorted(NORMS)}, got {norm!r}")
        if name in SWIN:
            raise ValueError(f"backbone {name!r} is a Swin Transformer: build it with SwinBackbone (build_backbone)")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONE_NAMES}")
        self._check_weights_and_stages(weights, out_stages)
        builder, weights_enum, channels = RESNETS[name]
        body = builder(weights=None, norm_layer=NORMS[norm])
        self.init = "random"
        if weights == "imagenet":
            state, path = load_imagenet_state_dict(name, weights_enum, weights_path)
            want = body.state_dict()
            checked_weights(path, state, want, "the file")
            # BatchNorm's step counter is in torchvision's files, but not in FrozenBatchNorm2d and never used
            missing, unexpected = ([k for k in sorted(a - b) if not k.endswith("num_batches_tracked")]
                                   for a, b in ((set(want), set(state)), (set(state), set(want))))
            if missing or unexpected:
                raise WeightsError(f"ImageNet weights {path} do not fit {name}: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
            body.load_state_dict(state, strict=False)
            self.init = f"imagenet:{path.name}"
        del body.fc, body.avgpool
        for stage in STAGES[STAGES.index(out_stages[-1]) + 1:]:  # stages after the last one used
            delattr(body, stage)
        if weights == "synthetic":
            self.init = load_synthetic_state_dict(name, body, weights_path)
        self.body = body
        self._set_stages(out_stages, channels)
        groups = [["conv1", "bn1"]] + [[s] for s in STAGES if hasattr(self.body, s)]
        self._freeze(getattr(self.body, m) for group in groups[:freeze_at] for m in group)

    def stage_outputs(self, images, padding_mask):
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        outs = []
        for stage in STAGES[:STAGES.index(self.out_stages[-1]) + 1]:
            x = getattr(b, stage)(x)
            if stage in self.out_stages:
                outs.append((x, downsample_mask(padding_mask, x)))
        return outs


# --------------------------------------------------------------------------------------------------
# Swin-T

def swin_state_dict_from_official(state):
    """A checkpoint of the official Swin repository (keys `patch_embed.*`, `layers.{i}.blocks.{j}.*`,
    `layers.{i}.downsample.*`, `norm.*`, `head.*`, possibly under `model`) in torchvision's Swin
    layout (`features.{k}...`). The computed buffers (relative_position_index, attn_mask) are dropped:
    torchvision builds the same ones. Other keys are an error."""
    state = state.get("model", state)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if parts[0] == "patch_embed":
            new = {"proj": "features.0.0", "norm": "features.0.2"}[parts[1]] + "." + parts[-1]
        elif parts[0] == "layers" and parts[2] == "blocks":
            stage, block, rest = int(parts[1]), parts[3], parts[4:]
            rest = ".".join(rest).replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
            new = f"features.{2 * stage + 1}.{block}.{rest}"
        elif parts[0] == "layers" and parts[2] == "downsample":
            new = f"features.{2 * int(parts[1]) + 2}." + ".".join(parts[3:])
        elif parts[0] in ("norm", "head"):
            new = key
        else:
            raise KeyError(f"unexpected key {key!r} in a Swin checkpoint")
        out[new] = value
    return out


def load_swin_state_dict(name, weights_enum, weights_path, body):
    """Loads ImageNet weights into a torchvision Swin `body`: torchvision's file, or an official Swin
    repository checkpoint (converted). Returns the `init` description."""
    state, path = load_imagenet_state_dict(name, weights_enum, weights_path)
    what = "'model'" if isinstance(state, dict) and "model" in state else "the file"
    state = checked_weights(path, state.get("model", state) if isinstance(state, dict) else state, {}, what)
    if any(k.startswith("patch_embed.") for k in state):
        try:
            state, kind = swin_state_dict_from_official(state), "official Swin checkpoint"
        except (KeyError, IndexError, ValueError) as e:  # a key outside the official layout
            raise WeightsError(f"{path} has patch_embed.* keys, but is not an official Swin checkpoint: "
                               f"{type(e).__name__} {e}") from None
    else:
        kind = "torchvision"
    # the classifier head (1k or 22k classes) is not used by a detector
    state = checked_weights(path, {k: v for k, v in state.items() if not k.startswith("head.")}, body.state_dict(), what)
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index") and not k.startswith("head.")]
    if missing or unexpected:
        raise WeightsError(f"Swin weights {path} do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return f"imagenet:{path.name} ({kind})"


class SwinBackbone(_StagedBackbone):
    """torchvision Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7). forward(images,
    padding_mask) returns a list of (feature (B, C, h, w), mask) pairs, one per requested stage.

    As the detection Swin of the authors' code (detectron2/detrex), each returned stage gets its own new
    LayerNorm (`out_norms`, default init; the classification checkpoint's final `norm` is not used), and
    stochastic depth rises linearly over the blocks from 0 to `drop_path` (the authors': 0.1).
    freeze_at: 0 trains everything (the authors' frozen_stages=-1), 1 freezes the patch embedding,
    k > 1 also the first k-1 stages with their patch merging. Dropping later stages as for ResNets.
    pad_to_patch: zero-pad the image on the bottom/right to a multiple of the patch size (4) first,
    as detectron2's PatchEmbed does (the KS-DETR Swin-T models); without it the patch embedding
    drops the last H mod 4 rows and W mod 4 columns, as torchvision's.
    """

    def __init__(self, name="swin_t", weights=None, weights_path=None, freeze_at=0, out_stages=("layer4",),
                 drop_path=0.0, pad_to_patch=False):
        super().__init__()
        if name not in SWIN:
            raise ValueError(f"unknown Swin backbone {name!r}; expected one of {sorted(SWIN)}")
        self._check_weights_and_stages(weights, out_stages, allowed=(None, "imagenet"))
        builder, weights_enum, channels = SWIN[name]
        body = builder(stochastic_depth_prob=drop_path)
        self.init = "random"
        if weights == "imagenet":
            self.init = load_swin_state_dict(name, weights_enum, weights_path, body)
        last = STAGES.index(out_stages[-1])
        # features: [patch embed, stage1, merge, stage2, merge, stage3, merge, stage4]
        self.features = nn.Sequential(*list(body.features)[:2 * last + 2])
        self._set_stages(out_stages, channels)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.num_channels)
        self.pad_to_patch = pad_to_patch
        groups = [[0]] + [[2 * i + 1, 2 * i + 2] for i in range(4)]
        self._freeze(self.features[j] for group in groups[:freeze_at] for j in group if j < len(self.features))

    def stage_outputs(self, images, padding_mask):
        x = images
        if self.pad_to_patch:
            patch = self.features[0][0].stride
            x = F.pad(x, (0, -x.shape[-1] % patch[1], 0, -x.shape[-2] % patch[0]))
        outs = []
        for j, module in enumerate(self.features):
            x = module(x)  # channels last (B, h, w, C)
            if j % 2 == 1 and STAGES[j // 2] in self.out_stages:
                i = self.out_stages.index(STAGES[j // 2])
                feature = self.out_norms[i](x).permute(0, 3, 1, 2).contiguous()
                outs.append((feature, downsample_mask(padding_mask, feature)))
        return outs
