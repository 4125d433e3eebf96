"""Building blocks shared by the DETR variants.

All sequence tensors are batch first: (B, N, d). Attention runs on
torch.nn.functional.scaled_dot_product_attention (SDPA); boolean SDPA masks are True where a
query MAY attend, the opposite of the DETR convention for padding masks (True = padding).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops.ms_deform_attn import ms_deform_attn


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


def dropout(x, p, training=True):
    """F.dropout(x, p, training), with the keep mask drawn from torch.rand on CPU: CPU bernoulli_
    takes about 3x as long as rand (benchmarks/vs_transformers.py). Same probability
    (to float32's 2^-24), same scaling by 1 / (1 - p); a different random stream than F.dropout."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 1:
        return x * 0
    noise = torch.rand(x.shape, dtype=torch.float32, device=x.device).ge_(p).to(x.dtype).div_(1 - p)
    return x * noise


class Dropout(nn.Dropout):
    """nn.Dropout on `dropout` (same state dict: none; `inplace` is not used)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def attention_map_is_explicit(q, dropout_p):
    """Whether `attend` computes the attention map itself (dropout on CPU) rather than calling SDPA."""
    return dropout_p > 0 and q.device.type == "cpu"


def attend(q, k, v, mask=None, dropout_p=0.0, scale=None):
    """SDPA. With dropout on CPU, SDPA computes the attention map explicitly anyway (its fused CPU
    kernel has no dropout), so the same map is computed here, with `dropout` drawing on it: in
    float32 for half-precision inputs, as SDPA's math path; a query with no allowed key gets zeros."""
    if not attention_map_is_explicit(q, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None and mask.dtype == torch.bool:
        attn = attn.masked_fill(~mask, float("-inf")).softmax(-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    else:
        attn = (attn if mask is None else attn + mask).softmax(-1)
        if mask is not None:
            attn = attn.nan_to_num(nan=0.0)  # rows of -inf only
    return (dropout(attn, dropout_p) @ v).to(dtype)


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


class FFNLayer(nn.Module):
    """The FFN block of every encoder and decoder layer here, post-norm: norm(x + FFN(x)) with
    dropout after the activation and after the second linear layer. Its modules are attributes of
    the layer itself (linear1, linear2, activation, ffn_dropout1, ffn_dropout2), as in the DETR
    family's state dicts; each layer adds its own norms."""

    def _add_ffn(self, d_model, dim_feedforward, dropout, activation):
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = make_activation(activation)
        self.ffn_dropout1 = Dropout(dropout)
        self.ffn_dropout2 = Dropout(dropout)

    def ffn_block(self, x, norm):
        return norm(x + self.ffn_dropout2(self.linear2(self.ffn_dropout1(self.activation(self.linear1(x))))))


class _PostNormEncoderLayer(FFNLayer):
    """The part every encoder layer here shares: norm1 after the attention residual, then
    LN(x + FFN(x)) (norm2)."""

    def _add_norms_and_ffn(self, d_model, dim_feedforward, dropout, activation):
        self._add_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def ffn(self, x):
        """LN(x + FFN(x)); x is the output of norm1."""
        return self.ffn_block(x, self.norm2)


class EncoderLayer(_PostNormEncoderLayer):
    """Post-norm transformer encoder layer: LN(x + SelfAttn(x + pos, x + pos, x)), then
    LN(x + FFN(x)). Dropout acts on the attention weights and inside the FFN (after the activation
    and after the second linear layer); the attention output itself has none (detrex's
    proj_drop is 0)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu"):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self._add_norms_and_ffn(d_model, dim_feedforward, dropout, activation)

    def post_attention(self, x, attn_out):
        """Residual, norms and FFN after the attention (attn_out already out-projected)."""
        return self.ffn(self.norm1(x + attn_out))

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


def detection_heads(d_model, num_classes):
    """A class head (bias at the focal-loss prior 0.01) and a 3-layer box head whose last layer starts
    at zero, as the DETR family initialises them."""
    class_head, box_head = nn.Linear(d_model, num_classes), MLP(d_model, d_model, 4, 3)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    return class_head, box_head


def xavier_init_(module):
    """xavier_uniform_ on every parameter with more than one dimension (the DETR transformers' init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


# --------------------------------------------------------------------------------------------------
# Multi-scale deformable attention (Deformable-DETR family)

def box_from_delta(delta, references, eps=1e-5):
    """Box logits from a box-head output `delta` (..., 4) and reference points (..., 2 or 4) in
    [0, 1]: the reference's inverse sigmoid (`eps`: model.inverse_sigmoid_eps) is added to the
    centre (2-d references) or to the whole box (4-d). Sigmoid them to get normalised cxcywh boxes."""
    if references.shape[-1] == 4:
        return delta + inverse_sigmoid(references, eps)
    if references.shape[-1] != 2:
        raise ValueError(f"reference points must have 2 or 4 coordinates, got {references.shape[-1]}")
    return torch.cat([delta[..., :2] + inverse_sigmoid(references, eps), delta[..., 2:]], -1)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., ICLR 2021) on models.ops.ms_deform_attn.

    Each query predicts, per head, level and point, a sampling offset and an attention weight (the
    weights softmaxed jointly over levels x points) from its own feature; the values are projected
    once, zeroed at padding, and sampled bilinearly. Sampling locations: for 2-d reference points
    reference + offset / (W_l, H_l); for 4-d reference boxes centre + offset / n_points * wh / 2.

    The pieces (`values`, `locations`, `weights`, `sample`) are separate so that the KS layer
    (models.ks_encoder) can combine the student's locations with teacher weights or values.
    """

    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """detrex's init: zero offset weights and a bias that puts head h's points on the ray
        at angle 2 pi h / n_heads (scaled to the unit square's border), point p at p + 1 times that
        step; zero attention weights (uniform attention); xavier value/output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)
        direction = direction / direction.abs().amax(-1, keepdim=True)
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = direction[:, None, None, :] * steps[None, None, :, None]  # (heads, 1, points, 2)
        self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def values(self, value_input, padding_mask=None, proj=None):
        """(B, S, d) -> per-head values (B, S, heads, d / heads), zero at padding (True)."""
        value = (self.value_proj if proj is None else proj)(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        return value.view(*value.shape[:2], self.n_heads, -1)

    def locations(self, query, reference_points, spatial_shapes):
        """Sampling locations (B, Nq, heads, levels, points, 2), normalised (x, y), from the queries
        (B, Nq, d) and reference points (B, Nq, levels, 2 or 4), the latter already scaled to each
        level's valid region; spatial_shapes (levels, 2) int64 (H_l, W_l): the offsets of 2-d
        reference points are in units of each level's width/height."""
        B, Nq, _ = query.shape
        if spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f"spatial_shapes must be ({self.n_levels}, 2), got {tuple(spatial_shapes.shape)}")
        offsets = self.sampling_offsets(query).view(B, Nq, self.n_heads, self.n_levels, self.n_points, 2)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            return ref + offsets / spatial_shapes.flip(-1).to(offsets)[:, None, :]
        if reference_points.shape[-1] == 4:
            return ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        raise ValueError(f"reference points must have 2 or 4 coordinates, got {reference_points.shape[-1]}")

    def weights(self, query, head=None):
        """Attention weights (B, Nq, heads, levels, points), softmaxed over levels x points, from
        `head` (default: this module's attention_weights) applied to the queries."""
        B, Nq, _ = query.shape
        head = self.attention_weights if head is None else head
        logits = head(query).view(B, Nq, self.n_heads, self.n_levels * self.n_points)
        return logits.softmax(-1).view(B, Nq, self.n_heads, self.n_levels, self.n_points)

    @staticmethod
    def sample(value, spatial_shapes, level_start_index, locations, weights):
        """The op: (B, Nq, d) before the output projection."""
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)

    def forward(self, query, reference_points, value_input, spatial_shapes, level_start_index, padding_mask=None):
        """query (B, Nq, d) (positional encoding already added); reference_points (B, Nq, levels, 2
        or 4); value_input (B, S, d) the flattened levels; spatial_shapes (levels, 2) int64;
        level_start_index (levels,) int64; padding_mask (B, S) True at padding."""
        value = self.values(value_input, padding_mask)
        locations = self.locations(query, reference_points, spatial_shapes)
        out = self.sample(value, spatial_shapes, level_start_index, locations, self.weights(query))
        return self.output_proj(out)


class DeformableEncoderLayer(_PostNormEncoderLayer):
    """Post-norm deformable encoder layer: LN(x + dropout(MSDeformAttn(x + pos, refs, x))), then
    LN(x + FFN(x)), with dropout on the attention output and inside the FFN (after the activation
    and after the second linear layer), as detrex."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu", n_levels=4, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, nhead, n_points)
        self.attn_dropout = Dropout(dropout)
        self._add_norms_and_ffn(d_model, dim_feedforward, dropout, activation)

    def post_attention(self, x, attn_out):
        """Dropout, residual, norms and FFN after the attention (attn_out already out-projected)."""
        return self.ffn(self.norm1(x + self.attn_dropout(attn_out)))

    def forward(self, x, pos, key_padding_mask, reference_points, spatial_shapes, level_start_index):
        """x, pos (B, S, d); key_padding_mask (B, S) True at padding; reference_points (B, S, levels,
        2); spatial_shapes (levels, 2) and level_start_index (levels,), int64."""
        attn = self.self_attn(x + pos, reference_points, x, spatial_shapes, level_start_index, key_padding_mask)
        return self.post_attention(x, attn)
