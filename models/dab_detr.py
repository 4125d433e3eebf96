"""DAB-DETR (Liu et al., ICLR 2022) with optional knowledge sharing in the last encoder layer.

As the authors' configuration (detrex DAB-DETR; docs/authors_code.md, "Family settings"): 4-d anchor-box queries
with zero content queries, conditional cross-attention whose positional query is the anchor's sine
embedding modulated by the predicted width/height, iterative anchor refinement with one box head
shared by all decoder layers, element-wise query scaling of the positional encoding in the encoder
(from each layer's input) and decoder, post-norm layers with PReLU FFNs, a final decoder LayerNorm.
"""
import torch
from torch import nn

from . import ks_encoder as ks
from .backbone import eval_padding_mask
from .conditional_detr import ConditionalDecoderLayer, SingleScaleDETR
from .layers import MLP, EncoderLayer, box_sine_embedding, detection_heads, inverse_sigmoid, xavier_init_


class DABEncoder(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_layers, ks_mode):
        super().__init__()
        self.layers = nn.ModuleList(
            [EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation) for _ in range(num_layers - 1)]
            + [ks.make_encoder_layer(ks_mode, d_model, nhead, dim_feedforward, dropout, activation)])
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, x, pos, key_padding_mask, fg=None):
        """Returns (student memory, {teacher branch: memory})."""
        for layer in self.layers[:-1]:
            x = layer(x, pos * self.query_scale(x), key_padding_mask)
        return ks.run_last_layer(self.layers[-1], x, pos * self.query_scale(x), key_padding_mask, fg)


# The DAB decoder layer is Conditional-DETR's; DAB changes what goes into it.
DABDecoderLayer = ConditionalDecoderLayer


class DABDecoder(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_layers, modulate_hw_attn=True,
                 box_eps=1e-5):
        super().__init__()
        self.d_model, self.box_eps = d_model, box_eps
        self.layers = nn.ModuleList(DABDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, i == 0)
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None

    def forward(self, tgt, memory, memory_pos, memory_padding_mask, anchors, bbox_embed, self_attn_mask=None):
        """tgt (B, Q, d) content queries; anchors (B, Q, 4) unsigmoided boxes; bbox_embed the shared
        box head used for the iterative refinement. Returns the normalised hidden states of every
        layer (L, B, Q, d) and the anchors each layer started from (L, B, Q, 4), sigmoided."""
        d = self.d_model
        refs = anchors.sigmoid()
        hidden, references = [], [refs]
        out = tgt
        for i, layer in enumerate(self.layers):
            sine = box_sine_embedding(refs, d // 2)  # (B, Q, 2d): y, x, w, h
            query_pos = self.ref_point_head(sine)
            query_sine = sine[..., :d] * (1 if i == 0 else self.query_scale(out))
            if self.ref_anchor_head is not None:  # modulate the x/y parts by reference w/h
                ref_hw = self.ref_anchor_head(out).sigmoid()
                query_sine = torch.cat([query_sine[..., :d // 2] * (ref_hw[..., 1] / refs[..., 3])[..., None],
                                        query_sine[..., d // 2:] * (ref_hw[..., 0] / refs[..., 2])[..., None]], -1)
            out = layer(out, memory, memory_pos, query_pos, query_sine, memory_padding_mask, self_attn_mask)
            # The box head sees the un-normalised layer output here, as in DAB-DETR. The next layer
            # starts from detached anchors, but the returned ones keep their gradient.
            new_refs = (bbox_embed(out) + inverse_sigmoid(refs, self.box_eps)).sigmoid()
            if i < len(self.layers) - 1:
                references.append(new_refs)
            refs = new_refs.detach()
            hidden.append(self.norm(out))
        return torch.stack(hidden), torch.stack(references)


class DABDETR(SingleScaleDETR):
    """DAB-DETR as the module docstring describes; forward as SingleScaleDETR's."""

    def __init__(self, cfg, num_classes):
        super().__init__(cfg)  # the sine encoding without offset (model.pos_offset is not read)
        d, nhead = cfg["hidden_dim"], cfg["nheads"]
        layer_args = (d, nhead, cfg["dim_feedforward"], cfg["dropout"], cfg["activation"])
        self.encoder = DABEncoder(*layer_args, cfg["enc_layers"], self.ks_mode)
        self.box_eps = cfg["inverse_sigmoid_eps"]
        self.decoder = DABDecoder(*layer_args, cfg["dec_layers"], cfg["dab"]["modulate_hw_attn"], self.box_eps)
        xavier_init_(self.encoder)
        xavier_init_(self.decoder)
        ks.init_ks_parameters(self.encoder)

        nq = cfg["num_queries"]
        anchors = torch.randn(nq, 4)
        if cfg["dab"]["random_anchor_xy"]:
            anchors[:, :2] = inverse_sigmoid(torch.rand(nq, 2))
        # Split so the centres can really be frozen (freeze_anchor_xy); detrex's
        # `freeze_anchor_box_centers` sets requires_grad on a `.data` view, which leaves them trainable.
        self.anchor_xy = nn.Parameter(anchors[:, :2], requires_grad=not cfg["dab"]["freeze_anchor_xy"])
        self.anchor_wh = nn.Parameter(anchors[:, 2:])
        self.class_embed, self.bbox_embed = detection_heads(d, num_classes)

    def encode(self, images, padding_mask, targets, teachers):
        """Backbone and encoder: (student memory, {teacher: memory}, pos, flattened padding mask)."""
        (feature, mask), = self.backbone(images, padding_mask)
        pos = self.position(mask).flatten(2).transpose(1, 2)
        src = self.input_proj(feature)
        fg = ks.token_fg_mask(targets, images.shape[-2:], src.shape[-2:], mask,
                                self.teacher_mask) if teachers else None
        mask = mask.flatten(1)
        memory, teacher_memories = self.encoder(src.flatten(2).transpose(1, 2), pos, mask, fg)
        return memory, teacher_memories, pos, mask

    def queries(self, batch_size, targets):
        """Decoder queries: content (B, Q, d) (zeros), anchors (B, Q, 4) unsigmoided, the decoder
        self-attention mask (None) and the denoising batch (None; see DN-DETR)."""
        anchors = torch.cat([self.anchor_xy, self.anchor_wh], -1).expand(batch_size, -1, -1)
        return anchors.new_zeros(*anchors.shape[:2], self.class_embed.in_features), anchors, None, None

    def forward(self, images, padding_mask, targets=None, with_teachers=None):
        teachers = ks.teachers_wanted(self.ks_mode, self.training, with_teachers)
        if not self.training:
            padding_mask = eval_padding_mask(padding_mask, self.eval_padding)
        memory, teacher_memories, pos, mask = self.encode(images, padding_mask, targets, teachers)
        content, anchors, self_attn_mask, dn = self.queries(images.shape[0], targets)
        memory_mask = mask if self.decoder_padding_mask else None  # detrex's decoder passes no mask

        def decode(memory, n):
            masks = None if memory_mask is None else memory_mask.repeat(n, 1)
            hidden, refs = self.decoder(content.repeat(n, 1, 1), memory, pos.repeat(n, 1, 1), masks,
                                        anchors.repeat(n, 1, 1), self.bbox_embed, self_attn_mask)
            logits = self.class_embed(hidden)
            boxes = (self.bbox_embed(hidden) + inverse_sigmoid(refs, self.box_eps)).sigmoid()
            layers = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits, boxes)]
            return layers if dn is None else [dn.split(layer) for layer in layers]

        out = ks.decode_outputs(decode, memory, teacher_memories, self.training, self.teacher_layers)
        if dn is not None:
            out["dn_meta"] = dn.meta()
        return out


def build(cfg, num_classes):
    return DABDETR(cfg, num_classes)
