"""Hungarian matcher with the focal classification cost (Deformable/DAB/DN/Conditional-DETR)."""
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher:
    """One-to-one assignment of predictions to targets minimising
    cost_class * focal cost + cost_bbox * L1 + cost_giou * (-GIoU), per image.

    The focal cost of predicting class c with probability p is
    alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)).
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0):
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits, boxes, labels, target_boxes):
        """Costs (Q, T) for one set of predictions (Q, K), (Q, 4) against T targets."""
        prob = logits.sigmoid()
        neg = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        cost_class = pos[:, labels] - neg[:, labels]
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                         box_convert(target_boxes, "cxcywh", "xyxy"))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    @torch.profiler.record_function("matcher")  # its share of a step in profiles (benchmarks/gpu_check.py)
    def __call__(self, pred_logits, pred_boxes, targets):
        """pred_logits (B, Q, K), pred_boxes (B, Q, 4) normalised cxcywh; targets: list of dicts with
        `labels` (T_i,) and `boxes` (T_i, 4) normalised cxcywh. Returns a list of B pairs
        (prediction indices, target indices), int64 tensors of equal length, sorted by prediction."""
        B, Q, _ = pred_logits.shape
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(B)]
        # One cost matrix for the whole batch (as DETR), split per image for the assignment.
        cost = self.cost_matrix(pred_logits.flatten(0, 1).float(), pred_boxes.flatten(0, 1).float(),
                                torch.cat([t["labels"] for t in targets]),
                                torch.cat([t["boxes"] for t in targets]).float())
        cost = cost.view(B, Q, -1).cpu()
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
