"""From model outputs to detections in original-image pixels (top-k over sigmoid scores)."""
import torch
from torchvision.ops import box_convert


@torch.no_grad()
def postprocess(pred_logits, pred_boxes, orig_sizes, topk=300, clip=False):
    """pred_logits (B, Q, K), pred_boxes (B, Q, 4) normalised cxcywh, orig_sizes (B, 2) as (h, w).

    Keeps the top-k (query, class) pairs per image by sigmoid score, as the DETR family's focal-loss
    models do (one query may give several classes). Returns a list of dicts with `scores` (k,),
    `labels` (k,) contiguous and `boxes` (k, 4) absolute xyxy in original-image pixels. With `clip`
    (`model.eval_clip_boxes`), boxes are clipped to the image and those left without area dropped,
    as detectron2's detector_postprocess does in the KS-DETR code's evaluation.
    """
    B, Q, K = pred_logits.shape
    prob = pred_logits.sigmoid().flatten(1)
    scores, index = prob.topk(min(topk, Q * K), dim=1)
    query, labels = index // K, index % K
    boxes = box_convert(pred_boxes, "cxcywh", "xyxy").gather(1, query[..., None].expand(-1, -1, 4))
    h, w = orig_sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)[:, None].to(boxes)
    boxes = boxes * scale
    if not clip:
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
    boxes = torch.minimum(boxes.clamp(min=0), scale)
    keep = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return [{"scores": s[k], "labels": l[k], "boxes": b[k]} for s, l, b, k in zip(scores, labels, boxes, keep)]
