"""The KS controls and what the synthetic tables log: teachers told nothing (model.ks.mask: none),
each branch's last-decoder-layer loss, and the teacher-student memory distance."""
import copy

import pytest
import torch

from models.ks_encoder import MemoryDistance, token_fg_mask, token_fg_mask_levels
from .model_helpers import build, tiny_batch_two_annotated

VARIANTS = ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr", "dn_deformable_detr"]


def without_boxes(targets):
    """The targets with every box removed (the GT mask is then all background)."""
    out = copy.deepcopy(targets)
    for t in out:
        t["boxes_xyxy"] = t["boxes_xyxy"][:0]
    return out


def test_mask_none_is_all_background_of_the_same_shape():
    _, padding, targets = tiny_batch_two_annotated()
    gt = token_fg_mask(targets, (96, 128), (12, 16), padding[:, ::8, ::8])
    none = token_fg_mask(targets, (96, 128), (12, 16), padding[:, ::8, ::8], "none")
    assert gt.any() and none.shape == gt.shape and none.dtype == gt.dtype and not none.any()
    levels = [(12, 16), (6, 8)]
    masks = [padding[:, ::8, ::8], padding[:, ::16, ::16]]
    gt = token_fg_mask_levels(targets, (96, 128), levels, masks)
    none = token_fg_mask_levels(targets, (96, 128), levels, masks, "none")
    assert gt.any() and none.shape == gt.shape and not none.any()
    with pytest.raises(ValueError, match="unknown teacher mask 'box'"):
        token_fg_mask(targets, (96, 128), (12, 16), None, "box")


@pytest.mark.parametrize("variant", ["dab_detr", "deformable_detr"])
def test_teachers_told_nothing_see_what_a_batch_without_boxes_shows_them(variant):
    """mask: none changes only what the teachers are told: their outputs equal those of the same
    weights given no box for the mask, and differ from the GT-mask teachers; the student is the same."""
    gt_model, _ = build(variant, "triple")
    none_model, _ = build(variant, "triple", ks={"mask": "none"})
    none_model.load_state_dict(gt_model.state_dict())
    images, padding, targets = tiny_batch_two_annotated()
    with torch.no_grad():
        none = none_model.eval()(images, padding, targets, with_teachers=True)
        empty = gt_model.eval()(images, padding, without_boxes(targets), with_teachers=True)
        gt = gt_model(images, padding, targets, with_teachers=True)
    for branch in ("attn2", "attn3"):
        a, b, c = (o["teacher_outputs"][branch][-1]["pred_logits"] for o in (none, empty, gt))  # the box heads start at zero
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a - c).abs().max() > 1e-4, branch
    torch.testing.assert_close(none["pred_logits"], gt["pred_logits"], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_layer_losses_are_each_branch_last_decoder_layer(variant):
    model, criterion = build(variant, "triple")
    images, padding, targets = tiny_batch_two_annotated()
    torch.manual_seed(0)
    losses = criterion(model.train()(images, padding, targets), targets)
    w = criterion.weights
    dn = variant.startswith("dn_")
    for branch, suffix in (("attn1", ""), ("attn3", "_attn3"), ("attn2", "_attn2")):
        expected = sum(w[k] * losses[k + suffix] for k in w)
        if dn:
            expected = expected + sum(w[k] * losses[f"{k}_dn{suffix}"] for k in w)
        torch.testing.assert_close(losses[f"loss_last_layer_{branch}"], expected.detach())
        assert not losses[f"loss_last_layer_{branch}"].requires_grad
    # the authors' code keeps one teacher layer: the teacher's branch total is its last layer
    torch.testing.assert_close(losses["loss_last_layer_attn3"], losses["loss_attn3"].detach())


def test_last_layer_loss_of_a_teacher_with_every_layer_kept_is_its_last_one():
    model, criterion = build("dab_detr", "triple", ks={"teacher_layers": "all"})
    images, padding, targets = tiny_batch_two_annotated()
    losses = criterion(model.train()(images, padding, targets), targets)
    w = criterion.weights
    last = max(int(k.rsplit("_", 1)[1]) for k in losses if k.startswith("loss_giou_attn3_"))
    torch.testing.assert_close(losses["loss_last_layer_attn3"],
                               sum(w[k] * losses[f"{k}_attn3_{last}"] for k in w).detach())


def _memories(model, images, padding, targets):
    """(student memory, {teacher: memory}, padding per token) from the KS layer, by a hook."""
    seen = {}
    layer = [m for m in model.modules() if hasattr(m, "teacher")][-1]

    def keep(module, args, kwargs, output):
        seen["out"], seen["padding"] = output, args[2]

    handle = layer.register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(images, padding, targets, with_teachers=True)
    handle.remove()
    return (*seen["out"], seen["padding"])


@pytest.mark.parametrize("variant", ["conditional_detr", "deformable_detr"])
def test_memory_distance_is_the_relative_distance_over_the_tokens_that_are_not_padding(variant):
    model, _ = build(variant, "triple", backbone={"last_stage": "layer3"})  # stride 16: padded tokens
    model.eval()
    images, padding, targets = tiny_batch_two_annotated()
    student, teachers, token_padding = _memories(model, images, padding, targets)
    assert token_padding.any()  # image 1 is padded: its padding tokens must not count
    keep = ~token_padding
    with MemoryDistance(model) as distance:
        with torch.no_grad():
            model(images, padding, targets, with_teachers=True)  # twice: the sums accumulate
            model(images, padding, targets, with_teachers=True)
            model(images, padding)  # no teachers: nothing to add
    got = distance.relative()
    assert list(got) == ["attn3", "attn2"]
    for branch, memory in teachers.items():
        # in float64 from the float32 memories, as MemoryDistance (a float32 difference rounds by up to
        # 6e-8 of each element, which moves the ratio by more than the tolerance)
        expected = ((memory.double() - student.double())[keep].norm() / student[keep].double().norm()).item()
        assert got[branch] == pytest.approx(expected, rel=1e-9)
    sums = distance.sums()
    assert got == distance.relative(sums)
    assert MemoryDistance(model).relative() == {"attn3": pytest.approx(float("nan"), nan_ok=True),
                                                "attn2": pytest.approx(float("nan"), nan_ok=True)}
    # the hooks are gone after the block
    with torch.no_grad():
        model(images, padding, targets, with_teachers=True)
    assert torch.equal(distance.sums(), sums)


def test_memory_distance_of_a_model_without_ks_has_no_branch():
    model, _ = build("dab_detr", "none")
    assert MemoryDistance(model).relative() == {}
