"""COCO detection data set, dataset builder and batch collation.

Works on the COCO 2017 layout (``root/train2017``, ``root/val2017``,
``root/annotations/instances_{train2017,val2017}.json``), on the synthetic one (split folders
``train``/``val``, see datasets/synthetic.py) and on explicit paths (``data.train_images``,
``data.train_annotations``, ``data.val_images``, ``data.val_annotations``; see build_split).

Bad data gives a DataError (datasets/errors.py) when the data set is built: an annotation file that
is not JSON or not a COCO detection file, images listed but missing on disk, unknown category ids,
malformed boxes. What training changes without stopping is counted in one note on stderr when the
set is built: boxes of zero or negative size (dropped), boxes partly outside their image (clamped)
or wholly outside it (dropped), annotations of unlisted images, and images with an EXIF orientation
(used as stored, never rotated: COCO-format boxes are in the stored pixel frame, as pycocotools and
COCO's own tools read them). An image file that cannot be decoded gives a DataError naming it when it
is loaded; 16-bit images are scaled to 8 bits.
"""
import contextlib
import io
import json
import math
import os
import re
import sys
from numbers import Real
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .errors import DataError, DataNotFoundError
from .images import read_rgb
from .transforms import make_transforms

REQUIRED_LISTS = ("images", "annotations", "categories")
SHOW = 3  # how many offending items an error or note names


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection images with DETR-style targets.

    ``dataset[i]`` returns ``(image, target)``: image a float32 (3, H, W) tensor (after transforms;
    scaled to [0, 1] when transforms is None) and target a dict with
    ``boxes`` (n, 4) float32 absolute xyxy pixels in the frame of the returned image,
    ``labels`` (n,) int64 contiguous 0..K-1, ``image_id`` int, ``orig_size`` and ``size`` int64 (h, w).
    Crowd annotations are dropped; boxes are clamped to the image and empty ones removed. Images are
    used in their stored pixel frame (an EXIF orientation is not applied; see datasets.images.read_rgb).

    The annotation file is checked when the data set is built (the module docstring lists what is an
    error and what a note): a DataError names the file and the annotation or image id; a bbox must be
    four finite numbers. Boxes dropped or clamped in the targets stay in ``self.coco`` for evaluation,
    as pycocotools does.
    """

    def __init__(self, img_dir, ann_file, transforms=None):
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = _load_annotation_file(self.ann_file)
        notes = _check_coco(data, self.ann_file)
        _check_images_present(data["images"], self.img_dir, self.ann_file)
        if notes:  # one note per data set, when it is built
            print(f"note: {self.ann_file}: " + "; ".join(notes), file=sys.stderr)
        self.coco = COCO()  # silent without a file; the JSON is read once, above
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.getCatIds())
        self.num_classes = len(self.category_ids)
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}

    def __len__(self):
        return len(self.ids)

    def classes(self):
        """[{"id": the data set's category id, "name"}] in the order of the contiguous labels 0..K-1."""
        return [{"id": c, "name": self.coco.cats[c]["name"]} for c in self.category_ids]

    def label_to_category_id(self, labels):
        """Map contiguous labels (int, list or tensor) back to COCO category ids (int or list)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        if isinstance(labels, int):
            return self.category_ids[labels]
        return [self.category_ids[int(label)] for label in labels]

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = tv_tensors.Image(F.pil_to_tensor(read_rgb(self.img_dir / info["file_name"], f"image id {image_id}")))
        height, width = image.shape[-2:]

        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        labels = torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
        }

        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = F.to_dtype(image, torch.float32, scale=True)
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).to(torch.float32),
            "labels": target["labels"],
            "image_id": int(image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
        }


# ------------------------------------------------------------------ checks when the set is built

def _load_annotation_file(ann_file):
    """The parsed JSON of ann_file; DataError naming the file when it cannot be read or parsed."""
    try:
        raw = ann_file.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"annotation file {ann_file} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"annotation file {ann_file} is a folder; expected a COCO-format JSON file") from None
    except OSError as e:
        raise DataError(f"annotation file {ann_file} cannot be read: {e.strerror or e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        ends_early = e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated")
        hint = "; the file ends before the JSON is complete (truncated?)" if ends_early else ""
        raise DataError(f"annotation file {ann_file} is not valid JSON: {e.msg} at line {e.lineno} column "
                        f"{e.colno} (character {e.pos} of {len(e.doc)}){hint}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"annotation file {ann_file} is not valid JSON: not UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    try:
        return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _first(items):
    """'a, b, c' of the first SHOW items, with ', ...' when there are more."""
    items = list(items)
    return ", ".join(str(i) for i in items[:SHOW]) + (", ..." if len(items) > SHOW else "")


def _check_coco(data, ann_file):
    """Check that data (parsed from ann_file) is a usable COCO detection file; one pass, no images.

    Raises DataError for what would fail later (missing lists or fields, duplicate ids, unknown
    category ids, malformed boxes). Returns the sentences of the data set's note: how many boxes are
    of zero or negative size, partly or wholly outside their image (by the image's width and height
    in the file; crowd boxes, which training drops anyway, are not counted) and how many annotations
    belong to images that are not listed.
    """
    expected = "expected a COCO detection file: an object with 'images', 'annotations' and 'categories' lists"
    if not isinstance(data, dict):
        raise DataError(f"annotation file {ann_file} is not a COCO detection file: its top level is a JSON "
                        f"{type(data).__name__}; {expected}")
    for key in REQUIRED_LISTS:
        if key not in data:
            found = _first(repr(k) for k in data) or "none"
            raise DataError(f"annotation file {ann_file} is not a COCO detection file: it has no {key!r} key "
                            f"(top-level keys: {found}); {expected}")
        if not isinstance(data[key], list):
            raise DataError(f"annotation file {ann_file} is not a COCO detection file: its {key!r} is a JSON "
                            f"{type(data[key]).__name__}, not a list; {expected}")

    def entry_error(kind, index, entry, problem):
        ident = f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else ""
        return DataError(f"annotation file {ann_file}: {kind} #{index}{ident} {problem}")

    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise entry_error("category", i, cat, "has no integer 'id'")
        if cat["id"] in category_ids:
            raise entry_error("category", i, cat, "repeats a category id")
        category_ids.add(cat["id"])
    if not category_ids:
        raise DataError(f"annotation file {ann_file} lists no categories; a detection set needs at least one")

    sizes = {}  # image id -> (width, height)
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise entry_error("image", i, img, "has no integer 'id'")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise entry_error("image", i, img, "has no 'file_name' string")
        for key in ("width", "height"):
            if not _is_number(img.get(key)) or img[key] <= 0:
                raise entry_error("image", i, img, f"has no positive {key!r} (got {img.get(key)!r})")
        if img["id"] in sizes:
            raise entry_error("image", i, img, f"repeats image id {img['id']}")
        sizes[img["id"]] = (img["width"], img["height"])

    ann_ids, degenerate, orphans, partly_outside, outside = set(), [], [], [], []
    known = ", ".join(map(str, sorted(category_ids)[:20]))
    known += f", ... ({len(category_ids)} in all)" if len(category_ids) > 20 else ""
    def annotation_error(i, ann):
        """The DataError for an annotation that failed the quick check below."""
        if not isinstance(ann, dict):
            return entry_error("annotation", i, ann, f"is a JSON {type(ann).__name__}, not an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                return entry_error("annotation", i, ann, f"has no {key!r}")
        if not _is_int(ann["id"]):
            return entry_error("annotation", i, ann, "has an 'id' that is not an integer")
        if ann["id"] in ann_ids:
            return entry_error("annotation", i, ann, f"repeats annotation id {ann['id']}")
        if not _is_int(ann["image_id"]):
            return entry_error("annotation", i, ann, f"has image_id {ann['image_id']!r}, not an integer")
        where = f"annotation id {ann['id']} (image {ann['image_id']})"
        if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
            return DataError(f"annotation file {ann_file}: {where} has category_id {ann['category_id']!r}, "
                             f"which is not among the categories (known category ids: {known})")
        return DataError(f"annotation file {ann_file}: {where} has bbox {ann['bbox']!r}; expected 4 finite "
                         f"numbers [x, y, width, height]")

    # One quick test per annotation (COCO train2017 has 860k); annotation_error says what failed.
    number = (int, float)
    for i, ann in enumerate(data["annotations"]):
        try:
            ann_id, image_id, bbox = ann["id"], ann["image_id"], ann["bbox"]
            good = (type(ann_id) is int and ann_id not in ann_ids and type(image_id) is int
                    and type(ann["category_id"]) is int and ann["category_id"] in category_ids
                    and type(bbox) is list and len(bbox) == 4 and type(bbox[0]) in number
                    and type(bbox[1]) in number and type(bbox[2]) in number and type(bbox[3]) in number
                    and math.isfinite(bbox[0] + bbox[1] + bbox[2] + bbox[3]))
        except (KeyError, TypeError, OverflowError):
            good = False
        if not good:
            raise annotation_error(i, ann)
        ann_ids.add(ann_id)
        size = sizes.get(image_id)
        if size is None:
            orphans.append(ann)
        if bbox[2] <= 0 or bbox[3] <= 0:
            degenerate.append(ann)
        elif size is not None and not ann.get("iscrowd", 0):
            x, y, x2, y2 = bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]
            if x >= size[0] or y >= size[1] or x2 <= 0 or y2 <= 0:
                outside.append(ann)
            elif x < 0 or y < 0 or x2 > size[0] or y2 > size[1]:
                partly_outside.append(ann)

    n = len(data["annotations"])

    def first(anns):
        return f"first: annotation id {anns[0]['id']}, image {anns[0]['image_id']}"

    notes = []
    if degenerate:
        notes.append(f"{len(degenerate)} of {n} annotations have a box of zero or negative width or height "
                     f"({first(degenerate)}); they are dropped in training and stay in evaluation, as pycocotools "
                     f"does")
    if partly_outside:
        notes.append(f"{len(partly_outside)} of {n} annotations have a box partly outside its image "
                     f"({first(partly_outside)}); training clamps them to the image, evaluation uses them as they are")
    if outside:
        notes.append(f"{len(outside)} of {n} annotations have a box wholly outside its image ({first(outside)}); "
                     f"they are dropped in training and stay in evaluation")
    if orphans:
        notes.append(f"{len(orphans)} of {n} annotations belong to image ids that are not in 'images' "
                     f"({first(orphans)}); they are not used")
    return notes


def _check_images_present(images, img_dir, ann_file):
    """DataError unless every image listed in the annotations is a file in img_dir.

    One directory listing covers plain file names (COCO train2017's 118k images cost one scandir, not
    118k stats); names with subfolders are checked one by one.
    """
    try:
        with os.scandir(img_dir) as entries:
            present = {entry.name for entry in entries}
    except FileNotFoundError:
        raise DataNotFoundError(f"image folder {img_dir} does not exist (images of {ann_file})") from None
    except NotADirectoryError:
        raise DataError(f"image folder {img_dir} is not a folder (images of {ann_file})") from None
    except OSError as e:
        raise DataError(f"image folder {img_dir} cannot be listed: {e.strerror or e}") from None
    missing = []
    for img in images:
        name = img["file_name"]
        if "/" in name or os.sep in name:
            found = (img_dir / name).is_file()
        else:
            found = name in present
        if not found:
            missing.append(img)
    if missing:
        raise DataError(f"image folder {img_dir}: {len(missing)} of {len(images)} images listed in {ann_file} are "
                        f"missing (first: " + _first(f"{img['file_name']} (image id {img['id']})" for img in missing)
                        + ")")


# ------------------------------------------------------------------ paths from the configuration

def _folder_names(folder, pattern=None, limit=8):
    """'a/, b/' of the visible entries of folder (only matching pattern when given), for messages."""
    try:
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(folder) if not e.name.startswith("."))
    except OSError:
        return ""
    if pattern:
        names = [n for n in names if re.fullmatch(pattern, n)]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _data_root(data_cfg):
    """(root Path, where it came from): data.root, else the COCO_ROOT environment variable."""
    if data_cfg.get("root"):
        return Path(data_cfg["root"]).expanduser(), "data.root"
    if os.environ.get("COCO_ROOT"):
        return Path(os.environ["COCO_ROOT"]).expanduser(), "COCO_ROOT"
    raise DataNotFoundError(
        "no COCO data root: data.root is not set in the manifest and COCO_ROOT is not set. Set either (or give "
        "explicit paths with data.train_images/data.train_annotations and data.val_images/data.val_annotations), "
        "or generate the synthetic set with `python -m datasets.synthetic --out DIR --train N --val M --seed S` "
        "and use DIR as data.root.")


def _layout_paths(data_cfg, split, part=None):
    """(image folder, annotation file) for root/<split> and root/annotations/instances_<split>.json.

    part ("train"/"val") names the configuration keys in the messages when given.
    """
    root, source = _data_root(data_cfg)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataNotFoundError(
            f"COCO data not found: data root {root} ({source}) {what}. Set data.root in the manifest (or the "
            f"COCO_ROOT environment variable) to a folder holding <split>/ images and "
            f"annotations/instances_<split>.json, or generate the synthetic set with "
            f"`python -m datasets.synthetic --out DIR --train N --val M --seed S`.")
    img_dir, ann_file = root / split, root / "annotations" / f"instances_{split}.json"
    used = f"data.{part}_split = {split!r}" if part else f"split {split!r}"
    explicit = f", or set data.{part}_images and data.{part}_annotations" if part else ""
    if not img_dir.is_dir():
        there = _folder_names(root)
        raise DataNotFoundError(
            f"COCO data not found: image folder {img_dir} does not exist ({used} under {source} {root}, which "
            f"holds: {there or 'nothing'}); name an existing image folder of {root}{explicit}")
    if not ann_file.is_file():
        there = _folder_names(root / "annotations", r".*\.json")
        raise DataNotFoundError(
            f"COCO data not found: annotation file {ann_file} does not exist ({used} under {source} {root}; "
            f"JSON files in {root / 'annotations'}: {there or 'none'}){explicit}")
    return img_dir, ann_file


def split_paths(data_cfg, part):
    """(image folder, annotation file) of part "train" or "val" of the data configuration.

    data.<part>_images and data.<part>_annotations when set (both or neither; the caller resolves
    them to absolute paths), else root/<data.<part>_split> and root/annotations/instances_<split>.json.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    images_key, anns_key = f"{part}_images", f"{part}_annotations"
    images, anns = data_cfg.get(images_key), data_cfg.get(anns_key)
    if not images and not anns:
        if not data_cfg.get(f"{part}_split"):
            raise DataError(f"data.{part}_split is not set: name the {part} image folder under data.root, or set "
                            f"data.{images_key} and data.{anns_key}")
        return _layout_paths(data_cfg, data_cfg[f"{part}_split"], part)
    for missing, given in ((anns_key, images_key), (images_key, anns_key)):
        if not data_cfg.get(missing):
            raise DataError(f"data.{missing} is not set but data.{given} is: give both (the image folder and the "
                            f"COCO-format annotation file of the {part} set)")
    img_dir, ann_file = Path(images).expanduser(), Path(anns).expanduser()
    if not img_dir.exists():
        raise DataNotFoundError(f"image folder {img_dir} does not exist (data.{images_key})")
    if not img_dir.is_dir():
        raise DataError(f"image folder {img_dir} is not a folder (data.{images_key})")
    if not ann_file.exists():
        raise DataNotFoundError(f"annotation file {ann_file} does not exist (data.{anns_key})")
    if not ann_file.is_file():
        raise DataError(f"annotation file {ann_file} is not a file (data.{anns_key}); expected a COCO-format JSON file")
    return img_dir, ann_file


def build_split(data_cfg, part):
    """CocoDetection of part "train" (random train transforms) or "val" (deterministic test transforms).

    Paths from split_paths: explicit data.<part>_images and data.<part>_annotations, or the
    root/<split> layout. Every problem with the data is a DataError (DataNotFoundError, also a
    FileNotFoundError, for paths that do not exist) naming the path and the configuration key.
    """
    img_dir, ann_file = split_paths(data_cfg, part)
    return CocoDetection(img_dir, ann_file, make_transforms(data_cfg, part == "train"))


def build_dataset(data_cfg, split, train):
    """CocoDetection for images ``root/<split>`` and ``root/annotations/instances_<split>.json``.

    ``data_cfg['root']`` falls back to the COCO_ROOT environment variable when None or empty;
    ``train`` selects the random train transforms or the deterministic test transforms.
    build_split also reads the explicit paths and names the configuration keys in its errors.
    """
    img_dir, ann_file = _layout_paths(data_cfg, split)
    return CocoDetection(img_dir, ann_file, make_transforms(data_cfg, train))

def collate(batch):
    """Stack (image, target) pairs into a zero-padded batch.

    Returns ``images`` (B, 3, Hmax, Wmax) float32 padded at the bottom/right, ``padding_mask``
    (B, Hmax, Wmax) bool, True on padding, and ``targets`` (list of target dicts). Each image keeps its
    top-left origin, so box pixel coordinates are also batch coordinates.
    """
    images = [image for image, _ in batch]
    h_max = max(image.shape[1] for image in images)
    w_max = max(image.shape[2] for image in images)
    padded = images[0].new_zeros((len(images), 3, h_max, w_max))
    padding_mask = torch.ones((len(images), h_max, w_max), dtype=torch.bool)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        padded[i, :, :h, :w] = image
        padding_mask[i, :h, :w] = False
    return {"images": padded, "padding_mask": padding_mask, "targets": [target for _, target in batch]}
