"""How a row's run starts: the decision to start fresh, resume, skip a finished row or refuse
(another process trains it, an unfinished record), moving old records aside, and env.json. The files
themselves are written by experiments/records.py, the checkpoints by experiments/checkpoints.py.
"""
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torchvision

from models import is_teacher_parameter
from models.layers import MSDeformAttn
from models.ops.ms_deform_attn import path_taken

from slurm import jobs as slurm_jobs

from . import records
from .checkpoints import has_checkpoint
from .errors import RunError


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
        # which MSDeformAttn implementation runs (they differ in rounding); None without the op
        "ms_deform_attn": path_taken(device) if any(isinstance(m, MSDeformAttn) for m in model.modules())
        else None,
        "launcher": ctx.source,
        "world_size": ctx.world_size,
        "backend": torch.distributed.get_backend() if ctx.distributed else None,
        "slurm_job_id": slurm_jobs.job_id(),
        "batch_size_per_process": batch,
        "accumulation_steps": accumulation,
        "total_batch_size": total,
        "backbone_init": model.backbone.init,
        "parameters": n_params,
        "teacher_parameters": n_teacher,
        "resumed_after_epoch": resumed_after,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


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
    me = slurm_jobs.job_id()
    holder = records.heartbeat_holder(directory)
    earlier_me = (me and holder is not None and holder.get("slurm_job_id") == me
                  and int(holder.get("slurm_restart") or 0) < slurm_jobs.restart_count())
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
    jobs = [j["job_id"] for j in slurm_jobs.submissions(directory) if j.get("job_id") and j["job_id"] != me]
    if jobs:
        active = {j: s for j, s in (slurm_jobs.job_states(jobs[-1:]) or {}).items() if s in slurm_jobs.ACTIVE_STATES}
        if active:
            job, state = next(iter(active.items()))
            raise RunError(f"{row}: SLURM job {job} of this row is {state} (see {directory / slurm_jobs.SUBMISSIONS}); "
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

