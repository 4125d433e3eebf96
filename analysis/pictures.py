"""Pictures of what a trained row does.

    python -m analysis show --manifest demo --row ks_def_r18 [--images 8 | --image-ids 3 7] [--score 0.3]
    python -m analysis attention --manifest demo --row ks_def_r18 [--image-id 3] [--points 40,60 ...]

`show`: validation images, one column per branch (the student Attn1 and, for a KS row, each teacher
with the ground-truth Fg-Bg mask): the post-processed detections above a score (class name and
score) over the ground truth (white, dashed).

`attention`: the KS layer (the last encoder layer) for a few query tokens of one validation image:
the student's attention row A = softmax(q k^T / sqrt(d_head)) and the teacher's A^t (Attn3's Q^t
K^t on X^t + P), per head or averaged, or for deformable attention the shared sampling locations
with both attention weights; beside them the GT mask on the token grid and |X^t - X| (the sMLP
changes foreground tokens only). The layer's own `inspect` (models.ks_encoder) computes them from its
inputs of one forward (a forward hook), for the chosen queries only.

Both read the row's checkpoint (default: its checkpoint.pth) and write PNG and PDF under
<results>/figures/. The functions return the figure and the data drawn, which the tests compare
with the model.
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import patches

from datasets.drawing import draw_detections
from experiments import records
from models import ks_encoder as ks

from . import AnalysisError
from .figures import plt, save_figure

BRANCH_TITLES = {"attn1": "Attn1 (student)", "attn2": "Attn2 (teacher: A, V^t; GT mask)",
                 "attn3": "Attn3 (teacher: A^t, V; GT mask)"}


# --------------------------------------------------------------------------------------------------
# the trained model and its images

@dataclass
class Trained:
    """A row's trained model (evaluation mode, CPU) with its validation set and configuration."""
    name: str  # manifest / row
    model: torch.nn.Module
    dataset: object
    cfg: dict

    @property
    def ks_mode(self):
        return self.cfg["model"]["ks"]["mode"]


def load_trained(manifest, row, checkpoint=None, results=records.RESULTS):
    from experiments.build import build_data
    from experiments.checkpoints import load_checkpoint

    ck = load_checkpoint(manifest, row, checkpoint, results=results)
    note = ck.note()
    if note:
        print(note, file=sys.stderr)
    _, val_set = build_data(ck.cfg)
    model = ck.build_model(val_set.num_classes)
    return Trained(f"{ck.manifest.name} / {row}", model, val_set, ck.cfg)


def batch_of(dataset, image_ids):
    """(images, padding mask, model targets) of these validation images, with the test transform."""
    from datasets import collate
    from models import model_targets

    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    missing = [i for i in image_ids if i not in index]
    if missing:
        raise AnalysisError(f"image ids {missing} are not in the validation set ({len(dataset.ids)} images, ids "
                            f"{dataset.ids[0]}..{dataset.ids[-1]})")
    batch = collate([dataset[index[i]] for i in image_ids])
    return batch["images"], batch["padding_mask"], model_targets(batch["targets"])


def original_image(dataset, image_id):
    from PIL import Image

    info = dataset.coco.imgs[image_id]
    with Image.open(dataset.img_dir / info["file_name"]) as pil:
        return np.asarray(pil.convert("RGB"))


def ground_truth(dataset, image_id):
    """[(xyxy box in original pixels, category name, iscrowd)] of an image."""
    out = []
    for ann in dataset.coco.imgToAnns[image_id]:
        x, y, w, h = ann["bbox"]
        out.append(([x, y, x + w, y + h], dataset.coco.cats[ann["category_id"]]["name"], bool(ann.get("iscrowd"))))
    return out


def draw_ground_truth(ax, dataset, image_id):
    """The image's ground-truth boxes on `ax`: white, dashed (dotted for crowd regions)."""
    for (x0, y0, x1, y1), _, crowd in ground_truth(dataset, image_id):
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                                       linestyle=":" if crowd else "--", linewidth=1.0, gid="gt"))


def class_names(dataset):
    return [dataset.coco.cats[c]["name"] for c in dataset.category_ids]


def _branches(trained, branches):
    available = (ks.STUDENT,) + tuple(sorted(ks.teacher_branches(trained.model)))
    if branches is None:
        return list(available)
    bad = [b for b in branches if b not in available]
    if bad:
        raise AnalysisError(f"{trained.name}: no branch {bad}; this row (model.ks.mode {trained.ks_mode!r}) has "
                            f"{list(available)}")
    return list(branches)


# --------------------------------------------------------------------------------------------------
# detections

@torch.no_grad()
def detections(trained, image_ids, branches, score=0.3, batch_size=8):
    """{(image_id, branch): {"boxes" (n, 4) xyxy original pixels, "scores" (n,), "labels" (n,)}}: the
    post-processed detections (models.postprocess, the model's eval_topk) with score >= `score`."""
    from models.postprocess import postprocess

    teachers = [b for b in branches if b != ks.STUDENT]
    topk, clip = trained.cfg["model"]["eval_topk"], trained.cfg["model"]["eval_clip_boxes"]
    out = {}
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        images, mask, targets = batch_of(trained.dataset, ids)
        outputs = trained.model(images, mask, targets if teachers else None, with_teachers=bool(teachers) or None)
        sizes = torch.stack([t["orig_size"] for t in targets])
        for branch in branches:
            o = ks.branch_output(outputs, branch)
            dets = postprocess(o["pred_logits"], o["pred_boxes"], sizes, topk, clip)
            for image_id, det in zip(ids, dets):
                keep = det["scores"] >= score
                out[(image_id, branch)] = {k: v[keep] for k, v in det.items()}
    return out


def detections_figure(trained, image_ids, branches=None, score=0.3):
    """A grid: one row per image, one column per branch. Returns (figure, the detections drawn)."""
    branches = _branches(trained, branches)
    dets = detections(trained, image_ids, branches, score)
    names = class_names(trained.dataset)
    # constrained layout keeps the suptitle clear of the column titles (tight_layout ignores suptitles)
    fig, axes = plt.subplots(len(image_ids), len(branches), figsize=(3.2 * len(branches), 3.0 * len(image_ids)),
                             squeeze=False, layout="constrained")
    for r, image_id in enumerate(image_ids):
        image = original_image(trained.dataset, image_id)
        for c, branch in enumerate(branches):
            ax = axes[r, c]
            ax.imshow(image)
            draw_ground_truth(ax, trained.dataset, image_id)
            d = dets[(image_id, branch)]
            draw_detections(ax, d["boxes"], d["scores"], d["labels"], names)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(BRANCH_TITLES.get(branch, branch), fontsize=8)
            if c == 0:
                ax.set_ylabel(f"image {image_id}", fontsize=8)
    fig.suptitle(f"{trained.name}: detections with score >= {score} (white dashed: ground truth)", fontsize=9)
    return fig, dets


def default_image_ids(dataset, n):
    if n < 1:
        raise AnalysisError(f"--images must be at least 1, got {n}")
    return list(dataset.ids[:n])


def write_detections_figure(manifest, row, checkpoint=None, images=8, image_ids=None, score=0.3, branches=None,
                     results=records.RESULTS):
    trained = load_trained(manifest, row, checkpoint, results)
    ids = list(image_ids) if image_ids else default_image_ids(trained.dataset, images)
    fig, _ = detections_figure(trained, ids, branches, score)
    manifest_name = trained.name.split(" / ")[0]
    paths = save_figure(fig, Path(results) / "figures" / f"{manifest_name}_{row}_detections")
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------------
# the KS layer's attention

@dataclass
class LayerInputs:
    """What the last encoder layer received in one forward with teachers (one image)."""
    x: torch.Tensor                 # (1, N, d) the layer input X
    pos: torch.Tensor               # (1, N, d) the positional term added to its queries and keys
    key_padding_mask: torch.Tensor  # (1, N) True at padding
    fg: torch.Tensor                # (1, N) the GT Fg-Bg mask of the tokens
    levels: dict                    # deformable layers: reference_points, spatial_shapes, level_start_index
    token_shapes: list              # [(h, w)] of the token grid(s), in token order
    strides: list                   # the backbone stride of each grid: model-input pixels per token

    def inspect(self, layer, queries):
        """The layer's Inspection (models.ks_encoder) of these inputs for the query tokens `queries`."""
        return layer.inspect(self.x, self.pos, self.key_padding_mask, fg=self.fg, queries=queries, **self.levels)


@torch.no_grad()
def capture_layer_inputs(trained, image_id):
    """Runs the model with teachers on one image and captures the KS layer's inputs."""
    layer = ks.ks_layer(trained.model)
    if layer is None:
        raise AnalysisError(f"{trained.name}: not a KS row (model.ks.mode {trained.ks_mode!r}); the attention "
                            f"figure needs the teachers of a KS layer")
    images, mask, targets = batch_of(trained.dataset, [image_id])
    seen = {}

    def hook(module, args, kwargs, output):
        seen["inputs"] = ks.named_inputs(module, args, kwargs)

    def grid(module, args, output):
        seen["grid"] = tuple(output.shape[-2:])

    handles = [layer.register_forward_hook(hook, with_kwargs=True)]
    if isinstance(trained.model.input_proj, torch.nn.Conv2d):  # single-scale models
        handles.append(trained.model.input_proj.register_forward_hook(grid))
    try:
        trained.model(images, mask, targets, with_teachers=True)
    finally:
        for handle in handles:
            handle.remove()
    levels = dict(seen["inputs"])
    x, pos, key_padding_mask, fg = (levels.pop(k) for k in ("x", "pos", "key_padding_mask", "fg"))
    if levels:  # deformable: the levels, each a token grid
        shapes = [tuple(s) for s in levels["spatial_shapes"].tolist()]
    else:
        shapes = [seen["grid"]]
    # each grid's stride is a power of two; its token count is the input size over it, rounded up
    strides = [2 ** round(math.log2(images.shape[-1] / w)) for _, w in shapes]
    return layer, LayerInputs(x, pos, key_padding_mask, fg, levels, shapes, strides), images, targets


def _first(t):
    return None if t is None else t[0]


def standard_attention_rows(layer, inputs, queries):
    """(A, A^t or None): (heads, len(queries), N) softmax rows of the student's and the teacher's
    attention maps for the query tokens `queries` (the layer's `inspect`)."""
    seen = inputs.inspect(layer, queries)
    return seen.student[0], _first(seen.teacher)


def deformable_samples(layer, inputs, queries):
    """(locations (len(queries), heads, levels, points, 2) normalised x, y; the student's weights and
    the teacher's (None without Attn3), each (len(queries), heads, levels, points)): the layer's
    `inspect`."""
    seen = inputs.inspect(layer, queries)
    return seen.locations[0], seen.student[0], _first(seen.teacher)


def default_queries(inputs, boxes, n_objects=2):
    """Query tokens of the first grid: the token under the centre of each of the n_objects largest
    ground-truth boxes (boxes: (n, 4) xyxy in model-input pixels), then the background token farthest
    from the foreground."""
    h, w = inputs.token_shapes[0]
    s = inputs.strides[0]
    chosen = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in areas.argsort(descending=True)[:n_objects].tolist():
        cx, cy = float(boxes[i, 0] + boxes[i, 2]) / 2, float(boxes[i, 1] + boxes[i, 3]) / 2
        token = min(int(cy // s), h - 1) * w + min(int(cx // s), w - 1)
        if token not in chosen:
            chosen.append(token)
    fg = inputs.fg[0, :h * w].view(h, w)
    background = ~inputs.key_padding_mask[0, :h * w].view(h, w) & ~fg
    if background.any():
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = torch.nonzero(fg, as_tuple=True)
        dist = (((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(-1).values.float() if len(ys)
                else torch.zeros(h, w))
        dist[~background] = -1
        chosen.append(int(dist.flatten().argmax()))
    return chosen


def point_to_query(inputs, point, scale):
    """The first grid's token under (x, y) in original-image pixels; scale = model input / original."""
    h, w = inputs.token_shapes[0]
    s = inputs.strides[0]
    col, row = int(point[0] * scale[0] // s), int(point[1] * scale[1] // s)
    if not (0 <= col < w and 0 <= row < h) or inputs.key_padding_mask[0, row * w + col]:
        size = (round(w * s / scale[0]), round(h * s / scale[1]))
        raise AnalysisError(f"point x={point[0]:g}, y={point[1]:g} is outside the image (about {size[0]} x "
                            f"{size[1]} pixels; points are given in the original image's pixels)")
    return row * w + col


def attention_figure(trained, image_id, points=None, per_head=False):
    """The KS layer's attention for a few query tokens of one image. Returns (figure, data) where data
    holds what is drawn: `queries` (token indices), `fg` (the first grid's GT Fg-Bg mask), `smlp_change`
    (|X^t - X| per token of the first grid) and, for standard attention, `student`/`teacher` (heads,
    queries, N) maps, for deformable attention `locations`, `student`/`teacher` weights."""
    layer, inputs, images, targets = capture_layer_inputs(trained, image_id)
    if per_head and inputs.levels:
        raise AnalysisError(f"{trained.name}: --per-head draws standard attention rows head by head; a "
                            f"deformable KS layer's sampling points are drawn for all heads at once")
    image = original_image(trained.dataset, image_id)
    orig_h, orig_w = image.shape[:2]
    in_h, in_w = (int(s) for s in targets[0]["size"])
    scale = (in_w / orig_w, in_h / orig_h)
    queries = ([point_to_query(inputs, p, scale) for p in points] if points
               else default_queries(inputs, targets[0]["boxes_xyxy"]))
    if not queries:
        raise AnalysisError(f"{trained.name}: image {image_id} has no valid token to show")
    h, w = inputs.token_shapes[0]
    s = inputs.strides[0]
    extent = (0, w * s / scale[0], h * s / scale[1], 0)  # the grid in original-image pixels
    with torch.no_grad():
        seen = inputs.inspect(layer, queries)
    data = {"queries": queries, "fg": inputs.fg[0, :h * w].view(h, w),
            "smlp_change": (seen.teacher_feature - inputs.x)[0, :h * w].norm(dim=-1).view(h, w)}
    deformable = bool(inputs.levels)
    if deformable:
        data["locations"] = seen.locations[0]
    data["student"], data["teacher"] = seen.student[0], _first(seen.teacher)

    data["fg_share"] = foreground_share(data, inputs)
    heads = data["student"].shape[1 if deformable else 0]
    head_rows = list(range(heads)) if per_head and not deformable else [None]
    n_rows = 1 + len(queries) * len(head_rows)
    fig, axes = plt.subplots(n_rows, 3, figsize=(9.6, 3.1 * n_rows), squeeze=False)

    def token_xy(q):
        return ((q % w + 0.5) * s / scale[0], (q // w + 0.5) * s / scale[1])

    ax = axes[0, 0]
    ax.imshow(image)
    draw_ground_truth(ax, trained.dataset, image_id)
    for i, q in enumerate(queries):
        ax.plot(*token_xy(q), marker="*", markersize=12, color="red", markeredgecolor="white")
        ax.annotate(f"q{i + 1}", token_xy(q), color="white", fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"image {image_id}: query tokens", fontsize=8)
    axes[0, 1].imshow(image)
    axes[0, 1].imshow(data["fg"].float().numpy(), extent=extent, alpha=0.55, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
    axes[0, 1].set_title(f"GT Fg-Bg mask on the {h}x{w} token grid", fontsize=8)
    axes[0, 2].imshow(image)
    im = axes[0, 2].imshow(data["smlp_change"].numpy(), extent=extent, alpha=0.6, cmap="magma",
                           interpolation="nearest")
    fig.colorbar(im, ax=axes[0, 2], fraction=0.046)
    axes[0, 2].set_title("|X^t - X|: tokens the sMLP changes", fontsize=8)

    row = 1
    for i, q in enumerate(queries):
        for head in head_rows:
            label = f"q{i + 1}" + ("" if head is None else f", head {head}")
            if deformable:
                _draw_samples(axes[row], image, data, i, q, token_xy, scale, inputs, label)
            else:
                _draw_maps(axes[row], image, data, i, head, token_xy(q), extent, (h, w), label)
            row += 1
    for ax in axes.flat:
        if ax.images:  # image panels; the deformable bar charts keep their axes
            ax.set_xticks([])
            ax.set_yticks([])
    kind = "sampling points (size: attention weight)" if deformable else "attention rows"
    fig.suptitle(f"{trained.name}: the KS layer's {kind}, student A vs. teacher A^t (GT mask)", fontsize=9)
    fig.tight_layout()
    return fig, data


def _draw_maps(axes, image, data, i, head, query_xy, extent, hw, label):
    """Student row, teacher row and their difference on the token grid (mean over heads or one head)."""
    def pick(maps):
        m = maps[:, i] if head is None else maps[head:head + 1, i]
        return m.mean(0)[: hw[0] * hw[1]].view(*hw).numpy()

    student = pick(data["student"])
    teacher = pick(data["teacher"]) if data["teacher"] is not None else None
    share_s, share_t = (None if v is None else f"{100 * float(v[i]):.0f}% on fg" for v in data["fg_share"])
    panels = [(student, f"{label}: student A" + (f", {share_s}" if head is None else ""), "viridis")]
    panels.append((teacher, f"{label}: teacher A^t" + (f", {share_t}" if head is None else ""), "viridis")
                  if teacher is not None else (None, f"{label}: no teacher map (this mode shares A)", None))
    panels.append((teacher - student if teacher is not None else None, f"{label}: A^t - A", "coolwarm"))
    for ax, (values, title, cmap) in zip(axes, panels):
        ax.imshow(image)
        if values is not None:
            bound = float(np.abs(values).max()) or 1.0
            kw = dict(vmin=-bound, vmax=bound) if cmap == "coolwarm" else {}
            ax.imshow(values, extent=extent, alpha=0.65, cmap=cmap, interpolation="nearest", **kw)
        ax.plot(*query_xy, marker="*", markersize=10, color="red", markeredgecolor="white")
        ax.set_title(title, fontsize=8)


def sample_pixels(locations, inputs, scale):
    """(x, y) in original-image pixels of deformable sampling locations (..., levels, points, 2).
    Locations are normalised to each level's token grid, and a level's grid covers its token count
    times its stride in model-input pixels; scale = model input / original."""
    span = torch.tensor([[lw * st, lh * st] for (lh, lw), st in zip(inputs.token_shapes, inputs.strides)],
                        dtype=locations.dtype)  # (levels, 2): input pixels covered by each level's grid
    pixels = locations * span[:, None, :] / torch.tensor(scale, dtype=locations.dtype)
    return pixels[..., 0], pixels[..., 1]


def _draw_samples(axes, image, data, i, q, token_xy, scale, inputs, label):
    """Sampling locations of query i over the image, sized by the student's and the teacher's weights."""
    loc = data["locations"][i]  # (heads, levels, points, 2)
    px, py = (c.flatten().numpy() for c in sample_pixels(loc, inputs, scale))
    levels = torch.arange(loc.shape[1])[None, :, None].expand(loc.shape[:3]).flatten().numpy()
    colours = plt.get_cmap("tab10")(levels % 10)
    share_s, share_t = (None if v is None else f"{100 * float(v[i]):.0f}% on fg" for v in data["fg_share"])
    weights = [(data["student"][i], f"{label}: student A, {share_s}")]
    weights.append((data["teacher"][i], f"{label}: teacher A^t, {share_t}") if data["teacher"] is not None else
                   (None, f"{label}: no teacher weights (this mode shares A)"))
    for ax, (wts, title) in zip(axes[:2], weights):
        ax.imshow(image)
        if wts is not None:
            ax.scatter(px, py, s=400 * wts.flatten().numpy(), c=colours, alpha=0.7, edgecolors="white",
                       linewidths=0.3)
        ax.plot(*token_xy(q), marker="*", markersize=10, color="red", markeredgecolor="white")
        ax.set_title(title, fontsize=8)
    for ax in axes[:2]:
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
    ax = axes[2]
    levels = np.arange(loc.shape[1])
    ax.bar(levels - 0.2, data["student"][i].sum(-1).mean(0).numpy(), width=0.4, label="student")
    if data["teacher"] is not None:
        ax.bar(levels + 0.2, data["teacher"][i].sum(-1).mean(0).numpy(), width=0.4, label="teacher")
    ax.set_xticks(levels, [f"level {lv}" for lv in levels])
    ax.set_ylabel("attention weight (mean over heads)")
    ax.legend(fontsize=7)
    ax.set_title(f"{label}: attention weight per level", fontsize=8)


def foreground_share(data, inputs):
    """(student, teacher or None): per query, the share of the attention (mean over heads) that falls on
    foreground tokens of the GT Fg-Bg mask; for deformable layers the share of the attention weight whose
    sampling location lies on a foreground token of its level."""
    fg = inputs.fg[0].float()
    if "locations" not in data:
        h, w = inputs.token_shapes[0]
        fg = fg[:h * w]

        def share(maps):
            return (maps[..., : h * w] * fg).sum(-1).mean(0)  # (queries,)
    else:
        loc = data["locations"]  # (queries, heads, levels, points, 2)
        on_fg = torch.zeros(loc.shape[:-1])
        for level, ((lh, lw), start) in enumerate(zip(inputs.token_shapes,
                                                      inputs.levels["level_start_index"].tolist())):
            col = (loc[:, :, level, :, 0] * lw).floor().long()
            row = (loc[:, :, level, :, 1] * lh).floor().long()
            inside = (col >= 0) & (col < lw) & (row >= 0) & (row < lh)
            index = start + row.clamp(0, lh - 1) * lw + col.clamp(0, lw - 1)
            on_fg[:, :, level] = fg[index] * inside

        def share(weights):
            return (weights * on_fg).sum((-1, -2)).mean(-1)  # (queries,)
    return share(data["student"]), (share(data["teacher"]) if data["teacher"] is not None else None)


def default_image_id(dataset):
    """The first validation image with at least two objects."""
    for image_id in dataset.ids:
        if sum(not crowd for _, _, crowd in ground_truth(dataset, image_id)) >= 2:
            return image_id
    return dataset.ids[0]


def write_attention_figure(manifest, row, checkpoint=None, image_id=None, points=None, per_head=False,
                    results=records.RESULTS):
    trained = load_trained(manifest, row, checkpoint, results)
    image_id = default_image_id(trained.dataset) if image_id is None else image_id
    fig, _ = attention_figure(trained, image_id, points, per_head)
    manifest_name = trained.name.split(" / ")[0]
    paths = save_figure(fig, Path(results) / "figures" / f"{manifest_name}_{row}_attention_{image_id}")
    plt.close(fig)
    return paths
