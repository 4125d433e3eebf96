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

    def __call__(self, pred_logits, pred_boxes, targets):
        """pred_logits (B, Q, K), pred_boxes (B, Q, 4) normalised cxcywh; targets: list of dicts with
        `labels` (T_i,) and `boxes` (T_i, 4) normalised cxcywh. Returns a list of B pairs
        (prediction indices, target indices), int64 tensors of equal length, sorted by prediction."""
        return self.match_all([(pred_logits, pred_boxes)], targets)[0]

    @torch.no_grad()
    @torch.profiler.record_function("matcher")  # its share of a step in profiles (benchmarks/gpu_check.py)
    def match_all(self, predictions, targets):
        """The assignments of several sets of predictions of one batch (e.g. every decoder layer of
        the student and of each teacher) against the same targets: [one __call__ result per
        (pred_logits, pred_boxes)]. Their cost matrices are copied to the host together, once, not
        once per output (each copy waits for the device)."""
        B = predictions[0][0].shape[0]
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in range(B)] for _ in predictions]
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()
        # One cost matrix per output for its whole batch (as DETR), split per image for the assignment.
        # Each is computed on its own (vectorised kernels round a batch's last elements differently
        # when the length changes, which would move near-ties), then all go to the host in one copy.
        cost = torch.cat([self.cost_matrix(lg.flatten(0, 1).float(), bx.flatten(0, 1).float(), labels, target_boxes)
                          for lg, bx in predictions]).cpu()
        out, start = [], 0
        for pred_logits, _ in predictions:
            n = pred_logits.shape[0] * pred_logits.shape[1]
            per_image = cost[start:start + n].view(pred_logits.shape[0], pred_logits.shape[1], -1)
            start += n
            indices = []
            for i, c in enumerate(per_image.split(sizes, -1)):
                rows, cols = linear_sum_assignment(c[i].numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            out.append(indices)
        return out
