"""Knowledge sharing (KS-DETR), in one place.

Every variant takes from here:
- the ground-truth foreground/background (Fg-Bg) mask at token resolution (`fg_mask`; multi-scale:
  `token_fg_mask_levels`),
- the sMLP teacher feature X^t (paper Eq. 9),
- the last encoder layer with triple or dual attention: `KSEncoderLayer` (standard attention:
  Conditional-, DAB-, DN-DETR) and `KSDeformableEncoderLayer` (Deformable-, DN-Deformable-DETR),
- the bookkeeping: when teachers run, the decoder on every branch, which outputs get a loss.

Branches (as the paper): attn1 = student (Q, K, V); attn2 = the student's attention map A with
teacher values (Q, K, V^t); attn3 = teacher attention sharing the student's values (Q^t, K^t, V).
Modes: `none` (plain baseline), `triple` (attn1 + attn3 + attn2), `dual_share_v` (attn1 + attn3),
`dual_share_a` (attn1 + attn2).

Teachers run only where asked for (training, or evaluation with GT masks for Fig. 4). Without them
the KS layer is exactly the plain encoder layer: student outputs are bit-identical to a model built
without any teacher parameters, and no ground truth is needed.

What the authors' code does for each part, with their file paths: docs/authors_code.md.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (DeformableEncoderLayer, EncoderLayer, attend, attention_map_is_explicit, merge_heads, sdpa_mask,
                     split_heads)

STUDENT = "attn1"
# Teacher branches per mode, in the authors' order (their feat_t = [A^t V, A V^t]).
TEACHER_BRANCHES = {
    "none": (),
    "triple": ("attn3", "attn2"),
    "dual_share_v": ("attn3",),
    "dual_share_a": ("attn2",),
}
KS_MODES = tuple(TEACHER_BRANCHES)
TEACHER_LAYERS = ("last", "all")
# What the teachers are told (`model.ks.mask`): `gt` the ground-truth Fg-Bg mask (the paper); `none`
# an all-background mask, so X^t = X: the teachers keep their projections, decoder passes and losses
# but get no ground-truth knowledge (a control for where a KS gain comes from).
TEACHER_MASKS = ("gt", "none")


def check_ks_mode(mode):
    if mode not in TEACHER_BRANCHES:
        raise ValueError(f"unknown KS mode {mode!r}; expected one of {list(KS_MODES)}")
    return mode


def check_teacher_mask(mask):
    if mask not in TEACHER_MASKS:
        raise ValueError(f"unknown teacher mask {mask!r}; expected one of {list(TEACHER_MASKS)}")
    return mask


def settings(ks_cfg):
    """(mode, teacher_layers, teacher mask) of a model configuration's `ks` section, checked."""
    return check_ks_mode(ks_cfg["mode"]), ks_cfg["teacher_layers"], check_teacher_mask(ks_cfg["mask"])


# --------------------------------------------------------------------------------------------------
# GT Fg-Bg mask (docs/authors_code.md, "GT Fg-Bg mask")

def fg_canvas(boxes, batch_hw):
    """Rasterise boxes on the padded-batch canvas, as the authors' code does box by box:
    canvas[b, int(y1):int(y2), int(x1):int(x2)] = 1 (int() truncates, a floor for the non-negative
    coordinates of boxes clamped to their image; half-open, so the last partial row and column are
    left out and a box under one pixel wide after flooring can be empty). Overlaps union.

    boxes: list of B (n_i, 4) absolute xyxy tensors in padded-batch pixels; batch_hw: (H, W).
    Returns (B, H, W) float32 of 0/1. Vectorised: rows x columns indicator matrix product.
    """
    H, W = batch_hw
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    n = max((len(b) for b in boxes), default=0)
    if n == 0:
        return torch.zeros(len(boxes), H, W, device=device)
    padded = torch.zeros(len(boxes), n, 4, dtype=torch.int64, device=device)  # zero box = empty
    for i, b in enumerate(boxes):
        padded[i, :len(b)] = b.detach().to(torch.int64).clamp(min=0)
    x1, y1, x2, y2 = padded.unbind(-1)
    ys = torch.arange(H, device=device)
    xs = torch.arange(W, device=device)
    rows = ((ys >= y1[..., None]) & (ys < y2[..., None])).float()  # (B, n, H)
    cols = ((xs >= x1[..., None]) & (xs < x2[..., None])).float()  # (B, n, W)
    return (torch.bmm(rows.transpose(1, 2), cols) > 0).float()


def resize_canvas(canvas, feature_hw, padding_mask=None):
    """Canvas (B, H, W) -> token mask (B, h, w): bilinear with align_corners=True and a token is
    foreground iff its interpolated value is > 0 (no 0.5 threshold). This is point sampling: token
    (i, j) reads the canvas at y = i (H-1)/(h-1), x = j (W-1)/(w-1) and is foreground if any
    neighbour with a non-zero weight is. Padding tokens (padding_mask True) are never foreground."""
    mask = F.interpolate(canvas[:, None], size=tuple(feature_hw), mode="bilinear",
                         align_corners=True)[:, 0] > 0
    if padding_mask is not None:
        mask = mask & ~padding_mask
    return mask


def fg_mask(boxes, batch_hw, feature_hw, padding_mask=None):
    """GT Fg-Bg mask at token resolution: (B, h, w) bool. See fg_canvas and resize_canvas."""
    return resize_canvas(fg_canvas(boxes, batch_hw), feature_hw, padding_mask)


def fg_mask_levels(boxes, batch_hw, level_hws, padding_masks=None):
    """Multi-scale masks: each level resized independently from the one full-resolution canvas
    (as the authors' code). Returns a list of (B, h_l, w_l) bool masks in level order."""
    canvas = fg_canvas(boxes, batch_hw)
    padding_masks = padding_masks or [None] * len(level_hws)
    return [resize_canvas(canvas, hw, pm) for hw, pm in zip(level_hws, padding_masks)]


# --------------------------------------------------------------------------------------------------
# Teacher feature and the KS encoder layer (docs/authors_code.md: "sMLP", "Triple and dual attention,
# standard layer")

class SMLP(nn.Module):
    """sMLP of paper Eq. 9: X^t = X * (1 - M) + ReLU(X W + b) * M. Background tokens pass unchanged.
    One Linear(d, d) with PyTorch's default init (the authors' code keeps it out of the xavier loop)."""

    def __init__(self, d_model):
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)

    def forward(self, x, fg):
        """x (B, N, d); fg (B, N) bool."""
        return torch.where(fg[..., None], F.relu(self.linear(x)), x)


class TeacherParameters(nn.Module):
    """Every parameter that exists only for the teachers: the sMLP and the teacher projections
    W^Qt, W^Kt (teacher attention map, attn3) and W^Vt (teacher values, attn2)."""

    def __init__(self, d_model, branches):
        super().__init__()
        self.smlp = SMLP(d_model)
        self.qk_proj = nn.Linear(d_model, 2 * d_model) if "attn3" in branches else None
        self.v_proj = nn.Linear(d_model, d_model) if "attn2" in branches else None


def attend_shared_map(q, k, v, vt, mask, dropout_p):
    """A V and A V^t from ONE attention map A (and one dropout draw on it), as attn1 and attn2 must
    share it. One SDPA call on the concatenated values [V | V^t]; q and k are zero-padded to the
    doubled head dim, with the scale of the true head dim passed explicitly, because unequal q/v
    head dims make SDPA fall back to a slow path that materialises the map
    (see benchmarks/triple_attention.py). Where `attend` computes the map itself (dropout
    on CPU) the padding would only add work and is left out."""
    dh = q.shape[-1]
    if attention_map_is_explicit(q, dropout_p):
        y = attend(q, k, torch.cat([v, vt], -1), mask, dropout_p)
    else:
        y = attend(torch.cat([q, torch.zeros_like(q)], -1), torch.cat([k, torch.zeros_like(k)], -1),
                   torch.cat([v, vt], -1), mask, dropout_p, scale=dh ** -0.5)
    return y[..., :dh], y[..., dh:]


@dataclass
class Inspection:
    """What a KS layer computes for some query tokens (`inspect`), batch first; nq = len(queries).

    teacher_feature: X^t (B, N, d), the sMLP output of every token.
    student, teacher: for the standard layer the softmax attention rows of A and A^t (B, heads, nq,
    N); for the deformable layer the attention weights of A and A^t (B, nq, heads, levels, points).
    teacher is None where the mode has no teacher attention (share-A: Attn2 uses A).
    locations: deformable layer only, the sampling locations (B, nq, heads, levels, points, 2),
    normalised (x, y), shared by the student and the teachers.
    """
    teacher_feature: torch.Tensor
    student: torch.Tensor
    teacher: torch.Tensor | None
    locations: torch.Tensor | None = None


def attention_rows(q, k, key_padding_mask=None, queries=None):
    """softmax(q k^T / sqrt(d_head)) for the query tokens `queries` (default all): (B, heads, nq, Nk)
    from per-head q, k (B, heads, N, d_head); zero at padding keys (key_padding_mask (B, Nk) True)."""
    if queries is not None:
        q = q[:, :, queries]
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


class KSEncoderLayer(EncoderLayer):
    """Plain post-norm encoder layer plus teacher branches (docs/authors_code.md, "Triple and dual
    attention, standard layer").

    The student parameters keep the plain layer's names, so the state dict minus `teacher.*` is a
    baseline layer's. All branches share the out-projection, the residual from the student input X
    (not X^t), both LayerNorms and the FFN; dropout draws are independent per branch, except that
    attn2 reuses the student's dropped-out attention map. The positional encoding P (for DAB/DN the
    query-scaled one, computed from the student X) is added to the Q/K inputs of every group.
    """

    def __init__(self, mode, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu"):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation)
        check_ks_mode(mode)
        if mode == "none":
            raise ValueError("KSEncoderLayer needs a KS mode other than 'none'")
        self.mode = mode
        self.branches = TEACHER_BRANCHES[mode]
        self.teacher = TeacherParameters(d_model, self.branches)
        self.reset_ks_parameters()

    @torch.no_grad()
    def reset_ks_parameters(self):
        """The authors' code packs the student and teacher in-projections into one (k*d x d) matrix
        (k = 6 triple, 5 share-V, 4 share-A) and xavier-initialises it as a whole, so its bound is
        sqrt(6 / ((k+1) d)) for student and teacher rows alike. The sMLP keeps PyTorch's default
        init. Call this after any xavier loop over the transformer."""
        d = self.self_attn.d_model
        parts = [self.self_attn.in_proj] + [p for p in (self.teacher.qk_proj, self.teacher.v_proj)
                                            if p is not None]
        packed = torch.empty(sum(p.out_features for p in parts), d)
        nn.init.xavier_uniform_(packed)
        for part, weight in zip(parts, packed.split([p.out_features for p in parts])):
            part.weight.copy_(weight)
            nn.init.zeros_(part.bias)
        self.teacher.smlp.linear.reset_parameters()

    def forward(self, x, pos, key_padding_mask=None, fg=None):
        """x, pos (B, N, d); key_padding_mask (B, N) True at padding; fg (B, N) bool foreground
        tokens or None. Returns (student output, {teacher branch: output}); fg None runs the plain
        layer alone (inference)."""
        if fg is None:
            return super().forward(x, pos, key_padding_mask), {}
        attn, nhead = self.self_attn, self.self_attn.nhead
        qk = x + pos
        q, k, v = attn.project(qk, qk, x)
        xt = self.teacher.smlp(x, fg)
        mask = sdpa_mask(key_padding_mask)
        p = attn.dropout_p()
        ys = {}
        if "attn2" in self.branches:
            vt = split_heads(self.teacher.v_proj(xt), nhead)
            if self.training:  # the student's map and its dropout are shared with attn2
                ys[STUDENT], ys["attn2"] = attend_shared_map(q, k, v, vt, mask, p)
            else:
                ys["attn2"] = attend(q, k, vt, mask)
        if "attn3" in self.branches:
            ys["attn3"] = attend(*self._teacher_qk(xt, pos), v, mask, p)
        if self.training and STUDENT not in ys:
            ys[STUDENT] = attend(q, k, v, mask, p)
        # Outside training the student runs the plain layer below, exactly as at inference.
        names = [n for n in (STUDENT,) + self.branches if n in ys]
        y = attn.out_proj(torch.cat([merge_heads(ys[n]) for n in names]))
        outs = dict(zip(names, self.post_attention(x.repeat(len(names), 1, 1), y).chunk(len(names))))
        student = outs.pop(STUDENT) if STUDENT in outs else super().forward(x, pos, key_padding_mask)
        return student, outs

    def _teacher_qk(self, xt, pos):
        """Per-head Q^t, K^t of the teacher attention map (Attn3), from X^t + P."""
        return tuple(split_heads(t, self.self_attn.nhead) for t in self.teacher.qk_proj(xt + pos).chunk(2, dim=-1))

    def inspect(self, x, pos, key_padding_mask, fg, queries=None):
        """The attention maps of this layer for the query tokens `queries` (indices into N; default
        all), as forward uses them outside training (no dropout); forward's fused attention returns
        no map. Inputs as forward's. Returns an Inspection."""
        qk = x + pos
        q, k, _ = self.self_attn.project(qk, qk, x)
        xt = self.teacher.smlp(x, fg)
        teacher = None
        if self.teacher.qk_proj is not None:
            teacher = attention_rows(*self._teacher_qk(xt, pos), key_padding_mask, queries)
        return Inspection(xt, attention_rows(q, k, key_padding_mask, queries), teacher)


# --------------------------------------------------------------------------------------------------
# The deformable KS encoder layer (docs/authors_code.md, "Triple attention, deformable layer")

class DeformableTeacherParameters(nn.Module):
    """Every parameter that exists only for the teachers of a deformable KS layer: the sMLP, the
    teacher attention-weights head on X^t + P (attn3: the student's sampling locations with teacher
    weights) and the teacher value projection on X^t (attn2). There are no teacher sampling offsets:
    A^t differs from A only in its weights."""

    def __init__(self, d_model, branches, n_weights):
        super().__init__()
        self.smlp = SMLP(d_model)
        self.attention_weights = nn.Linear(d_model, n_weights) if "attn3" in branches else None
        self.value_proj = nn.Linear(d_model, d_model) if "attn2" in branches else None


class KSDeformableEncoderLayer(DeformableEncoderLayer):
    """Deformable encoder layer plus teacher branches. In MSDeformAttn the attention "A" is (sampling
    locations, attention weights) and "V" the projected values, so with q = X + P, q^t = X^t + P:
        attn1 = MSDA(value_proj(X),         loc(q), softmax(attention_weights(q)))
        attn3 = MSDA(value_proj(X),         loc(q), softmax(teacher.attention_weights(q^t)))
        attn2 = MSDA(teacher.value_proj(X^t), loc(q), softmax(attention_weights(q)))
    Only the student's sampling offsets exist. The output projection, the dropout after it, the
    residual from the student input X, both LayerNorms and the FFN are shared; dropout draws are
    independent per branch. The student parameters keep the plain layer's names, so the state dict
    minus `teacher.*` is a baseline layer's.
    """

    def __init__(self, mode, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu", n_levels=4,
                 n_points=4):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points)
        check_ks_mode(mode)
        if mode == "none":
            raise ValueError("KSDeformableEncoderLayer needs a KS mode other than 'none'")
        self.mode = mode
        self.branches = TEACHER_BRANCHES[mode]
        self.teacher = DeformableTeacherParameters(d_model, self.branches, nhead * n_levels * n_points)
        self.reset_ks_parameters()

    @torch.no_grad()
    def reset_ks_parameters(self):
        """The authors' effective init: their transformer-wide xavier loop runs after the teacher
        init and only the student MSDA is re-initialised afterwards, so the teacher attention-weights
        head ends up xavier (not zero like the student's) with zero bias, the teacher value
        projection xavier with zero bias; the sMLP keeps PyTorch's default init. Call this after any
        xavier loop over the transformer."""
        for proj in (self.teacher.attention_weights, self.teacher.value_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)
        self.teacher.smlp.linear.reset_parameters()

    def forward(self, x, pos, key_padding_mask, reference_points, spatial_shapes, level_start_index, fg=None):
        """As DeformableEncoderLayer.forward, plus fg (B, S) bool foreground tokens or None. Returns
        (student output, {teacher branch: output}); fg None runs the plain layer alone (inference)."""
        plain_inputs = (x, pos, key_padding_mask, reference_points, spatial_shapes, level_start_index)
        if fg is None:
            return super().forward(*plain_inputs), {}
        attn = self.self_attn
        q = x + pos
        xt = self.teacher.smlp(x, fg)
        locations = attn.locations(q, reference_points, spatial_shapes)
        weights = attn.weights(q)
        value = attn.values(x, key_padding_mask)
        inputs = {}  # branch -> (values, attention weights); every branch samples at `locations`
        if self.training:  # outside training the student runs the plain layer below, as at inference
            inputs[STUDENT] = (value, weights)
        if "attn3" in self.branches:
            inputs["attn3"] = (value, attn.weights(xt + pos, self.teacher.attention_weights))
        if "attn2" in self.branches:
            inputs["attn2"] = (attn.values(xt, key_padding_mask, self.teacher.value_proj), weights)
        names = [n for n in (STUDENT,) + self.branches if n in inputs]
        k = len(names)
        # one op call for all branches, stacked on the batch axis
        y = attn.sample(torch.cat([inputs[n][0] for n in names]), spatial_shapes, level_start_index,
                        locations.repeat(k, *[1] * (locations.dim() - 1)), torch.cat([inputs[n][1] for n in names]))
        outs = dict(zip(names, self.post_attention(x.repeat(k, 1, 1), attn.output_proj(y)).chunk(k)))
        student = outs.pop(STUDENT) if STUDENT in outs else super().forward(*plain_inputs)
        return student, outs

    def inspect(self, x, pos, key_padding_mask, reference_points, spatial_shapes, level_start_index, fg,
                queries=None):
        """The sampling locations and attention weights of this layer for the query tokens `queries`
        (indices into S; default all), as forward computes them. Inputs as forward's. Returns an
        Inspection."""
        attn = self.self_attn
        rows = slice(None) if queries is None else queries
        q = (x + pos)[:, rows]
        xt = self.teacher.smlp(x, fg)
        teacher = None
        if self.teacher.attention_weights is not None:
            teacher = attn.weights((xt + pos)[:, rows], self.teacher.attention_weights)
        return Inspection(xt, attn.weights(q), teacher,
                          attn.locations(q, reference_points[:, rows], spatial_shapes))


def make_encoder_layer(mode, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu"):
    """The last encoder layer for a KS mode: plain for `none`, KSEncoderLayer otherwise."""
    if check_ks_mode(mode) == "none":
        return EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
    return KSEncoderLayer(mode, d_model, nhead, dim_feedforward, dropout, activation)


def make_deformable_encoder_layer(mode, d_model, nhead, dim_feedforward, dropout=0.0, activation="relu",
                                  n_levels=4, n_points=4):
    """The last deformable encoder layer for a KS mode: plain for `none`, KSDeformableEncoderLayer otherwise."""
    args = (d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points)
    if check_ks_mode(mode) == "none":
        return DeformableEncoderLayer(*args)
    return KSDeformableEncoderLayer(mode, *args)


KS_LAYERS = (KSEncoderLayer, KSDeformableEncoderLayer)


def ks_layers(model):
    """The KS layers of a model (or of any module), in module order."""
    return [m for m in model.modules() if isinstance(m, KS_LAYERS)]


def ks_layer(model):
    """The model's KS layer (its last encoder layer), or None for a model without teachers."""
    layers = ks_layers(model)
    return layers[-1] if layers else None


def teacher_branches(model):
    """The teacher branches of a model, in the order of its `teacher_outputs`; () without teachers."""
    layer = ks_layer(model)
    return layer.branches if layer is not None else ()


def branch_output(outputs, branch):
    """One branch's predictions (pred_logits, pred_boxes) in a model's output dict: the dict itself
    for the student, a teacher's last decoder layer (of a forward with teachers) otherwise."""
    return outputs if branch == STUDENT else outputs["teacher_outputs"][branch][-1]


def named_inputs(layer, args, kwargs):
    """{parameter name: value} of one call of a KS layer (as a forward hook receives it): x, pos,
    key_padding_mask, fg and, for a deformable layer, reference_points, spatial_shapes,
    level_start_index; the names `inspect` takes."""
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def run_last_layer(layer, x, pos, key_padding_mask, fg, **layer_inputs):
    """Runs the last encoder layer; returns (student memory, {teacher: memory}). layer_inputs: what
    a deformable layer takes besides (x, pos, key_padding_mask): reference_points, spatial_shapes,
    level_start_index."""
    if isinstance(layer, KS_LAYERS):
        return layer(x, pos, key_padding_mask, fg=fg, **layer_inputs)
    return layer(x, pos, key_padding_mask, **layer_inputs), {}


class MemoryDistance:
    """While active (`with MemoryDistance(model) as d:`), accumulates over every forward that runs
    the teachers the squared distance of each teacher memory from the student memory and the
    squared norm of the student memory, over the tokens that are not padding (a forward hook on
    the model's KS layers). `sums()`: a float64 tensor [per teacher branch in `branches`..., the
    student's], to be all-reduced across processes; `relative(sums)`: {branch: ||Z_t - Z_s|| /
    ||Z_s||} (NaN before any teacher forward)."""

    def __init__(self, model):
        self.layers = ks_layers(model)
        self.branches = teacher_branches(model)
        self._sums = torch.zeros(len(self.branches) + 1, dtype=torch.float64)
        self._hooks = []

    def __enter__(self):
        self._hooks = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, module, args, kwargs, output):
        student, teachers = output
        if not teachers:
            return
        padding = named_inputs(module, args, kwargs)["key_padding_mask"]
        keep = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device) if padding is None else ~padding
        s = student.detach().double()[keep]
        parts = [(teachers[b].detach().double()[keep] - s).square().sum() for b in self.branches]
        self._sums += torch.stack(parts + [s.square().sum()]).cpu()

    def sums(self):
        return self._sums.clone()

    def relative(self, sums=None):
        sums = self._sums if sums is None else sums
        norm = sums[-1].item()
        return {b: (sums[i].item() / norm) ** 0.5 if norm > 0 else float("nan") for i, b in enumerate(self.branches)}


def init_ks_parameters(module):
    """Re-applies the authors' KS init to every KS layer below `module` (after xavier loops)."""
    for m in ks_layers(module):
        m.reset_ks_parameters()


# --------------------------------------------------------------------------------------------------
# Bookkeeping shared by the variants

def teachers_wanted(mode, training, with_teachers=None):
    """Whether this forward runs the teacher branches: by default in training only; with_teachers
    True asks for them in evaluation too (GT-assisted teacher evaluation, paper Fig. 4)."""
    if mode == "none":
        if with_teachers:
            raise ValueError("with_teachers=True needs a KS model (model.ks.mode is 'none')")
        return False
    return training if with_teachers is None else bool(with_teachers)


def token_fg_mask(targets, batch_hw, feature_hw, padding_mask, source="gt"):
    """Flattened token mask (B, h*w) from model targets (their `boxes_xyxy`, absolute xyxy in
    padded-batch pixels); all False for source 'none' (TEACHER_MASKS)."""
    if targets is None:
        raise ValueError("the teacher branches need ground-truth boxes: pass targets to the model")
    boxes = [t["boxes_xyxy"] for t in targets]
    mask = fg_mask(boxes, batch_hw, feature_hw, padding_mask).flatten(1)
    return mask if check_teacher_mask(source) == "gt" else torch.zeros_like(mask)


def token_fg_mask_levels(targets, batch_hw, level_hws, padding_masks, source="gt"):
    """Multi-scale token mask (B, sum_l h_l * w_l) from model targets: each level resized from the
    one full-resolution canvas (fg_mask_levels), flattened row-major and concatenated in level
    order, which is the token order of the flattened multi-scale features. padding_masks: per level
    (B, h_l, w_l), True at padding (never foreground). All False for source 'none'."""
    if targets is None:
        raise ValueError("the teacher branches need ground-truth boxes: pass targets to the model")
    boxes = [t["boxes_xyxy"] for t in targets]
    mask = torch.cat([m.flatten(1) for m in fg_mask_levels(boxes, batch_hw, level_hws, padding_masks)], 1)
    return mask if check_teacher_mask(source) == "gt" else torch.zeros_like(mask)


def decode_branches(decode, student_memory, teacher_memories, training):
    """Runs the (shared) decoder on every branch's memory.

    decode(memory, n) must run the decoder and heads on `memory` holding n branches stacked on the
    batch axis (repeating its own per-image inputs n times) and return a list of per-layer output
    dicts of batch-first tensors. In training all branches go through one batched call; in
    evaluation the student runs alone, exactly as at inference, and the teachers together.
    Returns {branch: list of per-layer output dicts}, student first.
    """
    memories = {STUDENT: student_memory, **teacher_memories}
    groups = [list(memories)] if training else [[STUDENT], list(teacher_memories)]
    outputs = {}
    for names in filter(None, groups):
        layers = decode(torch.cat([memories[n] for n in names]), len(names))
        for i, name in enumerate(names):
            outputs[name] = [{k: v.chunk(len(names))[i] for k, v in layer.items()} for layer in layers]
    return {name: outputs[name] for name in memories}


def assemble_outputs(branch_outputs, teacher_layers="last"):
    """The model's output dict: the student's last decoder layer as `pred_*`, its other layers as
    `aux_outputs`, and, when teachers ran, `teacher_outputs` {branch: [layer outputs]} holding the
    last decoder layer (the authors' code) or all of them (teacher_layers='all', paper Eq. 10)."""
    if teacher_layers not in TEACHER_LAYERS:
        raise ValueError(f"teacher_layers must be one of {TEACHER_LAYERS}, got {teacher_layers!r}")
    student = branch_outputs[STUDENT]
    out = dict(student[-1])
    out["aux_outputs"] = student[:-1]
    teachers = {name: (layers if teacher_layers == "all" else layers[-1:])
                for name, layers in branch_outputs.items() if name != STUDENT}
    if teachers:
        out["teacher_outputs"] = teachers
    return out


def decode_outputs(decode, student_memory, teacher_memories, training, teacher_layers="last"):
    """The model's output dict from the decoder run on every branch: decode_branches, then
    assemble_outputs."""
    return assemble_outputs(decode_branches(decode, student_memory, teacher_memories, training), teacher_layers)
