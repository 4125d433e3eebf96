"""DN query generation, the DN attention mask and the DN losses, checked directly."""
import torch
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from models.criterion import SetCriterion
from models.denoising import DN_EPS, DenoisingQueries, dn_attention_mask, dn_indices
from models.layers import inverse_sigmoid
from models.matcher import HungarianMatcher

K, D = 4, 8  # classes, model width


def targets():
    return [{"labels": torch.tensor([1, 3, 0]),
             "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1], [0.8, 0.2, 0.3, 0.2]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.6]])},
            {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


def test_attention_mask_by_hand():
    # 2 groups of 2 slots, then 3 matching queries; True = may not attend
    expected = torch.tensor([
        # g0  g0  g1  g1  m   m   m
        [0, 0, 1, 1, 0, 0, 0],  # group 0
        [0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],  # group 1
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],  # matching queries see no DN query
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(dn_attention_mask(2, 2, 3), expected)


def test_attention_mask_rules_for_the_reference_setting():
    groups, pad, nq = 5, 4, 10
    mask = dn_attention_mask(groups, pad, nq)
    n_dn = groups * pad
    for i in range(n_dn + nq):
        for j in range(n_dn + nq):
            if i >= n_dn:  # matching query
                blocked = j < n_dn
            else:  # DN query of group i // pad: sees its group and every matching query
                blocked = j < n_dn and i // pad != j // pad
            assert mask[i, j].item() == blocked, (i, j)
    assert not mask.all(-1).any()  # every query sees at least one key (itself)


def test_queries_layout_without_noise():
    gen = DenoisingQueries(K, D, groups=3, label_noise=0.0, box_noise=0.0)
    t = targets()
    dn = gen(t, num_queries=5)
    assert (dn.groups, dn.single_pad, dn.num_dn) == (3, 3, 9)
    assert dn.content.shape == (3, 9, D) and dn.anchors.shape == (3, 9, 4)
    assert torch.equal(dn.attn_mask, dn_attention_mask(3, 3, 5))
    for b, (src, tgt) in enumerate(dn_indices(t, 3, 3)):
        n = len(t[b]["labels"])
        assert torch.equal(src, torch.tensor([g * 3 + j for g in range(3) for j in range(n)], dtype=torch.int64))
        assert torch.equal(tgt, torch.arange(n).repeat(3))
        if n:  # each slot holds its box's label embedding + indicator 1 and its un-sigmoided box
            emb = gen.label_embed.weight[t[b]["labels"][tgt]]
            torch.testing.assert_close(dn.content[b, src], torch.cat([emb, torch.ones(len(src), 1)], -1))
            torch.testing.assert_close(dn.anchors[b, src], inverse_sigmoid(t[b]["boxes"][tgt], eps=DN_EPS))
        padding = torch.ones(9, dtype=torch.bool)
        padding[src] = False  # padding slots: zero content (indicator 0 too) and a zero box logit
        assert (dn.content[b, padding] == 0).all() and (dn.anchors[b, padding] == 0).all()
    matching = gen.matching_content(5)
    torch.testing.assert_close(matching, torch.cat([gen.label_embed.weight[K], torch.zeros(1)]).expand(5, -1))


def test_label_and_box_noise():
    torch.manual_seed(0)
    gen = DenoisingQueries(K, D, groups=200, label_noise=0.2, box_noise=0.4)
    labels = torch.full((1000,), 2)
    noised = gen.noised_labels(labels)
    changed = (noised != labels).float().mean().item()
    # a replaced label is drawn from K + 1 = 5 rows (detrex's "no object" row included): a
    # fifth of the replacements draw the same label again
    assert abs(changed - 0.2 * 4 / 5) < 0.04
    assert set(noised.tolist()) == {0, 1, 2, 3, 4}

    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2000, 1)
    noised = gen.noised_boxes(boxes)
    shift = (noised - boxes).abs()
    assert (shift[:, 0] <= 0.4 * 0.1 + 1e-6).all() and (shift[:, 1] <= 0.4 * 0.2 + 1e-6).all()
    assert (shift[:, 2] <= 0.4 * 0.2 + 1e-6).all() and (shift[:, 3] <= 0.4 * 0.4 + 1e-6).all()
    assert shift[:, 0].max() > 0.9 * 0.04 and shift[:, 3].max() > 0.9 * 0.16  # uniform over the range
    edge = gen.noised_boxes(torch.tensor([[0.02, 0.98, 0.9, 0.9]]).repeat(100, 1))
    assert edge.min() >= 0 and edge.max() <= 1  # clamped


def test_nothing_to_denoise():
    gen = DenoisingQueries(K, D, groups=5)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    assert gen(empty, 5) is None
    assert DenoisingQueries(K, D, groups=0)(targets(), 5) is None


def test_split_keeps_matching_part_under_the_usual_keys():
    gen = DenoisingQueries(K, D, groups=2, label_noise=0.0, box_noise=0.0)
    dn = gen(targets(), num_queries=5)  # 2 groups x 3 slots
    layer = {"pred_logits": torch.arange(3 * 11).view(3, 11, 1)}
    split = dn.split(layer)
    assert torch.equal(split["pred_logits"], layer["pred_logits"][:, 6:])
    assert torch.equal(split["dn_pred_logits"], layer["pred_logits"][:, :6])


def test_dn_losses_fixed_index_and_normaliser():
    torch.manual_seed(0)
    t = targets()
    groups, pad = 2, 3
    criterion = SetCriterion(K, HungarianMatcher())
    logits = torch.randn(3, 5, K)
    boxes = torch.rand(3, 5, 4) * 0.3 + 0.3
    dn_logits = torch.randn(3, groups * pad, K)
    dn_boxes = torch.rand(3, groups * pad, 4) * 0.3 + 0.3
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "dn_pred_logits": dn_logits, "dn_pred_boxes": dn_boxes,
               "aux_outputs": [], "dn_meta": {"groups": groups, "single_pad": pad}}
    losses = criterion(outputs, t)
    # by hand: every DN slot holding box j of image b is scored against box j; 4 boxes x 2 groups
    n = 4 * groups
    onehot = torch.zeros_like(dn_logits)
    l1 = giou = 0.0
    for b, tb in enumerate(t):
        for g in range(groups):
            for j in range(len(tb["labels"])):
                slot = g * pad + j
                onehot[b, slot, tb["labels"][j]] = 1
                l1 += (dn_boxes[b, slot] - tb["boxes"][j]).abs().sum()
                giou += 1 - generalized_box_iou(box_convert(dn_boxes[b, slot][None], "cxcywh", "xyxy"),
                                                box_convert(tb["boxes"][j][None], "cxcywh", "xyxy"))[0, 0]
    focal = sigmoid_focal_loss(dn_logits, onehot, 0.25, 2.0, reduction="sum")  # padding slots: background
    torch.testing.assert_close(losses["loss_class_dn"], focal / n)
    torch.testing.assert_close(losses["loss_bbox_dn"], l1 / n)
    torch.testing.assert_close(losses["loss_giou_dn"], giou / n)
    plain = criterion({k: v for k, v in outputs.items() if not k.startswith("dn")}, t)
    torch.testing.assert_close(losses["loss"] - plain["loss"],
                               losses["loss_class_dn"] + 5 * losses["loss_bbox_dn"] + 2 * losses["loss_giou_dn"])

    # perfect DN predictions: zero DN box losses, near-zero class loss
    perfect_logits = torch.full_like(dn_logits, -30.0)
    perfect_boxes = dn_boxes.clone()
    for b, (src, tgt) in enumerate(dn_indices(t, groups, pad)):
        perfect_boxes[b, src] = t[b]["boxes"][tgt]
        perfect_logits[b, src, t[b]["labels"][tgt]] = 30.0
    losses = criterion({**outputs, "dn_pred_logits": perfect_logits, "dn_pred_boxes": perfect_boxes}, t)
    for key in ("loss_class_dn", "loss_bbox_dn", "loss_giou_dn"):
        assert losses[key].item() < 1e-6, key
