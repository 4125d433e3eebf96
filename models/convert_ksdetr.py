"""Weights of the KS-DETR authors' checkpoints (edocanonymous/KS-DETR, a detrex 0.2.1 / detectron2 0.6
fork) in this project's models: KS-DAB-, KS-DN-, KS-Conditional-, KS-Deformable- and
KS-DN-Deformable-DETR with triple or dual attention, and their plain (detrex) baselines, on
detectron2's ResNet-50/101 or Swin-T.

    checkpoint = read_checkpoint(path)          # the file's dict (read with weights_only=True)
    found = describe(checkpoint["model"])       # what it holds: variant, KS mode, sizes, backbone
    found.mismatches(cfg)                       # how a `model` configuration section differs from it
    weights, leftovers = convert(checkpoint, target_state, path)

`convert` maps the checkpoint onto `target_state` (a state dict of the model the configuration
builds; meta tensors are fine for checking shapes). Every entry of the checkpoint is either mapped
or a leftover with its reason (training state, detrex's aliases, buffers computed here); anything
else, a target tensor left unfilled, or a shape that differs is a ConversionError naming the keys.
The key mapping (backbone, encoder, decoder, queries and heads): docs/authors_code.md, "Converting
a checkpoint".
"""
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ks_encoder as ks
from .backbone import swin_state_dict_from_official
from .convert_hf import BN_KEYS, RESNET_DEPTHS, ConversionError, StateMapper
from .serialization import UnreadableFile, load_plain

# Top-level entries of a detrex checkpoint besides `model`: detectron2's DetectionCheckpointer with
# trainer=trainer (tools/train_net.py) writes the trainer's state and the iteration.
TRAINING_STATE = ("trainer", "iteration", "optimizer", "scheduler", "grad_scaler")
VARIANT_NAMES = {"dab_detr": "DAB-DETR", "dn_detr": "DN-DETR", "conditional_detr": "Conditional-DETR",
                 "deformable_detr": "Deformable-DETR", "dn_deformable_detr": "DN-Deformable-DETR"}
SINGLE_SCALE = ("dab_detr", "dn_detr", "conditional_detr")
SWIN_DEPTHS = {(96, (2, 2, 6, 2)): "swin_t"}
SMLP = "ksgt.smlp_module.token_split_conv.linear.0"
ENC, DEC = "transformer.encoder.layers", "transformer.decoder.layers"
COMPUTED = "computed here from the window size (checked equal)"

# The authors' KS layer packs the student's and the teachers' in-projections into one matrix of
# k x d rows (its in_proj_weight.chunk(k)): Q, K, V, then the teachers' Q^t, K^t (share-V), V^t
# (share-A) or Q^t, K^t, V^t (triple). In models/ks_encoder.py they are separate modules of the
# layer: runs of d-row blocks -> parameter name.
PACKED_IN_PROJ = {
    "none": (("self_attn.in_proj", 3),),
    "triple": (("self_attn.in_proj", 3), ("teacher.qk_proj", 2), ("teacher.v_proj", 1)),
    "dual_share_v": (("self_attn.in_proj", 3), ("teacher.qk_proj", 2)),
    "dual_share_a": (("self_attn.in_proj", 3), ("teacher.v_proj", 1)),
}
# The deformable KS layer's teacher heads, by their names in the authors' layer (its
# attention_weights_teacher, value_proj_teacher) -> names here, and the branch each serves.
DEFORMABLE_TEACHER_HEADS = {"attention_weights_teacher": ("teacher.attention_weights", "attn3"),
                            "value_proj_teacher": ("teacher.value_proj", "attn2")}
SMLP_LINEAR = "teacher.smlp.linear"  # the sMLP's Linear(d, d) in a KS layer


def packed_in_proj_mode(rows, d_model):
    """The KS mode of an encoder layer from the rows of its packed (authors') in-projection, or
    None when no mode has that many."""
    for mode, runs in PACKED_IN_PROJ.items():
        if rows == d_model * sum(n for _, n in runs):
            return mode
    return None


def split_packed_in_proj(mode, tensor, d_model):
    """A packed in-projection weight (k d, d) or bias (k d,) of the authors' layer -> {parameter name in
    this project's layer (without .weight/.bias): its rows}, for a layer of `mode`."""
    runs = PACKED_IN_PROJ[ks.check_ks_mode(mode)]
    parts = tensor.split([n * d_model for _, n in runs])
    return {name: part for (name, _), part in zip(runs, parts)}


def deformable_mode(teacher_heads):
    """The KS mode of a deformable encoder layer from the authors' teacher heads it has (names of
    DEFORMABLE_TEACHER_HEADS), or None when no mode has exactly those."""
    branches = {DEFORMABLE_TEACHER_HEADS[h][1] for h in teacher_heads}
    modes = [m for m, b in ks.TEACHER_BRANCHES.items() if set(b) == branches]
    return modes[0] if modes else None


def read_checkpoint(path):
    """The dict of a detrex checkpoint file: {"model": state dict, ...}. A file that cannot be read
    (missing, truncated, not a PyTorch file, or holding more than tensors and plain values) or that
    has no state dict is a ConversionError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no checkpoint file at {path}")
    try:
        state = load_plain(path)
    except UnreadableFile as e:
        raise ConversionError(str(e)) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConversionError(f"{path} is not a detrex checkpoint: expected a dict with a 'model' state dict, "
                              f"got {type(state).__name__}"
                              + (f" with keys {sorted(state)[:8]}" if isinstance(state, dict) else ""))
    return state


def _indices(keys, prefix):
    """Sorted integers i of keys `<prefix>.<i>.…`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys for m in [pattern.match(k)] if m})


@dataclass
class Found:
    """What a checkpoint holds, read from its keys and shapes (None: cannot be told from them)."""
    variant: str
    ks_mode: str
    hidden_dim: int
    num_classes: int
    enc_layers: int
    dec_layers: int
    num_queries: int
    dim_feedforward: int
    prelu: bool
    backbone: str | None  # a name of models.backbone, or None for a ResNet/Swin of no known depth
    backbone_kind: str  # "resnet" or "swin"
    backbone_text: str  # the backbone in words
    num_levels: int | None = None
    box_refine: bool | None = None

    @property
    def name(self):
        return ("KS-" if self.ks_mode != "none" else "") + VARIANT_NAMES[self.variant]

    def summary(self):
        parts = [f"variant {self.variant}", f"KS mode {self.ks_mode}", f"{self.enc_layers}+{self.dec_layers} layers",
                 f"hidden_dim {self.hidden_dim}", f"{self.num_queries} queries", f"{self.num_classes} classes",
                 f"backbone {self.backbone_text}"]
        return f"a {self.name} checkpoint ({', '.join(parts)})"

    def mismatches(self, cfg):
        """['key: row value vs checkpoint value', ...] for the `model` configuration keys that do not
        fit this checkpoint."""
        want = {"variant": self.variant, "ks.mode": self.ks_mode, "hidden_dim": self.hidden_dim,
                "enc_layers": self.enc_layers, "dec_layers": self.dec_layers, "num_queries": self.num_queries,
                "dim_feedforward": self.dim_feedforward}
        if self.backbone is not None:
            want["backbone.name"] = self.backbone
        if self.num_levels is not None:
            want["deformable.num_levels"] = self.num_levels
        if self.box_refine is not None:
            want["deformable.box_refine"] = self.box_refine
        out = []
        for key, value in want.items():
            have = cfg
            for part in key.split("."):
                have = have[part]
            if have != value:
                out.append(f"model.{key} is {have!r}, the checkpoint's is {value!r}")
        if (cfg["activation"] == "prelu") != self.prelu:
            out.append(f"model.activation is {cfg['activation']!r}, the checkpoint's FFNs "
                       f"{'are PReLU' if self.prelu else 'have no PReLU weights'}")
        return out


def describe(state):
    """Found: the variant, KS mode and sizes of a detrex state dict (the `model` entry)."""
    keys = set(state)
    if "neck.convs.0.conv.weight" in keys:
        variant = "dn_deformable_detr" if "tgt_embed.weight" in keys else "deformable_detr"
    elif "anchor_box_embed.weight" in keys:
        variant = "dn_detr" if "denoising_generator.label_encoder.weight" in keys else "dab_detr"
    elif "query_embed.weight" in keys:
        variant = "conditional_detr"
    else:
        raise ConversionError("not a checkpoint of the KS-DETR models: it has none of the keys that tell the "
                              "variant (neck.convs.0.conv.weight, anchor_box_embed.weight, query_embed.weight)")
    enc = _indices(keys, ENC)
    dec = _indices(keys, DEC)
    if not enc or not dec:
        raise ConversionError(f"a {VARIANT_NAMES[variant]} checkpoint without {ENC}.* or {DEC}.* keys")
    num_classes, d = _need(state, "class_embed.weight" if variant in SINGLE_SCALE else "class_embed.0.weight").shape
    last = f"{ENC}.{enc[-1]}.attentions.0"
    if variant in SINGLE_SCALE:
        for i in enc:
            rows = _need(state, f"{ENC}.{i}.attentions.0.attn.in_proj_weight").shape[0]
            mode = packed_in_proj_mode(rows, d)
            if mode is None or (mode != "none" and i != enc[-1]):
                raise ConversionError(f"{ENC}.{i}.attentions.0.attn.in_proj_weight has {rows} rows: not a plain "
                                      f"(3 x {d}) in-projection" + ("" if i == enc[-1] else
                                      "; only the last encoder layer can be a KS layer"))
        ks_mode = mode
    else:
        heads = [h for h in DEFORMABLE_TEACHER_HEADS if f"{last}.{h}.weight" in keys]
        ks_mode = deformable_mode(heads)
        if ks_mode is None:
            raise ConversionError(f"{last} has the teacher heads {heads}, which no KS mode has")
        early = [k for k in keys if "_teacher." in k and not k.startswith(last + ".")]
        if early:
            raise ConversionError(f"{early[0]}: only the last encoder layer can be a KS layer")
    if (ks_mode != "none") != (f"{SMLP}.weight" in keys):
        raise ConversionError(f"the last encoder layer is {'a KS' if ks_mode != 'none' else 'a plain'} layer but "
                              f"the checkpoint {'lacks' if ks_mode != 'none' else 'has'} the sMLP {SMLP}")
    queries = {"dab_detr": "anchor_box_embed.weight", "dn_detr": "anchor_box_embed.weight",
               "conditional_detr": "query_embed.weight", "deformable_detr": "query_embedding.weight",
               "dn_deformable_detr": "tgt_embed.weight"}[variant]
    ffn = _need(state, f"{ENC}.0.ffns.0.layers.0.0.weight").shape[0]
    found = Found(variant, ks_mode, d, num_classes, len(enc), len(dec), state[queries].shape[0], ffn,
                  f"{ENC}.0.ffns.0.layers.0.1.weight" in keys, *_backbone(keys, state))
    if variant not in SINGLE_SCALE:
        found.num_levels = _need(state, "transformer.level_embeds").shape[0]
        found.box_refine = "transformer.decoder.bbox_embed.0.layers.0.weight" in keys
    return found


def _need(state, key):
    if key not in state:
        raise ConversionError(f"the checkpoint has no {key!r}")
    return state[key]


def _backbone(keys, state):
    """(name of models.backbone or None, 'resnet' or 'swin', the backbone in words)."""
    if "backbone.stem.conv1.weight" in keys:
        depths = tuple(len(_indices(keys, f"backbone.res{s}")) for s in (2, 3, 4, 5))
        block = "bottleneck" if "backbone.res2.0.conv3.weight" in keys else "basic"
        name = RESNET_DEPTHS.get((block, depths))
        return name, "resnet", name or f"a ResNet of {block} blocks {depths} (no known depth)"
    if "backbone.patch_embed.proj.weight" in keys:
        depths = tuple(len(_indices(keys, f"backbone.layers.{i}.blocks")) for i in _indices(keys, "backbone.layers"))
        dim = state["backbone.patch_embed.proj.weight"].shape[0]
        name = SWIN_DEPTHS.get((dim, depths))
        return name, "swin", name or f"a Swin Transformer of width {dim} and depths {depths} (not Swin-T)"
    raise ConversionError("the checkpoint has no backbone this project knows: neither detectron2's ResNet "
                          "(backbone.stem.conv1.weight) nor its Swin Transformer (backbone.patch_embed.proj.weight)")


# --------------------------------------------------------------------------------------------------
# The mapping

class _Mapper(StateMapper):
    def alias(self, copy_key, original, reason):
        """A tensor registered twice: checked equal to `original` (which must be mapped too); meta
        tensors (a key listing) have their shapes compared."""
        a, b = self.get(copy_key), self.get(original)
        if a.shape != b.shape or not (a.is_meta or b.is_meta or torch.equal(a, b)):
            raise ConversionError(f"{copy_key} differs from {original}, whose alias it is in the authors' "
                                  f"model ({reason})")
        self.skipped[copy_key] = f"alias of {original} ({reason}; checked equal)"

    def alias_module(self, copy_prefix, original_prefix, reason):
        for key in [k for k in self.source if k.startswith(copy_prefix + ".")]:
            self.alias(key, original_prefix + key[len(copy_prefix):], reason)

    def norm(self, dst, src):
        for p in BN_KEYS:
            self.copy(f"{dst}.{p}", f"{src}.{p}")


def _resnet(m):
    m.copy("backbone.body.conv1.weight", "backbone.stem.conv1.weight")
    m.norm("backbone.body.bn1", "backbone.stem.conv1.norm")
    block = re.compile(r"backbone\.res([2-5])\.(\d+)\.(conv\d|shortcut)\.weight$")
    for key in list(m.source):
        match = block.match(key)
        if not match:
            continue
        stage, index, part = match.groups()
        ours = f"backbone.body.layer{int(stage) - 1}.{index}"
        src = key[:-len(".weight")]
        if part == "shortcut":
            m.copy(f"{ours}.downsample.0.weight", key)
            m.norm(f"{ours}.downsample.1", f"{src}.norm")
        else:
            m.copy(f"{ours}.{part}.weight", key)
            m.norm(f"{ours}.bn{part[-1]}", f"{src}.norm")


def _swin(m, target):
    """detectron2's SwinTransformer (the official repository's names under backbone., plus one
    LayerNorm norm{i} per returned stage) -> SwinBackbone's features / out_norms."""
    official = {}  # official Swin name -> checkpoint key
    norms = sorted({int(g) for k in m.source for g in re.findall(r"^backbone\.norm(\d+)\.", k)})
    for key in m.source:
        if not key.startswith("backbone.") or re.match(r"backbone\.norm\d+\.", key):
            continue
        if key.endswith("relative_position_index"):
            ours = _swin_index_target(key)
            if ours in target and not target[ours].is_meta and not torch.equal(target[ours], m.get(key).flatten()):
                raise ConversionError(f"{key} differs from the relative position index computed here ({ours})")
            m.get(key)
            m.skipped[key] = COMPUTED
            continue
        official[key[len("backbone."):]] = key
    try:
        converted = swin_state_dict_from_official({name: m.source[key] for name, key in official.items()})
    except KeyError as e:
        raise ConversionError(f"{m.name}: {e.args[0]} (under backbone.): not a key of detectron2's Swin "
                              f"Transformer") from None
    # it keeps the order of its input, one output per input here
    for ours, key in zip(converted, official.values()):
        m.out[f"backbone.{ours}"] = m.get(key)
        m.origin[f"backbone.{ours}"] = key
    for j, i in enumerate(norms):
        m.linear(f"backbone.out_norms.{j}", f"backbone.norm{i}")


def _swin_index_target(key):
    stage, block = re.match(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.", key).groups()
    return f"backbone.features.{2 * int(stage) + 1}.{block}.attn.relative_position_index"


def _ffn(m, ours, src, prelu):
    m.linear(f"{ours}.linear1", f"{src}.ffns.0.layers.0.0")
    m.linear(f"{ours}.linear2", f"{src}.ffns.0.layers.1")
    if prelu:
        m.copy(f"{ours}.activation.weight", f"{src}.ffns.0.layers.0.1.weight")
        m.alias(f"{src}.ffns.0.activation.weight", f"{src}.ffns.0.layers.0.1.weight",
                "detrex's FFN keeps its activation module twice")


def _mlp(m, ours, src):
    layers = _indices(m.source, f"{src}.layers")
    if not layers:
        raise ConversionError(f"{m.name} has no {src}.layers.* (for {ours})")
    for i in layers:
        m.linear(f"{ours}.layers.{i}", f"{src}.layers.{i}")


def _encoder(m, found):
    d = found.hidden_dim
    for i in range(found.enc_layers):
        src, ours = f"{ENC}.{i}", f"encoder.layers.{i}"
        mode = found.ks_mode if i == found.enc_layers - 1 else "none"
        if found.variant in SINGLE_SCALE:
            attn = f"{src}.attentions.0.attn"
            for p in ("weight", "bias"):
                packed = m.get(f"{attn}.in_proj_{p}")
                rows = d * sum(n for _, n in PACKED_IN_PROJ[mode])
                if packed.shape[0] != rows:
                    raise ConversionError(f"{m.name}: {attn}.in_proj_{p} has {packed.shape[0]} rows, a {mode!r} "
                                          f"layer's has {rows}")
                for name, rows in split_packed_in_proj(mode, packed, d).items():
                    m.out[f"{ours}.{name}.{p}"] = rows
                    m.origin[f"{ours}.{name}.{p}"] = f"{attn}.in_proj_{p}"
            m.linear(f"{ours}.self_attn.out_proj", f"{attn}.out_proj")
        else:
            attn = f"{src}.attentions.0"
            for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
                m.linear(f"{ours}.self_attn.{name}", f"{attn}.{name}")
            for head, (name, _) in DEFORMABLE_TEACHER_HEADS.items():
                if f"{attn}.{head}.weight" in m.source:
                    m.linear(f"{ours}.{name}", f"{attn}.{head}")
        _ffn(m, ours, src, found.prelu)
        m.linear(f"{ours}.norm1", f"{src}.norms.0")
        m.linear(f"{ours}.norm2", f"{src}.norms.1")
    if found.ks_mode != "none":
        m.linear(f"encoder.layers.{found.enc_layers - 1}.{SMLP_LINEAR}", SMLP)
    if found.variant in ("dab_detr", "dn_detr"):
        _mlp(m, "encoder.query_scale", "transformer.encoder.query_scale")


# detrex's conditional attention projections -> this project's (sa_* / ca_* + the short name)
CONDITIONAL_PROJECTIONS = {"query_content_proj": "q_content", "query_pos_proj": "q_pos",
                           "key_content_proj": "k_content", "key_pos_proj": "k_pos", "value_proj": "v",
                           "out_proj": "out", "query_pos_sine_proj": "q_sine"}


def _conditional_projections(layer):
    """(attention index, detrex name, name here) of one conditional decoder layer: the positional
    query projection of the cross-attention exists in the first layer only (in both code bases)."""
    out = []
    for a, prefix in ((0, "sa"), (1, "ca")):
        for name, short in CONDITIONAL_PROJECTIONS.items():
            if (a == 0 and name == "query_pos_sine_proj") or (a == 1 and name == "query_pos_proj" and layer > 0):
                continue
            out.append((a, name, f"{prefix}_{short}"))
    return out


def _decoder(m, found, target):
    for i in range(found.dec_layers):
        src, ours = f"{DEC}.{i}", f"decoder.layers.{i}"
        if found.variant in SINGLE_SCALE:
            for a, name, short in _conditional_projections(i):
                m.linear(f"{ours}.{short}", f"{src}.attentions.{a}.{name}")
        else:
            for p in ("weight", "bias"):
                m.copy(f"{ours}.self_attn.in_proj.{p}", f"{src}.attentions.0.attn.in_proj_{p}")
            m.linear(f"{ours}.self_attn.out_proj", f"{src}.attentions.0.attn.out_proj")
            for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
                m.linear(f"{ours}.cross_attn.{name}", f"{src}.attentions.1.{name}")
        _ffn(m, ours, src, found.prelu)
        for n in range(3):
            m.linear(f"{ours}.norm{n + 1}", f"{src}.norms.{n}")
    for name in ("query_scale", "ref_point_head", "ref_anchor_head"):
        # wherever either model has one (a missing one on either side is an error below)
        if any(k.startswith(f"transformer.decoder.{name}.") for k in m.source) or f"decoder.{name}.layers.0.weight" \
                in target:
            _mlp(m, f"decoder.{name}", f"transformer.decoder.{name}")
    if found.variant in SINGLE_SCALE:
        m.linear("decoder.norm", "transformer.decoder.post_norm_layer")


def _heads_and_queries(m, found):
    v = found.variant
    if v in SINGLE_SCALE:
        m.linear("input_proj", "input_proj")
        m.linear("class_embed", "class_embed")
        _mlp(m, "bbox_embed", "bbox_embed")
    if v in ("dab_detr", "dn_detr"):
        anchors = m.get("anchor_box_embed.weight")
        m.out["anchor_xy"], m.out["anchor_wh"] = anchors[:, :2], anchors[:, 2:]
        m.origin["anchor_xy"] = m.origin["anchor_wh"] = "anchor_box_embed.weight"
        m.alias_module("transformer.decoder.bbox_embed", "bbox_embed",
                       "DAB-DETR's anchor refinement uses the box head")
    if v == "conditional_detr":
        m.copy("query_embed.weight", "query_embed.weight")
    if v in ("dn_detr", "dn_deformable_detr"):
        m.copy("denoising.label_embed.weight", "denoising_generator.label_encoder.weight")
    if v in SINGLE_SCALE:
        return
    convs = _indices(m.source, "neck.convs")
    for level in convs:
        m.linear(f"input_proj.{level}.0", f"neck.convs.{level}.conv")
        m.linear(f"input_proj.{level}.1", f"neck.convs.{level}.norm")
    for j in _indices(m.source, "neck.extra_convs"):
        m.linear(f"input_proj.{len(convs) + j}.0", f"neck.extra_convs.{j}.conv")
        m.linear(f"input_proj.{len(convs) + j}.1", f"neck.extra_convs.{j}.norm")
    m.copy("level_embed", "transformer.level_embeds")
    layers = range(found.dec_layers)
    if v == "deformable_detr":
        m.copy("query_embed.weight", "query_embedding.weight")
        m.linear("reference_points", "transformer.reference_points")
    else:
        m.copy("tgt_embed.weight", "tgt_embed.weight")
        m.copy("refpoint_embed.weight", "refpoint_embed.weight")
    if found.box_refine:
        for i in layers:
            m.linear(f"class_embed.{i}", f"class_embed.{i}")
            _mlp(m, f"bbox_embed.{i}", f"bbox_embed.{i}")
            m.alias_module(f"transformer.decoder.bbox_embed.{i}", f"bbox_embed.{i}",
                           "the box refinement uses the prediction heads")
    else:  # one pair of heads, registered under every decoder layer's index
        m.linear("class_embed", "class_embed.0")
        _mlp(m, "bbox_embed", "bbox_embed.0")
        for i in layers[1:]:
            reason = "Deformable-DETR without box refinement shares one pair of heads"
            m.alias_module(f"class_embed.{i}", "class_embed.0", reason)
            m.alias_module(f"bbox_embed.{i}", "bbox_embed.0", reason)


def convert(checkpoint, target_state, name="the checkpoint"):
    """(state dict for the model of `target_state`, {checkpoint entry: why it is not used}).
    checkpoint: the dict of read_checkpoint; target_state: the target model's state dict (meta
    tensors are fine: shapes are all that is compared then). Raises ConversionError, naming the
    keys, for an entry that is neither used nor an expected leftover, a target tensor left
    unfilled, and a shape that differs."""
    unknown = sorted(k for k in checkpoint if k != "model" and k not in TRAINING_STATE)
    if unknown:
        raise ConversionError(f"{name} has top-level entries {unknown} besides 'model' and the training state "
                              f"{list(TRAINING_STATE)}; this is not a checkpoint of the authors' trainer")
    state = checkpoint["model"]
    found = describe(state)
    m = _Mapper(state, name)
    if found.backbone_kind == "resnet":
        _resnet(m)
    else:
        _swin(m, target_state)
    _encoder(m, found)
    _decoder(m, found, target_state)
    _heads_and_queries(m, found)
    unused = m.unused()
    if unused:
        raise ConversionError(f"{name}: unknown keys, neither mapped nor expected leftovers: "
                              f"{', '.join(unused[:6])}{', ...' if len(unused) > 6 else ''}")
    extra = [k for k in m.out if k not in target_state]
    if extra:
        raise ConversionError(f"{name}: {m.origin[extra[0]]} maps to {extra[0]}, which the configured model does "
                              f"not have" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = [k for k in target_state if k not in m.out and not _computed_here(k)]
    if missing:
        raise ConversionError(f"{name} has nothing for {', '.join(missing[:6])}"
                              f"{', ...' if len(missing) > 6 else ''} of the configured model")
    wrong = [k for k, v in m.out.items() if tuple(v.shape) != tuple(target_state[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConversionError(f"{name}: shape mismatch: {m.origin[k]} gives {k} the shape {tuple(m.out[k].shape)}, "
                              f"the configured model expects {tuple(target_state[k].shape)}"
                              + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""))
    leftovers = {k: "training state, not weights" for k in checkpoint if k != "model"}
    leftovers.update({k: m.skipped[k] for k in sorted(m.skipped)})
    return {k: v.clone() for k, v in m.out.items()}, leftovers


def _computed_here(key):
    return key.endswith("relative_position_index")
