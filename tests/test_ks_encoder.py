"""The KS encoder layer: sMLP, triple/dual attention against explicit matmuls, shared dropout,
parameter counts and init."""
import math

import pytest
import torch

from models.ks_encoder import SMLP, TEACHER_BRANCHES, KSEncoderLayer, attend_shared_map
from models.layers import EncoderLayer

D, HEADS, FFN = 32, 4, 64


def inputs(B=2, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    pos = torch.randn(B, N, D, generator=g)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -3:] = True
    fg = (torch.rand(B, N, generator=g) < 0.5) & ~pad
    return x, pos, pad, fg


def test_smlp_leaves_background_unchanged():
    smlp = SMLP(D)
    x, _, _, fg = inputs()
    out = smlp(x, fg)
    assert torch.equal(out[~fg], x[~fg])
    torch.testing.assert_close(out[fg], torch.relu(smlp.linear(x[fg])), rtol=0, atol=1e-6)


def explicit_branches(layer, x, pos, pad, fg):
    """The authors' formulas with plain matmuls in float64: {branch: layer output}."""
    layer = layer.double()
    x, pos = x.double(), pos.double()
    d, h = D, HEADS
    dh = d // h
    w, b = layer.self_attn.in_proj.weight, layer.self_attn.in_proj.bias
    lin = lambda t, i: t @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d]  # noqa: E731
    heads = lambda t: t.view(t.shape[0], t.shape[1], h, dh).transpose(1, 2)  # noqa: E731
    q, k, v = heads(lin(x + pos, 0)), heads(lin(x + pos, 1)), heads(lin(x, 2))
    t = layer.teacher
    xt = torch.where(fg[..., None], torch.relu(t.smlp.linear(x)), x)
    bias = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, -math.inf)[:, None, None]
    softmax = lambda a, b_: torch.softmax(a @ b_.transpose(-1, -2) / math.sqrt(dh) + bias, -1)  # noqa: E731
    A = softmax(q, k)
    ys = {"attn1": A @ v}
    if t.v_proj is not None:
        ys["attn2"] = A @ heads(t.v_proj(xt))
    if t.qk_proj is not None:
        qt, kt = t.qk_proj(xt + pos).split(d, -1)
        ys["attn3"] = softmax(heads(qt), heads(kt)) @ v
    merge = lambda y: y.transpose(1, 2).reshape(x.shape)  # noqa: E731
    return {n: layer.post_attention(x, layer.self_attn.out_proj(merge(y))) for n, y in ys.items()}


@pytest.mark.parametrize("mode", ["triple", "dual_share_v", "dual_share_a"])
@pytest.mark.parametrize("training", [True, False])
def test_branches_match_explicit_formulas(mode, training):
    torch.manual_seed(0)
    layer = KSEncoderLayer(mode, D, HEADS, FFN, dropout=0.0)
    layer.train(training)
    x, pos, pad, fg = inputs()
    student, teachers = layer(x, pos, pad, fg)
    assert list(teachers) == list(TEACHER_BRANCHES[mode])
    expected = explicit_branches(layer, x, pos, pad, fg)
    got = {"attn1": student, **teachers}
    for name in expected:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-5, atol=1e-5)


def test_without_fg_the_layer_is_the_plain_layer_bit_for_bit():
    torch.manual_seed(0)
    ks_layer = KSEncoderLayer("triple", D, HEADS, FFN).eval()
    plain = EncoderLayer(D, HEADS, FFN).eval()
    student_state = {k: v for k, v in ks_layer.state_dict().items() if not k.startswith("teacher.")}
    plain.load_state_dict(student_state)  # strict: the student keeps the plain layer's names
    x, pos, pad, fg = inputs()
    out, teachers = ks_layer(x, pos, pad)
    assert teachers == {}
    assert torch.equal(out, plain(x, pos, pad))
    # evaluation with teachers: the student is still the plain layer exactly
    out_with_teachers, _ = ks_layer(x, pos, pad, fg)
    assert torch.equal(out_with_teachers, out)


def test_attn2_shares_the_dropped_out_map_and_attn3_draws_its_own():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g) for _ in range(3))
    torch.manual_seed(0)
    y1, y2 = attend_shared_map(q, k, v, v, None, dropout_p=0.5)
    assert torch.equal(y1, y2)  # same map, same dropout draw: A V == A V^t when V^t = V
    no_drop, _ = attend_shared_map(q, k, v, v, None, dropout_p=0.0)
    assert not torch.allclose(y1, no_drop)  # dropout was applied

    # in the layer: make the teachers' projections equal to the student's and the sMLP a no-op
    torch.manual_seed(0)
    layer = KSEncoderLayer("triple", D, HEADS, FFN, dropout=0.5).train()
    layer.ffn_dropout1.p = layer.ffn_dropout2.p = 0.0  # keep only the attention dropout
    with torch.no_grad():
        w, b = layer.self_attn.in_proj.weight, layer.self_attn.in_proj.bias
        layer.teacher.qk_proj.weight.copy_(w[:2 * D])
        layer.teacher.qk_proj.bias.copy_(b[:2 * D])
        layer.teacher.v_proj.weight.copy_(w[2 * D:])
        layer.teacher.v_proj.bias.copy_(b[2 * D:])
    x, pos, pad, _ = inputs()
    no_fg = torch.zeros_like(pad)
    student, teachers = layer(x, pos, pad, no_fg)
    torch.testing.assert_close(teachers["attn2"], student, rtol=0, atol=1e-6)  # shared draw
    assert not torch.allclose(teachers["attn3"], student, atol=1e-3)  # independent draw


@pytest.mark.parametrize("mode,projections", [("triple", 3), ("dual_share_v", 2), ("dual_share_a", 1)])
def test_teacher_parameter_counts(mode, projections):
    d = 256
    layer = KSEncoderLayer(mode, d, 8, 2048)
    n_teacher = sum(p.numel() for p in layer.teacher.parameters())
    # sMLP d(d+1) (the paper's count) plus the teacher projections, each d(d+1)
    assert n_teacher == (1 + projections) * d * (d + 1)
    plain = sum(p.numel() for p in EncoderLayer(d, 8, 2048).parameters())
    assert sum(p.numel() for p in layer.parameters()) == plain + n_teacher


@pytest.mark.parametrize("mode,rows", [("triple", 6), ("dual_share_v", 5), ("dual_share_a", 4)])
def test_joint_xavier_init_of_packed_projections(mode, rows):
    torch.manual_seed(0)
    d = 256
    layer = KSEncoderLayer(mode, d, 8, 2048)
    bound = math.sqrt(6 / ((rows + 1) * d))  # xavier over the authors' packed (rows*d x d) matrix
    weights = [layer.self_attn.in_proj.weight] + [p.weight for p in (layer.teacher.qk_proj, layer.teacher.v_proj)
                                                  if p is not None]
    for w in weights:
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    smlp = layer.teacher.smlp.linear.weight  # PyTorch default: uniform with bound 1/sqrt(fan_in)
    assert smlp.abs().max() <= 1 / math.sqrt(d)
    assert abs(smlp.std().item() - 1 / math.sqrt(3 * d)) < 0.05 / math.sqrt(d)


def test_gradients_reach_every_teacher_parameter():
    torch.manual_seed(0)
    layer = KSEncoderLayer("triple", D, HEADS, FFN).train()
    x, pos, pad, fg = inputs()
    student, teachers = layer(x, pos, pad, fg)
    sum(t.square().mean() for t in teachers.values()).backward()
    for name, p in layer.teacher.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
