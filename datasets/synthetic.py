"""Synthetic COCO-format detection data set: coloured shapes on cluttered backgrounds.

Usage: python -m datasets.synthetic --out data/synthetic --train 1000 --val 200 --seed 0 [--size 256]

Layout written under DIR (COCO 2017 style, split folders named ``train``/``val``)::

    DIR/train/000000000001.png ...     DIR/val/...
    DIR/annotations/instances_train.json, instances_val.json
    DIR/meta.json                      generator parameters, format version, counts

Everything is deterministic: image i of a split is drawn from
``numpy.random.default_rng([seed, split_code, i])``, so the same parameters give identical pixels
and byte-identical JSON, and the validation images do not depend on the number of training images.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .errors import DataError

FORMAT_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1}
COCO_IMAGE_FOLDER = re.compile(r"(train|val|test|unlabeled)20\d\d")  # COCO's train2017, val2014, ...

# Non-contiguous ids on purpose (COCO's ids run 1..90 with gaps), so label mapping gets exercised.
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "cross", "supercategory": "shape"},
    {"id": 18, "name": "ring", "supercategory": "shape"},
]
# Filled pixel area of each shape divided by R^2, R = circumradius (used to aim at a target area).
FILL = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4, "cross": 2.04,
        "ring": math.pi * (1 - 0.55 ** 2)}

# COCO area ranges (pycocotools COCOeval): small < 32^2 <= medium < 96^2 <= large.
SMALL_MAX, MEDIUM_MAX = 32 ** 2, 96 ** 2
MIN_AREA = 100          # smallest target area: about a 10x10 px object
MAX_OBJECTS = 8
MAX_LARGE = 2           # large objects per image (they cover a quarter of a 192 px image or more)
MIN_VISIBLE = 0.5       # every annotated object keeps at least this fraction of its pixels
SLOT_PERIOD = 32        # one empty image and one crowd image in every 32 (about 3% each)


def size_range(area):
    """COCO size range name of an area in pixels."""
    return "small" if area < SMALL_MAX else "medium" if area < MEDIUM_MAX else "large"


# ----------------------------------------------------------------------------------- drawing

def _shape_mask(shape, cx, cy, r, angle, height, width):
    """Boolean (height, width) mask of one shape with circumradius r centred at (cx, cy)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)

    def rotated(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "square":
        draw.polygon(rotated([(r * math.cos(a), r * math.sin(a))
                              for a in (0.25 * math.pi, 0.75 * math.pi, 1.25 * math.pi, 1.75 * math.pi)]), fill=255)
    elif shape == "triangle":
        draw.polygon(rotated([(r * math.cos(a), r * math.sin(a))
                              for a in (-0.5 * math.pi, math.pi / 6, 5 * math.pi / 6)]), fill=255)
    elif shape == "cross":
        t = 0.3 * r  # half thickness of each arm
        draw.polygon(rotated([(-r, -t), (r, -t), (r, t), (-r, t)]), fill=255)
        draw.polygon(rotated([(-t, -r), (t, -r), (t, r), (-t, r)]), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 0


def _background(rng, height, width):
    """Float (H, W, 3) background: colour gradient at a random angle plus two faint sinusoids."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = math.cos(angle) * xx + math.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 + (c1 - c0) * t[..., None]
    for _ in range(2):
        fx, fy = rng.uniform(-0.08, 0.08, 2)
        wave = np.sin(2 * math.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * math.pi))
        img += rng.uniform(5, 20) * wave[..., None] * rng.choice([-1.0, 1.0], 3)
    return img


def _draw_distractors(rng, img):
    """Thin lines and dots that are not objects, drawn onto the uint8 background in place."""
    height, width = img.shape[:2]
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(2, 9)):
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(5, 30)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        d = rng.uniform(0.5, 2.0)
        draw.ellipse([x - d, y - d, x + d, y + d], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img[:] = np.asarray(pil)


def _contrasting_colour(rng, reference):
    """Random RGB colour (independent of the class) that stands out from the reference colour."""
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - reference) > 90:
            break
    return colour


def _plan_objects(rng, height, width):
    """(category, circumradius) of each object to draw, largest first so that small ones end up in front.

    Each object aims at a COCO size range (small 40%, medium 35%, large 25% where it fits) and a
    log-uniform area inside it.
    """
    r_max = 0.5 * min(height, width) - 2
    n = 1 + int(rng.binomial(MAX_OBJECTS - 1, 0.3))
    plans, n_large = [], 0
    for _ in range(n):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        fill = FILL[cat["name"]]
        bucket = rng.choice(["small", "medium", "large"], p=[0.4, 0.35, 0.25])
        if bucket == "large" and (n_large >= MAX_LARGE or fill * r_max ** 2 < 1.4 * MEDIUM_MAX):
            bucket = "medium"  # a large one of this shape does not fit this image
        n_large += bucket == "large"
        lo, hi = {"small": (MIN_AREA, SMALL_MAX), "medium": (SMALL_MAX, MEDIUM_MAX),
                  "large": (1.3 * MEDIUM_MAX, fill * r_max ** 2)}[bucket]
        area = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform within the range
        plans.append((cat, min(math.sqrt(area / fill), r_max)))
    plans.sort(key=lambda p: -p[1])
    return plans


def _place(rng, objects, make_mask):
    """Try placements from make_mask() until no earlier object drops below MIN_VISIBLE.

    Later objects occlude earlier ones. Returns the new mask, or None when all tries failed.
    """
    for _ in range(30):
        mask = make_mask()
        if all((o["visible"] & ~mask).sum() >= MIN_VISIBLE * o["full"] for o in objects):
            for o in objects:
                o["visible"] &= ~mask
            return mask
    return None


def render_image(seed, split, index, size=256):
    """Draw one image. Returns (uint8 HxWx3 array, list of object dicts with category/visible/crowd)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    low = int(round(0.75 * size))
    height, width = int(rng.integers(low, size + 1)), int(rng.integers(low, size + 1))
    background = _background(rng, height, width)
    img = np.clip(background, 0, 255).astype(np.uint8)
    _draw_distractors(rng, img)

    # Empty and crowd images sit at fixed slots (shifted by the seed) so even a small set has some.
    slot = (index + seed) % SLOT_PERIOD
    objects = []
    if slot == SLOT_PERIOD // 2:
        # Crowd: a tight cluster of many tiny shapes of one category, annotated as one iscrowd box.
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        extent = rng.uniform(0.15, 0.3) * min(height, width)
        x0, y0 = rng.uniform(0, width - extent), rng.uniform(0, height - extent)
        members = np.zeros((height, width), bool)
        for _ in range(rng.integers(12, 30)):
            m = _shape_mask(cat["name"], x0 + rng.uniform(3, extent - 3), y0 + rng.uniform(3, extent - 3),
                            rng.uniform(2.0, 3.5), rng.uniform(0, 2 * math.pi), height, width)
            if m.any():
                img[m] = _contrasting_colour(rng, img[m].mean(0))
                members |= m
        objects.append({"category": cat, "visible": members, "full": int(members.sum()), "crowd": True})

    if slot != 0:
        for cat, r in _plan_objects(rng, height, width):
            angle = rng.uniform(0, 2 * math.pi)
            margin = 1.05 * r + 1  # the cross's arm corners reach slightly beyond r

            def candidate():
                cx = rng.uniform(margin, max(margin, width - margin))
                cy = rng.uniform(margin, max(margin, height - margin))
                return _shape_mask(cat["name"], cx, cy, r, angle, height, width)

            mask = _place(rng, objects, candidate)
            if mask is None or not mask.any():
                continue
            img[mask] = _contrasting_colour(rng, img[mask].mean(0))  # vs. what it covers
            objects.append({"category": cat, "visible": mask.copy(), "full": int(mask.sum()), "crowd": False})

    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return img, objects


def _annotation(obj, ann_id, image_id):
    """COCO annotation dict for the visible pixels of one object (bbox tight, area = pixel count)."""
    visible = obj["visible"]
    ys, xs = np.nonzero(visible)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category"]["id"],
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(visible.sum()),
        "iscrowd": int(obj["crowd"]),
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
    }


# ----------------------------------------------------------------------------------- writing

def _write_split(root, split, n_images, seed, size):
    """Write the images of one split and return (COCO dict, counts dict)."""
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    counts = {"images": n_images, "empty_images": 0, "objects": 0, "crowd": 0,
              "size_ranges": {"small": 0, "medium": 0, "large": 0},
              "categories": {c["name"]: 0 for c in CATEGORIES}}
    for index in tqdm(range(n_images), desc=f"synthetic {split}", unit="img"):
        img, objects = render_image(seed, split, index, size)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        Image.fromarray(img).save(root / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        counts["empty_images"] += not any(not o["crowd"] for o in objects)
        for obj in objects:
            ann = _annotation(obj, len(annotations) + 1, image_id)
            annotations.append(ann)
            if obj["crowd"]:
                counts["crowd"] += 1
            else:
                counts["objects"] += 1
                counts["size_ranges"][size_range(ann["area"])] += 1
                counts["categories"][obj["category"]["name"]] += 1
    coco = {
        "info": {"description": "KS-DETR synthetic shapes", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    return coco, counts


def _params(n_train, n_val, seed, size):
    return {"n_train": int(n_train), "n_val": int(n_val), "seed": int(seed), "size": int(size)}


def generate(out_dir, n_train, n_val, seed, size=256):
    """Write the data set to out_dir (which must not exist or be empty) and return its Path.

    The data set is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a folder that looks finished.
    """
    out_dir = Path(out_dir)
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        meta = {"format_version": FORMAT_VERSION, "generator": "datasets.synthetic",
                "params": _params(n_train, n_val, seed, size), "categories": CATEGORIES, "counts": {}}
        (tmp / "annotations").mkdir(parents=True)
        for split, n in (("train", n_train), ("val", n_val)):
            coco, meta["counts"][split] = _write_split(tmp, split, n, seed, size)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _written_by_generator(out_dir):
    """The parsed meta.json of out_dir when datasets.synthetic wrote it, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == "datasets.synthetic" else None


def _coco_signs(out_dir):
    """What makes out_dir look like a COCO-format data set: annotations/instances_*.json and image
    folders named like train2017/val2017 (list of names, empty when none)."""
    signs = sorted(f"annotations/{p.name}" for p in (out_dir / "annotations").glob("instances_*.json"))
    try:
        signs += sorted(f"{p.name}/" for p in out_dir.iterdir() if p.is_dir() and COCO_IMAGE_FOLDER.fullmatch(p.name))
    except OSError:
        pass
    return signs


def _not_synthetic(out_dir):
    """DataError for an existing folder that datasets.synthetic did not write (never suggests deleting it)."""
    signs = _coco_signs(out_dir)
    if signs:
        shown = ", ".join(signs[:4]) + (", ..." if len(signs) > 4 else "")
        return DataError(f"{out_dir} looks like a COCO-format data set ({shown}; no meta.json of datasets.synthetic), "
                         f"not a synthetic one: to train on it set data.dataset=coco (with data.root={out_dir} and "
                         f"data.train_split/data.val_split naming its image folders), or choose another folder "
                         f"for the synthetic set")
    return DataError(f"{out_dir} exists, is not empty and was not written by datasets.synthetic (no meta.json of "
                     f"the generator); it is left as it is: choose another folder (--out, or data.root) for the "
                     f"synthetic set")


def _check_existing(out_dir, params):
    """Raise DataError (a ValueError) unless out_dir holds a finished data set generated with params."""
    meta = _written_by_generator(out_dir)
    if meta is None:
        raise _not_synthetic(out_dir)
    have = dict(meta.get("params", {}), format_version=meta.get("format_version"))
    want = dict(params, format_version=FORMAT_VERSION)
    diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        detail = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise DataError(f"synthetic data set in {out_dir} was generated with different parameters ({detail}); "
                        f"delete the folder or point data.root to another one")


def ensure_synthetic(out_dir, n_train, n_val, seed, size=256):
    """Return out_dir holding the data set for these parameters, generating it when absent.

    An existing finished data set is reused when its meta.json matches; otherwise DataError (a
    ValueError). A folder that exists with other content is never overwritten, and deleting it is
    only suggested when the generator's own meta.json is there.
    """
    out_dir = Path(out_dir)
    params = _params(n_train, n_val, seed, size)
    done = all((out_dir / "annotations" / f"instances_{s}.json").is_file() for s in SPLIT_CODES)
    if not done and out_dir.exists() and any(out_dir.iterdir()):
        if _written_by_generator(out_dir) is not None:
            raise DataError(f"{out_dir} is an unfinished synthetic data set (its meta.json was written by "
                            f"datasets.synthetic, but annotations/instances_train.json or instances_val.json is "
                            f"missing); delete it to generate it again, or choose another folder")
        raise _not_synthetic(out_dir)
    if not done:
        try:
            generate(out_dir, n_train, n_val, seed, size)
            return out_dir
        except OSError:
            # Another process (e.g. another DDP rank) may have finished the same folder first.
            if not (out_dir / "meta.json").is_file():
                raise
    _check_existing(out_dir, params)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m datasets.synthetic",
        description="Generate the synthetic COCO-format shapes data set (deterministic from --seed). "
                    "An existing folder with the same parameters is reused; different parameters are an error.")
    parser.add_argument("--out", required=True, help="output folder (becomes data.root in a manifest)")
    parser.add_argument("--train", type=int, required=True, help="number of training images")
    parser.add_argument("--val", type=int, required=True, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=256,
                        help="longest image side in px; sides vary in [0.75*size, size] (default 256)")
    args = parser.parse_args(argv)
    try:
        out = ensure_synthetic(args.out, args.train, args.val, args.seed, args.size)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    counts = json.loads((out / "meta.json").read_text())["counts"]
    for split, c in counts.items():
        print(f"{split}: {c['images']} images, {c['objects']} objects {c['size_ranges']}, "
              f"{c['crowd']} crowd, {c['empty_images']} empty")
    print(f"data set ready in {out}")


if __name__ == "__main__":
    sys.exit(main())
