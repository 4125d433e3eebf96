"""Deformable-DETR here is the published architecture: tiny, randomly initialised Hugging Face
transformers DeformableDetr models (local ResNet-18 backbone config taking three stages, 4 feature
levels: nothing is downloaded) are converted with models.convert_hf, and this project's model must give
the same logits and boxes, elementwise, for every decoder layer, from the same pixels, in float64;
without box refinement (the Deformable-DETR rows) and with it. And the op: this project's PyTorch path
of MSDeformAttn (models.ops.ms_deform_attn) equals transformers' multi-scale deformable attention
function, forward and gradients.

Needs transformers (a test-only dependency pinned in requirements-test.txt, which `make test`
installs; skipped without it). Every tensor of the Hugging Face
models is randomised first (GroupNorm/LayerNorm/BatchNorm statistics and the MSDA linears included).
Heads (8), levels (4) and points (3) differ, so that a swapped axis cannot pass. Deviations of
transformers from the original repository are documented in docs/transformers_parity.md; the ones that show
in code are checked here.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
transformers = pytest.importorskip("transformers")
from transformers.models.deformable_detr import modeling_deformable_detr as hf_deformable  # noqa: E402

from experiments.config import DEFAULTS, merge  # noqa: E402
from models import build_model, is_teacher_parameter  # noqa: E402
from models.convert_hf import ConversionError, load_from_hf, model_config_from_hf  # noqa: E402
from models.ops.ms_deform_attn import ms_deform_attn_pytorch  # noqa: E402

from .model_helpers import inputs, randomise  # noqa: E402

NUM_LABELS = 3
DEC_LAYERS = 3
TOL = 1e-10  # float64


def resnet18_config(out_features=("stage2", "stage3", "stage4")):
    return transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                     layer_type="basic", out_features=list(out_features))  # = torchvision resnet18


def hf_config(box_refine=False, **config):
    values = dict(backbone_config=resnet18_config(), d_model=32, encoder_layers=2, decoder_layers=DEC_LAYERS,
                  encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_queries=12, num_labels=NUM_LABELS, num_feature_levels=4, encoder_n_points=3,
                  decoder_n_points=3, with_box_refine=box_refine)
    return transformers.DeformableDetrConfig(**{**values, **config})


def hf_model(box_refine=False, seed=0, **config):
    torch.manual_seed(seed)
    model = transformers.DeformableDetrForObjectDetection(hf_config(box_refine, **config)).eval()
    randomise(model, seed)
    return model


def our_model(hf, ks_mode="none"):
    """This project's model with the Hugging Face model's architecture (its own random init)."""
    model_cfg = model_config_from_hf(hf.config, "deformable_detr")
    model_cfg["backbone"].update(weights=None, freeze_at=0)
    cfg = merge(DEFAULTS, {"model": {**model_cfg, "ks": {"mode": ks_mode, "teacher_layers": "last"}}}, "hf")
    torch.manual_seed(1)
    return build_model(cfg["model"], NUM_LABELS)[0].eval()


def ours_from_hf(hf, ks_mode="none"):
    """This project's model with the Hugging Face model's architecture and weights."""
    model = our_model(hf, ks_mode)
    skipped = load_from_hf(model, hf)
    return model, skipped


@torch.no_grad()
def hf_all_layers(hf, images, pixel_mask):
    """Logits and boxes of every decoder layer, from transformers' own heads and references (as its
    forward computes them for the auxiliary losses)."""
    out = hf(pixel_values=images, pixel_mask=pixel_mask)
    hidden = out.intermediate_hidden_states
    logits, boxes = [], []
    for i in range(hidden.shape[1]):
        ref = out.init_reference_points if i == 0 else out.intermediate_reference_points[:, i - 1]
        delta = hf.bbox_embed[i](hidden[:, i])
        if ref.shape[-1] == 4:
            box = delta + hf_deformable.inverse_sigmoid(ref)
        else:
            box = torch.cat([delta[..., :2] + hf_deformable.inverse_sigmoid(ref), delta[..., 2:]], -1)
        logits.append(hf.class_embed[i](hidden[:, i]))
        boxes.append(box.sigmoid())
    logits, boxes = torch.stack(logits), torch.stack(boxes)
    torch.testing.assert_close(logits[-1], out.logits, rtol=0, atol=1e-12)  # transformers' own outputs
    torch.testing.assert_close(boxes[-1], out.pred_boxes, rtol=0, atol=1e-12)
    return logits, boxes


def our_all_layers(model, images, pixel_mask):
    with torch.no_grad():
        out = model(images, pixel_mask == 0)
    layers = out["aux_outputs"] + [out]
    return torch.stack([o["pred_logits"] for o in layers]), torch.stack([o["pred_boxes"] for o in layers])


@pytest.mark.parametrize("box_refine,ks_mode", [(False, "none"), (False, "triple"), (True, "none")])
def test_logits_and_boxes_match_transformers(box_refine, ks_mode):
    hf = hf_model(box_refine).double()
    model, skipped = ours_from_hf(hf, ks_mode)
    model.double()
    images, pixel_mask = inputs(torch.float64)
    hf_logits, hf_boxes = hf_all_layers(hf, images, pixel_mask)
    logits, boxes = our_all_layers(model, images, pixel_mask)
    assert logits.shape == hf_logits.shape == (DEC_LAYERS, 2, 12, NUM_LABELS)
    assert hf_logits.abs().max() > 0.5 and hf_boxes.std() > 0.05  # outputs are not trivially flat
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=TOL)
    torch.testing.assert_close(boxes, hf_boxes, rtol=0, atol=TOL)
    print(f"deformable_detr box_refine={box_refine} {ks_mode} float64: max |diff| logits "
          f"{(logits - hf_logits).abs().max():.3g}, boxes {(boxes - hf_boxes).abs().max():.3g}")
    # only tied copies are skipped, each checked equal to its original
    assert skipped and all(reason.startswith("tied to ") for reason in skipped.values())
    if ks_mode != "none":  # the teacher-only parameters keep their own initialisation
        fresh = our_model(hf, ks_mode).state_dict()  # the same seed, not converted
        teacher = [n for n in fresh if is_teacher_parameter(n)]
        assert teacher and all(torch.equal(model.state_dict()[n], fresh[n].double()) for n in teacher)


def test_every_converted_parameter_shapes_the_outputs():
    """A parity that some parameter does not influence proves nothing about that parameter."""
    hf = hf_model()
    model, _ = ours_from_hf(hf)
    images, pixel_mask = inputs(torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(images, pixel_mask == 0)
    g = torch.Generator().manual_seed(3)
    total = sum((o["pred_logits"] * torch.randn(o["pred_logits"].shape, generator=g)).sum()
                + (o["pred_boxes"] * torch.randn(o["pred_boxes"].shape, generator=g)).sum()
                for o in out["aux_outputs"] + [out])
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    buffers = [n for n, _ in model.named_buffers()]
    assert len(buffers) > 0 and all(n.startswith("backbone.") for n in buffers)  # frozen BN statistics only


def msda_inputs(dtype=torch.float64, seed=0, N=2, Lq=7, M=3, D=5, P=2, shapes=((6, 4), (3, 2), (1, 1))):
    """Random op inputs; some sampling locations fall outside the maps (zero padding)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    L = len(shapes)
    value = torch.randn(N, int(sizes.sum()), M, D, generator=g, dtype=dtype)
    locations = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype) + 1e-5
    weights = weights / weights.sum((-2, -1), keepdim=True)
    return value, spatial_shapes, starts, locations, weights


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_pytorch_op_path_matches_transformers_function(dtype, tol):
    value, shapes, starts, locations, weights = msda_inputs(dtype)
    grads = torch.randn(2, 7, 15, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for op in ("ours", "transformers"):
        leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        if op == "ours":
            out = ms_deform_attn_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
        else:
            out = hf_deformable.MultiScaleDeformableAttention()(
                leaves[0], shapes, [tuple(s) for s in shapes.tolist()], starts, leaves[1], leaves[2], 64)
        (out * grads).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)
    assert (locations < 0).any() and (locations > 1).any()  # the zero padding is exercised too


def test_transformers_ties_the_class_heads_of_a_refinement_model():
    """transformers' deviation: with box refinement the original (and detrex) clone the class head
    per decoder layer; transformers ties them all to the first. Converted, the per-layer heads here
    are separate modules with equal weights."""
    hf = hf_model(box_refine=True)
    assert hf.class_embed[1].weight is hf.class_embed[0].weight
    assert hf.bbox_embed[1].layers[0].weight is not hf.bbox_embed[0].layers[0].weight  # per-layer box heads
    assert hf.model.decoder.bbox_embed[1].layers[0].weight is hf.bbox_embed[1].layers[0].weight
    model, skipped = ours_from_hf(hf)
    assert model.class_embed[1].weight is not model.class_embed[0].weight
    assert torch.equal(model.class_embed[1].weight, model.class_embed[0].weight)
    assert {k for k in skipped if k.startswith("class_embed.")} == {f"class_embed.{i}.{p}" for i in (1, 2)
                                                                  for p in ("weight", "bias")}


def test_transformers_drops_the_encoder_input_in_training():
    """transformers' deviation (training only): dropout on the encoder's input features; the
    original and the authors' code feed them unchanged, as here."""
    hf = hf_model(dropout=0.5)
    seen = {}
    hf.model.encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]),
                                               with_kwargs=True)
    hf.model.encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.update(layer0=args[0]))
    images, pixel_mask = inputs(torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        hf.train()(pixel_values=images, pixel_mask=pixel_mask)
    kept = seen["layer0"] != 0
    assert (~kept).float().mean() > 0.3  # about half of the features dropped
    torch.testing.assert_close(seen["layer0"][kept], seen["embeds"][kept] / 0.5)

    model, _ = ours_from_hf(hf)
    model.train()
    model.encoder.register_forward_pre_hook(lambda m, args: seen.update(ours_embeds=args[0]))
    model.encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.update(ours_layer0=args[0]))
    with torch.no_grad():
        model.encode(images, pixel_mask == 0, None, teachers=False)
    assert seen["ours_layer0"] is seen["ours_embeds"]


def test_training_time_settings_of_transformers_are_as_documented():
    """transformers' non-timm ResNet backbone is frozen completely (the authors' code: stem only), and its
    decoder self-attention weights get `attention_dropout`, 0.0 by default (the authors' code: 0.1)."""
    hf = hf_model()
    assert not any(p.requires_grad for p in hf.model.backbone.parameters())
    assert transformers.DeformableDetrConfig().attention_dropout == 0.0
    assert hf.model.decoder.layers[0].self_attn.attention_dropout == 0.0


def test_converter_refuses_what_it_cannot_represent():
    hf = hf_model()
    hf.class_embed[1] = copy.deepcopy(hf.class_embed[0])  # untie one layer's class head
    with torch.no_grad():
        hf.class_embed[1].weight.add_(1.0)
    with pytest.raises(ConversionError, match="shares one class head"):
        ours_from_hf(hf)
    with pytest.raises(ConversionError, match="two_stage"):
        model_config_from_hf(hf_config(True, two_stage=True), "deformable_detr")
    with pytest.raises(ConversionError, match="n_points"):
        model_config_from_hf(hf_config(decoder_n_points=2), "deformable_detr")
    wrong_stages = hf_config()
    wrong_stages.backbone_config = resnet18_config(("stage3", "stage4"))
    with pytest.raises(ConversionError, match="backbone stages"):
        model_config_from_hf(wrong_stages, "deformable_detr")
    cfg = model_config_from_hf(hf_config(), "deformable_detr")
    assert cfg["deformable"] == {"num_levels": 4, "n_points": 3, "box_refine": False}
    assert (cfg["pos_temperature"], cfg["pos_offset"], cfg["backbone"]["name"]) == (10000, -0.5, "resnet18")


def test_the_step_benchmark_against_transformers_runs_on_the_same_model(capsys):
    from benchmarks import vs_transformers
    vs_transformers.main(["--small", "--size", "64", "--repeats", "1", "--pytorch-path"])
    out = capsys.readouterr().out
    difference = float(out.split("differ by at most ")[1].split()[0])
    assert difference < 1e-4  # float32; the parity test above holds it to 1e-10 in float64
    assert "train step" in out and "inference" in out and out.count("ours / transformers") == 2
    assert out.count(f"{vs_transformers.PYTORCH_PATH} ") == 2 and out.count("ours / it") == 2
    vs_transformers.main(["--small", "--size", "64", "--repeats", "1", "--profile"])
    out = capsys.readouterr().out
    assert "ours, one whole training step" in out and "transformers, one whole training step" in out
