"""Denoising (DN) queries, as DN-DETR (Li et al., CVPR 2022) in detrex's form (GenerateDNQueries in
detrex/layers/denoising.py, used by DN-DETR and DN-Deformable-DETR; docs/authors_code.md, "Denoising").

Per training iteration the ground truth of the batch is repeated in `groups` groups of `single_pad`
slots (the most boxes of one image in the batch): image b's box j of group g sits at query
g * single_pad + j; slots beyond an image's box count are padding (zero content and box, never a
loss target). The DN queries come first, the matching queries after them.
- Labels are replaced with probability `label_noise` by a draw from the num_classes + 1 rows of the
  label embedding ("no object" included, as detrex); boxes (cxcywh) move by up to box_noise times
  half their size (centre) and their size, then are clamped and un-sigmoided (eps 1e-3).
- Content: the label embedding (d - 1 channels) plus an indicator channel, 1 for DN queries and 0
  for the matching queries (whose label is "no object", num_classes).
- Self-attention mask: matching queries see no DN query, a DN group no other group.
- Losses: the DN part of every output is scored against the box it was made from (fixed-index
  matching, `dn_indices`), normalised by num_boxes x groups (models.criterion).
No DN queries outside training. In full: docs/models.md, "Denoising queries".
"""
from dataclasses import dataclass

import torch
from torch import nn

from .layers import inverse_sigmoid

DN_EPS = 1e-3  # detrex's inverse_sigmoid eps for the noised boxes


def dn_attention_mask(groups, single_pad, num_queries, device=None):
    """(P + Q, P + Q) bool, True where query i may NOT attend to query j; P = groups * single_pad DN
    queries first, then the Q matching queries."""
    pad = groups * single_pad
    group = torch.arange(pad + num_queries, device=device) // max(single_pad, 1)
    is_dn = torch.arange(pad + num_queries, device=device) < pad
    other_group = is_dn[:, None] & is_dn[None, :] & (group[:, None] != group[None, :])
    matching_sees_dn = ~is_dn[:, None] & is_dn[None, :]
    return other_group | matching_sees_dn


def dn_indices(targets, groups, single_pad):
    """Fixed-index assignment of the DN queries: per image (query indices, target indices), int64,
    group by group, box by box."""
    out = []
    for t in targets:
        n = len(t["labels"])
        device = t["labels"].device
        tgt = torch.arange(n, device=device).repeat(groups)
        src = (torch.arange(groups, device=device)[:, None] * single_pad + torch.arange(n, device=device)).flatten()
        out.append((src, tgt))
    return out


@dataclass
class DNBatch:
    """The DN queries of one iteration: content (B, P, d), anchors (B, P, 4) unsigmoided boxes, the
    self-attention mask over [DN ; matching] queries, and the layout."""
    content: torch.Tensor
    anchors: torch.Tensor
    attn_mask: torch.Tensor
    groups: int
    single_pad: int

    @property
    def num_dn(self):
        return self.groups * self.single_pad

    def split(self, layer):
        """Splits one decoder layer's output dict (tensors (B, P + Q, ...)): the matching part keeps
        the keys, the DN part goes to `dn_<key>`."""
        out = {}
        for key, value in layer.items():
            out[key] = value[:, self.num_dn:]
            out[f"dn_{key}"] = value[:, :self.num_dn]
        return out

    def meta(self):
        """What the criterion needs besides the outputs (plain integers)."""
        return {"groups": self.groups, "single_pad": self.single_pad}


class DenoisingQueries(nn.Module):
    """Holds the label embedding (num_classes + 1 rows of d - 1 channels; the last row is "no
    object") and makes the DN queries of a batch."""

    def __init__(self, num_classes, d_model, groups=5, label_noise=0.2, box_noise=0.4):
        super().__init__()
        self.num_classes, self.groups = num_classes, groups
        self.label_noise, self.box_noise = label_noise, box_noise
        self.label_embed = nn.Embedding(num_classes + 1, d_model - 1)

    @classmethod
    def from_config(cls, cfg, num_classes):
        """From a model configuration: its hidden_dim and `dn` section (groups, label_noise, box_noise)."""
        dn = cfg["dn"]
        return cls(num_classes, cfg["hidden_dim"], dn["groups"], dn["label_noise"], dn["box_noise"])

    def prepend(self, content, anchors, targets, model_name):
        """The decoder queries of a training batch: its DN queries before the matching queries
        (content (B, Q, d), unsigmoided anchors (B, Q, 4)). Returns (content, anchors, the
        self-attention mask, the DNBatch); the matching queries alone (mask and batch None) when
        there is nothing to denoise."""
        if targets is None:
            raise ValueError(f"{model_name} training needs the ground truth for its denoising queries: pass targets")
        dn = self(targets, anchors.shape[1])
        if dn is None:  # no box in the whole batch (or model.dn.groups = 0)
            return content, anchors, None, None
        return torch.cat([dn.content, content], 1), torch.cat([dn.anchors.to(anchors), anchors], 1), dn.attn_mask, dn

    def content(self, labels, indicator):
        emb = self.label_embed(labels)
        return torch.cat([emb, emb.new_full((*emb.shape[:-1], 1), float(indicator))], -1)

    def matching_content(self, num_queries):
        """(Q, d): the "no object" embedding with indicator 0, for every matching query."""
        labels = torch.full((num_queries,), self.num_classes, dtype=torch.int64, device=self.label_embed.weight.device)
        return self.content(labels, 0)

    def noised_labels(self, labels):
        noisy = torch.rand(labels.shape, device=labels.device) < self.label_noise
        random = torch.randint(0, self.num_classes + 1, labels.shape, device=labels.device)
        return torch.where(noisy, random, labels)

    def noised_boxes(self, boxes):
        wh = boxes[:, 2:]
        diff = torch.cat([wh / 2, wh], -1)
        boxes = boxes + (torch.rand_like(boxes) * 2 - 1) * diff * self.box_noise
        return boxes.clamp(0.0, 1.0)

    def forward(self, targets, num_queries):
        """targets: model targets (`labels`, `boxes` normalised cxcywh). Returns a DNBatch, or None
        when there is nothing to denoise (no groups, or no box in the whole batch)."""
        sizes = [len(t["labels"]) for t in targets]
        single_pad = max(sizes, default=0)
        if self.groups == 0 or single_pad == 0:
            return None
        B, G = len(targets), self.groups
        weight = self.label_embed.weight
        labels = torch.cat([t["labels"] for t in targets]).to(weight.device).repeat(G)
        boxes = torch.cat([t["boxes"] for t in targets]).to(weight).repeat(G, 1)
        image = torch.repeat_interleave(torch.arange(B, device=weight.device),
                                        torch.tensor(sizes, device=weight.device)).repeat(G)
        slot = torch.cat([torch.arange(n, device=weight.device) for n in sizes])
        slot = (torch.arange(G, device=weight.device)[:, None] * single_pad + slot).flatten()

        content = weight.new_zeros(B, G * single_pad, weight.shape[1] + 1)
        anchors = weight.new_zeros(B, G * single_pad, 4)
        content[image, slot] = self.content(self.noised_labels(labels), 1)
        anchors[image, slot] = inverse_sigmoid(self.noised_boxes(boxes), eps=DN_EPS)
        mask = dn_attention_mask(G, single_pad, num_queries, weight.device)
        return DNBatch(content, anchors, mask, G, single_pad)
