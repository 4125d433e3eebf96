"""Tiny model configurations and inputs shared by the model tests, and checks every variant passes."""
import copy

import pytest
import torch

from experiments.config import DEFAULTS, merge
from models import build_model, is_teacher_parameter, model_targets
from models.ks_encoder import TEACHER_BRANCHES

TINY = {
    "hidden_dim": 32, "nheads": 4, "enc_layers": 2, "dec_layers": 3, "dim_feedforward": 64,
    "num_queries": 12, "eval_topk": 20,
    "backbone": {"name": "resnet18", "weights": None, "freeze_at": 0},
}
# The authors' family settings (docs/authors_code.md, "Family settings") that differ from DEFAULTS (DAB-DETR's).
FAMILIES = {
    "conditional_detr": {"dropout": 0.1, "activation": "relu", "pos_temperature": 10000,
                         "loss": {"class_weight": 2.0}},
    "dab_detr": {},
    "dn_detr": {"dab": {"random_anchor_xy": False, "freeze_anchor_xy": False},
                "dn": {"groups": 5, "label_noise": 0.2, "box_noise": 0.4}},
    # TINY's hidden_dim 32 suits the GroupNorm(32) input projections; its FFN stays tiny
    "deformable_detr": {"dropout": 0.1, "activation": "relu", "pos_temperature": 10000, "pos_offset": -0.5,
                        "deformable": {"num_levels": 4, "n_points": 4, "box_refine": False}},
    "dn_deformable_detr": {"dropout": 0.0, "activation": "relu", "pos_temperature": 10000, "pos_offset": -0.5,
                           "deformable": {"num_levels": 4, "n_points": 4, "box_refine": True},
                           "dn": {"groups": 5, "label_noise": 0.2, "box_noise": 0.4}},
}
KS_MODES = ["none", "triple", "dual_share_v", "dual_share_a"]
NUM_CLASSES = 3


def tiny_config(variant="dab_detr", ks_mode="none", **model):
    """A validated `model` configuration section, tiny enough for CPU tests."""
    cfg = merge(DEFAULTS, {"model": {**copy.deepcopy(TINY), "variant": variant, **model}}, "test config")
    cfg["model"]["ks"]["mode"] = ks_mode
    return cfg["model"]


def family_config(variant, ks_mode="none", **model):
    """tiny_config with the authors' family settings of `variant`, then `model` on top."""
    cfg = merge(DEFAULTS, {"model": {**copy.deepcopy(TINY), "variant": variant}}, "test config")
    cfg = merge(cfg, {"model": copy.deepcopy(FAMILIES[variant])}, "test family config")
    cfg = merge(cfg, {"model": model}, "test config")
    cfg["model"]["ks"]["mode"] = ks_mode
    return cfg["model"]


def build(variant, ks_mode="none", seed=0, **model):
    torch.manual_seed(seed)
    return build_model(family_config(variant, ks_mode, **model), NUM_CLASSES)


def tiny_batch(seed=0):
    """Two images of different sizes, zero-padded; image 0 has three boxes, image 1 none."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=g)
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, 80:, :] = True
    padding[1, :, 100:] = True
    images[padding[:, None].expand_as(images)] = 0
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 60.0, 50.0], [70.5, 10.2, 120.0, 90.0], [30.0, 40.0, 34.0, 45.0]]),
         "labels": torch.tensor([0, 2, 1]), "size": torch.tensor([96, 128]), "orig_size": torch.tensor([96, 128]),
         "image_id": 1},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": torch.tensor([80, 100]),
         "orig_size": torch.tensor([80, 100]), "image_id": 2},
    ]
    return images, padding, model_targets(targets)


def tiny_batch_two_annotated(seed=0):
    """tiny_batch with a box in image 1 too (two boxes fewer than image 0: DN padding slots)."""
    images, padding, targets = tiny_batch(seed)
    extra = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 70.0]]), "labels": torch.tensor([1]),
             "size": torch.tensor([80, 100]), "orig_size": torch.tensor([80, 100]), "image_id": 2}
    return images, padding, targets[:1] + model_targets([extra])


# --------------------------------------------------------------------------------------------------
# Checks shared by the variant tests

def check_train_step(variant, ks_mode, **model):
    """Training forward/backward: output layout, finite loss, equal-weight sum over branches, and a
    gradient for every trainable parameter (non-zero for every teacher parameter). Returns
    (outputs, losses)."""
    net, criterion = build(variant, ks_mode, **model)
    cfg = family_config(variant, ks_mode, **model)
    Q, L = cfg["num_queries"], cfg["dec_layers"]
    images, padding, targets = tiny_batch_two_annotated()
    out = net.train()(images, padding, targets)
    assert out["pred_logits"].shape == (2, Q, NUM_CLASSES) and out["pred_boxes"].shape == (2, Q, 4)
    assert len(out["aux_outputs"]) == L - 1
    teachers = out.get("teacher_outputs", {})
    assert list(teachers) == list(TEACHER_BRANCHES[ks_mode])
    assert all(len(layers) == 1 for layers in teachers.values())  # the authors' code keeps the last layer
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss"])
    torch.testing.assert_close(losses["loss"], sum(losses[f"loss_{b}"] for b in ["attn1", *teachers]))
    losses["loss"].backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            if is_teacher_parameter(name):
                assert p.grad.abs().sum() > 0, f"zero gradient for teacher parameter {name}"
    return out, losses


def check_teacher_removal(variant, ks_mode, **model):
    """At inference a KS model is its baseline: the baseline loads the KS state minus the teacher
    parameters strictly, has that many fewer parameters, and gives bit-identical outputs; GT-assisted
    evaluation (with_teachers=True) leaves the student bit-identical too."""
    ks_model, _ = build(variant, ks_mode, **model)
    baseline, _ = build(variant, "none", seed=1, **model)
    state = {k: v for k, v in ks_model.state_dict().items() if not is_teacher_parameter(k)}
    baseline.load_state_dict(state)  # strict: every other parameter has the baseline's name
    n_teacher = sum(p.numel() for n, p in ks_model.named_parameters() if is_teacher_parameter(n))
    assert n_teacher > 0
    assert sum(p.numel() for p in baseline.parameters()) == sum(p.numel() for p in ks_model.parameters()) - n_teacher

    images, padding, targets = tiny_batch()
    ks_model.eval()
    baseline.eval()
    with torch.no_grad():
        ks_out = ks_model(images, padding)  # no targets: inference needs no ground truth
        base_out = baseline(images, padding)
        with_teachers = ks_model(images, padding, targets, with_teachers=True)
    assert "teacher_outputs" not in ks_out
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(ks_out[key], base_out[key])
        assert torch.equal(with_teachers[key], ks_out[key])
        for a, b, c in zip(ks_out["aux_outputs"], base_out["aux_outputs"], with_teachers["aux_outputs"]):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert list(with_teachers["teacher_outputs"]) == list(TEACHER_BRANCHES[ks_mode])
    assert not any(k.startswith("dn_") for k in with_teachers)  # no denoising outside training



# Denoising variants (DN-DETR, DN-Deformable-DETR) in their family settings: 5 DN groups, 12 queries.
DN_LOSS_WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def check_dn_train_step(variant, ks_mode, **model):
    """check_train_step, plus: the DN outputs are split off every output (teachers included), every
    output that gets a loss gets the three DN losses, and each branch's total is its matching losses
    plus its DN losses with the same weights."""
    out, losses = check_train_step(variant, ks_mode, **model)
    assert out["dn_meta"] == {"groups": 5, "single_pad": 3}  # image 0 has three boxes
    outputs = [out] + out["aux_outputs"] + [layer for layers in out.get("teacher_outputs", {}).values()
                                            for layer in layers]
    for o in outputs:  # 5 groups x 3 slots, split off every output
        assert o["dn_pred_logits"].shape == (2, 15, 3) and o["dn_pred_boxes"].shape == (2, 15, 4)
        assert o["pred_logits"].shape == (2, 12, 3)
    suffixes = ["", "_0", "_1"] + [f"_{b}" for b in TEACHER_BRANCHES[ks_mode]]
    assert {f"{c}_dn{s}" for c in DN_LOSS_WEIGHTS for s in suffixes} == {k for k in losses if "_dn" in k}
    for branch in ["attn1", *TEACHER_BRANCHES[ks_mode]]:
        mine = ["", "_0", "_1"] if branch == "attn1" else [f"_{branch}"]
        expected = sum(w * (losses[c + s] + losses[f"{c}_dn{s}"]) for c, w in DN_LOSS_WEIGHTS.items() for s in mine)
        torch.testing.assert_close(losses[f"loss_{branch}"], expected)


def check_no_dn_queries_outside_training_or_without_boxes(variant, **model):
    """No DN queries at evaluation or for a batch without boxes (whose loss stays finite); a training
    forward without targets is a clear error."""
    net, criterion = build(variant, "triple", **model)
    images, padding, targets = tiny_batch_two_annotated()
    with torch.no_grad():
        out = net.eval()(images, padding, targets, with_teachers=True)
    assert "dn_meta" not in out and not any(k.startswith("dn_") for k in out)
    no_boxes = [{**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0], "boxes_xyxy": t["boxes_xyxy"][:0]}
                for t in targets]
    out = net.train()(images, padding, no_boxes)
    assert "dn_meta" not in out
    assert torch.isfinite(criterion(out, no_boxes)["loss"])
    with pytest.raises(ValueError, match="denoising"):
        build(variant, **model)[0].train()(images, padding)


def check_matching_queries_never_see_the_dn_queries(variant):
    """With DN queries and the attention mask, the matching part of every output (student layers and
    teachers) is what the model gives without any DN query."""
    net, _ = build(variant, "triple")
    net.train()  # dropout is 0 in both DN families: training forwards are deterministic
    images, padding, targets = tiny_batch_two_annotated()
    with torch.no_grad():
        with_dn = net(images, padding, targets)
        net.denoising.groups = 0
        without = net(images, padding, targets)
    assert "dn_meta" in with_dn and "dn_meta" not in without
    pairs = [(with_dn, without)] + list(zip(with_dn["aux_outputs"], without["aux_outputs"]))
    pairs += [(with_dn["teacher_outputs"][b][0], without["teacher_outputs"][b][0]) for b in ("attn3", "attn2")]
    for a, b in pairs:
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)

def randomise(model, seed):
    """Every floating tensor gets a random value of a sensible scale (no ones, no zeros)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=t.dtype)
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
        elif t.dim() >= 2:
            t.copy_(r / t[0].numel() ** 0.5)
        elif ("norm" in name and name.endswith("weight")) or name.endswith("activation_fn.weight"):
            t.copy_(1.0 + 0.2 * r if "norm" in name else 0.25 + 0.1 * r)
        else:
            t.copy_(0.2 * r)


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=g, dtype=dtype)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.int64)
    pixel_mask[1, 70:] = 0  # image 1 is smaller: padded on the bottom and right
    pixel_mask[1, :, 90:] = 0
    return images * pixel_mask[:, None], pixel_mask
