"""DAB-DETR with every KS mode: forward/backward, teacher removal at inference, outputs per branch."""
import pytest
import torch

from models import build_model, is_teacher_parameter
from models.ks_encoder import TEACHER_BRANCHES

from .model_helpers import check_teacher_removal, tiny_batch, tiny_config

KS = ["triple", "dual_share_v", "dual_share_a"]
NUM_CLASSES = 3


def build(ks_mode, seed=0, **model):
    torch.manual_seed(seed)
    return build_model(tiny_config("dab_detr", ks_mode, **model), NUM_CLASSES)


@pytest.mark.parametrize("ks_mode", ["none"] + KS)
def test_train_step_outputs_and_finite_loss(ks_mode):
    model, criterion = build(ks_mode)
    images, padding, targets = tiny_batch()
    out = model.train()(images, padding, targets)
    assert out["pred_logits"].shape == (2, 12, NUM_CLASSES) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 2  # dec_layers - 1
    teachers = out.get("teacher_outputs", {})
    assert list(teachers) == list(TEACHER_BRANCHES[ks_mode])
    assert all(len(layers) == 1 for layers in teachers.values())  # the authors' code keeps the last layer
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss"])
    # 3 student outputs + one per teacher, equal weights: the total is the sum of the branch totals
    torch.testing.assert_close(losses["loss"], sum(losses[f"loss_{b}"] for b in ["attn1", *teachers]))
    assert sum(k.startswith("loss_class") and not k.startswith("loss_class_attn") for k in losses) == 3
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
    for name, p in model.named_parameters():
        if is_teacher_parameter(name):
            assert p.grad.abs().sum() > 0, f"zero gradient for teacher parameter {name}"


@pytest.mark.parametrize("ks_mode", KS)
def test_teacher_removal_is_exact_at_inference(ks_mode):
    check_teacher_removal("dab_detr", ks_mode)


def test_inference_never_touches_teacher_parameters():
    model, _ = build("triple")
    images, padding, _ = tiny_batch()
    out = model.eval()(images, padding)
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    for name, p in model.named_parameters():
        if is_teacher_parameter(name):
            assert p.grad is None, name


def test_teachers_need_targets_and_a_ks_model():
    model, _ = build("triple")
    images, padding, _ = tiny_batch()
    with pytest.raises(ValueError, match="ground-truth boxes"):
        model.train()(images, padding)
    baseline, _ = build("none")
    with pytest.raises(ValueError, match="needs a KS model"):
        baseline.eval()(images, padding, with_teachers=True)


def test_teacher_layers_all_gives_every_decoder_layer_a_loss():
    model, criterion = build("triple", ks={"mode": "triple", "teacher_layers": "all"})
    images, padding, targets = tiny_batch()
    out = model.train()(images, padding, targets)
    assert all(len(layers) == 3 for layers in out["teacher_outputs"].values())
    losses = criterion(out, targets)
    for branch in ("attn2", "attn3"):
        assert {f"loss_giou_{branch}_{i}" for i in range(3)} <= set(losses)


def test_teacher_decoder_pass_matches_separate_runs():
    """The batched decoder call on [student, attn3, attn2] memories gives each branch what a
    separate decoder run on that memory gives."""
    model, _ = build("triple", dropout=0.0)
    images, padding, targets = tiny_batch()
    model.train()
    with torch.no_grad():
        out = model(images, padding, targets)
        model.eval()
        separate = model(images, padding, targets, with_teachers=True)
    for branch in ("attn3", "attn2"):
        torch.testing.assert_close(out["teacher_outputs"][branch][0]["pred_boxes"],
                                   separate["teacher_outputs"][branch][0]["pred_boxes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["pred_logits"], separate["pred_logits"], rtol=1e-5, atol=1e-5)


def test_frozen_anchor_centres_get_no_update():
    model, criterion = build("none", dab={"modulate_hw_attn": True, "random_anchor_xy": True, "freeze_anchor_xy": True})
    images, padding, targets = tiny_batch()
    criterion(model.train()(images, padding, targets), targets)["loss"].backward()
    assert model.anchor_xy.grad is None and model.anchor_wh.grad is not None
    assert 0 < model.anchor_xy.sigmoid().min() and model.anchor_xy.sigmoid().max() < 1
