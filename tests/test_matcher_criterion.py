"""Hungarian matcher invariances and the set criterion."""
import torch

from models.criterion import SetCriterion, output_names
from models.matcher import HungarianMatcher


def random_predictions(B=3, Q=7, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, K, generator=g)
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05], -1)
    return logits, boxes


def random_targets(sizes, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], -1)
        out.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": boxes})
    return out


def test_batched_equals_per_image_and_empty_targets():
    matcher = HungarianMatcher()
    logits, boxes = random_predictions()
    targets = random_targets([3, 0, 5])
    batched = matcher(logits, boxes, targets)
    for i, t in enumerate(targets):
        (src, tgt), = matcher(logits[i:i + 1], boxes[i:i + 1], [t])
        assert torch.equal(batched[i][0], src) and torch.equal(batched[i][1], tgt)
    assert len(batched[1][0]) == 0 and len(batched[1][1]) == 0
    assert [len(s) for s, _ in batched] == [3, 0, 5]
    empty = matcher(logits, boxes, random_targets([0, 0, 0]))
    assert all(len(s) == 0 for s, _ in empty)


def test_matches_the_exact_predictions():
    matcher = HungarianMatcher()
    targets = random_targets([4])
    perm = torch.tensor([5, 0, 3, 6])  # target j is predicted exactly by query perm[j]
    logits = torch.full((1, 7, 4), -8.0)
    boxes = torch.rand(1, 7, 4) * 0.2 + 0.4
    boxes[0, perm] = targets[0]["boxes"]
    logits[0, perm, targets[0]["labels"]] = 8.0
    (src, tgt), = matcher(logits, boxes, targets)
    assert torch.equal(perm[tgt], src)


def test_criterion_losses_vanish_on_perfect_predictions_and_count_every_output():
    criterion = SetCriterion(4, HungarianMatcher())
    targets = random_targets([2, 3])
    logits = torch.full((2, 5, 4), -30.0)
    boxes = torch.full((2, 5, 4), 0.5)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"]
        logits[i, torch.arange(n), t["labels"]] = 30.0
    layer = {"pred_logits": logits, "pred_boxes": boxes}
    outputs = {**layer, "aux_outputs": [layer, layer],
               "teacher_outputs": {"attn3": [layer], "attn2": [layer, layer]}}
    assert [s for s, _, _ in output_names(outputs)] == ["", "_0", "_1", "_attn3", "_attn2_0", "_attn2_1"]
    losses = criterion(outputs, targets)
    for key, value in losses.items():
        assert value.item() < 1e-6, key

    noisy = {"pred_logits": torch.zeros(2, 5, 4), "pred_boxes": torch.full((2, 5, 4), 0.3)}
    losses = criterion({**noisy, "aux_outputs": [], "teacher_outputs": {"attn3": [noisy]}}, targets)
    torch.testing.assert_close(losses["loss_attn3"], losses["loss_attn1"])  # identical outputs, equal weights
    torch.testing.assert_close(losses["loss"], 2 * losses["loss_attn1"])
    expected = 1.0 * losses["loss_class"] + 5.0 * losses["loss_bbox"] + 2.0 * losses["loss_giou"]
    torch.testing.assert_close(losses["loss_attn1"], expected)


def test_all_outputs_are_matched_together_with_one_host_copy(monkeypatch):
    """match_all (what the criterion uses for every output of a step) gives each output the
    assignment it gets alone, and copies the costs to the host once."""
    matcher = HungarianMatcher()
    targets = random_targets([3, 0, 5])
    sets = [random_predictions(seed=s) for s in range(4)]
    together = matcher.match_all(sets, targets)
    for (logits, boxes), indices in zip(sets, together):
        alone = matcher(logits, boxes, targets)
        assert all(torch.equal(a, b) for pa, pb in zip(indices, alone) for a, b in zip(pa, pb))

    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a, **k))
    criterion = SetCriterion(4, matcher)
    (l0, b0), (l1, b1), (l2, b2), (l3, b3) = sets
    outputs = {"pred_logits": l0, "pred_boxes": b0, "aux_outputs": [{"pred_logits": l1, "pred_boxes": b1}],
               "teacher_outputs": {"attn3": [{"pred_logits": l2, "pred_boxes": b2}],
                                   "attn2": [{"pred_logits": l3, "pred_boxes": b3}]}}
    losses = criterion(outputs, targets)
    assert copies == [(4 * 3 * 7, 8)]  # one copy of every output's costs (4 outputs x B 3 x Q 7, 8 targets)
    monkeypatch.undo()
    # the losses equal those of each output matched alone
    for suffix, _, out in output_names(outputs):
        alone = criterion.matched_losses(out, targets, matcher(out["pred_logits"], out["pred_boxes"], targets), 8.0)
        for k, v in alone.items():
            assert torch.equal(losses[k + suffix], v), k + suffix
