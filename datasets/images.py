"""Reading image files: the COCO-format sets' images and a folder of one's own (`find_images`,
`UnlabelledImages`, used by `python -m experiments predict`).

`read_rgb` decodes any file PIL reads into 8-bit RGB: 16-bit images keep their high byte,
greyscale is repeated over the channels. Two frames:

- as stored (the data sets): the pixels as the file holds them. COCO-format annotations (and the
  width and height of 'images') are in this frame, as pycocotools and COCO's tools read them, so an
  EXIF orientation is not applied (rotating the pixels would misplace every box); the first such
  image a process reads is named once on stderr.
- as viewed (`as_viewed=True`, one's own images): as an image viewer shows the file, with its EXIF
  orientation applied and transparent pixels over white.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .errors import DataError

EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 2-8 mirror and/or rotate
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_orientation_noted = False  # per process: the first stored-frame image with an EXIF orientation is named once


def read_rgb(path, label=None, as_viewed=False):
    """The image at `path` as an RGB PIL image, fully decoded; a DataError naming it (and `label`,
    e.g. "image id 3") when it cannot be read.

    PIL decodes lazily, so a truncated or corrupt file is only noticed by load(); with
    ImageFile.LOAD_TRUNCATED_IMAGES False (PIL's default, never changed here) load() raises for it.
    """
    name = f"image {path}" + (f" ({label})" if label else "")
    try:
        with Image.open(path) as pil:
            pil.load()
            if as_viewed:
                pil = ImageOps.exif_transpose(pil)
            else:
                _note_orientation(pil, name)
            if pil.mode in ("I", "F") or pil.mode.startswith("I;16"):
                return _wide_to_rgb(pil, name)
            if as_viewed and (pil.mode in ("RGBA", "LA", "PA") or "transparency" in pil.info):
                rgba = pil.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            return pil.convert("RGB")
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        detail = str(e) or "no detail"
        raise DataError(f"{name} cannot be read: {type(e).__name__}: {detail}") from None


def _wide_to_rgb(pil, name):
    """An RGB image of a decoded single-channel image with more than 8 bits per pixel.

    PIL's convert("RGB") clips such values at 255 (a 16-bit image becomes all white), so 16-bit values
    (modes I;16*, and mode I, which PIL uses for 16-bit greyscale too) keep their high byte, as PIL
    itself reads 16-bit colour PNGs; the grey channel is repeated. Values beyond 16 bits and
    floating-point pixels (mode F) have no agreed 8-bit scale: a DataError naming the file.
    """
    values = np.asarray(pil)
    if pil.mode == "F" or (values.size and (values.min() < 0 or values.max() > 65535)):
        what = "floating-point pixels (PIL mode F)" if pil.mode == "F" else "pixel values beyond 16 bits"
        raise DataError(f"{name} has {what}, which have no agreed 8-bit scale; "
                        f"convert it to 8 or 16 bits per channel")
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _note_orientation(pil, name):
    """Notes (once per process) a stored-frame image whose EXIF orientation is not upright. Checked
    when an image is read (its header is parsed then anyway), not when a set is built, which would
    open every file of the set in every process."""
    global _orientation_noted
    if _orientation_noted:
        return
    orientation = pil.getexif().get(EXIF_ORIENTATION)
    if orientation not in (None, 1):
        _orientation_noted = True
        print(f"note: {name} has the EXIF orientation {orientation}; it is used as stored, not "
              f"rotated, since COCO-format boxes are in the stored pixel frame (other such images "
              f"are not named)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# images of one's own

def find_images(inputs):
    """The image files of `inputs` (files and folders), in order: a file as given (whatever its
    name), a folder's files with an image suffix (IMAGE_SUFFIXES, any case) found recursively, sorted.
    A path that does not exist is a DataError naming it; so is a folder without images."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"folder {item} holds no image files (looked for {', '.join(IMAGE_SUFFIXES)}, "
                                f"in subfolders too)")
            found.extend(files)
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return found


class UnlabelledImages(torch.utils.data.Dataset):
    """Image files with the test transforms of a data configuration, for prediction.

    ``dataset[i]`` is ``(image, info)`` with the transformed (3, H, W) float32 image and
    ``info = {"path", "orig_size", "size"}`` (sizes (h, w) int64; orig_size in the frame as viewed),
    or ``(None, {"path", "error"})`` for a file that cannot be read, so that one bad file does not
    stop a loader."""

    def __init__(self, paths, transforms):
        self.paths = list(paths)
        self.transforms = transforms

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            image = tv_tensors.Image(F.pil_to_tensor(read_rgb(path, as_viewed=True)))
        except DataError as e:
            return None, {"path": path, "error": str(e)}
        height, width = image.shape[-2:]
        nothing = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
                   "labels": torch.zeros(0, dtype=torch.int64)}
        image, _ = self.transforms(image, nothing)
        return image.as_subclass(torch.Tensor), {"path": path, "orig_size": torch.tensor([height, width]),
                                                 "size": torch.tensor(image.shape[-2:])}
