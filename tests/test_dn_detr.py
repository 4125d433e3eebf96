"""DN-DETR with every KS mode: forward/backward with DN losses on every output that gets a loss
(teachers included), teacher removal at inference, and the DN attention mask at work in the model."""
import pytest
import torch

from models.denoising import dn_attention_mask
from models.ks_encoder import TEACHER_BRANCHES

from .model_helpers import KS_MODES, build, check_teacher_removal, check_train_step, tiny_batch_two_annotated

VARIANT = "dn_detr"
FROZEN_BACKBONE = {"backbone": {"name": "resnet18", "weights": None, "freeze_at": 5}}  # faster backward
COMPONENTS = ("loss_class", "loss_bbox", "loss_giou")


@pytest.mark.parametrize("ks_mode", KS_MODES)
def test_train_step_with_dn_losses_on_every_output(ks_mode):
    out, losses = check_train_step(VARIANT, ks_mode, **FROZEN_BACKBONE)
    assert out["dn_meta"] == {"groups": 5, "single_pad": 3}  # image 0 has three boxes
    outputs = [out] + out["aux_outputs"] + [layer for layers in out.get("teacher_outputs", {}).values()
                                            for layer in layers]
    for o in outputs:  # 5 groups x 3 slots, split off every output
        assert o["dn_pred_logits"].shape == (2, 15, 3) and o["dn_pred_boxes"].shape == (2, 15, 4)
        assert o["pred_logits"].shape == (2, 12, 3)
    suffixes = ["", "_0", "_1"] + [f"_{b}" for b in TEACHER_BRANCHES[ks_mode]]
    assert {f"{c}_dn{s}" for c in COMPONENTS for s in suffixes} == {k for k in losses if "_dn" in k}
    # each branch total = its matching losses + its DN losses, with the same weights 1 / 5 / 2
    weights = dict(zip(COMPONENTS, (1.0, 5.0, 2.0)))
    for branch in ["attn1", *TEACHER_BRANCHES[ks_mode]]:
        mine = ["", "_0", "_1"] if branch == "attn1" else [f"_{branch}"]
        expected = sum(weights[c] * (losses[c + s] + losses[f"{c}_dn{s}"]) for c in COMPONENTS for s in mine)
        torch.testing.assert_close(losses[f"loss_{branch}"], expected)


@pytest.mark.parametrize("ks_mode", KS_MODES[1:])
def test_teacher_removal_is_exact_at_inference(ks_mode):
    check_teacher_removal(VARIANT, ks_mode)


def test_no_dn_queries_outside_training_or_without_boxes():
    model, criterion = build(VARIANT, "triple")
    images, padding, targets = tiny_batch_two_annotated()
    with torch.no_grad():
        out = model.eval()(images, padding, targets, with_teachers=True)
    assert "dn_meta" not in out and not any(k.startswith("dn_") for k in out)
    no_boxes = [{**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0], "boxes_xyxy": t["boxes_xyxy"][:0]}
                for t in targets]
    out = model.train()(images, padding, no_boxes)
    assert "dn_meta" not in out
    assert torch.isfinite(criterion(out, no_boxes)["loss"])
    with pytest.raises(ValueError, match="denoising"):
        build(VARIANT)[0].train()(images, padding)


def test_matching_queries_never_see_the_dn_queries():
    """With DN queries and the mask, the matching part of every output (student layers and teachers)
    is what the model gives without any DN query."""
    model, _ = build(VARIANT, "triple")
    model.train()  # dropout is 0 in this family: training forwards are deterministic
    images, padding, targets = tiny_batch_two_annotated()
    with torch.no_grad():
        with_dn = model(images, padding, targets)
        model.denoising.groups = 0
        without = model(images, padding, targets)
    assert "dn_meta" in with_dn and "dn_meta" not in without
    pairs = [(with_dn, without)] + list(zip(with_dn["aux_outputs"], without["aux_outputs"]))
    pairs += [(with_dn["teacher_outputs"][b][0], without["teacher_outputs"][b][0]) for b in ("attn3", "attn2")]
    for a, b in pairs:
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_dn_groups_never_see_each_other():
    """Changing the queries of one DN group changes that group's outputs only."""
    model, _ = build(VARIANT)
    model.train()
    images, padding, targets = tiny_batch_two_annotated()
    with torch.no_grad():
        memory, _, pos, mask = model.encode(images, padding, targets, teachers=False)
        torch.manual_seed(0)
        content, anchors, attn_mask, dn = model.queries(2, targets)
        assert torch.equal(attn_mask, dn_attention_mask(5, 3, 12))
        S = dn.single_pad
        changed_content, changed_anchors = content.clone(), anchors.clone()
        changed_content[:, 2 * S:3 * S] += 1.0  # group 2
        changed_anchors[:, 2 * S:3 * S] -= 0.5
        runs = [model.decoder(c, memory, pos, mask, a, model.bbox_embed, attn_mask)[0]
                for c, a in ((content, anchors), (changed_content, changed_anchors))]
    same = torch.ones(content.shape[1], dtype=torch.bool)
    same[2 * S:3 * S] = False
    torch.testing.assert_close(runs[0][:, :, same], runs[1][:, :, same], rtol=1e-5, atol=1e-5)
    assert (runs[0][:, :, ~same] - runs[1][:, :, ~same]).abs().amax() > 1e-2


def test_dn_content_queries_and_anchors():
    model, _ = build(VARIANT)
    with torch.no_grad():
        content, anchors, attn_mask, dn = model.eval().queries(2, None)
    assert attn_mask is None and dn is None
    # matching content: the "no object" label embedding with indicator 0, for every query
    expected = torch.cat([model.denoising.label_embed.weight[3], torch.zeros(1)])
    torch.testing.assert_close(content, expected.expand(2, 12, -1))
    # the family's anchors (freeze_anchor_box_centers=False in the authors' config): none frozen
    assert model.anchor_xy.requires_grad and model.anchor_wh.requires_grad
