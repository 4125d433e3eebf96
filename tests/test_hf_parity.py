"""The baselines here are the published architectures: tiny, randomly initialised Hugging Face
transformers ConditionalDetr / DabDetr models (local ResNet-18 backbone config: nothing is downloaded)
are converted with models.convert_hf, and this project's models must give the same logits and boxes,
elementwise, for every decoder layer, from the same pixels.

Needs transformers (a test-only dependency pinned in requirements-test.txt, which `make test`
installs; skipped without it). Every tensor of the Hugging Face
models is randomised first (LayerNorm and BatchNorm statistics included), so that a swapped or
forgotten mapping cannot hide behind default values; and every parameter here is shown to influence
the outputs. Deviations of transformers from the original repositories are documented in
docs/transformers_parity.md; the ones visible in a forward pass are checked here (aux-loss mode of
ConditionalDetr; DabDetr runs in float32 only).
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
transformers = pytest.importorskip("transformers")

from experiments.config import DEFAULTS, merge  # noqa: E402
from models import build_model, is_teacher_parameter  # noqa: E402
from models.convert_hf import ConversionError, load_from_hf, model_config_from_hf  # noqa: E402
from models.layers import inverse_sigmoid  # noqa: E402

from .model_helpers import inputs, randomise  # noqa: E402

NUM_LABELS = 3
HF_CLASSES = {
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection", "d_model"),
    "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection", "hidden_size"),
}
# ConditionalDetr runs in float64 (differences at float64 rounding); transformers' DabDetr cannot:
# its decoder queries are created as float32 zeros and its softmax is forced to float32.
DTYPE = {"conditional_detr": torch.float64, "dab_detr": torch.float32}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def hf_model(variant, seed=0, num_labels=NUM_LABELS, **config):
    config_cls, model_cls, width = (getattr(transformers, n) if i < 2 else n for i, n in enumerate(HF_CLASSES[variant]))
    backbone = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                         layer_type="basic", out_features=["stage4"])  # = torchvision resnet18
    cfg = config_cls(backbone_config=backbone, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=12,
                     num_labels=num_labels, **{width: 32}, **config)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomise(model, seed)
    return model


@torch.no_grad()
def our_model(hf, variant, ks_mode="none", num_classes=NUM_LABELS):
    """This project's model with the Hugging Face model's architecture (its own random init)."""
    model_cfg = model_config_from_hf(hf.config, variant)
    model_cfg["backbone"].update(weights=None, freeze_at=0)
    cfg = merge(DEFAULTS, {"model": {**model_cfg, "ks": {"mode": ks_mode, "teacher_layers": "last"}}}, "hf")
    torch.manual_seed(1)
    return build_model(cfg["model"], num_classes)[0].eval()


def ours_from_hf(hf, variant, ks_mode="none", num_classes=NUM_LABELS, class_index=None):
    model = our_model(hf, variant, ks_mode, num_classes)
    skipped = load_from_hf(model, hf, class_index)
    return model, skipped


@torch.no_grad()
def hf_all_layers(hf, variant, images, pixel_mask):
    """Logits and boxes of every decoder layer, from transformers' own modules and heads."""
    if variant == "conditional_detr":
        out = hf(pixel_values=images, pixel_mask=pixel_mask, output_hidden_states=True)
        # the input of every decoder layer (zeros first, then the un-normalised output of the layer
        # before), then the last layer's output after the decoder's LayerNorm
        states = out.decoder_hidden_states
        assert len(states) == 4 and not states[0].any()
        hidden = torch.stack([hf.model.decoder.layernorm(h) for h in states[1:-1]] + [states[-1]])
        refs = hf.model.decoder.ref_point_head(hf.model.query_position_embeddings.weight).sigmoid()
        offsets = hf.bbox_predictor(hidden)
        boxes = torch.cat([offsets[..., :2] + inverse_sigmoid(refs), offsets[..., 2:]], -1).sigmoid()
        logits = hf.class_labels_classifier(hidden)
    else:
        out = hf(pixel_values=images, pixel_mask=pixel_mask)
        base = hf.model(pixel_values=images, pixel_mask=pixel_mask)
        logits = hf.class_embed(base.intermediate_hidden_states)
        boxes = (hf.bbox_predictor(base.intermediate_hidden_states) + inverse_sigmoid(base.reference_points)).sigmoid()
    # transformers' own last-layer outputs are the last of these
    torch.testing.assert_close(logits[-1], out.logits, rtol=0, atol=1e-12 if images.dtype == torch.float64 else 1e-6)
    torch.testing.assert_close(boxes[-1], out.pred_boxes, rtol=0, atol=1e-12 if images.dtype == torch.float64 else 1e-6)
    return logits, boxes


def our_all_layers(model, images, pixel_mask, targets=None):
    with torch.no_grad():
        out = model(images, pixel_mask == 0, targets, with_teachers=True if targets is not None else None)
    layers = out["aux_outputs"] + [out]
    return torch.stack([o["pred_logits"] for o in layers]), torch.stack([o["pred_boxes"] for o in layers]), out


@pytest.mark.parametrize("variant", sorted(HF_CLASSES))
@pytest.mark.parametrize("ks_mode", ["none", "triple"])
def test_logits_and_boxes_match_transformers(variant, ks_mode):
    dtype = DTYPE[variant]
    hf = hf_model(variant).to(dtype)
    model, skipped = ours_from_hf(hf, variant, ks_mode)
    model.to(dtype)
    images, pixel_mask = inputs(dtype)
    hf_logits, hf_boxes = hf_all_layers(hf, variant, images, pixel_mask)
    logits, boxes, _ = our_all_layers(model, images, pixel_mask)
    assert logits.shape == hf_logits.shape == (3, 2, 12, NUM_LABELS)
    assert hf_logits.abs().max() > 0.5 and hf_boxes.std() > 0.05  # outputs are not trivially flat
    tol = TOL[dtype]
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=tol)
    torch.testing.assert_close(boxes, hf_boxes, rtol=0, atol=tol)
    print(f"{variant} {ks_mode} {dtype}: max |diff| logits {(logits - hf_logits).abs().max():.3g}, "
          f"boxes {(boxes - hf_boxes).abs().max():.3g}")
    if variant == "dab_detr":
        # the tied copy of the box head; transformers 5 leaves tied tensors out of state_dict()
        assert hf.model.decoder.bbox_embed.layers[0].weight is hf.bbox_predictor.layers[0].weight
        assert set(skipped) <= {f"model.decoder.bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    else:
        assert skipped == {}


@pytest.mark.parametrize("variant", sorted(HF_CLASSES))
def test_every_converted_parameter_shapes_the_outputs(variant):
    """A parity that some parameter does not influence proves nothing about that parameter."""
    hf = hf_model(variant)
    model, _ = ours_from_hf(hf, variant)
    images, pixel_mask = inputs(torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(images, pixel_mask == 0)
    g = torch.Generator().manual_seed(3)
    total = sum((o["pred_logits"] * torch.randn(o["pred_logits"].shape, generator=g)).sum()
                + (o["pred_boxes"] * torch.randn(o["pred_boxes"].shape, generator=g)).sum()
                for o in out["aux_outputs"] + [out])
    total.backward()
    # the first decoder layer's content query is zeros (as in the original models), so the weights
    # that multiply it get exactly zero gradient; their biases still count
    zero_input = {f"decoder.layers.0.{n}.weight" for n in ("sa_q_content", "sa_k_content", "sa_v")}
    for name, p in model.named_parameters():
        if name in zero_input:
            assert p.grad is not None and not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    buffers = [n for n, _ in model.named_buffers()]
    assert len(buffers) > 0 and all(n.startswith("backbone.") for n in buffers)  # frozen BN statistics only


def test_class_index_selects_this_projects_classes():
    """COCO checkpoints have 91 outputs indexed by category id; here classes are contiguous."""
    hf = hf_model("conditional_detr", num_labels=6).double()
    index = [5, 0, 3]
    model, _ = ours_from_hf(hf, "conditional_detr", num_classes=3, class_index=index)
    images, pixel_mask = inputs(torch.float64)
    hf_logits, hf_boxes = hf_all_layers(hf, "conditional_detr", images, pixel_mask)
    logits, boxes, _ = our_all_layers(model.double(), images, pixel_mask)
    torch.testing.assert_close(logits, hf_logits[..., index], rtol=0, atol=1e-10)
    torch.testing.assert_close(boxes, hf_boxes, rtol=0, atol=1e-10)
    with pytest.raises(ConversionError, match="shape"):
        ours_from_hf(hf, "conditional_detr", num_classes=3)


def test_conditional_detr_auxiliary_loss_mode_deviates():
    """transformers' ConditionalDetr with auxiliary_loss=True feeds each decoder layer the LayerNorm'd
    output of the previous one (the original repository, and this project, feed the un-normalised
    output). The first layer still agrees; the later ones do not. That is why the parity runs with
    auxiliary_loss=False (transformers' default), where it follows the original."""
    hf = hf_model("conditional_detr", auxiliary_loss=True).double()
    model, _ = ours_from_hf(hf, "conditional_detr")
    images, pixel_mask = inputs(torch.float64)
    with torch.no_grad():
        hidden = hf.model(pixel_values=images, pixel_mask=pixel_mask).intermediate_hidden_states
        hf_logits = hf.class_labels_classifier(hidden)
    logits, _, _ = our_all_layers(model.double(), images, pixel_mask)
    torch.testing.assert_close(logits[0], hf_logits[0], rtol=0, atol=1e-10)
    assert (logits[1:] - hf_logits[1:]).abs().amax() > 1e-3


def test_training_time_differences_of_transformers_are_as_documented():
    """Training-only deviations (see docs/transformers_parity.md): transformers' non-timm ConditionalDetr
    backbone freezes every parameter, DabDetr's none; the authors' code freezes the stem only."""
    cond, dab = hf_model("conditional_detr"), hf_model("dab_detr")
    assert not any(p.requires_grad for p in cond.model.backbone.parameters())
    assert all(p.requires_grad for p in dab.model.backbone.parameters())
    assert transformers.DabDetrConfig().dropout == 0.1  # the DAB reference: 0.0


def test_converter_refuses_what_it_cannot_represent():
    hf = hf_model("dab_detr")
    hf.model.decoder.bbox_embed = copy.deepcopy(hf.bbox_predictor)  # untie the two box heads
    with torch.no_grad():
        hf.model.decoder.bbox_embed.layers[0].weight.add_(1.0)
    with pytest.raises(ConversionError, match="shares one box head"):
        ours_from_hf(hf, "dab_detr")
    with pytest.raises(ConversionError, match="num_patterns"):
        model_config_from_hf(transformers.DabDetrConfig(num_patterns=3, backbone_config=hf.config.backbone_config),
                             "dab_detr")
    bottleneck_in_stride = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                                     hidden_sizes=[256, 512, 1024, 2048], downsample_in_bottleneck=True)
    with pytest.raises(ConversionError, match="v1.5"):
        model_config_from_hf(transformers.ConditionalDetrConfig(backbone_config=bottleneck_in_stride), "conditional_detr")
    resnet50 = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])
    cfg = model_config_from_hf(transformers.ConditionalDetrConfig(backbone_config=resnet50), "conditional_detr")
    assert cfg["backbone"]["name"] == "resnet50" and cfg["hidden_dim"] == 256 and cfg["pos_temperature"] == 10000


def test_teacher_parameters_keep_their_own_initialisation():
    hf = hf_model("dab_detr")
    model, _ = ours_from_hf(hf, "dab_detr", "triple")
    fresh = our_model(hf, "dab_detr", "triple").state_dict()  # the same seed, not converted
    teacher = [n for n in fresh if is_teacher_parameter(n)]
    assert teacher and all(torch.equal(model.state_dict()[n], fresh[n]) for n in teacher)
    assert not torch.equal(model.state_dict()["class_embed.weight"], fresh["class_embed.weight"])
