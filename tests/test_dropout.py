"""models.layers.dropout (the keep mask drawn with torch.rand on CPU) is dropout: the same
probability and scaling as F.dropout, gradients through the kept elements only, reproducible from
the seed; and `attend` with dropout on CPU (the attention map computed explicitly) is SDPA's
attention with that dropout on its map."""
import pytest
import torch
import torch.nn.functional as F

from models import layers
from models.layers import Dropout, attend, dropout


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
