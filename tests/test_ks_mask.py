"""GT Fg-Bg mask semantics (docs/authors_code.md, "GT Fg-Bg mask") on hand-computed cases and against a
loop implementation that follows the authors' code line by line."""
import torch
import torch.nn.functional as F

from models.ks_encoder import fg_canvas, fg_mask, fg_mask_levels


def reference_mask(boxes, batch_hw, feature_hw, padding_mask=None):
    """The authors' procedure, box by box: int64 cast, half-open slices, bilinear with
    align_corners=True, then .bool()."""
    H, W = batch_hw
    canvas = torch.zeros(len(boxes), H, W)
    for b, image_boxes in enumerate(boxes):
        for box in image_boxes:
            x1, y1, x2, y2 = box.type(torch.int64).tolist()
            canvas[b, y1:y2, x1:x2] = 1
    mask = F.interpolate(canvas[None], size=feature_hw, mode="bilinear", align_corners=True)[0].bool()
    if padding_mask is not None:
        mask &= ~padding_mask
    return mask


def grid(rows, cols, hw):
    out = torch.zeros(hw, dtype=torch.bool)
    for r in rows:
        for c in cols:
            out[r, c] = True
    return out


def test_canvas_floor_cast_and_half_open():
    canvas = fg_canvas([torch.tensor([[1.7, 2.2, 4.9, 5.0]])], (8, 8))[0]
    # int() -> x 1..4, y 2..5; half-open: columns 1, 2, 3 and rows 2, 3, 4
    assert torch.equal(canvas.bool(), grid(range(2, 5), range(1, 4), (8, 8)))


def test_canvas_sub_pixel_box_is_empty_and_wide_one_is_not():
    canvas = fg_canvas([torch.tensor([[2.3, 2.3, 2.9, 2.9], [5.9, 5.9, 7.1, 7.1]])], (8, 8))[0]
    # the first floors to [2, 2) (empty); the second to rows/columns 5 and 6
    assert torch.equal(canvas.bool(), grid([5, 6], [5, 6], (8, 8)))


def test_canvas_image_edges_and_overlap_union():
    canvas = fg_canvas([torch.tensor([[0.0, 0.0, 3.0, 2.0], [6.5, 6.0, 8.0, 8.0], [2.0, 1.0, 4.0, 3.0]])], (8, 8))[0]
    expected = grid(range(0, 2), range(0, 3), (8, 8)) | grid([6, 7], [6, 7], (8, 8)) | grid([1, 2], [2, 3], (8, 8))
    assert torch.equal(canvas.bool(), expected)
    assert canvas.max() == 1  # overlaps union, they do not add up


def test_empty_images_and_empty_batch():
    boxes = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    mask = fg_mask(boxes, (8, 8), (4, 4))
    assert not mask[0].any() and mask[1].all()
    assert not fg_mask([torch.zeros(0, 4)] * 2, (8, 8), (4, 4)).any()


def test_point_sampling_threshold_above_zero():
    # 8x8 canvas -> 4x4 tokens samples rows/columns 0, 7/3, 14/3, 7.
    mask = fg_mask([torch.tensor([[2.0, 2.0, 5.0, 5.0]])], (8, 8), (4, 4))[0]
    # 14/3 has weight 1/3 on row 4 (foreground) and 2/3 on row 5: value 1/3 > 0 counts
    assert torch.equal(mask, grid([1, 2], [1, 2], (4, 4)))


def test_object_between_sample_points_vanishes():
    # canvas row 1 only: sample y=0 gives row 1 weight 0; y=7/3 reads rows 2, 3
    mask = fg_mask([torch.tensor([[0.0, 1.0, 8.0, 2.0]])], (8, 8), (4, 4))[0]
    assert not mask.any()
    # canvas row 5 only: sample y=14/3 reads rows 4 and 5 (weight 2/3)
    mask = fg_mask([torch.tensor([[0.0, 5.0, 8.0, 6.0]])], (8, 8), (4, 4))[0]
    assert torch.equal(mask, grid([2], range(4), (4, 4)))


def test_padding_tokens_are_background():
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    padding = torch.zeros(1, 4, 4, dtype=torch.bool)
    padding[0, :, 3] = True
    mask = fg_mask(boxes, (8, 8), (4, 4), padding)[0]
    assert torch.equal(mask, ~padding[0])


def test_matches_reference_loop_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    H, W = 97, 131
    for feature_hw in [(4, 5), (13, 17), (25, 33), (1, 1), (1, 6)]:
        boxes, sizes = [], []
        for n in [0, 1, 7, 20]:
            h, w = int(torch.randint(40, H + 1, (), generator=g)), int(torch.randint(40, W + 1, (), generator=g))
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
            wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5
            b = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]).float())], 1)
            boxes.append(b)
            sizes.append((h, w))
        padding = torch.ones(len(boxes), H, W, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes):
            padding[i, :h, :w] = False
        token_padding = F.interpolate(padding[None].float(), size=feature_hw)[0].bool()
        assert torch.equal(fg_mask(boxes, (H, W), feature_hw, token_padding),
                           reference_mask(boxes, (H, W), feature_hw, token_padding))


def test_levels_resize_one_canvas_independently():
    boxes = [torch.tensor([[3.2, 4.1, 40.7, 22.9], [50.0, 30.0, 63.0, 63.0]]), torch.zeros(0, 4)]
    hws = [(8, 8), (4, 4), (2, 2), (1, 1)]
    levels = fg_mask_levels(boxes, (64, 64), hws)
    for hw, level in zip(hws, levels):
        assert torch.equal(level, reference_mask(boxes, (64, 64), hw))
