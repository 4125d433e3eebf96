"""Conditional-DETR (Meng et al., ICCV 2021) with optional knowledge sharing in the last encoder layer.

As the authors' configuration (detrex Conditional-DETR; docs/authors_code.md, "Family settings"): a plain post-norm
DETR encoder (the sine encoding added to queries and keys in every layer, no query scaling), learned
query embeddings as positional queries with zero content queries, one 2-d reference point per query
predicted from its query embedding and shared by all decoder layers, conditional cross-attention
(each head's query is [content ; transformed sine embedding of the reference point], its key
[content ; position]), a final decoder LayerNorm, and boxes predicted as offsets of the reference
point (x, y) before the sigmoid. The family's training settings are config values: dropout 0.1 (on
attention weights and in the FFN), ReLU, sine temperature 10000, focal loss with class weight 2.0.

The conditional decoder layer defined here is also DAB-DETR's (and DN-DETR's): DAB only changes what
goes into it (4-d anchors, per-layer positional queries, modulated sine embeddings).
"""
import torch
from torch import nn

from . import ks_encoder as ks
from .backbone import build_backbone, eval_padding_mask
from .layers import (MLP, EncoderLayer, FFNLayer, attend, box_sine_embedding, detection_heads, inverse_sigmoid,
                     merge_heads, sdpa_mask, split_heads, xavier_init_)
from .position_encoding import PositionEmbeddingSine


class ConditionalDecoderLayer(FFNLayer):
    """Conditional self- and cross-attention with separate content/position projections (no packed
    in-projection), post-norm. In the cross-attention each head's query is [content ; projected sine
    embedding of the reference] and its key [content ; position], so the q/k head dim is twice the
    value head dim (and the softmax scale 1/sqrt(2 d_head), as in detrex). The first layer
    also adds the positional query and key to the content parts. Dropout acts on the attention
    weights and inside the FFN (after the activation and after the second linear layer)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, is_first):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        linear = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_q_content, self.sa_q_pos, self.sa_k_content, self.sa_k_pos = linear(), linear(), linear(), linear()
        self.sa_v, self.sa_out = linear(), linear()
        self.ca_q_content, self.ca_k_content, self.ca_k_pos, self.ca_v = linear(), linear(), linear(), linear()
        self.ca_q_pos = linear() if is_first else None
        self.ca_q_sine, self.ca_out = linear(), linear()
        self._add_ffn(d_model, dim_feedforward, dropout, activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, tgt, memory, memory_pos, query_pos, query_sine, memory_padding_mask, self_attn_mask=None):
        """self_attn_mask (Q, Q) bool, True where query i may NOT attend to query j (DN)."""
        h, p = self.nhead, self.dropout if self.training else 0.0
        q = self.sa_q_content(tgt) + self.sa_q_pos(query_pos)
        k = self.sa_k_content(tgt) + self.sa_k_pos(query_pos)
        out = attend(split_heads(q, h), split_heads(k, h), split_heads(self.sa_v(tgt), h),
                     sdpa_mask(None, self_attn_mask), p)
        tgt = self.norm1(tgt + self.sa_out(merge_heads(out)))

        q, k = self.ca_q_content(tgt), self.ca_k_content(memory)
        k_pos = self.ca_k_pos(memory_pos)
        if self.ca_q_pos is not None:
            q, k = q + self.ca_q_pos(query_pos), k + k_pos
        q = torch.cat([split_heads(q, h), split_heads(self.ca_q_sine(query_sine), h)], -1)
        k = torch.cat([split_heads(k, h), split_heads(k_pos, h)], -1)
        out = attend(q, k, split_heads(self.ca_v(memory), h), sdpa_mask(memory_padding_mask), p)
        tgt = self.norm2(tgt + self.ca_out(merge_heads(out)))
        return self.ffn_block(tgt, self.norm3)


class ConditionalEncoder(nn.Module):
    """The DETR encoder: post-norm layers with the positional encoding added to queries and keys in
    every layer; the last layer is the KS layer of the configured mode."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_layers, ks_mode):
        super().__init__()
        self.layers = nn.ModuleList(
            [EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation) for _ in range(num_layers - 1)]
            + [ks.make_encoder_layer(ks_mode, d_model, nhead, dim_feedforward, dropout, activation)])

    def forward(self, x, pos, key_padding_mask, fg=None):
        """Returns (student memory, {teacher branch: memory}); P = the sine encoding for every branch."""
        for layer in self.layers[:-1]:
            x = layer(x, pos, key_padding_mask)
        return ks.run_last_layer(self.layers[-1], x, pos, key_padding_mask, fg)


class ConditionalDecoder(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_layers):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                            i == 0) for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(self, tgt, memory, memory_pos, memory_padding_mask, query_pos):
        """tgt (B, Q, d) content queries; query_pos (B, Q, d) the query embeddings. Returns the
        normalised hidden states of every layer (L, B, Q, d) and the reference points (B, Q, 2),
        sigmoided, shared by all layers."""
        refs = self.ref_point_head(query_pos).sigmoid()
        sine = box_sine_embedding(refs, self.d_model // 2)  # (B, Q, d): y, x
        hidden = []
        out = tgt
        for i, layer in enumerate(self.layers):
            # the first layer uses the sine embedding as it is; later ones scale it by T(content)
            query_sine = sine if i == 0 else sine * self.query_scale(out)
            out = layer(out, memory, memory_pos, query_pos, query_sine, memory_padding_mask)
            hidden.append(self.norm(out))
        return torch.stack(hidden), refs


class SingleScaleDETR(nn.Module):
    """What the single-scale models (Conditional-, DAB-, DN-DETR) set up before their encoder: the KS
    settings, the backbone's last stage with a 1x1 input projection, the sine position encoding.

    forward(images, padding_mask, targets=None, with_teachers=None) -> output dict (see
    models.ks_encoder.assemble_outputs). Teachers run in training, or in evaluation when
    with_teachers=True; they need `targets` (their `boxes_xyxy`)."""

    def __init__(self, cfg, pos_offset=0.0):
        super().__init__()
        d = cfg["hidden_dim"]
        self.ks_mode, self.teacher_layers, self.teacher_mask = ks.settings(cfg["ks"])
        self.eval_padding, self.decoder_padding_mask = cfg["eval_padding"], cfg["decoder_padding_mask"]
        self.backbone = build_backbone(cfg["backbone"], (cfg["backbone"]["last_stage"],))
        self.input_proj = nn.Conv2d(self.backbone.num_channels[-1], d, kernel_size=1)
        self.position = PositionEmbeddingSine(d // 2, temperature=cfg["pos_temperature"], normalize=True,
                                              offset=pos_offset)


class ConditionalDETR(SingleScaleDETR):
    """Conditional-DETR as the module docstring describes; forward as SingleScaleDETR's."""

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, cfg["pos_offset"])
        d, nhead = cfg["hidden_dim"], cfg["nheads"]
        layer_args = (d, nhead, cfg["dim_feedforward"], cfg["dropout"], cfg["activation"])
        self.encoder = ConditionalEncoder(*layer_args, cfg["enc_layers"], self.ks_mode)
        self.decoder = ConditionalDecoder(*layer_args, cfg["dec_layers"])
        self.box_eps = cfg["inverse_sigmoid_eps"]
        xavier_init_(self.encoder)
        xavier_init_(self.decoder)
        ks.init_ks_parameters(self.encoder)

        self.query_embed = nn.Embedding(cfg["num_queries"], d)
        self.class_embed, self.bbox_embed = detection_heads(d, num_classes)

    def forward(self, images, padding_mask, targets=None, with_teachers=None):
        teachers = ks.teachers_wanted(self.ks_mode, self.training, with_teachers)
        if not self.training:
            padding_mask = eval_padding_mask(padding_mask, self.eval_padding)
        (feature, mask), = self.backbone(images, padding_mask)
        src = self.input_proj(feature)
        # float32 as detrex, float64 when the whole model runs in float64 (numerical checks)
        pos = self.position(mask, torch.promote_types(src.dtype, torch.float32)).flatten(2).transpose(1, 2)
        fg = ks.token_fg_mask(targets, images.shape[-2:], src.shape[-2:], mask,
                                self.teacher_mask) if teachers else None
        mask = mask.flatten(1)
        memory, teacher_memories = self.encoder(src.flatten(2).transpose(1, 2), pos, mask, fg)

        B = images.shape[0]
        memory_mask = mask if self.decoder_padding_mask else None  # detrex's decoder passes no mask

        def decode(memory, n):
            query_pos = self.query_embed.weight.expand(n * B, -1, -1)
            tgt = torch.zeros_like(query_pos)
            masks = None if memory_mask is None else memory_mask.repeat(n, 1)
            hidden, refs = self.decoder(tgt, memory, pos.repeat(n, 1, 1), masks, query_pos)
            logits = self.class_embed(hidden)
            offsets = self.bbox_embed(hidden)
            boxes = torch.cat([offsets[..., :2] + inverse_sigmoid(refs, self.box_eps), offsets[..., 2:]],
                              -1).sigmoid()
            return [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits, boxes)]

        return ks.decode_outputs(decode, memory, teacher_memories, self.training, self.teacher_layers)


def build(cfg, num_classes):
    return ConditionalDETR(cfg, num_classes)
