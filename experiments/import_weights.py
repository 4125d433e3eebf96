"""`python -m experiments import-weights`: a checkpoint of another code base as a checkpoint of a
manifest row, which `python -m experiments eval MANIFEST --row ROW --checkpoint P` evaluates.

    python -m experiments import-weights --from ks-detr ks_dab_detr_r50.pth table1 --row dab_r50_ks

Sources: `ks-detr`, the checkpoints the KS-DETR authors release (detrex; models/convert_ksdetr.py).
The row must describe the checkpoint's model (variant, KS mode, sizes, backbone), else one error
names what differs. The written file holds `model` (every weight of the row's model), `config`
(the row's resolved configuration, which `eval` then uses), `num_classes` and `imported_from`
(the source file, its sha256, what it held, the entries left out and why). By default it goes to
<results>/runs/<manifest>/<row>/authors_checkpoint.pth, beside the row's own records, which it
does not touch (a row's run reads checkpoint.pth only).
"""
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_model
from models.backbone import file_sha256
from models.convert_hf import ConversionError
from models.convert_ksdetr import convert, describe, read_checkpoint
from models.serialization import CHECKSUM, content_checksum

from . import records
from .build import model_config, resolve_row
from .config import Manifest
from .errors import RunError

SOURCES = {"ks-detr": "the KS-DETR authors' detrex checkpoints (models/convert_ksdetr.py)"}
DEFAULT_NAME = "authors_checkpoint.pth"


@dataclass
class Imported:
    path: Path  # the file written
    summary: str  # what the source held
    mapped: int  # tensors written
    leftovers: dict  # source entry -> why it is not used


def import_weights(source, path, manifest_name, row, out=None, overrides=(), force=False, results=records.RESULTS):
    """Converts the checkpoint at `path` (a `source` of SOURCES) into a checkpoint of the manifest
    row and writes it to `out` (default: <results>/runs/<manifest>/<row>/authors_checkpoint.pth).
    ConversionError (one line, naming the file and the keys) when it cannot be read, is not the
    row's model, or holds keys that are neither used nor expected leftovers; RunError when `out`
    is a folder, or exists and not `force`."""
    if source not in SOURCES:
        raise RunError(f"--from {source!r}: unknown source; expected one of {sorted(SOURCES)}")
    manifest = Manifest(manifest_name)
    where = f"manifest {manifest.path}, row {row!r}"
    cfg, _ = resolve_row(manifest, row, overrides, where=where)
    out = Path(out) if out else records.run_dir(manifest.name, row, results) / DEFAULT_NAME
    if out.is_dir():  # --force replaces a file, never a folder
        raise RunError(f"--out {out} is a folder; --out names the checkpoint file to write, e.g. {out / DEFAULT_NAME}")
    if out.exists() and not force:
        raise RunError(f"{out} exists; pass --force to replace it, or --out another file")
    path = Path(path)
    checkpoint = read_checkpoint(path)
    found = describe(checkpoint["model"])
    problems = found.mismatches(cfg["model"])
    if problems:
        raise ConversionError(f"{path} is {found.summary()}, which {where} does not describe: {'; '.join(problems)}")
    model, _ = build_model(model_config(cfg, pretrained=False), found.num_classes)  # every weight: the checkpoint's
    target = model.state_dict()
    weights, leftovers = convert(checkpoint, target, str(path))
    model.load_state_dict({**target, **weights})
    state = {"model": model.state_dict(), "config": cfg, "num_classes": found.num_classes, "epoch": None,
             "imported_from": {"source": source, "file": str(path.resolve()), "sha256": file_sha256(path),
                               "held": found.summary(), "iteration": _plain(checkpoint.get("iteration")),
                               "left_out": leftovers}}
    state[CHECKSUM] = content_checksum(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    records.atomic_write(out, buffer.getvalue())
    return Imported(out, found.summary(), len(weights), leftovers)


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
