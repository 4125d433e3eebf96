"""A row's checkpoints: writing them (atomically, never a diverged state, a full disk named with the
space needed), reading them (the previous one when the latest is damaged) and a row's checkpoint with
the configuration that rebuilds its model (`load_checkpoint`).

Reading runs no code: every file is read by models/serialization.load_plain (weights_only: tensors and plain
data only), so a checkpoint whose pickle would call a function is refused with one error line. Each
checkpoint this project writes holds a checksum of its contents (`checksum`: sha256 over every tensor's
bytes and every other value), verified on every read: a file damaged in a way the zip reader does not
notice is refused like a truncated one. Checkpoints written before checksums existed load unchecked.
The checksum costs about 1.2 s per save and per read of a COCO-size checkpoint (DAB-DETR R50 with
its AdamW state, 526 MB; torch.save of it takes 2.5 s) on this project's 2-core CPU machine.

Resuming: checkpoint.pth (written atomically by rank 0 after each epoch's evaluation, and every
`train.checkpoint_every_iters` steps when set) holds the model, optimizer, scheduler, history and
configuration. A SLURM timeout or preemption in the middle of an epoch resumes from the last
checkpoint: the steps since then are trained again (at most one epoch, or checkpoint_every_iters steps).
"""
import errno
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_model
from models.serialization import CHECKSUM, UnreadableFile, checksum_problem, content_checksum, load_plain

from . import records
from .build import check_buildable, model_config
from .config import DEFAULTS, ConfigError, Manifest, diff, flatten, merge, parse_override
from .errors import RunError, first_names

CHECKPOINT = "checkpoint.pth"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pth"  # the one before, kept as a fallback for a damaged latest


def nonfinite_weights(model):
    """Names of the model's floating-point weights and buffers holding NaN or inf."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


def check_weights(model, where, kept="the checkpoint on disk"):
    """RunError when the weights hold NaN or inf ("the weights <where> are not finite ...; not
    saved: <kept> keeps the last finite state"), so that a diverged state is never saved."""
    bad = nonfinite_weights(model)
    if bad:
        raise RunError(f"the weights {where} are not finite ({first_names(bad)}); not saved: {kept} keeps the last "
                       f"finite state")


def save_checkpoint(path, model, optimizer, scheduler, epoch, history, cfg, step=0, partial=None, total_batch=None,
                    classes=None):
    """Everything needed to resume after `epoch` completed epochs (and `step` optimizer steps of the
    next one, `partial` its mean losses so far), and `classes` (CocoDetection.classes(): the names
    and data-set ids of the labels, so that `predict` needs no data set). Written to a temporary file, fsynced and renamed;
    the checkpoint it replaces becomes checkpoint.prev.pth. Refuses (RunError) weights that are not
    finite, so a diverged run never replaces a good checkpoint. A full disk is a DiskFull naming the
    file and the space it needs; no temporary file is left behind."""
    path = Path(path)
    # the engine checks on every process first (DDP: all stop together); this is the last guard
    check_weights(model, f"at epoch {epoch + 1}, iteration {step}" if step else f"after epoch {epoch}", path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "partial": partial,
             "total_batch_size": total_batch, "history": history, "config": cfg, "classes": classes}
    state[CHECKSUM] = content_checksum(state)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS_CHECKPOINT))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written file behind
        full = _disk_full(e)
        if full is None:
            raise
        # the tensors are nearly all of a checkpoint; the one it replaces is about as large
        needed = max(_state_bytes(state), path.stat().st_size if path.is_file() else 0)
        error = DiskFull(f"the disk is full ({full.strerror or 'no space left'}): the checkpoint {path} cannot be "
                         f"written; it needs about {_size(needed)}, and {_free(path.parent)} are free there. The "
                         f"checkpoints already on disk are kept: free some space, then continue with "
                         f"`run ... --resume`")
        error.errno = full.errno
        raise error from None


class DiskFull(RunError, OSError):
    """A checkpoint that a full disk (or an exceeded quota) kept from being written: a RunError whose
    message says so, which file and how much space it needs; also an OSError (its errno ENOSPC or
    EDQUOT), for callers that catch those."""


def _disk_full(error):
    """The OSError of a full disk or an exceeded quota behind `error` (torch.save reports a failed write
    as a RuntimeError of its zip writer, with the OSError as its context), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _state_bytes(obj):
    """Bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _size(n):
    """'1.2 GB', '340.5 MB', '2.0 kB' or '12 bytes'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _free(folder):
    try:
        return _size(shutil.disk_usage(folder).free)
    except OSError:
        return "an unknown amount"


# The keys of the checkpoints written before checksums (runs and import-weights): a file without a
# checksum is read unchecked only when it holds no other key, so a damaged key name is not a way round.
BEFORE_CHECKSUMS = {"model", "optimizer", "scheduler", "epoch", "step", "partial", "total_batch_size", "history",
                    "config", "classes", "num_classes", "imported_from"}


def _read(path):
    """(state, 'sha256:<hex>' of the bytes it was read from) of one checkpoint file; RunError when it
    is damaged, refused or not a checkpoint of this project."""
    try:
        # hashed, then loaded from the same open file: the digest is of the bytes used, even if the
        # path is replaced meanwhile (checkpoints are replaced by a rename)
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
            state = load_plain(path, f)
    except (OSError, UnreadableFile) as e:
        raise RunError(str(e) if isinstance(e, UnreadableFile) else f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunError(f"{path}: not a checkpoint of this project (expected a dict with a 'model' state dict)")
    problem = checksum_problem(state, BEFORE_CHECKSUMS, "checkpoint of this project")
    if problem:
        raise RunError(f"{path} is damaged: {problem}")
    bad = [str(k) for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise RunError(f"{path}: its 'model' holds entries that are not tensors ({first_names(bad)})")
    return state, "sha256:" + digest


def read_checkpoint(path, fallback=True):
    """(state, path read) of a checkpoint. When `path` is a run's checkpoint.pth and it is missing or
    damaged, checkpoint.prev.pth (the one before) is read instead (with `fallback`), saying so; a
    RunError names every file that could not be read."""
    return _read_checkpoint(path, fallback)[:2]


def _read_checkpoint(path, fallback=True):
    """read_checkpoint's (state, path read) and the sha256 of the file read."""
    path = Path(path)
    previous = path.with_name(PREVIOUS_CHECKPOINT)
    if not fallback or path.name != CHECKPOINT or not previous.is_file():
        if not path.is_file():
            raise RunError(f"no checkpoint at {path}")
        state, digest = _read(path)
        return state, path, digest
    problem = f"{path} is missing"
    if path.is_file():
        try:
            state, digest = _read(path)
            return state, path, digest
        except RunError as e:
            problem = str(e)
    try:
        state, digest = _read(previous)
    except RunError as e:
        raise RunError(f"{problem}; the previous checkpoint cannot be used either: {e}") from None
    print(f"warning: {problem}; using the previous checkpoint {previous} instead", file=sys.stderr, flush=True)
    return state, previous, digest


def set_damaged_aside(path):
    """Renames a damaged checkpoint to <name>.damaged-<time> (kept for inspection), so that the next
    save does not rotate it over the previous checkpoint that the run resumed from."""
    path = Path(path)
    if path.is_file():
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        print(f"warning: the damaged {path.name} was renamed to {aside}", file=sys.stderr, flush=True)


def has_checkpoint(directory):
    return any((Path(directory) / name).is_file() for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))



# What makes a checkpoint another row's model rather than this row's at another size: a checkpoint
# that differs from its row here is refused; other differences follow the checkpoint's configuration.
MODEL_KIND = ("model.variant", "model.ks.mode", "model.backbone.name")


@dataclass
class Checkpoint:
    """A row's checkpoint with the configuration to rebuild its model: the checkpoint's own (its
    `config`, overrides applied) or, for a checkpoint without one, the manifest row's."""
    manifest: Manifest
    row: str
    path: Path
    state: dict
    cfg: dict
    row_cfg: dict  # the row's (as its run recorded it, else the manifest's), overrides applied
    source: str  # where cfg came from, for the records
    sha256: str  # 'sha256:<hex>' of the file's bytes that were read

    def changed_model_keys(self):
        """Model keys where the checkpoint's configuration differs from the manifest row's."""
        return [k for k in diff(self.row_cfg, self.cfg) if k.startswith("model.")]

    def build_model(self, num_classes, device="cpu"):
        """The trained model (evaluation mode) on `device`. The backbone starts from a random
        initialisation: the checkpoint overwrites every weight, so no pretrained file is needed. A
        RunError names the file, the row and what differs when the weights do not fit the model."""
        held = self.state.get("num_classes")  # written by import-weights
        if held is not None and held != num_classes:
            raise RunError(f"{self.path} holds a model of {held} classes, the data set has {num_classes}")
        model, _ = build_model(model_config(self.cfg, pretrained=False), num_classes)
        problems = weight_mismatches(self.state["model"], model.state_dict())
        if problems:
            raise RunError(f"{self.path} does not fit the model of row {self.row!r} ({self._described()}, "
                           f"{num_classes} classes): {'; '.join(problems)}")
        model.load_state_dict(self.state["model"])
        return model.to(device).eval()

    def note(self):
        """The line to print (once, by rank 0) when the checkpoint's configuration differs from the
        row's where the weights stay the same, or None."""
        changed = self.changed_model_keys()
        return (f"{self.row}: the checkpoint's configuration differs from the row's at {', '.join(changed)}; "
                f"using the checkpoint's") if changed else None

    def _described(self):
        m = self.cfg["model"]
        return f"{m['variant']}, KS mode {m['ks']['mode']}, hidden_dim {m['hidden_dim']}"


def weight_mismatches(found, expected):
    """What differs between a checkpoint's weights and a model's state dict: keys missing from the
    file, keys the model lacks, and shapes, each with its first names; [] when they fit."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing from the file ({first_names(missing, 3)})")
    if extra:
        problems.append(f"{len(extra)} weights the model does not have ({first_names(extra, 3)})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({first_names(shapes, 3)})")
    return problems


def _ran_with(directory):
    """The configuration the row's run recorded (its config.yaml: the manifest row with the run's
    overrides), or None when there is none or it cannot be read."""
    if not (Path(directory) / "config.yaml").is_file():
        return None
    try:
        cfg = records.read_config(Path(directory) / "config.yaml")
        return merge(DEFAULTS, cfg, f"{directory}/config.yaml")
    except (RunError, ConfigError):
        return None


def load_checkpoint(manifest_name, row, checkpoint=None, overrides=(), results=records.RESULTS):
    """The checkpoint of a row (default: the run's checkpoint.pth) and its configuration; a RunError
    naming the file when it is missing or not a checkpoint of this project, and when its
    configuration is of another kind of model than the row's (MODEL_KIND: another variant, KS mode or
    backbone; give it with the row it was trained for). The row's configuration is the one its run
    recorded (config.yaml, the run's overrides included) where there is a run, else the manifest's.
    Other differences (sizes, evaluation settings) follow the checkpoint's configuration;
    `Checkpoint.note()` says so."""
    manifest = Manifest(manifest_name)
    directory = records.run_dir(*manifest.record_of(row), results)
    ran_with = _ran_with(directory)
    row_cfg = ran_with or manifest.resolve(row)
    row_source = f"{directory / 'config.yaml'}" if ran_with else f"manifest {manifest.path}"
    if checkpoint:  # a named file: no fallback
        path = Path(checkpoint)
        if not path.is_file():
            raise RunError(f"{row}: no checkpoint at {path}")
        state, path, digest = _read_checkpoint(path, fallback=False)
    else:  # the run's own: the previous one when the latest is damaged or missing
        path = directory / CHECKPOINT
        if not has_checkpoint(directory):
            raise RunError(f"{row}: no checkpoint at {path}: the row has not finished an epoch here; train it with "
                           f"`python -m experiments run {manifest.name} --row {row}`, or pass --checkpoint PATH")
        state, path, digest = _read_checkpoint(path)
    own = state.get("config")
    if own is not None and not isinstance(own, dict):
        raise RunError(f"{path}: its 'config' is a {type(own).__name__}, not a configuration of this project")
    cfg = merge(DEFAULTS, own, f"{path}, config") if own else row_cfg
    source = "the checkpoint" if own else row_source
    for text in overrides:
        try:
            cfg = merge(cfg, parse_override(text), f"override {text!r}")
            row_cfg = merge(row_cfg, parse_override(text), f"override {text!r}")
        except ConfigError as e:
            raise ConfigError(f"row {row!r}: {e}") from None
    ck = Checkpoint(manifest, row, path, state, cfg, row_cfg, source, digest)
    other_model = [k for k in ck.changed_model_keys() if k in MODEL_KIND]
    if other_model:
        flat_row, flat_own = flatten(row_cfg), flatten(cfg)
        raise RunError(f"{path} is not a checkpoint of row {row!r} of manifest {manifest.path}: its model differs at "
                       + ", ".join(f"{k} ({flat_own.get(k)!r} in the checkpoint, {flat_row.get(k)!r} in the row)"
                                   for k in other_model) + "; give it with the row it was trained for")
    check_buildable(cfg, f"{path} (row {row!r} of manifest {manifest.path})")
    return ck
