"""Weights of Hugging Face transformers' ConditionalDetr / DabDetr / DeformableDetr object-detection
models in this project's Conditional-DETR / DAB-DETR / Deformable-DETR (and any KS mode of them: the
teacher-only parameters keep their own initialisation). Used to prove that the baselines here are the
published architectures (tests/test_hf_parity.py, tests/test_hf_parity_deformable.py: same weights,
same inputs, elementwise equal logits and boxes).

    model = build_model(cfg, num_classes)[0]
    report = load_from_hf(model, hf_model)   # hf_model: ConditionalDetr/DabDetr/DeformableDetrForObjectDetection
    cfg_overrides = model_config_from_hf(hf_model.config, "dab_detr")   # the matching `model` section

Every Hugging Face tensor is either mapped or skipped for a stated reason, and every non-teacher
parameter/buffer here is filled: anything else is an error. `class_index` (the Hugging Face output
index of each class here) selects class-head rows, e.g. of a COCO checkpoint's 91 outputs; without it
the heads must have the same size. The key mapping (transformers 5.x) and where transformers deviates
from the original repositories and from the authors' detrex: docs/transformers_parity.md.
"""
import torch

from . import is_teacher_parameter
from .deformable_detr import backbone_stages

RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
}
RESNET_WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class ConversionError(ValueError):
    pass


def resnet_name_from_hf(backbone_config):
    """The torchvision ResNet that transformers' ResNetConfig describes exactly (or an error)."""
    if getattr(backbone_config, "model_type", None) != "resnet":
        raise ConversionError(f"only transformers' own ResNet backbone converts (got {backbone_config.model_type!r}; "
                              f"timm backbones are not supported)")
    c = backbone_config
    key = (c.layer_type, tuple(c.depths))
    problems = []
    if key not in RESNET_DEPTHS:
        problems.append(f"layer_type/depths {key} is none of {sorted(RESNET_DEPTHS.values())}")
    elif list(c.hidden_sizes) != RESNET_WIDTHS[c.layer_type]:
        problems.append(f"hidden_sizes {list(c.hidden_sizes)} != {RESNET_WIDTHS[c.layer_type]}")
    if c.embedding_size != 64 or c.num_channels != 3:
        problems.append(f"embedding_size {c.embedding_size} / num_channels {c.num_channels} (expected 64 / 3)")
    if getattr(c, "downsample_in_bottleneck", False) or getattr(c, "downsample_in_first_stage", False):
        problems.append("downsample_in_bottleneck / downsample_in_first_stage must be False (ResNet v1.5)")
    if c.hidden_act != "relu":
        problems.append(f"hidden_act {c.hidden_act!r} (expected relu)")
    if problems:
        raise ConversionError("the Hugging Face ResNet is not a torchvision ResNet: " + "; ".join(problems))
    return RESNET_DEPTHS[key]


def model_config_from_hf(hf_config, variant):
    """The `model` configuration values (to merge into experiments.config.DEFAULTS) that build this
    project's model with the Hugging Face model's architecture."""
    if variant == "conditional_detr":
        d, pos_temperature, activation = hf_config.d_model, 10000, hf_config.activation_function
        if hf_config.position_embedding_type != "sine":
            raise ConversionError(f"ConditionalDetr position_embedding_type {hf_config.position_embedding_type!r} "
                                  f"has no counterpart here (sine only)")
    elif variant == "dab_detr":
        d, activation = hf_config.hidden_size, hf_config.activation_function
        if hf_config.temperature_height != hf_config.temperature_width:
            raise ConversionError("DabDetr temperature_height != temperature_width is not supported")
        pos_temperature = hf_config.temperature_height
        bad = {k: getattr(hf_config, k) for k, ok in (("num_patterns", 0), ("keep_query_pos", False),
                                                      ("query_dim", 4), ("normalize_before", False))
               if getattr(hf_config, k) != ok}
        if getattr(hf_config, "sine_position_embedding_scale", None) not in (None, 2 * torch.pi):
            bad["sine_position_embedding_scale"] = hf_config.sine_position_embedding_scale
        if bad:
            raise ConversionError(f"DabDetr options without a counterpart here: {bad}")
    elif variant == "deformable_detr":
        d, pos_temperature, activation = hf_config.d_model, 10000, hf_config.activation_function
        bad = {k: getattr(hf_config, k) for k, ok in (("two_stage", False), ("position_embedding_type", "sine"),
                                                      ("dilation", False))
               if getattr(hf_config, k) != ok}
        if hf_config.encoder_n_points != hf_config.decoder_n_points:
            bad["encoder_n_points/decoder_n_points"] = (hf_config.encoder_n_points, hf_config.decoder_n_points)
        if bad:
            raise ConversionError(f"DeformableDetr options without a counterpart here: {bad}")
        levels = hf_config.num_feature_levels
        expected = [f"stage{int(s[-1])}" for s in backbone_stages("layer4", levels)]
        out_features = list(getattr(hf_config.backbone_config, "out_features", None) or [])
        if out_features != expected:
            raise ConversionError(f"DeformableDetr with {levels} feature levels must take the backbone stages "
                                  f"{expected}, got out_features {out_features}")
    else:
        raise ConversionError(f"no Hugging Face model for variant {variant!r}")
    if hf_config.encoder_attention_heads != hf_config.decoder_attention_heads:
        raise ConversionError("different encoder/decoder head counts are not supported")
    if hf_config.encoder_ffn_dim != hf_config.decoder_ffn_dim:
        raise ConversionError("different encoder/decoder FFN sizes are not supported")
    cfg = {
        "variant": variant, "hidden_dim": d, "nheads": hf_config.encoder_attention_heads,
        "enc_layers": hf_config.encoder_layers, "dec_layers": hf_config.decoder_layers,
        "dim_feedforward": hf_config.encoder_ffn_dim, "num_queries": hf_config.num_queries,
        "activation": activation, "pos_temperature": pos_temperature, "dropout": float(hf_config.dropout),
        "backbone": {"name": resnet_name_from_hf(hf_config.backbone_config), "last_stage": "layer4"},
    }
    if variant == "deformable_detr":
        cfg["pos_offset"] = -0.5
        cfg["deformable"] = {"num_levels": hf_config.num_feature_levels, "n_points": hf_config.encoder_n_points,
                             "box_refine": bool(hf_config.with_box_refine)}
    return cfg


class StateMapper:
    """Collects target tensors from source keys and remembers which source keys were used (and, in
    `origin`, which source key each target tensor came from). `name`: the source, for messages."""

    def __init__(self, source, name="the Hugging Face state"):
        self.source, self.name, self.used, self.out, self.skipped, self.origin = source, name, set(), {}, {}, {}

    def get(self, key):
        if key not in self.source:
            raise ConversionError(f"{self.name} has no {key!r}")
        self.used.add(key)
        return self.source[key]

    def copy(self, dst, src):
        self.out[dst] = self.get(src)
        self.origin[dst] = src

    def linear(self, dst, src):
        for p in ("weight", "bias"):
            self.copy(f"{dst}.{p}", f"{src}.{p}")

    def skip(self, prefix, reason):
        """Marks the not yet used source keys under `prefix` as skipped, for `reason`."""
        for k in self.source:
            if k.startswith(prefix) and k not in self.used:
                self.used.add(k)
                self.skipped[k] = reason

    def unused(self):
        return sorted(set(self.source) - self.used)


def _resnet(m, src, dst="backbone.body"):
    m.copy(f"{dst}.conv1.weight", f"{src}.embedder.embedder.convolution.weight")
    for p in BN_KEYS:
        m.copy(f"{dst}.bn1.{p}", f"{src}.embedder.embedder.normalization.{p}")
    stage_keys = sorted({tuple(int(x) for x in k[len(src) + 1:].split(".")[2:5:2])
                         for k in m.source if k.startswith(f"{src}.encoder.stages.")})
    for s, b in stage_keys:
        hf = f"{src}.encoder.stages.{s}.layers.{b}"
        tv = f"{dst}.layer{s + 1}.{b}"
        convs = sorted({int(k[len(hf) + len(".layer."):].split(".")[0]) for k in m.source if k.startswith(f"{hf}.layer.")})
        for c in convs:
            m.copy(f"{tv}.conv{c + 1}.weight", f"{hf}.layer.{c}.convolution.weight")
            for p in BN_KEYS:
                m.copy(f"{tv}.bn{c + 1}.{p}", f"{hf}.layer.{c}.normalization.{p}")
        if f"{hf}.shortcut.convolution.weight" in m.source:
            m.copy(f"{tv}.downsample.0.weight", f"{hf}.shortcut.convolution.weight")
            for p in BN_KEYS:
                m.copy(f"{tv}.downsample.1.{p}", f"{hf}.shortcut.normalization.{p}")
    m.skip(f"{src}.", "not a parameter of this backbone")  # e.g. num_batches_tracked


def _packed(m, dst, q, k, v):
    for p in ("weight", "bias"):
        m.out[f"{dst}.{p}"] = torch.cat([m.get(f"{q}.{p}"), m.get(f"{k}.{p}"), m.get(f"{v}.{p}")])


def _class_head(m, dst, src, class_index):
    w, b = m.get(f"{src}.weight"), m.get(f"{src}.bias")
    if class_index is not None:
        index = torch.as_tensor(class_index, dtype=torch.int64)
        w, b = w[index], b[index]
    m.out[f"{dst}.weight"], m.out[f"{dst}.bias"] = w, b


def _heads(m, class_src, box_src, class_index):
    _class_head(m, "class_embed", class_src, class_index)
    for i in range(3):
        m.linear(f"bbox_embed.layers.{i}", f"{box_src}.layers.{i}")


def _mlp(m, dst, src, layers=2):
    for i in range(layers):
        m.linear(f"{dst}.layers.{i}", f"{src}.layers.{i}")


def convert_conditional_detr(hf_state, enc_layers, dec_layers, class_index=None):
    """ConditionalDetrForObjectDetection state dict -> this project's ConditionalDETR state dict."""
    m = StateMapper(hf_state)
    _resnet(m, "model.backbone.model")
    m.linear("input_proj", "model.input_projection")
    m.copy("query_embed.weight", "model.query_position_embeddings.weight")
    for i in range(enc_layers):
        hf, ours = f"model.encoder.layers.{i}", f"encoder.layers.{i}"
        _packed(m, f"{ours}.self_attn.in_proj", f"{hf}.self_attn.q_proj", f"{hf}.self_attn.k_proj",
                f"{hf}.self_attn.v_proj")
        for a, b in (("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "self_attn_layer_norm"),
                     ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"), ("norm2", "final_layer_norm")):
            m.linear(f"{ours}.{a}", f"{hf}.{b}")
    for i in range(dec_layers):
        hf, ours = f"model.decoder.layers.{i}", f"decoder.layers.{i}"
        pairs = [("sa_q_content", "self_attn.q_content_proj"), ("sa_q_pos", "self_attn.q_pos_proj"),
                 ("sa_k_content", "self_attn.k_content_proj"), ("sa_k_pos", "self_attn.k_pos_proj"),
                 ("sa_v", "self_attn.v_proj"), ("sa_out", "self_attn.o_proj"), ("norm1", "self_attn_layer_norm"),
                 ("ca_q_content", "encoder_attn.q_content_proj"), ("ca_k_content", "encoder_attn.k_content_proj"),
                 ("ca_k_pos", "encoder_attn.k_pos_proj"), ("ca_v", "encoder_attn.v_proj"),
                 ("ca_q_sine", "encoder_attn.q_pos_sine_proj"), ("ca_out", "encoder_attn.o_proj"),
                 ("norm2", "encoder_attn_layer_norm"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
                 ("norm3", "final_layer_norm")]
        if i == 0:
            pairs.append(("ca_q_pos", "encoder_attn.q_pos_proj"))
        else:  # older transformers versions kept it in every layer; only the first layer uses it
            m.skip(f"{hf}.encoder_attn.q_pos_proj.", "unused after the first decoder layer")
        for a, b in pairs:
            m.linear(f"{ours}.{a}", f"{hf}.{b}")
    m.linear("decoder.norm", "model.decoder.layernorm")
    _mlp(m, "decoder.query_scale", "model.decoder.query_scale")
    _mlp(m, "decoder.ref_point_head", "model.decoder.ref_point_head")
    _heads(m, "class_labels_classifier", "bbox_predictor", class_index)
    return m


def convert_dab_detr(hf_state, enc_layers, dec_layers, class_index=None):
    """DabDetrForObjectDetection state dict -> this project's DABDETR state dict."""
    m = StateMapper(hf_state)
    _resnet(m, "model.backbone.conv_encoder.model")
    m.linear("input_proj", "model.input_projection")
    anchors = m.get("model.query_refpoint_embeddings.weight")
    m.out["anchor_xy"], m.out["anchor_wh"] = anchors[:, :2], anchors[:, 2:]
    _mlp(m, "encoder.query_scale", "model.encoder.query_scale")
    for i in range(enc_layers):
        hf, ours = f"model.encoder.layers.{i}", f"encoder.layers.{i}"
        _packed(m, f"{ours}.self_attn.in_proj", f"{hf}.self_attn.q_proj", f"{hf}.self_attn.k_proj",
                f"{hf}.self_attn.v_proj")
        for a, b in (("self_attn.out_proj", "self_attn.out_proj"), ("norm1", "self_attn_layer_norm"),
                     ("linear1", "fc1"), ("linear2", "fc2"), ("norm2", "final_layer_norm")):
            m.linear(f"{ours}.{a}", f"{hf}.{b}")
        m.copy(f"{ours}.activation.weight", f"{hf}.activation_fn.weight")
    for i in range(dec_layers):
        hf, ours = f"model.decoder.layers.{i}", f"decoder.layers.{i}"
        sa, ca = "self_attn.self_attn", "cross_attn.cross_attn"
        pairs = [("sa_q_content", f"{sa}_query_content_proj"), ("sa_q_pos", f"{sa}_query_pos_proj"),
                 ("sa_k_content", f"{sa}_key_content_proj"), ("sa_k_pos", f"{sa}_key_pos_proj"),
                 ("sa_v", f"{sa}_value_proj"), ("sa_out", f"{sa}.output_proj"), ("norm1", f"{sa}_layer_norm"),
                 ("ca_q_content", f"{ca}_query_content_proj"), ("ca_k_content", f"{ca}_key_content_proj"),
                 ("ca_k_pos", f"{ca}_key_pos_proj"), ("ca_v", f"{ca}_value_proj"),
                 ("ca_q_sine", f"{ca}_query_pos_sine_proj"), ("ca_out", f"{ca}.output_proj"),
                 ("norm2", f"{ca}_layer_norm"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
                 ("norm3", "mlp.final_layer_norm")]
        if i == 0:
            pairs.append(("ca_q_pos", f"{ca}_query_pos_proj"))
        for a, b in pairs:
            m.linear(f"{ours}.{a}", f"{hf}.{b}")
        m.copy(f"{ours}.activation.weight", f"{hf}.mlp.activation_fn.weight")
    m.linear("decoder.norm", "model.decoder.layernorm")
    _mlp(m, "decoder.query_scale", "model.decoder.query_scale")
    _mlp(m, "decoder.ref_point_head", "model.decoder.ref_point_head")
    _mlp(m, "decoder.ref_anchor_head", "model.decoder.ref_anchor_head")
    _heads(m, "class_embed", "bbox_predictor", class_index)
    for i in range(3):
        for p in ("weight", "bias"):
            tied, head = f"model.decoder.bbox_embed.layers.{i}.{p}", f"bbox_predictor.layers.{i}.{p}"
            if tied in hf_state and not torch.equal(m.get(tied), m.get(head)):
                raise ConversionError(f"{tied} differs from {head}: DAB-DETR shares one box head between the "
                                      f"anchor refinement and the predictions; an untied pair has no counterpart here")
    m.skip("model.decoder.bbox_embed.", "tied to bbox_predictor (checked equal)")
    return m


def _tied_copies(m, pairs, reason):
    """Skips the Hugging Face tensors that are tied copies of others ((copy, original) pairs; a copy
    may also be left out of the state dict) after checking that they are equal; a different copy is
    an error naming `reason`."""
    for copy_key, original in pairs:
        if copy_key in m.source:
            if not torch.equal(m.get(copy_key), m.get(original)):
                raise ConversionError(f"{copy_key} differs from {original}: {reason}")
            m.skipped[copy_key] = f"tied to {original} (checked equal)"


def convert_deformable_detr(hf_state, enc_layers, dec_layers, class_index=None, box_refine=False):
    """DeformableDetrForObjectDetection state dict -> this project's DeformableDETR state dict."""
    m = StateMapper(hf_state)
    _resnet(m, "model.backbone.model")
    levels = sorted({int(k.split(".")[2]) for k in hf_state if k.startswith("model.input_proj.")})
    for level in levels:
        for part in (0, 1):  # conv, GroupNorm
            m.linear(f"input_proj.{level}.{part}", f"model.input_proj.{level}.{part}")
    m.copy("level_embed", "model.level_embed")
    m.copy("query_embed.weight", "model.query_position_embeddings.weight")
    m.linear("reference_points", "model.reference_points")
    msda = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    for i in range(enc_layers):
        hf, ours = f"model.encoder.layers.{i}", f"encoder.layers.{i}"
        for name in msda:
            m.linear(f"{ours}.self_attn.{name}", f"{hf}.self_attn.{name}")
        for a, b in (("norm1", "self_attn_layer_norm"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
                     ("norm2", "final_layer_norm")):
            m.linear(f"{ours}.{a}", f"{hf}.{b}")
    for i in range(dec_layers):
        hf, ours = f"model.decoder.layers.{i}", f"decoder.layers.{i}"
        _packed(m, f"{ours}.self_attn.in_proj", f"{hf}.self_attn.q_proj", f"{hf}.self_attn.k_proj",
                f"{hf}.self_attn.v_proj")
        for name in msda:
            m.linear(f"{ours}.cross_attn.{name}", f"{hf}.encoder_attn.{name}")
        for a, b in (("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "self_attn_layer_norm"),
                     ("norm2", "encoder_attn_layer_norm"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
                     ("norm3", "final_layer_norm")):
            m.linear(f"{ours}.{a}", f"{hf}.{b}")
    params = ("weight", "bias")
    box_params = [f"layers.{k}.{p}" for k in range(3) for p in params]
    class_copies = [(f"class_embed.{i}.{p}", f"class_embed.0.{p}") for i in range(1, dec_layers) for p in params]
    if box_refine:
        # per-layer heads here; transformers ties every layer's class head to the first one
        _tied_copies(m, class_copies, "transformers ties the class heads of a box-refinement model")
        for i in range(dec_layers):
            _class_head(m, f"class_embed.{i}", "class_embed.0", class_index)
            _mlp(m, f"bbox_embed.{i}", f"bbox_embed.{i}", layers=3)
            _tied_copies(m, [(f"model.decoder.bbox_embed.{i}.{p}", f"bbox_embed.{i}.{p}") for p in box_params],
                         "the refinement's box heads are the prediction heads (one per layer)")
    else:  # one pair of heads shared by all layers
        _tied_copies(m, class_copies, "Deformable-DETR without box refinement shares one class head")
        box_copies = [(f"bbox_embed.{i}.{p}", f"bbox_embed.0.{p}") for i in range(1, dec_layers) for p in box_params]
        _tied_copies(m, box_copies, "Deformable-DETR without box refinement shares one box head")
        _class_head(m, "class_embed", "class_embed.0", class_index)
        _mlp(m, "bbox_embed", "bbox_embed.0", layers=3)
    return m


CONVERTERS = {"ConditionalDetrForObjectDetection": ("conditional_detr", convert_conditional_detr),
              "DabDetrForObjectDetection": ("dab_detr", convert_dab_detr),
              "DeformableDetrForObjectDetection": ("deformable_detr", convert_deformable_detr)}


@torch.no_grad()
def load_from_hf(model, hf_model, class_index=None):
    """Copies a transformers ConditionalDetr/DabDetr/DeformableDetr object-detection model's weights into `model`
    (this project's model of the same variant and architecture, any KS mode). Returns
    {hf key: reason} for the Hugging Face tensors that were skipped. Raises ConversionError when a
    Hugging Face tensor is left unmapped, a (non-teacher) tensor here is left unfilled, or shapes
    differ."""
    kind = type(hf_model).__name__
    if kind not in CONVERTERS:
        raise ConversionError(f"no converter for {kind}; expected one of {sorted(CONVERTERS)}")
    variant, convert = CONVERTERS[kind]
    hf_config = hf_model.config
    model_config_from_hf(hf_config, variant)  # raises on options without a counterpart
    extra = {"box_refine": bool(hf_config.with_box_refine)} if variant == "deformable_detr" else {}
    m = convert(hf_model.state_dict(), hf_config.encoder_layers, hf_config.decoder_layers, class_index, **extra)
    unused = m.unused()
    if unused:
        raise ConversionError(f"Hugging Face tensors left unmapped: {unused[:10]}{' ...' if len(unused) > 10 else ''}")
    ours = model.state_dict()
    missing = sorted(k for k in ours if k not in m.out and not is_teacher_parameter(k))
    extra = sorted(k for k in m.out if k not in ours)
    if missing or extra:
        raise ConversionError(f"state mismatch with {type(model).__name__}: unfilled {missing[:10]}, unknown {extra[:10]}")
    for k, v in m.out.items():
        if ours[k].shape != v.shape:
            raise ConversionError(f"{k}: shape {tuple(v.shape)} from Hugging Face, {tuple(ours[k].shape)} here")
        ours[k].copy_(v)
    return m.skipped
