"""A trained row's student on images of one's own (`python -m experiments predict`).

    python -m experiments predict demo --row ks_def_r18 photo.jpg my_folder/ [--score 0.5] [--out DIR]

The images (files, or folders read recursively) are read as an image viewer shows them (EXIF
orientation applied, transparency over white; datasets.images.read_rgb), resized and normalised
with the row's test transforms, padded into batches as the evaluation pads them, and run through
the student only (no ground truth is needed or read). For each image a PNG with the detections
above the score (class name and score), and one detections.json:

    {"<image path as found>": {"width": W, "height": H, "image_id": 7 (only when the file is an image of
      the row's validation set), "picture": "<png, relative to the output folder>",
      "detections": [{"bbox": [x, y, w, h], "score": s, "category_id": id, "category_name": name}, ...]}, ...}

with boxes in the image's pixels (as viewed) and category ids of the row's data set, the entries of
COCO's results format. A file that cannot be read is named on one line and skipped.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_convert

import datasets
from datasets.coco_eval import BOX_DECIMALS, SCORE_DECIMALS
from datasets.drawing import draw_detections
from datasets.images import UnlabelledImages, find_images, read_rgb
from datasets.synthetic import CATEGORIES
from models.ks_encoder import STUDENT, branch_output
from models.postprocess import postprocess

from . import distributed, records
from .build import data_config
from .checkpoints import load_checkpoint
from .errors import RunError
from .signals import ignore_stop_signals
from .training import progress

DETECTIONS = "detections.json"


def _collate(batch):
    """The readable images padded into one batch (as datasets.collate pads), and the files that were not."""
    good = [(image, info) for image, info in batch if image is not None]
    failed = [info for image, info in batch if image is None]
    padded = datasets.collate(good) if good else None
    return padded, failed


NOT_READABLE = (OSError, ValueError, KeyError, TypeError, datasets.DataError)


def _val_annotations(cfg):
    """(image folder, the parsed annotation file) of the row's validation set, or (None, why) when
    it is not on this machine or not readable. Only its 'images' and 'categories' are used here,
    never the annotations."""
    try:
        img_dir, ann_file = datasets.split_paths(data_config(cfg), "val")
        return Path(img_dir), json.loads(Path(ann_file).read_text())
    except NOT_READABLE as e:
        return None, e


def _val_image_ids(val):
    """{absolute image path: image id} of the row's validation set; {} when it is not on this machine."""
    img_dir, data = val
    if img_dir is None:
        return {}
    try:
        return {str((img_dir / im["file_name"]).resolve()): int(im["id"]) for im in data["images"]}
    except (TypeError, KeyError, ValueError):
        return {}


def _classes(ck, val):
    """[{"id", "name"}] by label: the checkpoint's, or for a checkpoint written before checkpoints
    named their classes, the synthetic generator's categories or those of the row's validation
    annotation file (`val`, from _val_annotations)."""
    if ck.state.get("classes"):
        return ck.state["classes"]
    if ck.cfg["data"]["dataset"] == "synthetic":  # the generator's categories, whichever set it wrote
        return [{"id": c["id"], "name": c["name"]} for c in sorted(CATEGORIES, key=lambda c: c["id"])]
    img_dir, data = val
    why = data if img_dir is None else None  # _val_annotations' error
    if why is None:
        try:
            categories = data["categories"]
            return [{"id": int(c["id"]), "name": str(c["name"])} for c in sorted(categories, key=lambda c: c["id"])]
        except (KeyError, TypeError, ValueError) as e:
            why = e
    raise RunError(f"{ck.path} does not name its classes (it was written before checkpoints did) and the row's "
                   f"validation annotation file, whose categories would, cannot be read ({why})")


def _picture_names(paths):
    """A unique PNG name per image: its file name with .png, numbered where two would clash."""
    names, used = [], set()
    for path in paths:
        stem, n = Path(path).stem, 1
        name = f"{stem}.png"
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        names.append(name)
    return names


def draw_picture(path, image, detections, names, scale_to=800):
    """A PNG of `image` (H, W, 3 uint8) with its detections (boxes in its pixels), at least
    `scale_to` pixels on its longer side so that the labels stay legible."""
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    dpi = 100
    scale = max(1.0, scale_to / max(height, width))
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image)
    ax.set_axis_off()
    draw_detections(ax, detections["boxes"], detections["scores"], detections["labels"], names, fontsize=8)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return fig


def default_out(results, manifest, row):
    """<results>/predictions/<manifest>/<row>/<time>/, a folder that does not exist yet."""
    base = Path(results) / "predictions" / manifest / row
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    return path


@torch.no_grad()
def predict(manifest, row, inputs, checkpoint=None, score=0.5, out=None, device=None, batch_size=None,
            results=records.RESULTS, draw=True, quiet=False):
    """Runs the row's student on the image files of `inputs` and writes `out`/detections.json and
    (with `draw`) one PNG per image. Returns (the detections.json content, the output folder,
    the files skipped as [(path, why)])."""
    if not 0 <= score <= 1:
        raise RunError(f"--score must be between 0 and 1, got {score}")
    ck = load_checkpoint(manifest, row, checkpoint, results=results)
    paths = find_images(inputs)
    out = Path(out) if out else default_out(results, ck.manifest.name, row)
    if (out / DETECTIONS).exists():
        raise RunError(f"{out / DETECTIONS} exists: name another --out folder (predictions are never overwritten)")
    val = _val_annotations(ck.cfg)  # read once: its categories (older checkpoints) and image ids
    classes = _classes(ck, val)
    names = [c["name"] for c in classes]
    device = distributed.pick_device(device)
    model = ck.build_model(len(classes), device)
    tc, topk, clip = ck.cfg["train"], ck.cfg["model"]["eval_topk"], ck.cfg["model"]["eval_clip_boxes"]
    workers = ck.cfg["data"]["num_workers"]
    loader = torch.utils.data.DataLoader(
        UnlabelledImages(paths, datasets.make_transforms(ck.cfg["data"], train=False)),
        batch_size=batch_size or tc["eval_batch_size"] or tc["batch_size"], shuffle=False, collate_fn=_collate,
        num_workers=workers, pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals if workers > 0 else None)
    image_ids = _val_image_ids(val)
    pictures = dict(zip(paths, _picture_names(paths)))
    found, skipped = {}, []
    out.mkdir(parents=True, exist_ok=True)
    bar = progress(loader, desc=f"predict {row}", unit="batch", disable=quiet or len(paths) <= 4)
    for batch, failed in bar:
        for info in failed:
            skipped.append((info["path"], info["error"]))
            bar.write(f"skipped: {info['error']}", file=sys.stderr)
        if batch is None:
            continue
        outputs = branch_output(model(batch["images"].to(device), batch["padding_mask"].to(device)), STUDENT)
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]]).to(device)
        dets = postprocess(outputs["pred_logits"], outputs["pred_boxes"], sizes, topk, clip)
        for info, det in zip(batch["targets"], dets):
            keep = det["scores"] >= score
            det = {k: v[keep].cpu() for k, v in det.items()}
            path = info["path"]
            height, width = info["orig_size"].tolist()
            entry = {"width": width, "height": height}
            image_id = image_ids.get(str(Path(path).resolve()))
            if image_id is not None:
                entry["image_id"] = image_id
            xywh = box_convert(det["boxes"], "xyxy", "xywh")
            entry["detections"] = [
                {"bbox": [round(v, BOX_DECIMALS) for v in box], "score": round(s, SCORE_DECIMALS),
                 "category_id": classes[label]["id"],
                 "category_name": classes[label]["name"]}
                for box, s, label in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist())]
            if draw:
                draw_picture(out / pictures[path], np.asarray(read_rgb(path, as_viewed=True)), det, names)
                entry["picture"] = pictures[path]
            found[str(path)] = entry
    bar.close()
    records.write_json(out / DETECTIONS, found)
    return found, out, skipped
