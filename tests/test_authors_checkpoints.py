"""The KS-DETR authors' checkpoints in this project (models/convert_ksdetr.py, `import-weights`),
against outputs of the authors' own code (tests/fixtures/authors/README.md): for six models, tiny
randomly initialised ones saved by the authors' checkpointer, the converted model's every student
decoder layer, the teachers' last layer, the GT token mask, the padding masks, the encoder memories
and the final detections equal the authors'; the full-size key listings of the released
architectures map onto the Table 1 rows; and bad checkpoints get named errors."""
import copy
import json

import pytest
import torch
import yaml

from experiments import checkpoints
from experiments.__main__ import main
from experiments.build import model_config
from experiments.config import DEFAULTS, Manifest, merge
from experiments.errors import RunError
from experiments.checkpoints import load_checkpoint
from models import backbone, build_model, model_targets
from models import ks_encoder as ks
from models.convert_hf import ConversionError
from models.convert_ksdetr import convert, describe, read_checkpoint
from models.postprocess import postprocess

from .authors_helpers import FIXTURES, KS_MODELS, MODELS, NUM_CLASSES, TINY, TINY_BACKBONE, import_argv

pytestmark = pytest.mark.usefixtures("tiny_backbone")  # conftest.py: the fixtures' backbone

def tiny_config(mid, **changes):
    cfg = merge(DEFAULTS, {"model": {**copy.deepcopy(TINY), **copy.deepcopy(MODELS[mid][0])}}, "test")
    cfg = merge(cfg, {"model": changes}, "test changes")["model"]
    cfg["backbone"]["name"] = TINY_BACKBONE
    return cfg


def reference(mid):
    return torch.load(FIXTURES / f"{mid}_reference.pt", weights_only=True)


def converted_model(mid, **changes):
    torch.manual_seed(0)
    model, _ = build_model(tiny_config(mid, **changes), NUM_CLASSES)
    weights, _ = convert(read_checkpoint(FIXTURES / f"{mid}_state_dict.pth"), model.state_dict(), mid)
    model.load_state_dict(weights)
    return model.eval()


def batch(ref):
    """The authors' padded batch (already normalised), its padding mask and model targets."""
    images = ref["images_tensor"]
    mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    targets = []
    for i, (h, w) in enumerate(ref["image_sizes"]):
        mask[i, :h, :w] = False
        targets.append({"boxes": ref["gt_boxes_xyxy_abs"][i].float(), "labels": ref["gt_classes"][i],
                        "size": torch.tensor([h, w])})
    return images, mask, model_targets(targets)


@torch.no_grad()
def run(mid, **changes):
    """The converted model on the authors' batch: its output dict, with what it computed on the
    way (`position_masks`: the masks of the sine encodings; `fg`: the KS layer's token mask;
    `memory`, `teacher_memories`: the encoder's outputs)."""
    model = converted_model(mid, **changes)
    seen = {"position_masks": []}
    hooks = [model.position.register_forward_pre_hook(lambda m, args: seen["position_masks"].append(args[0])),
             model.encoder.register_forward_hook(lambda m, args, out: seen.update(memory=out[0],
                                                                                   teacher_memories=out[1]))]
    for layer in model.encoder.modules():
        if isinstance(layer, ks.KS_LAYERS):
            hooks.append(layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(fg=kwargs["fg"]),
                                                         with_kwargs=True))
    images, mask, targets = batch(reference(mid))
    out = model(images, mask, targets, with_teachers=model.ks_mode != "none" or None)
    for h in hooks:
        h.remove()
    return out, seen


_RUNS = {}


def authors_run(mid):
    if mid not in _RUNS:
        _RUNS[mid] = run(mid)
    return _RUNS[mid]


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def student_layers(out):
    return out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]


# --------------------------------------------------------------------------------------------------
# Outputs of the authors' code

@pytest.mark.parametrize("mid", MODELS)
def test_every_student_decoder_layer_equals_the_authors(mid):
    out, _ = authors_run(mid)
    ref = reference(mid)
    layers = student_layers(out)
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        close(layer["pred_logits"], ref["all_pred_logits"][i], f"{mid} student layer {i} logits")
        close(layer["pred_boxes"], ref["all_pred_boxes"][i], f"{mid} student layer {i} boxes")
    # what the authors' evaluation picks (ksgt.eval_decoder_layer) is the student's last layer, ours
    close(out["pred_logits"], ref["eval_pred_logits"], f"{mid} evaluated logits")
    close(out["pred_boxes"], ref["eval_pred_boxes"], f"{mid} evaluated boxes")


@pytest.mark.parametrize("mid", KS_MODELS)
def test_the_teachers_last_layer_equals_the_authors_given_the_same_gt(mid):
    out, _ = authors_run(mid)
    ref = reference(mid)
    # the authors' rows after the student's: feat_t = [A^t V (attn3), A V^t (attn2)]
    for row, branch in enumerate(ks.TEACHER_BRANCHES["triple"], start=2):
        teacher = out["teacher_outputs"][branch][-1]
        close(teacher["pred_logits"], ref["all_pred_logits"][row], f"{mid} {branch} logits")
        close(teacher["pred_boxes"], ref["all_pred_boxes"][row], f"{mid} {branch} boxes")


@pytest.mark.parametrize("mid", KS_MODELS)
def test_the_gt_token_mask_equals_the_authors(mid):
    _, seen = authors_run(mid)
    fg_gt = reference(mid)["ksgt_targets"]["fg_gt"]  # (tokens, B), 1 = foreground
    assert fg_gt.sum() > 0 and (fg_gt == 0).any()
    assert torch.equal(seen["fg"], fg_gt.T.bool())


@pytest.mark.parametrize("mid", MODELS)
def test_the_padding_masks_and_encoder_memories_equal_the_authors(mid):
    _, seen = authors_run(mid)
    ref = reference(mid)
    expected = ([torch.zeros_like(m) for m in ref["feature_masks"]] if tiny_config(mid)["eval_padding"] == "none"
                else ref["feature_masks"])
    assert len(seen["position_masks"]) == len(expected)
    for ours, theirs in zip(seen["position_masks"], expected):
        assert torch.equal(ours, theirs)
    batch_first = (lambda t: t) if "deformable" in mid else (lambda t: t.transpose(0, 1))
    enc = ref["encoder_output"]
    close(seen["memory"], batch_first(enc["memory"]), f"{mid} encoder memory")
    if mid in KS_MODELS:
        for branch, theirs in zip(ks.TEACHER_BRANCHES["triple"], enc["layers"][-1]["feat_t"]):
            close(seen["teacher_memories"][branch], batch_first(theirs), f"{mid} {branch} memory")


@pytest.mark.parametrize("mid", MODELS)
def test_the_final_detections_equal_the_authors(mid):
    out, _ = authors_run(mid)
    ref = reference(mid)
    sizes = torch.tensor(ref["image_sizes"])
    ours = postprocess(out["pred_logits"], out["pred_boxes"], sizes, TINY["eval_topk"], clip=True)
    for i, (det, theirs) in enumerate(zip(ours, ref["detections"])):
        assert torch.equal(det["labels"], theirs["classes"]), (mid, i)
        close(det["scores"], theirs["scores"], f"{mid} image {i} scores")
        torch.testing.assert_close(det["boxes"], theirs["boxes_xyxy"], rtol=1e-5, atol=1e-4)


def test_the_authors_behaviours_are_needed_to_match():
    """Each switch changes the outputs on the fixtures' batch: with this project's defaults (exact
    eval padding, masked decoder cross-attention, unclipped boxes) they differ from the authors'."""
    def largest_difference(mid, **changes):
        out, _ = run(mid, **changes)
        ref = reference(mid)
        return max((layer[f"pred_{k}"] - ref[f"all_pred_{k}"][i]).abs().max().item()
                   for i, layer in enumerate(student_layers(out)) for k in ("logits", "boxes"))

    assert largest_difference("ks_dab_detr_r50_triple", eval_padding="exact") > 1e-2
    assert largest_difference("ks_conditional_detr_r50_triple", decoder_padding_mask=True) > 1e-2
    assert largest_difference("ks_dn_detr_r50_triple", decoder_padding_mask=True) > 1e-2
    assert largest_difference("ks_deformable_detr_r50_triple", eval_padding="exact") > 1e-2
    assert largest_difference("ks_dn_deformable_detr_r50_triple", eval_padding="exact") > 1e-2
    assert largest_difference("dab_detr_r50_plain", eval_padding="off_by_one") > 1e-2
    out, _ = authors_run("ks_dab_detr_r50_triple")
    sizes = torch.tensor(reference("ks_dab_detr_r50_triple")["image_sizes"])
    unclipped = postprocess(out["pred_logits"], out["pred_boxes"], sizes, TINY["eval_topk"])
    assert any((d["boxes"][:, 2:] > s.flip(0)).any() for d, s in zip(unclipped, sizes))


# the parameter that puts every reference point of a variant near 1 (sigmoid of about 10)
EXTREME_REFERENCES = {"ks_dab_detr_r50_triple": "anchor_xy", "ks_dn_detr_r50_triple": "anchor_xy",
                      "ks_conditional_detr_r50_triple": "decoder.ref_point_head.layers.1.bias",
                      "ks_deformable_detr_r50_triple": "reference_points.bias",
                      "ks_dn_deformable_detr_r50_triple": "refpoint_embed.weight"}


@pytest.mark.parametrize("mid", EXTREME_REFERENCES)
def test_inverse_sigmoid_eps_reaches_the_boxes(mid):
    """model.inverse_sigmoid_eps clamps the reference points (detrex: 1e-3) wherever their inverse
    sigmoid meets the box head: references beyond 1 - 1e-3 give other boxes with 1e-5."""
    boxes = {}
    for eps in (1e-3, 1e-5):
        model = converted_model(mid, inverse_sigmoid_eps=eps)
        with torch.no_grad():
            dict(model.named_parameters())[EXTREME_REFERENCES[mid]].fill_(10.0)
            images, mask, _ = batch(reference(mid))
            boxes[eps] = model(images, mask)["pred_boxes"]
    assert (boxes[1e-3] - boxes[1e-5]).abs().max() > 5e-4  # about 0.999 against 0.9999


def test_eval_padding_rules():
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, 4:], mask[1, :, 5:] = True, True  # image 1 is 4 x 5
    assert torch.equal(backbone.eval_padding_mask(mask, "exact"), mask)
    assert not backbone.eval_padding_mask(mask, "none").any()
    off = backbone.eval_padding_mask(mask, "off_by_one")
    assert (~off[0]).sum() == 5 * 7 and not off[0, :5, :7].any()
    assert (~off[1]).sum() == 3 * 4 and not off[1, :3, :4].any()


# --------------------------------------------------------------------------------------------------
# The released architectures

def listing_state(mid, values=False):
    """The full-size model's state dict from its key listing: meta tensors (shapes only), or random
    values with the authors' aliases equal."""
    listing = json.loads((FIXTURES / f"{mid}_fullsize_keys.json").read_text())
    if not values:
        return {e["key"]: torch.empty(e["shape"], device="meta") for e in listing}
    g = torch.Generator().manual_seed(0)
    state = {e["key"]: torch.randn(e["shape"], generator=g) for e in listing}
    for key in state:
        for copy_prefix, original in (("transformer.decoder.bbox_embed.", "bbox_embed."),
                                      ("ffns.0.activation.weight", "ffns.0.layers.0.1.weight")):
            if copy_prefix in key and key.replace(copy_prefix, original) in state:
                state[key] = state[key.replace(copy_prefix, original)]
    return state


def table1_model(row, meta=True):
    cfg = model_config(Manifest("table1").resolve(row))
    cfg["backbone"]["weights"] = None
    with torch.device("meta" if meta else "cpu"):
        return cfg, build_model(cfg, 80)[0]


@pytest.mark.parametrize("mid", MODELS)
def test_the_released_architectures_map_entirely_onto_their_table1_rows(mid):
    state = listing_state(mid)
    cfg, model = table1_model(MODELS[mid][1])
    found = describe(state)
    assert found.mismatches(cfg) == []
    assert (found.enc_layers, found.dec_layers, found.hidden_dim, found.backbone) == (6, 6, 256, "resnet50")
    weights, leftovers = convert({"model": state, "trainer": {}, "iteration": 0}, model.state_dict(), mid)
    assert set(weights) == set(model.state_dict())
    assert all(reason.startswith("alias of") for key, reason in leftovers.items() if key in state)
    assert set(leftovers) - set(state) == {"trainer", "iteration"}


def detectron2_relative_position_index(window=7):
    """The buffer detectron2's WindowAttention computes: (window^2, window^2) indices into the bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def swin_t_listing():
    """detectron2's SwinTransformer(embed_dim 96, depths 2-2-6-2, heads 3-6-12-24, window 7,
    out_indices (3,)) state-dict keys and shapes, as the KS-DAB-DETR Swin-T config builds it (meta
    tensors, but the computed relative position indices with their values)."""
    shapes, dim = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,),
                   "patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,)}, 96
    for i, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            shapes.update({f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,),
                           f"{b}.attn.relative_position_bias_table": (169, heads),
                           f"{b}.attn.relative_position_index": (49, 49),
                           f"{b}.attn.qkv.weight": (3 * dim, dim), f"{b}.attn.qkv.bias": (3 * dim,),
                           f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,),
                           f"{b}.norm2.weight": (dim,), f"{b}.norm2.bias": (dim,),
                           f"{b}.mlp.fc1.weight": (4 * dim, dim), f"{b}.mlp.fc1.bias": (4 * dim,),
                           f"{b}.mlp.fc2.weight": (dim, 4 * dim), f"{b}.mlp.fc2.bias": (dim,)})
        if i < 3:
            shapes.update({f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                           f"layers.{i}.downsample.norm.weight": (4 * dim,),
                           f"layers.{i}.downsample.norm.bias": (4 * dim,)})
            dim *= 2
    shapes.update({"norm3.weight": (768,), "norm3.bias": (768,)})
    return {f"backbone.{k}": detectron2_relative_position_index() if k.endswith("relative_position_index")
            else torch.empty(v, device="meta") for k, v in shapes.items()}


def test_a_swin_t_checkpoint_maps_onto_the_swin_t_row():
    """No fixture holds the Swin-T model: its detectron2 key listing, written out here from the
    Swin-T definition, with the KS-DAB-DETR transformer of the R50 listing."""
    transformer = {k: v for k, v in listing_state("ks_dab_detr_r50_triple").items() if not k.startswith("backbone.")}
    transformer["input_proj.weight"] = torch.empty(256, 768, 1, 1, device="meta")
    state = {**swin_t_listing(), **transformer}
    found = describe(state)
    cfg = model_config(Manifest("table1").resolve("dab_swint_ks"))
    cfg["backbone"].update(weights=None, weights_path=None)
    torch.manual_seed(0)
    model = build_model(cfg, 80)[0]  # real tensors: the computed indices are compared with torchvision's
    assert found.backbone == "swin_t" and found.mismatches(cfg) == []
    target = {k: v if k.endswith("relative_position_index") else torch.empty(v.shape, device="meta")
              for k, v in model.state_dict().items()}
    weights, leftovers = convert({"model": state}, target, "swin")
    assert set(weights) == {k for k in target if not k.endswith("relative_position_index")}
    assert sum(reason.startswith("computed here") for reason in leftovers.values()) == 12
    assert weights["backbone.out_norms.0.weight"].shape == (768,)
    assert weights["backbone.features.5.3.mlp.0.weight"].shape == (1536, 384)  # stage 3, block 3, fc1
    key = "backbone.layers.2.blocks.3.attn.relative_position_index"
    state[key] = state[key].T.contiguous()  # not detectron2's
    with pytest.raises(ConversionError, match=f"{key} differs from the relative position index computed here"):
        convert({"model": state}, target, "swin")


# --------------------------------------------------------------------------------------------------
# The command line and its errors

def error_of(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_a_checkpoint_of_another_model_is_a_named_error(tmp_path):
    path = FIXTURES / "ks_deformable_detr_r50_triple_state_dict.pth"
    message = error_of(import_argv(path, "dab_r50_ks", "table1", "--out", str(tmp_path / "x.pth")))
    assert str(path) in message and "KS-Deformable-DETR" in message
    assert "model.variant is 'dab_detr', the checkpoint's is 'deformable_detr'" in message
    assert not (tmp_path / "x.pth").exists()
    # the same checkpoint onto a DAB-DETR model, without the row check: the first key that does not fit
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match=r"has no transformer.decoder.query_scale.layers.\* \(for decoder"):
        convert(read_checkpoint(path), build_model(tiny_config("ks_dab_detr_r50_triple"), NUM_CLASSES)[0].state_dict())


def test_a_truncated_file_is_a_named_error(tmp_path):
    data = (FIXTURES / "ks_dab_detr_r50_triple_state_dict.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    message = error_of(import_argv(path, "dab_r50_ks", "table1", "--out", str(tmp_path / "x.pth")))
    assert str(path) in message and "truncated" in message


def saved_variant(tmp_path, change):
    checkpoint = read_checkpoint(FIXTURES / "ks_dab_detr_r50_triple_state_dict.pth")
    change(checkpoint)
    path = tmp_path / "changed.pth"
    torch.save(checkpoint, path)
    return read_checkpoint(path)


def tiny_dab_target(**changes):
    torch.manual_seed(0)
    return build_model(tiny_config("ks_dab_detr_r50_triple", **changes), NUM_CLASSES)[0].state_dict()


def test_a_missing_key_is_a_named_error(tmp_path):
    key = "transformer.decoder.layers.1.attentions.1.value_proj.weight"
    checkpoint = saved_variant(tmp_path, lambda c: c["model"].pop(key))
    with pytest.raises(ConversionError, match=f"has no '{key}'"):
        convert(checkpoint, tiny_dab_target())
    checkpoint = saved_variant(tmp_path, lambda c: c["model"].pop("class_embed.weight"))
    with pytest.raises(ConversionError, match="has no 'class_embed.weight'"):
        describe(checkpoint["model"])


def test_unknown_keys_and_entries_differing_aliases_and_shapes_are_named_errors(tmp_path):
    extra = "transformer.encoder.layers.0.attentions.0.attn.extra"
    checkpoint = saved_variant(tmp_path, lambda c: c["model"].update({extra: torch.zeros(1)}))
    with pytest.raises(ConversionError, match=f"unknown keys.*{extra}"):
        convert(checkpoint, tiny_dab_target())
    checkpoint = saved_variant(tmp_path, lambda c: c.update(ema={}))
    with pytest.raises(ConversionError, match=r"top-level entries \['ema'\]"):
        convert(checkpoint, tiny_dab_target())

    def untie(c):
        c["model"]["transformer.decoder.bbox_embed.layers.0.weight"] = c["model"]["bbox_embed.layers.0.weight"] + 1

    with pytest.raises(ConversionError, match="transformer.decoder.bbox_embed.layers.0.weight differs from "
                                              "bbox_embed.layers.0.weight"):
        convert(saved_variant(tmp_path, untie), tiny_dab_target())
    checkpoint = read_checkpoint(FIXTURES / "ks_dab_detr_r50_triple_state_dict.pth")
    with pytest.raises(ConversionError, match=r"shape mismatch: anchor_box_embed.weight .* \(10, 2\).*\(12, 2\)"):
        convert(checkpoint, tiny_dab_target(num_queries=12))
    found = describe(checkpoint["model"])
    assert found.mismatches(tiny_config("ks_dab_detr_r50_triple", ks={"mode": "dual_share_v"})) == [
        "model.ks.mode is 'dual_share_v', the checkpoint's is 'triple'"]


def test_import_weights_writes_a_checkpoint_of_the_table1_row(tmp_path, capsys):
    """A full-size KS-DAB-DETR-R50 checkpoint (random weights under the released keys, with the
    trainer's entries) through the command line, then read back as `eval` reads it."""
    state = listing_state("ks_dab_detr_r50_triple", values=True)
    source = tmp_path / "ks_dab_detr_r50.pth"
    torch.save({"model": state, "trainer": {"iteration": 374999}, "iteration": 374999}, source)
    out = tmp_path / "converted.pth"
    main(import_argv(source, "dab_r50_ks", "table1", "--out", str(out), "--results", str(tmp_path)))
    printed = capsys.readouterr().out
    assert "KS-DAB-DETR" in printed and f"--checkpoint {out}" in printed
    assert f"{out} exists; pass --force" in error_of(import_argv(source, "dab_r50_ks", "table1", "--out", str(out)))
    ck = load_checkpoint("table1", "dab_r50_ks", checkpoint=out, results=tmp_path)
    assert ck.source == "the checkpoint" and ck.changed_model_keys() == []
    assert ck.state["imported_from"]["iteration"] == 374999 and ck.state["num_classes"] == 80
    assert ck.state["checksum"] == checkpoints.content_checksum(ck.state)  # verified on every read, as the run's own
    with pytest.raises(RunError, match="holds a model of 80 classes, the data set has 5"):
        ck.build_model(5)
    model = ck.build_model(80)
    ours = model.state_dict()
    d = 256
    packed = state["transformer.encoder.layers.5.attentions.0.attn.in_proj_weight"]
    assert torch.equal(ours["encoder.layers.5.self_attn.in_proj.weight"], packed[:3 * d])
    assert torch.equal(ours["encoder.layers.5.teacher.qk_proj.weight"], packed[3 * d:5 * d])
    assert torch.equal(ours["encoder.layers.5.teacher.v_proj.weight"], packed[5 * d:])
    assert torch.equal(ours["encoder.layers.5.teacher.smlp.linear.weight"],
                       state["ksgt.smlp_module.token_split_conv.linear.0.weight"])
    assert torch.equal(ours["backbone.body.layer3.5.bn2.running_var"], state["backbone.res4.5.conv2.norm.running_var"])
    assert torch.equal(torch.cat([ours["anchor_xy"], ours["anchor_wh"]], 1), state["anchor_box_embed.weight"])


def test_eval_accepts_an_imported_checkpoint(tmp_path, capsys):
    """import-weights and eval --teachers, end to end, on the tiny KS-DAB-DETR fixture and the
    synthetic data set (whose 5 classes are the fixture's)."""
    manifest = tmp_path / "authors_tiny.yaml"
    model = {**copy.deepcopy(TINY), **copy.deepcopy(MODELS["ks_dab_detr_r50_triple"][0])}
    model["backbone"]["name"] = TINY_BACKBONE
    manifest.write_text(yaml.safe_dump({"defaults": {
        "model": model,
        "data": {"dataset": "synthetic", "root": str(tmp_path / "synthetic"), "train_split": "train",
                 "val_split": "val", "synthetic": {"train": 1, "val": 2, "seed": 0, "size": 96}, "test_size": 96,
                 "test_max_size": 128, "num_workers": 0},
        "train": {"batch_size": 2}}, "rows": [{"name": "ks_dab"}]}))
    fixture = FIXTURES / "ks_dab_detr_r50_triple_state_dict.pth"
    main(import_argv(fixture, "ks_dab", manifest, "--results", str(tmp_path)))
    out = tmp_path / "runs" / "authors_tiny" / "ks_dab" / "authors_checkpoint.pth"
    assert out.is_file()
    main(["eval", str(manifest), "--row", "ks_dab", "--checkpoint", str(out), "--teachers", "--results",
          str(tmp_path)])
    printed = capsys.readouterr().out
    assert all(branch in printed for branch in ("attn1", "attn2", "attn3"))
    record = json.loads(next((tmp_path / "runs" / "authors_tiny" / "ks_dab").glob("eval-*.json")).read_text())
    assert record["checkpoint"] == str(out) and record["config_from"] == "the checkpoint"
    assert set(record["metrics"]) == {"attn1", "attn2", "attn3"}
