"""Pictures of a trained row: the drawn detections are the post-processed ones, the drawn attention
rows are the model's, the mask panel is the GT Fg-Bg mask."""
import pytest
import torch
from matplotlib import patches

from analysis import AnalysisError
from analysis import pictures
from analysis.__main__ import main as analysis_main
from experiments.engine import train_row
from models.ks_encoder import fg_mask, fg_mask_levels
from models.postprocess import postprocess

from .helpers import TINY_RUN

DAB = ["model.variant=dab_detr", "model.pos_temperature=20", "model.pos_offset=0.0", "model.activation=prelu"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Results folder with a tiny trained KS-Deformable row (the demo's) and a tiny KS-DAB row."""
    root = tmp_path_factory.mktemp("pictures")
    data = [f"data.root={root / 'data'}"]
    train_row("demo", "ks_def_r18", TINY_RUN + data, results=root)
    train_row("demo", "def_r18", TINY_RUN + data + DAB + ["model.ks.mode=triple"], results=root)  # KS-DAB
    return root


def test_show_draws_the_post_processed_detections(results):
    trained = pictures.load_trained("demo", "ks_def_r18", results=results)
    ids = trained.dataset.ids[:3]
    fig, drawn = pictures.detections_figure(trained, ids, score=0.0)
    assert [ax.get_title() for ax in fig.axes[:3]] == [pictures.BRANCH_TITLES[b] for b in ("attn1", "attn2", "attn3")]
    # independently: the model on the same images, post-processed, cut at the score
    images, mask, targets = pictures.batch_of(trained.dataset, ids)
    with torch.no_grad():
        out = trained.model(images, mask, targets, with_teachers=True)
    sizes = torch.stack([t["orig_size"] for t in targets])
    for branch, o in [("attn1", out)] + [(b, out["teacher_outputs"][b][-1]) for b in ("attn2", "attn3")]:
        for r, (image_id, det) in enumerate(zip(ids, postprocess(o["pred_logits"], o["pred_boxes"], sizes, 20))):
            got = drawn[(image_id, branch)]
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(got[key], det[key], rtol=1e-6, atol=1e-4)
            # the rectangles in the panel are these boxes
            ax = fig.axes[r * 3 + ("attn1", "attn2", "attn3").index(branch)]
            rects = [p for p in ax.patches if isinstance(p, patches.Rectangle) and p.get_gid() == "detection"]
            xyxy = torch.tensor([[p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()]
                                 for p in rects])
            torch.testing.assert_close(xyxy, det["boxes"], rtol=1e-5, atol=1e-3)
    # a score threshold keeps only the boxes at or above it
    _, kept = pictures.detections_figure(trained, ids[:1], ["attn1"], score=0.02)
    assert (kept[(ids[0], "attn1")]["scores"] >= 0.02).all()


def test_show_and_attention_commands_write_png_and_pdf(results, capsys):
    assert analysis_main(["show", "--manifest", "demo", "--row", "ks_def_r18", "--images", "2", "--results",
                          str(results)]) == 0
    assert analysis_main(["attention", "--manifest", "demo", "--row", "ks_def_r18", "--results", str(results)]) == 0
    written = sorted(p.name for p in (results / "figures").iterdir())
    assert "demo_ks_def_r18_detections.png" in written and "demo_ks_def_r18_detections.pdf" in written
    assert any(n.startswith("demo_ks_def_r18_attention_") and n.endswith(".png") for n in written)
    assert any(n.startswith("demo_ks_def_r18_attention_") and n.endswith(".pdf") for n in written)
    # bad input: one error line, exit code 2
    assert analysis_main(["show", "--manifest", "demo", "--row", "ks_def_r18", "--image-ids", "999",
                          "--results", str(results)]) == 2
    assert "image ids [999] are not in the validation set" in capsys.readouterr().err
    assert analysis_main(["show", "--manifest", "demo", "--row", "ks_def_r18", "--branches", "attn4",
                          "--results", str(results)]) == 2
    assert "no branch ['attn4']" in capsys.readouterr().err


def test_standard_attention_rows_are_the_models(results):
    trained = pictures.load_trained("demo", "def_r18", results=results)  # the KS-DAB row of the fixture
    image_id = pictures.default_image_id(trained.dataset)
    fig, data = pictures.attention_figure(trained, image_id)
    layer, inputs, images, targets = pictures.capture_layer_inputs(trained, image_id)
    queries = data["queries"]
    assert len(queries) >= 2
    # reference: softmax(Q K^T / sqrt(d_head)) from the layer's weights, by hand
    d, nhead = layer.self_attn.d_model, layer.self_attn.nhead
    w, b = layer.self_attn.in_proj.weight, layer.self_attn.in_proj.bias
    x, pos = inputs.x[0].double(), inputs.pos[0].double()
    qk = x + pos

    def reference(q_all, k_all):
        q = q_all.view(-1, nhead, d // nhead)[queries].transpose(0, 1)  # (h, nq, dh)
        k = k_all.view(-1, nhead, d // nhead).transpose(0, 1)           # (h, N, dh)
        return torch.softmax(q @ k.transpose(-1, -2) / (d // nhead) ** 0.5, -1)

    student = reference(qk @ w[:d].double().T + b[:d].double(), qk @ w[d:2 * d].double().T + b[d:2 * d].double())
    torch.testing.assert_close(data["student"].double(), student, rtol=1e-4, atol=1e-5)
    fg = inputs.fg[0]
    lin = layer.teacher.smlp.linear
    xt = torch.where(fg[:, None], torch.relu(x @ lin.weight.double().T + lin.bias.double()), x)
    qkt = (xt + pos) @ layer.teacher.qk_proj.weight.double().T + layer.teacher.qk_proj.bias.double()
    teacher = reference(qkt[:, :d], qkt[:, d:])
    torch.testing.assert_close(data["teacher"].double(), teacher, rtol=1e-4, atol=1e-5)
    for maps in (data["student"], data["teacher"]):
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:2]), rtol=0, atol=1e-5)
    # the mask panel is the GT Fg-Bg mask of the token grid, and the sMLP moves exactly those tokens
    h, w_ = inputs.token_shapes[0]
    padding = inputs.key_padding_mask.view(1, h, w_)
    expected = fg_mask([targets[0]["boxes_xyxy"]], images.shape[-2:], (h, w_), padding)[0]
    assert torch.equal(data["fg"], expected) and expected.any()
    assert (data["smlp_change"][~data["fg"]] == 0).all() and (data["smlp_change"][data["fg"]] > 0).all()
    drawn_mask = fig.axes[1].images[1].get_array()
    assert (drawn_mask == data["fg"].float().numpy()).all()


def test_deformable_attention_samples_are_the_models(results):
    trained = pictures.load_trained("demo", "ks_def_r18", results=results)
    image_id = pictures.default_image_id(trained.dataset)
    _, data = pictures.attention_figure(trained, image_id)
    layer, inputs, images, targets = pictures.capture_layer_inputs(trained, image_id)
    attn, queries = layer.self_attn, data["queries"]
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    # reference: offsets and weights by hand from the layer's linear layers
    q = (inputs.x + inputs.pos)[0, queries]
    offsets = (q @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(-1, heads, levels, points, 2)
    shapes = inputs.levels["spatial_shapes"].flip(-1).float()  # (levels, 2) as (w, h)
    ref = inputs.levels["reference_points"][0, queries]          # (nq, levels, 2)
    locations = ref[:, None, :, None, :] + offsets / shapes[None, None, :, None, :]
    torch.testing.assert_close(data["locations"], locations, rtol=1e-5, atol=1e-6)
    logits = (q @ attn.attention_weights.weight.T + attn.attention_weights.bias).view(-1, heads, levels * points)
    torch.testing.assert_close(data["student"], logits.softmax(-1).view(-1, heads, levels, points), rtol=1e-5,
                               atol=1e-6)
    xt = layer.teacher.smlp(inputs.x, inputs.fg)[0, queries]
    t_logits = ((xt + inputs.pos[0, queries]) @ layer.teacher.attention_weights.weight.T
                + layer.teacher.attention_weights.bias).view(-1, heads, levels * points)
    torch.testing.assert_close(data["teacher"], t_logits.softmax(-1).view(-1, heads, levels, points), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(data["student"].sum((-1, -2)), torch.ones(len(queries), heads))
    # the mask panel is level 0 of the multi-scale GT Fg-Bg mask
    h, w = inputs.token_shapes[0]
    padding = inputs.key_padding_mask[:, :h * w].view(1, h, w)
    expected = fg_mask_levels([targets[0]["boxes_xyxy"]], images.shape[-2:], inputs.token_shapes, [padding, None])[0]
    assert torch.equal(data["fg"], expected[0]) and expected.any()


def test_attention_needs_a_ks_row(results, tmp_path):
    trained = pictures.load_trained("demo", "ks_def_r18", results=results)
    trained.model.encoder.layers[-1] = torch.nn.Identity()
    with pytest.raises(AnalysisError, match="not a KS row"):
        pictures.capture_layer_inputs(trained, trained.dataset.ids[0])
    fresh = pictures.load_trained("demo", "ks_def_r18", results=results)
    with pytest.raises(AnalysisError, match=r"point x=1000, y=5 is outside the image \(about \d+ x \d+ pixels"):
        pictures.attention_figure(fresh, fresh.dataset.ids[0], points=[(1000.0, 5.0)])
    with pytest.raises(AnalysisError, match="--per-head draws standard attention rows"):
        pictures.attention_figure(fresh, fresh.dataset.ids[0], per_head=True)


def test_standard_attention_rows_reproduce_the_layer_output(results):
    """The drawn maps are the ones the layer uses: A V (and A^t V for Attn3) through the layer's own
    out-projection, residual, norms and FFN give the student's and the teacher's outputs."""
    from models.layers import merge_heads, split_heads

    trained = pictures.load_trained("demo", "def_r18", results=results)  # the KS-DAB row
    layer, inputs, _, _ = pictures.capture_layer_inputs(trained, pictures.default_image_id(trained.dataset))
    n = inputs.x.shape[1]
    student_maps, teacher_maps = pictures.standard_attention_rows(layer, inputs, list(range(n)))
    attn = layer.self_attn
    d = attn.d_model
    v = split_heads(inputs.x @ attn.in_proj.weight[2 * d:].T + attn.in_proj.bias[2 * d:], attn.nhead)
    with torch.no_grad():
        student, teachers = layer(inputs.x, inputs.pos, inputs.key_padding_mask, fg=inputs.fg)
        for maps, expected in ((student_maps, student), (teacher_maps, teachers["attn3"])):
            out = layer.post_attention(inputs.x, attn.out_proj(merge_heads(maps[None] @ v)))
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def grid_sample_reference(value, shapes, starts, locations, weights):
    """Deformable sampling written independently with grid_sample (bilinear, zeros outside):
    value (S, heads, dh); locations (Nq, heads, levels, points, 2); weights (Nq, heads, levels, points)."""
    out = 0
    for level, ((h, w), start) in enumerate(zip(shapes.tolist(), starts.tolist())):
        grid_map = value[start:start + h * w].permute(1, 2, 0).reshape(value.shape[1], -1, h, w)  # (heads, dh, h, w)
        grid = 2 * locations[:, :, level].transpose(0, 1) - 1  # (heads, Nq, points, 2)
        sampled = torch.nn.functional.grid_sample(grid_map, grid, mode="bilinear", padding_mode="zeros",
                                                  align_corners=False)  # (heads, dh, Nq, points)
        out = out + (sampled * weights[:, :, level].permute(1, 0, 2)[:, None]).sum(-1)
    return out.permute(2, 0, 1).flatten(1)  # (Nq, heads * dh)


def test_deformable_samples_reproduce_the_layer_output(results):
    """Sampling the layer's values at the drawn locations with the drawn weights (an independent
    grid_sample implementation), then the layer's output projection and post-attention, gives the
    student's and Attn3's outputs at the query tokens."""
    trained = pictures.load_trained("demo", "ks_def_r18", results=results)
    layer, inputs, _, _ = pictures.capture_layer_inputs(trained, pictures.default_image_id(trained.dataset))
    queries = list(range(0, inputs.x.shape[1], 7))
    locations, student_w, teacher_w = pictures.deformable_samples(layer, inputs, queries)
    attn, lv = layer.self_attn, inputs.levels
    with torch.no_grad():
        student, teachers = layer(inputs.x, inputs.pos, inputs.key_padding_mask, fg=inputs.fg, **lv)
        value = attn.values(inputs.x, inputs.key_padding_mask)[0]
        for weights, expected in ((student_w, student), (teacher_w, teachers["attn3"])):
            sampled = grid_sample_reference(value, lv["spatial_shapes"], lv["level_start_index"], locations, weights)
            out = layer.post_attention(inputs.x[:, queries], attn.output_proj(sampled)[None])
            torch.testing.assert_close(out, expected[:, queries], rtol=1e-4, atol=1e-5)


def test_sampling_pixels_of_every_level_meet_at_the_query(results):
    """Drawn in image pixels, a query's reference point on each level (the same image position,
    scaled by each level's valid ratio) lands on the query token, within one token of the coarsest
    level."""
    trained = pictures.load_trained("demo", "ks_def_r18", results=results)
    image_id = pictures.default_image_id(trained.dataset)
    layer, inputs, _, targets = pictures.capture_layer_inputs(trained, image_id)
    image = pictures.original_image(trained.dataset, image_id)
    in_h, in_w = (int(v) for v in targets[0]["size"])
    scale = (in_w / image.shape[1], in_h / image.shape[0])
    assert len(inputs.token_shapes) == 2 and inputs.strides == [8, 16]
    h, w = inputs.token_shapes[0]
    valid = (~inputs.key_padding_mask[0, :h * w]).nonzero()[:, 0]
    queries = valid[:: max(1, len(valid) // 25)]
    ref = inputs.levels["reference_points"][0, queries]  # (nq, levels, 2)
    px, py = pictures.sample_pixels(ref[:, :, None, :], inputs, scale)  # (nq, levels, 1)
    s = inputs.strides[0]
    centre_x = ((queries % w).double() + 0.5) * s / scale[0]
    centre_y = ((queries // w).double() + 0.5) * s / scale[1]
    tolerance = inputs.strides[-1] / min(scale)
    for level in range(2):
        assert (px[:, level, 0].double() - centre_x).abs().max() <= tolerance
        assert (py[:, level, 0].double() - centre_y).abs().max() <= tolerance
    # the finest level's reference is the token centre itself, up to its valid-ratio rounding
    torch.testing.assert_close(px[:, 0, 0].double(), centre_x, rtol=0, atol=s / scale[0])


def test_foreground_share_counts_weight_on_foreground_tokens():
    """Standard maps: the mean over heads of the weight on fg tokens; deformable: the weight of the
    points whose location falls in a fg token of its level, points outside the grid counting as bg."""
    fg = torch.tensor([[True, False, False, True, False]])  # level 0: 2x2 tokens, level 1: 1x1 token
    maps = torch.tensor([[[0.5, 0.5, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]],
                         [[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]])  # (heads 2, queries 2, N)
    grid = pictures.LayerInputs(None, None, None, fg[:, :4], {}, [(2, 2)], [8])
    share_s, share_t = pictures.foreground_share({"student": maps[:, :, :4], "teacher": None}, grid)
    torch.testing.assert_close(share_s, torch.tensor([(0.5 + 1.0) / 2, (0.5 + 0.0) / 2]))
    assert share_t is None
    levels = {"level_start_index": torch.tensor([0, 4])}
    deform = pictures.LayerInputs(None, None, None, fg, levels, [(2, 2), (1, 1)], [8, 16])
    # one query, one head, 2 levels x 2 points: (x, y) normalised to each level's grid
    loc = torch.tensor([[[[[0.25, 0.25], [0.75, 0.25]],     # level 0: token 0 (fg), token 1 (bg)
                          [[0.5, 0.5], [1.5, 0.5]]]]])       # level 1: token 0 (bg), outside
    weights = torch.tensor([[[[0.4, 0.1], [0.3, 0.2]]]])
    teacher = torch.tensor([[[[0.0, 0.5], [0.5, 0.0]]]])
    s, t = pictures.foreground_share({"locations": loc, "student": weights, "teacher": teacher}, deform)
    torch.testing.assert_close(s, torch.tensor([0.4]))
    torch.testing.assert_close(t, torch.tensor([0.0]))
    deform.fg = torch.tensor([[True, True, False, False, True]])
    s, t = pictures.foreground_share({"locations": loc, "student": weights, "teacher": teacher}, deform)
    torch.testing.assert_close(s, torch.tensor([0.8]))  # the point outside level 1 still counts as bg
    torch.testing.assert_close(t, torch.tensor([1.0]))


@pytest.mark.parametrize("variant", ["dab", "deformable"])
@pytest.mark.parametrize("mode", ["dual_share_a", "dual_share_v"])
def test_pictures_of_dual_attention_rows(results, variant, mode):
    """Dual modes have one teacher: share_a (Attn2) keeps the student's map, so there is no teacher
    map or weight to draw; share_v (Attn3) has one. Both draw, with only their own branches."""
    from experiments.build import build_data, model_config
    from experiments.config import Manifest
    from models import build_model

    overrides = TINY_RUN + [f"data.root={results / 'data'}", f"model.ks.mode={mode}"]
    if variant == "dab":
        overrides += DAB
    cfg = Manifest("demo").resolve("ks_def_r18", overrides)
    _, val_set = build_data(cfg)
    model_cfg = model_config(cfg)
    model_cfg["backbone"]["weights"] = None
    torch.manual_seed(0)
    model, _ = build_model(model_cfg, val_set.num_classes)
    trained = pictures.Trained(f"untrained {variant} {mode}", model.eval(), val_set, cfg)
    image_id = pictures.default_image_id(val_set)
    fig, data = pictures.attention_figure(trained, image_id)
    assert (data["teacher"] is None) == (mode == "dual_share_a")
    titles = [ax.get_title() for ax in fig.axes]
    assert any("no teacher" in t for t in titles) == (mode == "dual_share_a")
    share_s, share_t = data["fg_share"]
    assert share_s.shape == (len(data["queries"]),) and (share_t is None) == (mode == "dual_share_a")
    _, drawn = pictures.detections_figure(trained, [image_id], score=0.0)
    teacher = "attn2" if mode == "dual_share_a" else "attn3"
    assert sorted(branch for _, branch in drawn) == sorted(["attn1", teacher])


def test_the_detections_figure_title_clears_the_column_titles(results):
    trained = pictures.load_trained("demo", "ks_def_r18", results=results)
    ids = (trained.dataset.ids * 2)[:8]  # the demo's default of 8 images: a tall figure
    fig, _ = pictures.detections_figure(trained, ids, score=0.3)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes[:3]:  # the top row's column titles
        column = ax.title.get_window_extent(renderer)
        assert title.y0 >= column.y1 or title.x1 <= column.x0 or title.x0 >= column.x1, (title, column)
