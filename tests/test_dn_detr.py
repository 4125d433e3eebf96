"""DN-DETR with every KS mode: forward/backward with DN losses on every output that gets a loss
(teachers included), teacher removal at inference, and the DN attention mask at work in the model."""
import pytest
import torch

from models.denoising import dn_attention_mask
from .model_helpers import (KS_MODES, build, check_dn_train_step, check_matching_queries_never_see_the_dn_queries,
                            check_no_dn_queries_outside_training_or_without_boxes, check_teacher_removal,
                            tiny_batch_two_annotated)

VARIANT = "dn_detr"
FROZEN_BACKBONE = {"backbone": {"name": "resnet18", "weights": None, "freeze_at": 5}}  # faster backward


@pytest.mark.parametrize("ks_mode", KS_MODES)
def test_train_step_with_dn_losses_on_every_output(ks_mode):
    check_dn_train_step(VARIANT, ks_mode, **FROZEN_BACKBONE)


@pytest.mark.parametrize("ks_mode", KS_MODES[1:])
def test_teacher_removal_is_exact_at_inference(ks_mode):
    check_teacher_removal(VARIANT, ks_mode)


def test_no_dn_queries_outside_training_or_without_boxes():
    check_no_dn_queries_outside_training_or_without_boxes(VARIANT)


def test_matching_queries_never_see_the_dn_queries():
    check_matching_queries_never_see_the_dn_queries(VARIANT)


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
