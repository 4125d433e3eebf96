"""Deformable-DETR (Zhu et al., ICLR 2021) with optional knowledge sharing in the last encoder layer.

As the authors' configuration (detrex Deformable-DETR; docs/authors_code.md, "Family settings"):
- features: 4 levels (`model.deformable.num_levels`), the last three ResNet stages (strides 8-32)
  through 1x1 conv + GroupNorm and a 3x3 stride-2 conv on the last stage (stride 64); positions are
  a sine encoding plus a learned level embedding;
- encoder: post-norm multi-scale deformable self-attention and a ReLU FFN; the last layer is the KS
  layer (models.ks_encoder.KSDeformableEncoderLayer);
- queries: 300 embeddings of 2d channels (positional, content), each with a 2-d reference point
  from its positional half;
- decoder: self-attention, deformable cross-attention, FFN; no final LayerNorm; every layer's
  output goes to one class and one box head shared by all layers.
`model.deformable.box_refine: true` gives every layer its own heads and iterative box refinement,
as the DN-Deformable family. The whole forward runs on CPU (models.ops.ms_deform_attn's CPU
kernels, or its PyTorch path). Layer by layer (heads, points, dropout, masks): docs/models.md.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import ks_encoder as ks
from .backbone import STAGES, build_backbone, downsample_mask, eval_padding_mask
from .layers import (DeformableEncoderLayer, Dropout, FFNLayer, MSDeformAttn, MultiheadAttention,
                     box_from_delta, detection_heads, xavier_init_)
from .position_encoding import PositionEmbeddingSine

GROUP_NORM_GROUPS = 32  # detrex's input projections (ChannelMapper) use GroupNorm(32, d)


def backbone_stages(last_stage, num_levels):
    """The backbone stages a multi-scale model takes: the last one alone for one level, else the
    (up to) three stages ending at `last_stage`; levels beyond them are extra stride-2 convolutions."""
    last = STAGES.index(last_stage)
    n = 1 if num_levels == 1 else min(num_levels, 3, last + 1)
    return tuple(STAGES[last - n + 1:last + 1])


def input_projections(in_channels, d_model, num_levels):
    """1x1 conv + GroupNorm per backbone stage, then 3x3 stride-2 conv + GroupNorm for each extra
    level (the first on the last stage's output, later ones on the previous extra level)."""
    if d_model % GROUP_NORM_GROUPS:
        raise ValueError(f"model.hidden_dim must be a multiple of {GROUP_NORM_GROUPS} for the GroupNorm "
                         f"input projections of a deformable model, got {d_model}")
    projections = [nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(GROUP_NORM_GROUPS, d_model))
                   for c in in_channels]
    c = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projections.append(nn.Sequential(nn.Conv2d(c, d_model, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(GROUP_NORM_GROUPS, d_model)))
        c = d_model
    for proj in projections:  # detrex's neck init
        nn.init.xavier_uniform_(proj[0].weight)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)


def valid_ratios(mask, dtype=torch.float32):
    """(B, h, w) padding mask (True = padding) -> (B, 2): the valid fraction of the width and the
    height (images are padded on the bottom and right)."""
    h, w = mask.shape[-2:]
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype)
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype)
    return torch.stack([valid_w / w, valid_h / h], -1)


def encoder_reference_points(shapes, ratios):
    """Reference point of every token of every level, for every level: (B, S, L, 2) normalised
    (x, y). A token's point is its cell centre relative to its own level's valid region, then
    re-scaled to each level's valid region (ratios (B, L, 2) from valid_ratios)."""
    points = []
    for level, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=ratios.dtype, device=ratios.device),
                              torch.linspace(0.5, w - 0.5, w, dtype=ratios.dtype, device=ratios.device),
                              indexing="ij")
        x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        points.append(torch.stack([x, y], -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


class DeformableEncoder(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_layers, n_levels, n_points, ks_mode):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points)
        self.layers = nn.ModuleList([DeformableEncoderLayer(*args) for _ in range(num_layers - 1)]
                                    + [ks.make_deformable_encoder_layer(ks_mode, *args)])

    def forward(self, x, pos, key_padding_mask, reference_points, spatial_shapes, level_start_index, fg=None):
        """Returns (student memory, {teacher branch: memory}); P = sine encoding + level embedding."""
        levels = dict(reference_points=reference_points, spatial_shapes=spatial_shapes,
                      level_start_index=level_start_index)
        for layer in self.layers[:-1]:
            x = layer(x, pos, key_padding_mask, **levels)
        return ks.run_last_layer(self.layers[-1], x, pos, key_padding_mask, fg, **levels)


class DeformableDecoderLayer(FFNLayer):
    """Post-norm: self-attention (queries and keys get the positional query; dropout on the attention
    weights, as detrex), deformable cross-attention on the memory (dropout on its output), FFN
    (dropout after the activation and after the second linear layer)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points)
        self.cross_dropout = Dropout(dropout)
        self._add_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, memory_padding_mask, spatial_shapes,
                level_start_index, self_attn_mask=None):
        """reference_points (B, Q, levels, 2 or 4) already scaled to each level's valid region;
        self_attn_mask (Q, Q) bool, True where query i may NOT attend to query j (DN)."""
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt, attn_mask=self_attn_mask))
        cross = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                memory_padding_mask)
        tgt = self.norm2(tgt + self.cross_dropout(cross))
        return self.ffn_block(tgt, self.norm3)


class DeformableDecoder(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_layers, n_levels, n_points,
                 box_eps=1e-5):
        super().__init__()
        self.d_model, self.box_eps = d_model, box_eps
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                           n_levels, n_points) for _ in range(num_layers))

    def layer_query_pos(self, index, tgt, reference_input, query_pos):
        """The positional query of layer `index`: Deformable-DETR's is the same learned one for every
        layer (DN-Deformable-DETR computes it from the references; see there)."""
        return query_pos

    def forward(self, tgt, query_pos, references, memory, memory_padding_mask, spatial_shapes, level_start_index,
                ratios, box_heads=None, self_attn_mask=None):
        """tgt (B, Q, d) content queries; query_pos (B, Q, d) or None; references (B, Q, 2 or 4) in
        [0, 1]; ratios (B, L, 2) the valid ratios of the levels; box_heads: per-layer box heads for
        iterative refinement (None: the references stay). Returns the lists of every layer's output
        (B, Q, d) and of the references each layer started from."""
        hidden, starts = [], []
        out = tgt
        for i, layer in enumerate(self.layers):
            scale = ratios if references.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            reference_input = references[:, :, None] * scale[:, None]
            pos = self.layer_query_pos(i, out, reference_input, query_pos)
            out = layer(out, pos, reference_input, memory, memory_padding_mask, spatial_shapes, level_start_index,
                        self_attn_mask)
            hidden.append(out)
            starts.append(references)
            if box_heads is not None:  # the next layer starts from this layer's box, detached
                references = box_from_delta(box_heads[i](out), references, self.box_eps).sigmoid().detach()
        return hidden, starts


@dataclass
class Encoded:
    """What the decoder needs from the encoder, batch first: memories, the flattened padding mask
    (B, S), the levels' spatial shapes (L, 2) and start indices (L,), and valid ratios (B, L, 2)."""
    memory: torch.Tensor
    teacher_memories: dict
    padding_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor


def repeat_batch(t, n):
    return None if t is None else t.repeat(n, *[1] * (t.dim() - 1))


class DeformableDETR(nn.Module):
    """forward(images, padding_mask, targets=None, with_teachers=None) -> output dict (see
    models.ks_encoder.assemble_outputs). Teachers run in training, or in evaluation when
    with_teachers=True; they need `targets` (their `boxes_xyxy`)."""

    decoder_class = DeformableDecoder
    # detrex's Deformable-DETR sets the box heads' size bias to -2 and then zeroes it again in its
    # init_weights; DN-Deformable-DETR sets it (first head) after zeroing.
    box_size_bias = 0.0

    def __init__(self, cfg, num_classes):
        super().__init__()
        d, nhead = cfg["hidden_dim"], cfg["nheads"]
        dc = cfg["deformable"]
        n_levels, n_points, self.box_refine = dc["num_levels"], dc["n_points"], dc["box_refine"]
        self.ks_mode, self.teacher_layers, self.teacher_mask = ks.settings(cfg["ks"])
        self.eval_padding = cfg["eval_padding"]
        if not cfg["decoder_padding_mask"]:
            raise ValueError("model.decoder_padding_mask: false is for the Conditional/DAB/DN-DETR decoders; the "
                             "deformable decoders mask padded values (as detrex does)")
        self.backbone = build_backbone(cfg["backbone"], backbone_stages(cfg["backbone"]["last_stage"], n_levels))
        self.input_proj = input_projections(self.backbone.num_channels, d, n_levels)
        self.position = PositionEmbeddingSine(d // 2, temperature=cfg["pos_temperature"], normalize=True,
                                              offset=cfg["pos_offset"])
        self.level_embed = nn.Parameter(torch.empty(n_levels, d))
        layer_args = (d, nhead, cfg["dim_feedforward"], cfg["dropout"], cfg["activation"])
        self.encoder = DeformableEncoder(*layer_args, cfg["enc_layers"], n_levels, n_points, self.ks_mode)
        self.box_eps = cfg["inverse_sigmoid_eps"]
        self.decoder = self.decoder_class(*layer_args, cfg["dec_layers"], n_levels, n_points, box_eps=self.box_eps)
        # detrex's transformer init: xavier everywhere, then the deformable attention's own
        # init, then (here) the KS layer's
        xavier_init_(self.encoder)
        xavier_init_(self.decoder)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        ks.init_ks_parameters(self.encoder)
        nn.init.normal_(self.level_embed)
        self.make_queries(cfg, num_classes)

        class_head, box_head = detection_heads(d, num_classes)
        if self.box_refine:  # one pair of heads per decoder layer
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(cfg["dec_layers"]))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(cfg["dec_layers"]))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], self.box_size_bias)
        else:  # one pair shared by all layers
            self.class_embed, self.bbox_embed = class_head, box_head
            nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], self.box_size_bias)

    def make_queries(self, cfg, num_classes):
        d = cfg["hidden_dim"]
        self.query_embed = nn.Embedding(cfg["num_queries"], 2 * d)  # [positional query ; content query]
        self.reference_points = nn.Linear(d, 2)
        nn.init.xavier_normal_(self.reference_points.weight)  # detrex
        nn.init.zeros_(self.reference_points.bias)

    def queries(self, batch_size, targets):
        """Decoder queries: content (B, Q, d), positional query (B, Q, d) or None (computed per layer),
        references (B, Q, 2 or 4) in [0, 1], the self-attention mask (None) and the denoising batch
        (None; see DN-Deformable-DETR)."""
        query_pos, content = self.query_embed.weight.split(self.query_embed.weight.shape[1] // 2, dim=1)
        query_pos = query_pos.expand(batch_size, -1, -1)
        return content.expand(batch_size, -1, -1), query_pos, self.reference_points(query_pos).sigmoid(), None, None

    def heads(self, index):
        if self.box_refine:
            return self.class_embed[index], self.bbox_embed[index]
        return self.class_embed, self.bbox_embed

    def multi_scale_features(self, images, padding_mask):
        """Projected levels [(B, d, h_l, w_l)] and their padding masks [(B, h_l, w_l)], in level order."""
        stages = self.backbone(images, padding_mask)
        sources, masks = [], []
        for level, proj in enumerate(self.input_proj):
            if level < len(stages):
                feature, mask = stages[level]
                source = proj(feature)
            else:  # extra level: from the last stage's output first, then from the previous level
                source = proj(stages[-1][0] if level == len(stages) else sources[-1])
                mask = downsample_mask(padding_mask, source)
            sources.append(source)
            masks.append(mask)
        return sources, masks

    def encode(self, images, padding_mask, targets, teachers):
        """Backbone, input projections and encoder. Every per-token tensor is the levels flattened
        row-major and concatenated in level order; the GT Fg-Bg mask of the teachers follows the
        same order (models.ks_encoder.token_fg_mask_levels)."""
        sources, masks = self.multi_scale_features(images, padding_mask)
        # float32 as detrex, float64 when the whole model runs in float64 (numerical checks)
        pos_dtype = torch.promote_types(sources[0].dtype, torch.float32)
        pos = torch.cat([self.position(m, pos_dtype).flatten(2).transpose(1, 2) + self.level_embed[level]
                         for level, m in enumerate(masks)], 1)
        shapes = [tuple(s.shape[-2:]) for s in sources]
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=images.device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        ratios = torch.stack([valid_ratios(m, sources[0].dtype) for m in masks], 1)
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        fg = ks.token_fg_mask_levels(targets, images.shape[-2:], shapes, masks,
                                       self.teacher_mask) if teachers else None
        memory, teacher_memories = self.encoder(x, pos, mask, encoder_reference_points(shapes, ratios),
                                                spatial_shapes, level_start_index, fg)
        return Encoded(memory, teacher_memories, mask, spatial_shapes, level_start_index, ratios)

    def forward(self, images, padding_mask, targets=None, with_teachers=None):
        teachers = ks.teachers_wanted(self.ks_mode, self.training, with_teachers)
        if not self.training:
            padding_mask = eval_padding_mask(padding_mask, self.eval_padding)
        enc = self.encode(images, padding_mask, targets, teachers)
        content, query_pos, references, self_attn_mask, dn = self.queries(images.shape[0], targets)

        def decode(memory, n):
            hidden, starts = self.decoder(
                repeat_batch(content, n), repeat_batch(query_pos, n), repeat_batch(references, n), memory,
                repeat_batch(enc.padding_mask, n), enc.spatial_shapes, enc.level_start_index,
                repeat_batch(enc.valid_ratios, n), self.bbox_embed if self.box_refine else None, self_attn_mask)
            layers = []
            for i, (h, ref) in enumerate(zip(hidden, starts)):
                class_head, box_head = self.heads(i)
                boxes = box_from_delta(box_head(h), ref, self.box_eps).sigmoid()
                layers.append({"pred_logits": class_head(h), "pred_boxes": boxes})
            return layers if dn is None else [dn.split(layer) for layer in layers]

        out = ks.decode_outputs(decode, enc.memory, enc.teacher_memories, self.training, self.teacher_layers)
        if dn is not None:
            out["dn_meta"] = dn.meta()
        return out


def build(cfg, num_classes):
    return DeformableDETR(cfg, num_classes)
