"""Deformable-DETR with every KS mode: forward/backward, teacher removal at inference, the deformable
KS layer against explicit formulas, its parameters and initialisation, the multi-scale GT Fg-Bg mask
in the token order of the flattened features, and the family's architecture (three backbone levels
plus one extra stride-2 level with GroupNorm projections, shared heads, boxes as offsets of 2-d
reference points). The published architecture itself is checked against transformers in
tests/test_hf_parity_deformable.py."""
import math

import pytest
import torch
from torch import nn

from experiments.config import Manifest
from models import build_model, is_teacher_parameter
from models.deformable_detr import encoder_reference_points, valid_ratios
from models.ks_encoder import TEACHER_BRANCHES, KSDeformableEncoderLayer, fg_mask_levels
from models.layers import DeformableEncoderLayer, MSDeformAttn, inverse_sigmoid
from models.ops.ms_deform_attn import ms_deform_attn_pytorch

from .model_helpers import KS_MODES, build, check_teacher_removal, check_train_step, tiny_batch

VARIANT = "deformable_detr"
FROZEN_BACKBONE = {"backbone": {"name": "resnet18", "weights": None, "freeze_at": 5}}  # faster backward


@pytest.mark.parametrize("ks_mode", KS_MODES)
def test_train_step(ks_mode):
    out, losses = check_train_step(VARIANT, ks_mode, **FROZEN_BACKBONE)
    assert "dn_meta" not in out and not any("_dn" in k for k in losses)


@pytest.mark.parametrize("ks_mode", KS_MODES[1:])
def test_teacher_removal_is_exact_at_inference(ks_mode):
    check_teacher_removal(VARIANT, ks_mode)


# --------------------------------------------------------------------------------------------------
# The deformable KS layer

D, HEADS, POINTS = 32, 4, 2
SHAPES = [(5, 6), (3, 3), (2, 2)]


def layer_inputs(seed=0, B=2):
    """x, pos, padding mask, reference points, spatial shapes, level start index, fg (float64);
    image 1 is padded (last row and column of every level)."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for h, w in SHAPES:
        m = torch.zeros(B, h, w, dtype=torch.bool)
        m[1, -1:, :] = True
        m[1, :, -1:] = True
        masks.append(m)
    pad = torch.cat([m.flatten(1) for m in masks], 1)
    S = pad.shape[1]
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    pos = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    refs = encoder_reference_points(SHAPES, torch.stack([valid_ratios(m, torch.float64) for m in masks], 1))
    shapes = torch.tensor(SHAPES)
    starts = torch.tensor([0, 30, 39])
    fg = (torch.rand(B, S, generator=g) < 0.5) & ~pad
    return x, pos, pad, refs, shapes, starts, fg


def explicit_branches(layer, x, pos, pad, refs, shapes, starts, fg):
    """The authors' deformable KS layer (docs/authors_code.md) with plain matmuls: {branch: layer output}."""
    a, t = layer.self_attn, layer.teacher
    B, S, _ = x.shape
    L = len(SHAPES)
    lin = lambda m, inp: inp @ m.weight.T + m.bias  # noqa: E731
    q = x + pos
    offsets = lin(a.sampling_offsets, q).view(B, S, HEADS, L, POINTS, 2)
    wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=x.dtype)  # x offsets in widths, y in heights
    loc = refs[:, :, None, :, None, :] + offsets / wh[:, None, :]

    def weights(m, inp):
        return torch.softmax(lin(m, inp).view(B, S, HEADS, L * POINTS), -1).view(B, S, HEADS, L, POINTS)

    def values(m, inp):
        return lin(m, inp).masked_fill(pad[..., None], 0.0).view(B, S, HEADS, -1)

    xt = torch.where(fg[..., None], torch.relu(lin(t.smlp.linear, x)), x)
    A, V = weights(a.attention_weights, q), values(a.value_proj, x)
    groups = {"attn1": (V, A)}
    if t.attention_weights is not None:
        groups["attn3"] = (V, weights(t.attention_weights, xt + pos))  # student locations, teacher weights
    if t.value_proj is not None:
        groups["attn2"] = (values(t.value_proj, xt), A)  # student A, teacher values
    return {n: layer.post_attention(x, lin(a.output_proj, ms_deform_attn_pytorch(v, shapes, starts, loc, w)))
            for n, (v, w) in groups.items()}


def ks_layer(mode, dropout=0.0):
    torch.manual_seed(0)
    layer = KSDeformableEncoderLayer(mode, D, HEADS, 64, dropout, "relu", len(SHAPES), POINTS).double()
    with torch.no_grad():  # non-trivial student offsets and weights (their init is zero)
        for p in (layer.self_attn.sampling_offsets.weight, layer.self_attn.attention_weights.weight):
            p.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("mode", ["triple", "dual_share_v", "dual_share_a"])
@pytest.mark.parametrize("training", [True, False])
def test_ks_layer_branches_match_explicit_formulas(mode, training):
    layer = ks_layer(mode).train(training)
    inputs = layer_inputs()
    x, pos, pad, refs, shapes, starts, fg = inputs
    student, teachers = layer(x, pos, pad, refs, shapes, starts, fg=fg)
    assert list(teachers) == list(TEACHER_BRANCHES[mode])
    expected = explicit_branches(layer, *inputs)
    got = {"attn1": student, **teachers}
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12)
    # the teachers differ from the student (fg tokens exist)
    for name in teachers:
        assert (got[name] - student).abs().amax() > 1e-3


def test_ks_layer_without_fg_is_the_plain_layer_bit_for_bit():
    layer = ks_layer("triple").eval()
    plain = DeformableEncoderLayer(D, HEADS, 64, 0.0, "relu", len(SHAPES), POINTS).double().eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("teacher.")})
    x, pos, pad, refs, shapes, starts, fg = layer_inputs()
    out, teachers = layer(x, pos, pad, refs, shapes, starts)
    assert teachers == {}
    assert torch.equal(out, plain(x, pos, pad, refs, shapes, starts))
    # evaluation with teachers: the student is still the plain layer's output, bit for bit
    out_with_teachers, teachers = layer(x, pos, pad, refs, shapes, starts, fg=fg)
    assert torch.equal(out_with_teachers, out) and list(teachers) == ["attn3", "attn2"]


def test_ks_layer_dropout_is_drawn_per_branch():
    """Every branch gets its own dropout draw after the shared output projection (reference: MSDA
    output dropout applied per branch); with the same inputs, the branches' dropped positions differ."""
    layer = ks_layer("triple", dropout=0.5).train()
    x, pos, pad, refs, shapes, starts, fg = layer_inputs()
    fg = torch.zeros_like(fg)  # no foreground: X^t = X, so attn2 would equal attn1 without dropout
    with torch.no_grad():
        layer.teacher.value_proj.load_state_dict(layer.self_attn.value_proj.state_dict())
        torch.manual_seed(0)
        student, teachers = layer(x, pos, pad, refs, shapes, starts, fg=fg)
        layer.eval()
        clean_student, clean_teachers = layer(x, pos, pad, refs, shapes, starts, fg=fg)
    torch.testing.assert_close(clean_teachers["attn2"], clean_student, rtol=0, atol=1e-12)
    assert (teachers["attn2"] - student).abs().amax() > 1e-2


REFERENCE_TEACHER_COUNTS = {  # the authors' layer, at d = 256, 8 heads, 4 levels, 4 points
    "triple": {"smlp": 65_792, "attention_weights": 32_896, "value_proj": 65_792},
    "dual_share_v": {"smlp": 65_792, "attention_weights": 32_896},
    "dual_share_a": {"smlp": 65_792, "value_proj": 65_792},
}


@pytest.mark.parametrize("mode", sorted(REFERENCE_TEACHER_COUNTS))
def test_teacher_parameters_and_init_at_the_reference_size(mode):
    torch.manual_seed(0)
    layer = KSDeformableEncoderLayer(mode, 256, 8, 1024, 0.1, "relu", 4, 4)
    plain = DeformableEncoderLayer(256, 8, 1024, 0.1, "relu", 4, 4)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in layer.teacher.named_children()}
    assert counts == REFERENCE_TEACHER_COUNTS[mode]
    n_teacher = sum(p.numel() for n, p in layer.named_parameters() if is_teacher_parameter(n))
    assert sum(p.numel() for p in layer.parameters()) - sum(p.numel() for p in plain.parameters()) == n_teacher
    assert n_teacher == sum(counts.values())
    t = layer.teacher
    if t.attention_weights is not None:
        # xavier (the authors' xavier loop runs after the teacher init), zero bias; the student's is zero
        w, bound = t.attention_weights.weight, math.sqrt(6 / (256 + 128))
        assert 0.9 * bound < w.abs().max() <= bound and not t.attention_weights.bias.any()
        assert not layer.self_attn.attention_weights.weight.any()
    if t.value_proj is not None:
        w, bound = t.value_proj.weight, math.sqrt(6 / 512)
        assert 0.9 * bound < w.abs().max() <= bound and not t.value_proj.bias.any()
    # the sMLP keeps nn.Linear's default init: uniform within 1/sqrt(256), bias included
    assert t.smlp.linear.weight.abs().max() <= 1 / 16 and t.smlp.linear.bias.abs().max() > 0


def test_model_init_leaves_the_teacher_init_of_the_ks_layer():
    model, _ = build(VARIANT, "triple")
    last = model.encoder.layers[-1]
    assert isinstance(last, KSDeformableEncoderLayer)
    assert last.teacher.smlp.linear.bias.abs().max() > 0  # not xavier'd / zeroed by the model init
    assert last.teacher.attention_weights.weight.abs().max() > 0 and not last.teacher.attention_weights.bias.any()
    for m in model.modules():  # every student MSDA has detrex's init after the xavier loop
        if isinstance(m, MSDeformAttn):
            assert not m.attention_weights.weight.any() and not m.sampling_offsets.weight.any()
            assert m.sampling_offsets.bias.abs().max() == m.n_points  # point p at p+1 steps


# --------------------------------------------------------------------------------------------------
# The model

def test_multi_scale_mask_follows_the_token_order_of_the_flattened_features():
    """Levels from the full-resolution canvas, each flattened row-major and concatenated in level
    order, exactly as the features: a box in one corner of the image gives foreground tokens in that
    corner of every level and nowhere else (point sampling: token (i, j) of an h x w level reads
    the canvas at y = i (H-1)/(h-1), x = j (W-1)/(w-1) and is foreground if a canvas pixel with a
    non-zero bilinear weight is)."""
    model, _ = build(VARIANT, "triple")
    images, padding, targets = tiny_batch()  # 96 x 128; image 1 valid 80 x 100
    targets[0]["boxes_xyxy"] = torch.tensor([[0.0, 0.0, 64.0, 48.0]])  # top left: rows < 48, columns < 64
    targets[1]["boxes_xyxy"] = torch.tensor([[60.0, 50.0, 128.0, 96.0]])  # reaches into the padding
    captured = {}
    model.encoder.register_forward_pre_hook(lambda module, args: captured.update(inputs=args))
    with torch.no_grad():
        sources, masks = model.multi_scale_features(images, padding)
        model.eval()(images, padding, targets, with_teachers=True)
    x, pos, mask, refs, spatial_shapes, starts, fg = captured["inputs"]
    shapes = [tuple(s.shape[-2:]) for s in sources]
    assert shapes == [tuple(s) for s in spatial_shapes.tolist()] == [(12, 16), (6, 8), (3, 4), (2, 2)]  # strides 8-64
    assert starts.tolist() == [0, 192, 240, 252] and fg.shape == mask.shape == (2, 256)
    expected_levels = fg_mask_levels([t["boxes_xyxy"] for t in targets], (96, 128), shapes, masks)
    for level, (h, w) in enumerate(shapes):
        tokens = slice(starts[level], starts[level] + h * w)
        assert torch.equal(x[:, tokens], sources[level].flatten(2).transpose(1, 2))
        assert torch.equal(mask[:, tokens], masks[level].flatten(1))
        assert torch.equal(fg[:, tokens], expected_levels[level].flatten(1))
        y = torch.arange(h, dtype=torch.float64)[:, None] * 95 / (h - 1)
        x_ = torch.arange(w, dtype=torch.float64)[None, :] * 127 / (w - 1)
        assert torch.equal(fg[0, tokens].view(h, w), (y < 48) & (x_ < 64))
        assert torch.equal(fg[1, tokens].view(h, w), (y > 49) & (x_ > 59) & ~masks[level][1])
    assert fg[1].any() and not (fg & mask).any()  # padding tokens are never foreground


def test_family_architecture():
    model, criterion = build(VARIANT)
    assert model.backbone.out_stages == ["layer2", "layer3", "layer4"]
    convs = [proj[0] for proj in model.input_proj]
    assert [c.in_channels for c in convs] == [128, 256, 512, 512]  # resnet18 stages, extra level on layer4
    assert [(c.kernel_size, c.stride) for c in convs] == [((1, 1), (1, 1))] * 3 + [((3, 3), (2, 2))]
    assert all(isinstance(proj[1], nn.GroupNorm) and proj[1].num_groups == 32 for proj in model.input_proj)
    assert model.level_embed.shape == (4, 32)
    assert (model.position.temperature, model.position.offset, model.position.normalize) == (10000, -0.5, True)
    enc, dec = model.encoder.layers[0], model.decoder.layers[0]
    attn = enc.self_attn
    assert (attn.n_levels, attn.n_heads, attn.n_points) == (4, 4, 4)
    assert enc.attn_dropout.p == enc.ffn_dropout1.p == enc.ffn_dropout2.p == 0.1
    assert dec.self_attn.dropout == dec.cross_dropout.p == dec.ffn_dropout1.p == 0.1
    assert isinstance(enc.activation, nn.ReLU) and isinstance(dec.activation, nn.ReLU)
    assert not hasattr(model.decoder, "norm")  # no final decoder LayerNorm
    assert isinstance(model.class_embed, nn.Linear) and not isinstance(model.bbox_embed, nn.ModuleList)  # shared
    assert criterion.weights["loss_class"] == 1.0


def test_boxes_are_offsets_of_each_querys_reference_point():
    model, _ = build(VARIANT)
    with torch.no_grad():  # box head outputs zero: every layer's box centre is the reference point
        model.bbox_embed.layers[-1].weight.zero_()
        model.bbox_embed.layers[-1].bias.zero_()
    images, padding, _ = tiny_batch()
    out = model.eval()(images, padding)
    query_pos = model.query_embed.weight[:, :32]  # [positional ; content]
    refs = model.reference_points(query_pos).sigmoid().expand(2, -1, -1)
    for layer in out["aux_outputs"] + [out]:
        torch.testing.assert_close(layer["pred_boxes"][..., :2], refs, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer["pred_boxes"][..., 2:], torch.full_like(refs, 0.5))
    with torch.no_grad():  # the centre moves by the reference's logit
        model.bbox_embed.layers[-1].bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    out = model(images, padding)
    expected = (inverse_sigmoid(refs) + torch.tensor([0.3, -0.2])).sigmoid()
    torch.testing.assert_close(out["pred_boxes"][..., :2], expected, rtol=0, atol=1e-6)


def test_box_refinement_option_gives_per_layer_heads():
    model, criterion = build(VARIANT, "triple", deformable={"box_refine": True}, **FROZEN_BACKBONE)
    assert isinstance(model.class_embed, nn.ModuleList) and len(model.bbox_embed) == 3
    assert model.class_embed[0].weight is not model.class_embed[1].weight
    images, padding, targets = tiny_batch()
    out = model.train()(images, padding, targets)
    assert torch.isfinite(criterion(out, targets)["loss"])


@pytest.mark.parametrize("family,row", [("deformable_detr", "def_r50_12ep"), ("dn_deformable_detr", "dndef_r50_12ep")])
def test_table1_rows_build_with_the_reference_teacher_parameters(family, row):
    """The Table 1 rows build (on the meta device: no memory, no weights); their KS rows add exactly
    the authors' teacher parameters (sMLP, teacher value projection and attention-weights head)."""
    manifest = Manifest("table1")
    counts = {}
    for name in (row, row + "_ks"):
        cfg = manifest.resolve(name)["model"]
        assert cfg["variant"] == family
        cfg["backbone"]["weights"] = None
        with torch.device("meta"):
            model, _ = build_model(cfg, 80)
        counts[name] = (sum(p.numel() for p in model.parameters()),
                        sum(p.numel() for n, p in model.named_parameters() if is_teacher_parameter(n)))
    assert counts[row][1] == 0
    assert counts[row + "_ks"] == (counts[row][0] + 164_480, 164_480)
