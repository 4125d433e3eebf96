"""Conditional-DETR with every KS mode: forward/backward, teacher removal at inference, and the
family's architecture details (shared reference points, conditional decoder layer shared with DAB).
The published architecture itself is checked against transformers in tests/test_hf_parity.py."""
import pytest
import torch

from models.conditional_detr import ConditionalDecoderLayer
from models.dab_detr import DABDecoderLayer
from models.layers import inverse_sigmoid

from .model_helpers import KS_MODES, build, check_teacher_removal, check_train_step, tiny_batch

VARIANT = "conditional_detr"
FROZEN_BACKBONE = {"backbone": {"name": "resnet18", "weights": None, "freeze_at": 5}}  # faster backward


@pytest.mark.parametrize("ks_mode", KS_MODES)
def test_train_step(ks_mode):
    out, losses = check_train_step(VARIANT, ks_mode, **FROZEN_BACKBONE)
    assert "dn_meta" not in out and not any("_dn" in k for k in losses)


def test_train_step_trains_the_backbone_but_its_stem():
    check_train_step(VARIANT, "triple", backbone={"name": "resnet18", "weights": None, "freeze_at": 1})


@pytest.mark.parametrize("ks_mode", KS_MODES[1:])
def test_teacher_removal_is_exact_at_inference(ks_mode):
    check_teacher_removal(VARIANT, ks_mode)


def test_family_settings_are_used():
    model, criterion = build(VARIANT)
    assert criterion.weights["loss_class"] == 2.0
    assert model.position.temperature == 10000
    layer = model.decoder.layers[0]
    assert layer.dropout == 0.1 and layer.ffn_dropout1.p == 0.1
    assert isinstance(layer.activation, torch.nn.ReLU)
    assert model.encoder.layers[0].self_attn.dropout == 0.1


def test_dab_uses_the_conditional_decoder_layer():
    assert DABDecoderLayer is ConditionalDecoderLayer
    model, _ = build(VARIANT)
    # only the first layer adds the positional query to the cross-attention query
    assert [layer.ca_q_pos is not None for layer in model.decoder.layers] == [True, False, False]


def test_one_reference_point_per_query_shared_by_all_layers():
    model, _ = build(VARIANT)
    with torch.no_grad():  # box head outputs zero offsets: every layer's box centre is the reference
        model.bbox_embed.layers[-1].weight.zero_()
        model.bbox_embed.layers[-1].bias.zero_()
    images, padding, _ = tiny_batch()
    out = model.eval()(images, padding)
    refs = model.decoder.ref_point_head(model.query_embed.weight).sigmoid()
    for layer in out["aux_outputs"] + [out]:
        torch.testing.assert_close(layer["pred_boxes"][..., :2], refs.expand(2, -1, -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(layer["pred_boxes"][..., 2:], torch.full_like(refs, 0.5).expand(2, -1, -1))
    # the reference point moves the predicted centre by its logit, not its sigmoid
    with torch.no_grad():
        model.bbox_embed.layers[-1].bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    out = model(images, padding)
    expected = (inverse_sigmoid(refs) + torch.tensor([0.3, -0.2])).sigmoid()
    torch.testing.assert_close(out["pred_boxes"][..., :2], expected.expand(2, -1, -1), rtol=0, atol=1e-6)


def test_dropout_acts_in_training_only():
    model, _ = build(VARIANT)
    images, padding, targets = tiny_batch()
    with torch.no_grad():
        a, b = (model.train()(images, padding, targets)["pred_logits"] for _ in range(2))
        c, d = (model.eval()(images, padding)["pred_logits"] for _ in range(2))
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)
