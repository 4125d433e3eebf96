"""DN-DETR (Li et al., CVPR 2022): DAB-DETR plus denoising training, with optional knowledge sharing.

As the authors' configuration (detrex DN-DETR; docs/authors_code.md, "Family settings"): everything of DAB-DETR
(models.dab_detr), except that
- the matching queries' content is the label embedding of "no object" with indicator 0 (DAB: zeros);
- in training, `model.dn.groups` groups of noised ground-truth queries (label noise
  `model.dn.label_noise`, box noise `model.dn.box_noise`, indicator 1) go before the matching
  queries, with the self-attention mask of models.denoising;
- their outputs are split off every decoder output (student layers and kept teacher layers alike:
  every decoder pass of every branch gets the same DN queries and mask) as `dn_pred_logits` /
  `dn_pred_boxes`, and `dn_meta` tells the criterion the layout for the DN losses.
The family's anchors are not frozen and keep nn.Embedding's N(0, 1) init for all four coordinates
(the authors' freeze_anchor_box_centers=False: set model.dab.random_anchor_xy and freeze_anchor_xy
to false). No DN queries outside training: inference is DAB-DETR's.
"""
import torch

from .dab_detr import DABDETR
from .denoising import DenoisingQueries


class DNDETR(DABDETR):
    """forward(images, padding_mask, targets=None, with_teachers=None) -> output dict (see
    models.ks_encoder.assemble_outputs), plus `dn_meta` and the `dn_*` entries in training."""

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.denoising = DenoisingQueries.from_config(cfg, num_classes)

    def queries(self, batch_size, targets):
        """Matching queries ("no object" content, learned anchors), preceded in training by the DN
        queries of this batch (generated once, shared by every branch's decoder pass)."""
        anchors = torch.cat([self.anchor_xy, self.anchor_wh], -1)
        content = self.denoising.matching_content(anchors.shape[0]).expand(batch_size, -1, -1)
        anchors = anchors.expand(batch_size, -1, -1)
        if not self.training:
            return content, anchors, None, None
        return self.denoising.prepend(content, anchors, targets, "DN-DETR")


def build(cfg, num_classes):
    return DNDETR(cfg, num_classes)
