"""A trained row's student on images of one's own (`python -m experiments predict`).

    python -m experiments predict demo --row ks_def_r18 photo.jpg my_folder/ [--score 0.5] [--out DIR]

The images (files, or folders read recursively) are read as an image viewer shows them (EXIF
orientation applied, transparency over white; datasets.images.read_rgb), resized and normalised
with the row's test transforms, padded into batches as the evaluation pads them, and run through
the student only (no ground truth is needed or read). For each image a PNG with the detections
above the score (class name and score), and one detections.json:

    {"checkpoint/": {"path": "<the checkpoint file, absolute>", "sha256": "<its sha256>"},
     "<image path as found>": {"width": W, "height": H, "image_id": 7 (only when the file is an image of
      the row's validation set), "picture": "<png, relative to the output folder>",
      "detections": [{"bbox": [x, y, w, h], "score": s, "category_id": id, "category_name": name}, ...]}, ...}

with boxes in the image's pixels (as viewed) and category ids of the row's data set, the entries of
COCO's results format. The key "checkpoint/" (PROVENANCE) names the checkpoint that made the
detections; it cannot be an image's key, since a path as pathlib writes it never ends with "/": a
reader that looks images up by path is unchanged, one that goes over every entry skips this key. A
picture's longer side is between MIN_PICTURE_SIDE (800: small images are enlarged, for legible
labels) and MAX_PICTURE_SIDE (2048) pixels: large images are drawn reduced, boxes with them, so that
a large photo does not cost gigabytes to draw. A file that cannot be read is named on one line and
skipped.
"""
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
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
from .config import Manifest
from .errors import RunError
from .evaluation import unwritable
from .signals import ignore_stop_signals
from .training import progress

DETECTIONS = "detections.json"
PROVENANCE = "checkpoint/"  # detections.json's key of the checkpoint; no image path ends with "/"
MIN_PICTURE_SIDE = 800  # pixels of a picture's longer side: labels stay legible
MAX_PICTURE_SIDE = 2048  # ... and drawing a 6000 x 6000 photo does not take gigabytes


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


def picture_scale(width, height):
    """The factor from an image's pixels to its picture's: its longer side brought up to
    MIN_PICTURE_SIDE or down to MAX_PICTURE_SIDE pixels, else 1."""
    longest = max(width, height)
    return min(max(1.0, MIN_PICTURE_SIDE / longest), MAX_PICTURE_SIDE / longest)


def draw_picture(path, image, detections, names):
    """A PNG of `image` (an RGB PIL image) with its detections (boxes in its pixels), scaled by
    picture_scale. The axes keep the image's pixel coordinates, so the boxes scale with the
    picture; a large image is reduced before matplotlib sees it."""
    from matplotlib.figure import Figure

    width, height = image.size
    dpi = 100
    scale = picture_scale(width, height)
    shown = image
    if scale < 1:
        shown = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(shown, extent=(-0.5, width - 0.5, height - 0.5, -0.5))
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
    (with `draw`) one PNG per image. Returns (the images' entries of detections.json by path, i.e.
    without its PROVENANCE entry, the output folder, the files skipped as [(path, why)]). Bad
    arguments, a device this machine lacks and an output folder that cannot be written are each
    a RunError before the checkpoint is read."""
    if not 0 <= score <= 1:
        raise RunError(f"--score must be between 0 and 1, got {score}")
    if batch_size is not None and batch_size < 1:
        raise RunError(f"--batch-size must be at least 1 (images per forward), got {batch_size}")
    device = distributed.pick_device(device)
    given = bool(out)
    out = Path(out) if given else default_out(results, Manifest(manifest).name, row)
    _check_out(out, given)
    ck = load_checkpoint(manifest, row, checkpoint, results=results)
    paths = find_images(inputs)
    provenance = {"path": str(ck.path.resolve()), "sha256": ck.sha256.removeprefix("sha256:")}
    note = ck.note()
    if note and not quiet:
        print(note, file=sys.stderr)
    val = _val_annotations(ck.cfg)  # read once: its categories (older checkpoints) and image ids
    classes = _classes(ck, val)
    names = [c["name"] for c in classes]
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _check_out(out, given, e.strerror or type(e).__name__)
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
                draw_picture(out / pictures[path], read_rgb(path, as_viewed=True), det, names)
                entry["picture"] = pictures[path]
            found[str(path)] = entry
    bar.close()
    records.write_json(out / DETECTIONS, {PROVENANCE: provenance, **found})
    return found, out, skipped


def _check_out(out, given, why=None):
    """RunError when the output folder `out` (`given` as --out, else the default) is a file, holds a
    detections.json already, or cannot be written (`why`, else tried: evaluation.unwritable)."""
    option = f"--out {out}" if given else f"the output folder {out}"
    if out.exists() and not out.is_dir():
        raise RunError(f"{option} is a file; --out names a folder for {DETECTIONS} and the pictures")
    if (out / DETECTIONS).exists():
        raise RunError(f"{out / DETECTIONS} exists: name another --out folder (predictions are never overwritten)")
    why = why or unwritable(out)
    if why:
        raise RunError(f"{option} cannot be written ({why}); "
                       + ("name another --out folder" if given else "pass --out DIR to write the predictions elsewhere"))
