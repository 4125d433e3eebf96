"""How a row's run starts and what it keeps: the decision to start fresh, resume, skip a finished row
or refuse (another process trains it, an unfinished record), moving old records aside, checkpoints
and env.json. The files themselves are written by experiments/records.py.

Resuming: checkpoint.pth (written atomically by rank 0 after each epoch's evaluation, and every
`train.checkpoint_every_iters` steps when set) holds the model, optimizer, scheduler, history and
configuration. A SLURM timeout or preemption in the middle of an epoch resumes from the last
checkpoint: the steps since then are trained again (at most one epoch, or checkpoint_every_iters steps).
"""
import errno
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torchvision

from models import is_teacher_parameter

from . import records, slurm_jobs
from .errors import RunError, first_names


def cpu_name():
    """The CPU model with its bfloat16 instruction sets (they decide the speed of the backbone's
    bfloat16 autocast), e.g. "Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)"; from
    /proc/cpuinfo where there is one, else platform.processor()."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = sorted(set(fields.get("flags", "").split()) & {"amx_bf16", "avx512_bf16"})
    name = fields.get("model name") or platform.processor() or None
    return f"{name} ({', '.join(flags)})" if name and flags else name


def environment(cfg, model, ctx, plan, resumed_after=None):
    n_params = sum(p.numel() for p in model.parameters())
    n_teacher = sum(p.numel() for n, p in model.named_parameters() if is_teacher_parameter(n))
    device = ctx.device
    batch, accumulation, total = plan
    return {
        "git_sha": records.git_sha(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "launcher": ctx.source,
        "world_size": ctx.world_size,
        "backend": torch.distributed.get_backend() if ctx.distributed else None,
        "slurm_job_id": records.slurm_job_id(),
        "batch_size_per_process": batch,
        "accumulation_steps": accumulation,
        "total_batch_size": total,
        "backbone_init": model.backbone.init,
        "parameters": n_params,
        "teacher_parameters": n_teacher,
        "resumed_after_epoch": resumed_after,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


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


def _read(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle errors, ...: all mean a damaged file
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       f"it is damaged or not a checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path}: not a checkpoint of this project (expected a dict with 'model')")
    return state


def read_checkpoint(path, fallback=True):
    """(state, path read) of a checkpoint. When `path` is a run's checkpoint.pth and it is missing or
    damaged, checkpoint.prev.pth (the one before) is read instead (with `fallback`), saying so; a
    RunError names every file that could not be read."""
    path = Path(path)
    previous = path.with_name(PREVIOUS_CHECKPOINT)
    if not fallback or path.name != CHECKPOINT or not previous.is_file():
        if not path.is_file():
            raise RunError(f"no checkpoint at {path}")
        return _read(path), path
    problem = f"{path} is missing"
    if path.is_file():
        try:
            return _read(path), path
        except RunError as e:
            problem = str(e)
    try:
        state = _read(previous)
    except RunError as e:
        raise RunError(f"{problem}; the previous checkpoint cannot be used either: {e}") from None
    print(f"warning: {problem}; using the previous checkpoint {previous} instead", file=sys.stderr, flush=True)
    return state, previous


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


def move_aside(directory, row):
    """Moves a run's record to <row>.replaced-<time> (never deletes one); returns the new path."""
    directory = Path(directory)
    aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    shutil.move(str(directory), aside)
    print(f"{row}: --force: the previous record was moved to {aside}")
    return aside


def check_not_running(directory, row):
    """RunError when another live process trains this row (its heartbeat is fresh) or one of its
    SLURM jobs is queued or running; our own earlier incarnation (the same SLURM job before it was
    requeued: a lower restart count) is fine, a second launch inside the same job is not."""
    directory = Path(directory)
    me = records.slurm_job_id()
    holder = records.heartbeat_holder(directory)
    earlier_me = (me and holder is not None and holder.get("slurm_job_id") == me
                  and int(holder.get("slurm_restart") or 0) < records.slurm_restart_count())
    if holder is not None and not earlier_me:
        job = holder.get("slurm_job_id")
        states = slurm_jobs.job_states([job]) if job else None
        if states is None or states.get(job) in slurm_jobs.ACTIVE_STATES:  # alive, or we cannot tell
            age = int(time.time() - holder["time"])
            raise RunError(
                f"{row}: {directory} is being trained by another process (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, SLURM job {job or '-'}, heartbeat {age} s ago). Wait for it; if that process "
                f"is dead, its heartbeat goes stale after {records.HEARTBEAT_STALE_S} s (or delete "
                f"{directory / records.HEARTBEAT}).")
    jobs = [j["job_id"] for j in records.slurm_jobs(directory) if j.get("job_id") and j["job_id"] != me]
    if jobs:
        active = {j: s for j, s in (slurm_jobs.job_states(jobs[-1:]) or {}).items() if s in slurm_jobs.ACTIVE_STATES}
        if active:
            job, state = next(iter(active.items()))
            raise RunError(f"{row}: SLURM job {job} of this row is {state} (see {directory / records.SLURM_RECORD}); "
                           f"cancel it (scancel {job}) or let it run")


def prepare_run_dir(directory, row, resume, force):
    """Decides how a row starts. Returns True when it resumes from a checkpoint, False for a fresh
    start, None when it is already done. Never deletes a record: --force moves the old one aside.

    An unfinished record is refused (RunError saying what to pass) unless it is resumed from its
    checkpoint, or it failed with nothing to keep (no finished epoch, no checkpoint: a rerun after
    fixing what failed replaces it, saying so). A damaged log.jsonl does not stop --resume, which
    rewrites it from the checkpoint's history; otherwise it is a DamagedLog naming the line."""
    directory = Path(directory)
    check_not_running(directory, row)
    state = records.status(directory)
    if force and directory.exists():
        move_aside(directory, row)
        return False
    if state == "done":
        # printed only when the launch goes no further (not before the error of another configuration)
        records.print_when_decided(f"{row}: already done ({directory}); pass --force to run it again")
        return None
    # "running" gets here only when the heartbeat is our own requeued SLURM job's or its job is gone
    # (check_not_running): that record is as unfinished as an interrupted one
    if state in ("interrupted", "failed", "running"):
        resumable = has_checkpoint(directory)
        log = directory / "log.jsonl"
        last, damaged = records.scan_log(log)
        if resumable and resume:
            if damaged:
                print(f"warning: {damaged}; the log is rewritten from the checkpoint's history", file=sys.stderr,
                      flush=True)
            return True
        if damaged:
            raise records.DamagedLog(f"{row}: {damaged}; " + (
                "pass --resume to continue the run from its checkpoint, which rewrites the log from the "
                "checkpoint's history" if resumable else
                "without a checkpoint the run cannot be resumed: repair or remove the line, or pass --force to "
                "start over (the old record is then moved aside)"))
        failure = _failure(directory) if state == "failed" else None
        if failure is not None and not resumable and not last:
            # nothing to keep (no finished epoch, no checkpoint): a rerun after fixing what failed, e.g.
            # an image that a loader worker could not read, replaces the record
            records.print_when_decided(f"{row}: note: replacing the failed record in {directory} (no epoch "
                                       f"finished, no checkpoint; it failed with {failure})")
            return False
        if not resume or last:
            # never start over silently: that would overwrite the log and checkpoint of finished epochs
            why = ("pass --resume to continue it from its checkpoint" if resumable else
                   "its checkpoint is missing, so it cannot be resumed")
            if failure is not None and resumable:
                why = f"fix what failed, then {why}"
            raise RunError(
                f"{row}: {directory} holds an unfinished run ({state}" + (f": {failure};" if failure else ",")
                + f" last finished epoch {last[-1]['epoch'] if last else 'none'}); {why}, or pass --force to start "
                f"over (the old record is then moved aside)")
        print(f"{row}: --resume: no checkpoint in {directory} (no epoch finished); starting from epoch 0")
    return False


def _failure(directory, limit=300):
    """The first line of a run's FAILED (shortened to `limit` characters), or None without one."""
    try:
        text = (Path(directory) / "FAILED").read_text(errors="replace").strip()
    except OSError:
        return None
    line = text.splitlines()[0] if text else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."

