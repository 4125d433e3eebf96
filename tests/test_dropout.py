"""models.layers.dropout (the keep mask drawn with torch.rand on CPU) is dropout: the same
probability and scaling as F.dropout, gradients through the kept elements only, reproducible from
the seed; and `attend` with dropout on CPU (the attention map computed explicitly) is SDPA's
attention with that dropout on its map."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import VARIANTS, layers
from models.layers import Dropout, attend, dropout

from .model_helpers import FAMILIES, build


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_drops_with_probability_p_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    x = torch.rand(400_000, dtype=dtype) + 1  # no zeros of its own
    out = dropout(x, 0.1)
    dropped = out == 0
    # 400k Bernoulli(0.1) draws: sd of the share 4.7e-4
    assert abs(dropped.double().mean().item() - 0.1) < 0.003
    scale = torch.ones((), dtype=dtype).div_(0.9)  # 1 / (1 - p) in the input's dtype, as F.dropout
    torch.testing.assert_close(out[~dropped], x[~dropped] * scale, rtol=0, atol=0)
    assert out.dtype == dtype


def test_same_seed_same_mask_and_other_seed_other_mask():
    x = torch.ones(10_000)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_gradient_flows_through_the_kept_elements_only():
    torch.manual_seed(0)
    x = torch.randn(5_000, requires_grad=True)
    out = dropout(x, 0.3)
    out.backward(torch.ones_like(out))
    kept = out != 0
    torch.testing.assert_close(x.grad[kept], torch.ones_like(x.grad[kept]).div_(0.7), rtol=0, atol=0)
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))


def test_edge_probabilities_evaluation_and_the_module():
    x = torch.randn(100)
    assert dropout(x, 0.0) is x or torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(dropout(x, 0.5, training=False), x)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    module = Dropout(0.5).eval()
    assert torch.equal(module(x), x) and module.state_dict() == {}
    module.train()
    torch.manual_seed(1)
    expected = dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(module(x), expected)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_with_empty_row", "float"])
def test_attend_with_dropout_on_cpu_is_sdpa_with_dropout_on_the_map(mask_kind, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    mask = None
    if mask_kind.startswith("bool"):
        mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
        mask[..., 0] = True
        if mask_kind == "bool_with_empty_row":
            mask[0, :, 2] = False  # SDPA gives such a query zeros
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 5, 7, generator=g, dtype=torch.float64)
    keep = torch.rand(2, 3, 5, 7, generator=g) > 0.25
    # the map's dropout replaced by a known mask; SDPA's math with the same mask applied
    monkeypatch.setattr(layers, "dropout", lambda a, p, training=True: a * keep / (1 - p))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.3)
    scores = q @ k.transpose(-2, -1) * 0.3
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    torch.testing.assert_close(weights @ v, expected, rtol=1e-12, atol=1e-12)  # the reference formula
    torch.testing.assert_close(attend(q, k, v, mask, 0.25, scale=0.3), (weights * keep / 0.75) @ v,
                               rtol=1e-12, atol=1e-12)


def test_other_devices_use_torch_dropout(monkeypatch):
    calls = []
    monkeypatch.setattr(layers.F, "dropout", lambda x, p, training: calls.append((x.device.type, p)) or x)
    dropout(torch.empty(4, device="meta"), 0.5)
    assert calls == [("meta", 0.5)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_dropout_of_every_model_is_this_one(variant):
    model = build(variant, "triple", **FAMILIES[variant])[0]
    plain = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and not isinstance(m, Dropout)]
    assert not plain, f"torch dropout modules left in {variant}: {plain}"


def reference_attention(q, k, v, mask, scale, keep=None, p=0.0):
    """softmax(q k^T * scale [+ mask]) (* keep / (1 - p)) @ v, a query without keys giving zeros."""
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return (weights if keep is None else weights * keep / (1 - p)) @ v


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 7), (1, 1, 5, 7), None])
@pytest.mark.parametrize("qk_dim", [8, 16])  # Conditional-DETR's q and k have twice v's head dim
def test_attend_default_scale_mask_shapes_and_gradients(mask_shape, qk_dim, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, qk_dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7, qk_dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if mask_shape:
        mask = torch.rand(*mask_shape, generator=g) > 0.3
        mask[..., 0] = True
    keep = torch.rand(2, 3, 5, 7, generator=g) > 0.1
    monkeypatch.setattr(layers, "dropout", lambda a, p, training=True: a * keep / (1 - p))
    out = attend(q, k, v, mask, 0.1)
    expected = reference_attention(q, k, v, mask, qk_dim ** -0.5, keep, 0.1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_attend_float_mask_rows_of_minus_infinity_give_zeros_as_sdpa():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g) for n in (3, 5, 5))
    mask = torch.zeros(1, 1, 3, 5)
    mask[..., 1, :] = float("-inf")
    torch.manual_seed(0)
    out = attend(q, k, v, mask, 0.5)
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[..., 1, :], out[..., 1, :])


def test_attend_with_dropout_in_bfloat16_computes_the_map_in_float32(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 300, 16, generator=g, dtype=torch.float64) for _ in range(3))
    monkeypatch.setattr(layers, "dropout", lambda a, p, training=True: a)  # no drop: compare the maps
    exact = reference_attention(q, k, v, None, 0.25)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = attend(*half, None, 0.1, scale=0.25)
    assert out.dtype == torch.bfloat16
    sdpa = F.scaled_dot_product_attention(*half, scale=0.25)  # SDPA's CPU path works in float32 too
    error = (out.double() - exact).abs().max().item()
    assert error <= 1.5 * (sdpa.double() - exact).abs().max().item() + 1e-3
