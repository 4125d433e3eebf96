"""DN-Deformable-DETR (Li et al., CVPR 2022: DN-DETR on DAB-Deformable-DETR) with optional knowledge
sharing in the last encoder layer.

As the authors' configuration (detrex DN-Deformable-DETR; docs/authors_code.md, "Family settings"): the
multi-scale features, encoder (KS layer included) and deformable decoder layers of Deformable-DETR
(models.deformable_detr), with
- 4-d anchor-box queries (300, unsigmoided, trainable) and content queries of d - 1 channels plus
  an indicator channel;
- per-layer positional queries from the anchors, as DAB-DETR;
- iterative box refinement with per-layer heads (`model.deformable.box_refine: true`);
- denoising training from models.denoising (`model.dn`), the same DN queries and mask for every
  decoder pass of every KS branch, and the DN part of every output split off for the criterion
  (`dn_pred_logits`, `dn_pred_boxes`, `dn_meta`), as DN-DETR (models.dn_detr).
No DN queries outside training. The details, and the family settings that are config values:
docs/models.md, "DN-Deformable-DETR".
"""
import torch
from torch import nn

from .deformable_detr import DeformableDecoder, DeformableDETR
from .denoising import DenoisingQueries
from .layers import MLP, box_sine_embedding


class DNDeformableDecoder(DeformableDecoder):
    """The deformable decoder whose positional queries come from the reference boxes (DAB-style)."""

    def __init__(self, d_model, *args, **kwargs):
        super().__init__(d_model, *args, **kwargs)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def layer_query_pos(self, index, tgt, reference_input, query_pos):
        # sine embedding (y, x, w, h; temperature 10000) of the level-0 scaled reference box
        pos = self.ref_point_head(box_sine_embedding(reference_input[:, :, 0], self.d_model // 2))
        return pos if index == 0 else self.query_scale(tgt) * pos


class DNDeformableDETR(DeformableDETR):
    """forward(images, padding_mask, targets=None, with_teachers=None) -> output dict (see
    models.ks_encoder.assemble_outputs), plus `dn_meta` and the `dn_*` entries in training."""

    decoder_class = DNDeformableDecoder
    box_size_bias = -2.0  # detrex DN-Deformable-DETR: the first box head's w/h bias

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.denoising = DenoisingQueries.from_config(cfg, num_classes)

    def make_queries(self, cfg, num_classes):
        self.tgt_embed = nn.Embedding(cfg["num_queries"], cfg["hidden_dim"] - 1)  # + the indicator channel
        self.refpoint_embed = nn.Embedding(cfg["num_queries"], 4)  # unsigmoided anchor boxes

    def queries(self, batch_size, targets):
        """Matching queries (learned content with indicator 0, learned anchors), preceded in
        training by the DN queries of this batch (generated once, shared by every branch's decoder
        pass). Returns content (B, Q', d), None (positional queries come from the references),
        references (B, Q', 4) in [0, 1], the self-attention mask and the DN batch."""
        weight = self.tgt_embed.weight
        content = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], -1).expand(batch_size, -1, -1)
        anchors = self.refpoint_embed.weight.expand(batch_size, -1, -1)
        if not self.training:
            return content, None, anchors.sigmoid(), None, None
        content, anchors, self_attn_mask, dn = self.denoising.prepend(content, anchors, targets, "DN-Deformable-DETR")
        return content, None, anchors.sigmoid(), self_attn_mask, dn


def build(cfg, num_classes):
    return DNDeformableDETR(cfg, num_classes)
