"""DN-Deformable-DETR with every KS mode: forward/backward with DN losses on every output that gets a
loss (teachers included), teacher removal at inference, the DN attention mask at work, iterative box
refinement with per-layer heads, and queries as the authors' code (learned content + indicator, learned
4-d anchors, positional queries from the anchors)."""
import pytest
import torch

from models.denoising import dn_attention_mask
from models.layers import box_sine_embedding, inverse_sigmoid

from .model_helpers import (KS_MODES, build, check_dn_train_step, check_matching_queries_never_see_the_dn_queries,
                            check_no_dn_queries_outside_training_or_without_boxes, check_teacher_removal,
                            tiny_batch, tiny_batch_two_annotated)

VARIANT = "dn_deformable_detr"
FROZEN_BACKBONE = {"backbone": {"name": "resnet18", "weights": None, "freeze_at": 5}}  # faster backward


@pytest.mark.parametrize("ks_mode", KS_MODES)
def test_train_step_with_dn_losses_on_every_output(ks_mode):
    check_dn_train_step(VARIANT, ks_mode, **FROZEN_BACKBONE)


@pytest.mark.parametrize("ks_mode", KS_MODES[1:])
def test_teacher_removal_is_exact_at_inference(ks_mode):
    check_teacher_removal(VARIANT, ks_mode)


def test_no_dn_queries_outside_training_or_without_boxes():
    check_no_dn_queries_outside_training_or_without_boxes(VARIANT, **FROZEN_BACKBONE)


def test_matching_queries_never_see_the_dn_queries():
    check_matching_queries_never_see_the_dn_queries(VARIANT)


def decoder_run(model, images, padding, targets=None):
    """(outputs, hidden states, references each layer started from, queries) of one forward."""
    with torch.no_grad():
        enc = model.encode(images, padding, targets, teachers=False)
        torch.manual_seed(0)
        content, query_pos, refs, attn_mask, dn = model.queries(images.shape[0], targets)
        hidden, starts = model.decoder(content, query_pos, refs, enc.memory, enc.padding_mask, enc.spatial_shapes,
                                       enc.level_start_index, enc.valid_ratios, model.bbox_embed, attn_mask)
    return enc, hidden, starts, (content, refs, attn_mask, dn)


def test_dn_groups_never_see_each_other():
    """Changing the queries of one DN group changes that group's outputs only."""
    model, _ = build(VARIANT)
    model.train()
    images, padding, targets = tiny_batch_two_annotated()
    enc, hidden, _, (content, refs, attn_mask, dn) = decoder_run(model, images, padding, targets)
    assert torch.equal(attn_mask, dn_attention_mask(5, 3, 12))
    S = dn.single_pad
    changed_content, changed_refs = content.clone(), refs.clone()
    changed_content[:, 2 * S:3 * S] += 1.0  # group 2
    changed_refs[:, 2 * S:3 * S] = (changed_refs[:, 2 * S:3 * S] - 0.1).clamp(0.05, 0.95)
    with torch.no_grad():
        changed, _ = model.decoder(changed_content, None, changed_refs, enc.memory, enc.padding_mask,
                                   enc.spatial_shapes, enc.level_start_index, enc.valid_ratios, model.bbox_embed,
                                   attn_mask)
    same = torch.ones(content.shape[1], dtype=torch.bool)
    same[2 * S:3 * S] = False
    for a, b in zip(hidden, changed):
        torch.testing.assert_close(a[:, same], b[:, same], rtol=1e-5, atol=1e-5)
        assert (a[:, ~same] - b[:, ~same]).abs().amax() > 1e-2


def test_iterative_box_refinement_with_per_layer_heads():
    model, _ = build(VARIANT)
    assert len(model.class_embed) == len(model.bbox_embed) == 3
    assert len({id(p) for head in model.class_embed for p in head.parameters()}) == 6  # no sharing
    with torch.no_grad():  # non-zero box deltas, different per layer (their init is zero)
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.2)
    model.eval()
    images, padding, _ = tiny_batch()
    _, hidden, starts, (_, refs, _, _) = decoder_run(model, images, padding)
    with torch.no_grad():
        out = model(images, padding)
    torch.testing.assert_close(starts[0], model.refpoint_embed.weight.sigmoid().expand(2, -1, -1))
    layers = out["aux_outputs"] + [out]
    for i, layer in enumerate(layers):
        refined = (model.bbox_embed[i](hidden[i]) + inverse_sigmoid(starts[i])).sigmoid()
        torch.testing.assert_close(layer["pred_boxes"], refined, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer["pred_logits"], model.class_embed[i](hidden[i]), rtol=0, atol=1e-6)
        if i + 1 < len(layers):  # the next layer starts from this layer's box
            torch.testing.assert_close(starts[i + 1], refined, rtol=0, atol=1e-6)
            assert (starts[i + 1] - starts[i]).abs().amax() > 1e-3
    # ... detached: no gradient flows into a layer's reference from the layers before
    model.train()
    images, padding, targets = tiny_batch_two_annotated()
    enc = model.encode(images, padding, targets, teachers=False)
    content, _, refs, attn_mask, _ = model.queries(2, targets)
    _, starts = model.decoder(content, None, refs, enc.memory, enc.padding_mask, enc.spatial_shapes,
                              enc.level_start_index, enc.valid_ratios, model.bbox_embed, attn_mask)
    assert starts[0].requires_grad and not any(s.requires_grad for s in starts[1:])


def test_queries_and_positional_queries():
    model, _ = build(VARIANT)
    with torch.no_grad():
        content, query_pos, refs, attn_mask, dn = model.eval().queries(2, None)
    assert query_pos is None and attn_mask is None and dn is None
    # matching content: the learned embedding (d - 1) plus indicator 0; 4-d learned anchors
    expected = torch.cat([model.tgt_embed.weight, torch.zeros(12, 1)], -1)
    torch.testing.assert_close(content, expected.expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(refs, model.refpoint_embed.weight.sigmoid().expand(2, -1, -1), rtol=0, atol=0)
    assert model.refpoint_embed.weight.requires_grad
    # the first box head starts with box size logits of -2 (detrex), the others with zeros
    assert torch.equal(model.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert not model.bbox_embed[1].layers[-1].bias.any()
    # positional query of layer i: ref_point_head(sine(level-0 scaled box)), times query_scale(content) after layer 0
    dec = model.decoder
    ref_input = torch.rand(2, 12, 4, 4)
    tgt = torch.randn(2, 12, 32)
    with torch.no_grad():
        raw = dec.ref_point_head(box_sine_embedding(ref_input[:, :, 0], 16, temperature=10000))
        torch.testing.assert_close(dec.layer_query_pos(0, tgt, ref_input, None), raw, rtol=0, atol=0)
        torch.testing.assert_close(dec.layer_query_pos(1, tgt, ref_input, None), dec.query_scale(tgt) * raw,
                                   rtol=0, atol=0)
