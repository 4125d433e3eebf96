"""Building blocks shared by the DETR variants.

All sequence tensors are batch first: (B, N, d). Attention runs on
torch.nn.functional.scaled_dot_product_attention (SDPA); boolean SDPA masks are True where a
query MAY attend, the opposite of the DETR convention for padding masks (True = padding).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU in between (DETR's box head and small projection MLPs)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def make_activation(name):
    activations = {"relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU}
    if name not in activations:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(activations)}")
    return activations[name]()


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def split_heads(x, nhead):
    """(B, N, h*dh) -> (B, h, N, dh)."""
    B, N, _ = x.shape
    return x.view(B, N, nhead, -1).transpose(1, 2)


def merge_heads(x):
    """(B, h, N, dh) -> (B, N, h*dh)."""
    B, h, N, dh = x.shape
    return x.transpose(1, 2).reshape(B, N, h * dh)


def sdpa_mask(key_padding_mask=None, attn_mask=None):
    """Boolean SDPA mask (True = attend) from a key padding mask (B, Nk), True at padding,
    and/or an attention mask (Nq, Nk) or (B, Nq, Nk), True where attention is blocked."""
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        allowed = ~attn_mask
        allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]
        mask = allowed if mask is None else mask & allowed
    return mask


def attend(q, k, v, mask=None, dropout_p=0.0, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class MultiheadAttention(nn.Module):
    """Multi-head attention with a packed (3d x d) input projection, as torch.nn.MultiheadAttention,
    batch first, on SDPA. Dropout acts on the attention weights."""

    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        self.d_model, self.nhead, self.dropout = d_model, nhead, dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, query, key, value):
        """Per-head Q, K, V, each (B, h, N, dh)."""
        d, w, b = self.d_model, self.in_proj.weight, self.in_proj.bias
        q = F.linear(query, w[:d], b[:d])
        k = F.linear(key, w[d:2 * d], b[d:2 * d])
        v = F.linear(value, w[2 * d:], b[2 * d:])
        return tuple(split_heads(t, self.nhead) for t in (q, k, v))

    def dropout_p(self):
        return self.dropout if self.training else 0.0

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        q, k, v = self.project(query, key, value)
        out = attend(q, k, v, sdpa_mask(key_padding_mask, attn_mask), self.dropout_p())
        return self.out_proj(merge_heads(out))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer: LN(x + SelfAttn(x + pos, x + pos, x)), then
    LN(x + FFN(x)). Dropout acts on the attention weights and inside the FFN (after the activation
    and after the second linear layer); the attention output itself has none (the reference's
    proj_drop is 0)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu"):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = make_activation(activation)
        self.ffn_dropout1 = nn.Dropout(dropout)
        self.ffn_dropout2 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def post_attention(self, x, attn_out):
        """Residual, norms and FFN after the attention (attn_out already out-projected)."""
        x = self.norm1(x + attn_out)
        ffn = self.linear2(self.ffn_dropout1(self.activation(self.linear1(x))))
        return self.norm2(x + self.ffn_dropout2(ffn))

    def forward(self, x, pos, key_padding_mask=None):
        qk = x + pos
        return self.post_attention(x, self.self_attn(qk, qk, x, key_padding_mask))


def box_sine_embedding(boxes, num_feats=128, temperature=10000):
    """Sine embedding of normalised (cx, cy[, w, h]) boxes: num_feats channels per coordinate,
    ordered (y, x[, w, h]) as DAB-DETR's decoder expects. boxes (..., 2 or 4) -> (..., 2 or 4 * num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(coord):
        pos = coord[..., None] * (2 * math.pi) / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [embed(boxes[..., 1]), embed(boxes[..., 0])]
    if boxes.shape[-1] == 4:
        parts += [embed(boxes[..., 2]), embed(boxes[..., 3])]
    return torch.cat(parts, dim=-1)


def xavier_init_(module):
    """xavier_uniform_ on every parameter with more than one dimension (the DETR transformers' init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
