"""Set criterion: Hungarian matching and the DETR losses for every output that gets a loss.

Every output (each student decoder layer and each kept teacher layer) gets its own matching and the
same weighted loss: class_weight * sigmoid focal loss + bbox_weight * L1 + giou_weight * GIoU loss,
each normalised by the number of target boxes in the (global) batch. Equal weights across outputs,
as the authors' code (docs/authors_code.md, "Decoder passes and losses").

Denoising (DN-DETR family): when the outputs carry `dn_meta`, every output that has a DN part
(`dn_pred_logits`, `dn_pred_boxes`: the student layers and the kept teacher layers) also gets the same
three losses on it, against the boxes its DN queries were made from (fixed-index matching, no
Hungarian matching), normalised by num_boxes x groups, with the same weights; the focal loss covers
every DN slot (padding slots count as background), as detrex's DNCriterion.
Keys: `loss_class_dn`, `loss_class_dn_0`, `loss_class_dn_attn3`, ...
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .denoising import dn_indices
from .ks_encoder import STUDENT


def output_names(outputs):
    """(suffix, branch, output dict) for every output that gets a loss, in a fixed order:
    the student's last layer (suffix ''), its earlier layers ('_0', '_1', ...), then each teacher's
    kept layers ('_attn3', or '_attn3_0', ... when all layers are kept)."""
    named = [("", STUDENT, outputs)]
    named += [(f"_{i}", STUDENT, aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    for branch, layers in outputs.get("teacher_outputs", {}).items():
        if len(layers) == 1:
            named.append((f"_{branch}", branch, layers[0]))
        else:
            named += [(f"_{branch}_{i}", branch, out) for i, out in enumerate(layers)]
    return named


def global_num_boxes(targets, device):
    num = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1).item()


class SetCriterion(nn.Module):
    def __init__(self, num_classes, matcher, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                 alpha=0.25, gamma=2.0):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_class": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.alpha, self.gamma = alpha, gamma

    def matched_losses(self, output, targets, indices, num_boxes):
        """Unweighted losses of one output given its assignment."""
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        onehot[batch_idx, src_idx, labels] = 1
        loss_class = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma, reduction="sum") / num_boxes
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                   box_convert(tgt_boxes, "cxcywh", "xyxy"))
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def weighted(self, losses):
        return sum(self.weights[k] * v for k, v in losses.items())

    def forward(self, outputs, targets):
        """Returns a dict: `loss` (the total to minimise), the unweighted components of every output
        (`loss_class`, `loss_class_0`, `loss_class_attn3`, ..., and `loss_class_dn`, ... for the DN
        parts), the weighted total per branch (`loss_attn1`, `loss_attn2`, `loss_attn3`, DN
        losses included) and, detached, the weighted loss of each branch's last decoder layer
        (`loss_last_layer_attn1`, ...: the student's last layer and each teacher's kept last one)."""
        num_boxes = global_num_boxes(targets, outputs["pred_logits"].device)
        dn_meta = outputs.get("dn_meta")
        if dn_meta is not None:
            dn_idx = dn_indices(targets, dn_meta["groups"], dn_meta["single_pad"])
            dn_num_boxes = num_boxes * dn_meta["groups"]
        result, branch_totals, last_layer = {}, {}, {}
        named = output_names(outputs)
        assignments = self.matcher.match_all([(o["pred_logits"], o["pred_boxes"]) for _, _, o in named], targets)
        for (suffix, branch, output), indices in zip(named, assignments):
            losses = self.matched_losses(output, targets, indices, num_boxes)
            result.update({k + suffix: v for k, v in losses.items()})
            total = self.weighted(losses)
            if dn_meta is not None:
                if "dn_pred_logits" not in output:
                    raise ValueError(f"output {suffix or '(last layer)'!r} has no DN part although dn_meta is set")
                dn_out = {"pred_logits": output["dn_pred_logits"], "pred_boxes": output["dn_pred_boxes"]}
                dn_losses = self.matched_losses(dn_out, targets, dn_idx, dn_num_boxes)
                result.update({f"{k}_dn{suffix}": v for k, v in dn_losses.items()})
                total = total + self.weighted(dn_losses)
            branch_totals[branch] = branch_totals.get(branch, 0) + total
            if branch != STUDENT or not suffix:  # a teacher's layers come in order: its last one stays
                last_layer[branch] = total
        result.update({f"loss_{b}": v for b, v in branch_totals.items()})
        # the same terms for every branch, so the branches compare (the paper's Fig. 4 question)
        result.update({f"loss_last_layer_{b}": v.detach() for b, v in last_layer.items()})
        result["loss"] = sum(branch_totals.values())
        return result
