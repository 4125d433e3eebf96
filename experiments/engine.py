"""Training and evaluation of one manifest row, with its run record (experiments/records.py).

One process or several (DDP, experiments/distributed.py): every process trains on its shard of each
batch; only rank 0 writes records, checkpoints and the heartbeat.

Batches. `train.batch_size` images per process and step; one optimizer step sees
batch_size x processes x accumulation images, where accumulation = total_batch_size / (batch_size x
processes) when `train.total_batch_size` is set (else 1). Each micro-batch's loss is weighted by its
share of the step's (all-reduced) box count, so a step's gradient is the gradient of the criterion on
the whole step batch: 2 processes x 2 images, 1 process x 2 images x 2 accumulation steps and 1 process
x 4 images give the same losses and weights (tests/test_distributed.py), up to float rounding and
up to padding (DETR pads a batch to its largest image, so the way images are grouped into per-process
batches changes the padding). The reference has no aspect-ratio grouping here.

Data order and randomness are functions of (seed, epoch, step), not of the process layout: the
training permutation of an epoch is drawn from (seed, epoch) and split into per-step blocks; the
augmentation of sample i in epoch e is drawn from (seed, e, i); dropout is reseeded per step and rank.
So a resumed run continues exactly as an uninterrupted one, at an epoch boundary or (with
`train.checkpoint_every_iters`) in the middle of an epoch.

Evaluation: each process evaluates a shard of the validation images; rank 0 gathers the detections
and runs pycocotools.

Resuming: checkpoint.pth (written atomically by rank 0 after each epoch's evaluation, and every
`train.checkpoint_every_iters` steps when set) holds the model, optimizer, scheduler, history and
configuration. A SLURM timeout or preemption in the middle of an epoch resumes from the last
checkpoint: the steps since then are trained again (at most one epoch, or checkpoint_every_iters steps).
"""
import copy
import math
import os
import platform
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from torch import nn
from tqdm import tqdm

import datasets
from models import build_model, is_teacher_parameter, model_targets
from models.ks_encoder import STUDENT, TEACHER_BRANCHES
from models.postprocess import postprocess

from . import distributed, records
from .config import DEFAULTS, ConfigError, Manifest, diff, merge, new_default_keys, parse_override, variant_available

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)


class RunError(RuntimeError):
    pass


class NotAvailableError(RunError):
    """The row needs a model part that is not built yet (a variant, a backbone)."""


def mix_seed(*parts):
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed):
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name=None):
    return distributed.pick_device(name)


def resolve_root(path):
    """Relative data and weight paths are relative to the repository root."""
    return str(path if path is None or Path(path).is_absolute() else records.REPO / path)


def model_config(cfg):
    """The `model` section as the model builders take it (weights_path resolved)."""
    m = copy.deepcopy(cfg["model"])
    if m["backbone"].get("weights_path"):
        m["backbone"]["weights_path"] = resolve_root(m["backbone"]["weights_path"])
    return m


def check_available(cfg, where):
    """Raises NotAvailableError when the row's variant or backbone is not built yet. Builds the model
    on the meta device (no memory, no weights) to find out, so a row that cannot run fails before any
    record is written or any job is submitted."""
    variant = cfg["model"]["variant"]
    if not variant_available(variant):
        import models

        built = sorted(v for v, m in models.VARIANTS.items() if m)
        raise NotAvailableError(f"{where}: model.variant {variant!r} is not available yet (built: {built})")
    m = model_config(cfg)
    m["backbone"]["weights"] = None
    try:
        with torch.device("meta"):
            build_model(m, 2)
        return
    except NotImplementedError as e:
        raise NotAvailableError(f"{where}: {e}") from None
    except Exception:  # noqa: BLE001 - maybe only the meta device's limits: build it for real to know
        pass
    try:
        build_model(m, 2)
    except NotImplementedError as e:
        raise NotAvailableError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{where}: the model cannot be built: {type(e).__name__}: {e}") from None


def batch_plan(train_cfg, world_size):
    """(per-process batch, accumulation steps, total batch per optimizer step) for `world_size`
    processes; a RunError when train.total_batch_size cannot be kept."""
    b, total = train_cfg["batch_size"], train_cfg["total_batch_size"]
    per_step = b * world_size
    if total is None:
        return b, 1, per_step
    if per_step > total or total % per_step:
        raise RunError(f"train.total_batch_size={total} cannot be kept with train.batch_size={b} on {world_size} "
                       f"process(es) ({per_step} images per micro-step): it must be a multiple of it. "
                       f"Change train.batch_size or the number of processes.")
    return b, total // per_step, total


# --------------------------------------------------------------------------------------------------
# data

class SeededDataset(torch.utils.data.Dataset):
    """A training set indexed by (epoch, index): sample `index` of `epoch` is augmented with the RNG
    seeded from (seed, epoch, index), whichever process or loader worker loads it."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


class TrainSampler(torch.utils.data.Sampler):
    """This process's share of an epoch's permutation: the permutation of the n samples drawn from
    (seed, epoch), cut to a multiple of the world size, every world_size-th element from `rank`; so
    consecutive micro-batches of all processes form consecutive blocks of the permutation. Yields
    (epoch, index) for SeededDataset. `set_epoch(epoch, skip)` skips the first `skip` samples."""

    def __init__(self, n, world_size=1, rank=0, seed=0):
        self.n, self.world_size, self.rank, self.seed = n, world_size, rank, seed
        self.epoch, self.skip = 1, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return max(self.n // self.world_size - self.skip, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: (self.n // self.world_size) * self.world_size]
        for i in perm[self.rank::self.world_size][self.skip:].tolist():
            yield self.epoch, i


def build_data(cfg, ctx=None):
    """(train set, val set) for a run configuration; the synthetic set is generated if missing
    (by rank 0, the others wait)."""
    ctx = ctx or distributed.Context()
    data = dict(cfg["data"])
    data["root"] = resolve_root(data["root"])
    if data["dataset"] == "synthetic":
        if not data["root"]:
            raise RunError("data.root must name a folder for the synthetic data set")
        s = data["synthetic"]
        if ctx.is_main:
            datasets.ensure_synthetic(data["root"], s["train"], s["val"], s["seed"], s["size"])
        ctx.barrier()
    return (datasets.build_dataset(data, data["train_split"], train=True),
            datasets.build_dataset(data, data["val_split"], train=False))


def make_train_loader(dataset, batch_size, num_workers, seed, ctx):
    sampler = TrainSampler(len(dataset), ctx.world_size, ctx.rank, seed)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    return torch.utils.data.DataLoader(
        SeededDataset(dataset, seed), batch_sampler=batches, collate_fn=datasets.collate, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=ctx.device.type == "cuda")


def make_eval_loader(dataset, batch_size, num_workers, ctx, max_images=None):
    """This process's shard of the first `max_images` validation images, in order, unpadded."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    shard = list(range(n))[ctx.rank::ctx.world_size]
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=batch_size, shuffle=False,
        collate_fn=datasets.collate, num_workers=num_workers, pin_memory=ctx.device.type == "cuda")


def build_optimizer(model, train_cfg):
    """AdamW; the backbone at its own (lower) lr; no weight decay on normalisation parameters.
    Each parameter group has a `name` ('backbone' or 'transformer', with '/no_decay' for norms)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("backbone.")
        decay = 0.0 if id(p) in norm_params else train_cfg["weight_decay"]
        key = (backbone, decay)
        if key not in groups:
            lr = train_cfg["lr_backbone"] if backbone else train_cfg["lr"]
            label = ("backbone" if backbone else "transformer") + ("/no_decay" if decay == 0.0 else "")
            groups[key] = {"params": [], "lr": lr, "weight_decay": decay, "name": label}
        groups[key]["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])


def main_lr(optimizer):
    """The lr of the non-backbone parameters (what the logs report as `lr`)."""
    for group in optimizer.param_groups:
        if not str(group.get("name", "")).startswith("backbone"):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def to_device(batch, device):
    return (batch["images"].to(device, non_blocking=True), batch["padding_mask"].to(device, non_blocking=True),
            model_targets(batch["targets"], device))


def progress(iterable=None, disable=False, **kwargs):
    interactive = sys.stderr.isatty()
    return tqdm(iterable, dynamic_ncols=True, mininterval=0.5 if interactive else 30, disable=disable, **kwargs)


# --------------------------------------------------------------------------------------------------
# one epoch of training, one evaluation

LOGGED_LOSSES = ("loss", "loss_attn1", "loss_attn2", "loss_attn3", "loss_class", "loss_bbox", "loss_giou")


def _reduce_means(sums, count, ctx):
    """Mean over the steps of every process of per-step loss sums (each rank: its own sums)."""
    if not sums:
        return {}
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=ctx.device)
    ctx.all_reduce_sum(t)
    total = max(t[-1].item(), 1.0)
    return {k: v for k, v in zip(keys, (t[:-1] / total).tolist())}


def train_one_epoch(model, criterion, loader, optimizer, device, clip_max_norm, epoch, max_iters=None, *,
                    accumulation=1, ctx=None, start_step=0, partial=None, on_step=None, seed_key=None):
    """Trains one epoch; returns the mean of the logged losses over its optimizer steps (over all
    processes). `loader` yields this process's micro-batches; `accumulation` micro-batches make one
    step. `start_step`/`partial` continue an epoch from a mid-epoch checkpoint; `on_step(step, sums,
    count)` is called after every optimizer step; `seed_key` (seed, epoch) reseeds dropout per step."""
    ctx = ctx or distributed.Context(device=torch.device(device))
    model.train()
    criterion.train()
    steps = len(loader) // accumulation + start_step
    if max_iters is not None:
        steps = min(steps, max_iters)
    sums, count = {}, 0
    if partial:  # means of the steps before start_step, as every rank's own share
        count = partial["count"]
        sums = {k: v * count for k, v in partial["means"].items()}
    bar = progress(total=steps, initial=start_step, desc=f"epoch {epoch} train", leave=False, disable=not ctx.is_main)
    batches = iter(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(start_step, steps):
        if seed_key is not None:
            torch.manual_seed(mix_seed(*seed_key, step, ctx.rank))
        micro = [to_device(next(batches), device) for _ in range(accumulation)]
        # each micro-batch's loss is normalised by its own (global) box count: reweight to the step's
        counts = torch.tensor([float(sum(len(t["labels"]) for t in m[2])) for m in micro], dtype=torch.float64,
                              device=ctx.device)
        counts = ctx.all_reduce_sum(counts) / ctx.world_size
        weights = (counts.clamp(min=1) / counts.sum().clamp(min=1)).tolist()
        optimizer.zero_grad(set_to_none=True)
        step_losses, bad = {}, None
        for i, (images, mask, targets) in enumerate(micro):
            last = i == accumulation - 1
            with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                losses = criterion(model(images, mask, targets), targets)
                (losses["loss"] * weights[i]).backward()
            if bad is None and not math.isfinite(losses["loss"].item()):
                bad = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            for k in LOGGED_LOSSES:
                if k in losses:
                    step_losses[k] = step_losses.get(k, 0.0) + losses[k].item() * weights[i]
        flag = ctx.all_reduce_sum(torch.tensor([0.0 if bad is None else 1.0], device=ctx.device))
        if flag.item() > 0:
            where = f"rank {ctx.rank}: {bad}" if bad else "on another process"
            raise RunError(f"non-finite loss at epoch {epoch}, iteration {step} ({where})")
        if clip_max_norm > 0:
            nn.utils.clip_grad_norm_(params, clip_max_norm)
        optimizer.step()
        for k, v in step_losses.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        bar.update(1)
        if ctx.is_main:
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}")
        if on_step is not None:
            on_step(step + 1, sums, count)
    bar.close()
    return _reduce_means(sums, count, ctx)


@torch.no_grad()
def evaluate(model, loader, dataset, device, teachers=(), topk=300, max_images=None, desc="eval", ctx=None,
             moved=False):
    """COCO metrics of the student and, with `teachers` (branch names), of each teacher branch's
    last decoder layer with GT masks. Returns {branch: {AP, AP50, ...}} (on every process; each
    process evaluates the images of its `loader`, rank 0 computes the metrics). With `moved`, also
    `attn1_moved`: the student's detections scored on other images (CocoEvaluator.
    moved_to_other_images), equal to its own AP for a detector that ignores its input."""
    ctx = ctx or distributed.Context(device=torch.device(device))
    model.eval()
    branches = (STUDENT,) + tuple(teachers)
    evaluators = {b: datasets.CocoEvaluator(dataset.coco, dataset.category_ids) for b in branches}
    seen = 0
    bar = progress(loader, desc=desc, leave=False, disable=not ctx.is_main)
    for batch in bar:
        if max_images is not None and seen >= max_images:
            break
        images, mask, targets = to_device(batch, device)
        outputs = model(images, mask, targets if teachers else None, with_teachers=bool(teachers) or None)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        image_ids = [int(t["image_id"]) for t in targets]
        per_branch = {STUDENT: outputs}
        per_branch.update({b: outputs["teacher_outputs"][b][-1] for b in teachers})
        for b, out in per_branch.items():
            dets = postprocess(out["pred_logits"], out["pred_boxes"], orig_sizes, topk)
            evaluators[b].update(image_ids, [d["boxes"] for d in dets], [d["scores"] for d in dets],
                                 [d["labels"] for d in dets])
        seen += len(targets)
    bar.close()
    if ctx.distributed:
        shards = ctx.gather({b: (e.detections, e.image_ids) for b, e in evaluators.items()})
        if ctx.is_main:
            for b, e in evaluators.items():
                e.detections, e.image_ids = [], []
                for shard in shards:
                    e.detections.extend(shard[b][0])
                    e.image_ids.extend(shard[b][1])
    metrics = None
    if ctx.is_main:
        metrics = {b: e.summarize() for b, e in evaluators.items()}
        if moved:  # needs two images to swap; with fewer, undefined (NaN) rather than an error on rank 0 only
            student = evaluators[STUDENT]
            metrics[f"{STUDENT}_moved"] = (student.moved_to_other_images().summarize()
                                           if len(set(student.image_ids)) >= 2
                                           else dict.fromkeys(records.METRICS, math.nan))
    return ctx.broadcast(metrics)


# --------------------------------------------------------------------------------------------------
# a whole row

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


def save_checkpoint(path, model, optimizer, scheduler, epoch, history, cfg, step=0, partial=None, total_batch=None):
    """Everything needed to resume after `epoch` completed epochs (and `step` optimizer steps of the
    next one, `partial` its mean losses so far), written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "partial": partial,
             "total_batch_size": total_batch, "history": history, "config": cfg}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


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
        from . import slurm

        states = slurm.job_states([job]) if job else None
        if states is None or states.get(job) in slurm.ACTIVE_STATES:  # alive, or we cannot tell
            age = int(time.time() - holder["time"])
            raise RunError(
                f"{row}: {directory} is being trained by another process (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, SLURM job {job or '-'}, heartbeat {age} s ago). Wait for it; if that process "
                f"is dead, its heartbeat goes stale after {records.HEARTBEAT_STALE_S} s (or delete "
                f"{directory / records.HEARTBEAT}).")
    jobs = [j["job_id"] for j in records.slurm_jobs(directory) if j.get("job_id") and j["job_id"] != me]
    if jobs:
        from . import slurm

        active = {j: s for j, s in (slurm.job_states(jobs[-1:]) or {}).items() if s in slurm.ACTIVE_STATES}
        if active:
            job, state = next(iter(active.items()))
            raise RunError(f"{row}: SLURM job {job} of this row is {state} (see {directory / records.SLURM_RECORD}); "
                           f"cancel it (scancel {job}) or let it run")


def prepare_run_dir(directory, row, resume, force):
    """Decides how a row starts. Returns True when it resumes from a checkpoint, False for a fresh
    start, None when it is already done. Never deletes a record: --force moves the old one aside."""
    directory = Path(directory)
    check_not_running(directory, row)
    state = records.status(directory)
    if force and directory.exists():
        move_aside(directory, row)
        return False
    if state == "done":
        print(f"{row}: already done ({directory}); pass --force to run it again")
        return None
    # "running" gets here only when the heartbeat is our own requeued SLURM job's or its job is gone
    # (check_not_running): that record is as unfinished as an interrupted one
    if state in ("interrupted", "failed", "running"):
        has_checkpoint = (directory / "checkpoint.pth").is_file()
        last = records.read_log(directory / "log.jsonl")
        if has_checkpoint and resume:
            return True
        if not resume or last:
            # never start over silently: that would overwrite the log and checkpoint of finished epochs
            why = ("pass --resume to continue it from its checkpoint" if has_checkpoint else
                   f"its checkpoint is missing, so it cannot be resumed")
            raise RunError(
                f"{row}: {directory} holds an unfinished run ({state}, last finished epoch "
                f"{last[-1]['epoch'] if last else 'none'}); {why}, or pass --force to start over (the old record "
                f"is then moved aside)")
        print(f"{row}: --resume: no checkpoint in {directory} (no epoch finished); starting from epoch 0")
    return False


def _launch(ctx):
    """(options for the recorded command, a comment) describing how this run's processes were started."""
    if not ctx.distributed:
        return [], ""
    if ctx.source == "local":
        return os.environ.get(distributed.LOCAL_LAUNCH, "").split(), f"  # {ctx.world_size} processes"
    job = records.slurm_job_id()
    return [], f"  # {ctx.world_size} processes ({ctx.source}{', SLURM job ' + job if job else ''})"


def train_row(manifest_name, row, overrides=(), resume=False, force=False, device=None, results=records.RESULTS):
    """Trains and evaluates one manifest row, writing its run record. Returns the run directory.

    Run by every process of a distributed launch (torchrun, SLURM, `run --gpus N`): rank 0 decides
    how the row starts and writes the records, the others follow."""
    manifest = Manifest(manifest_name)
    cfg = manifest.resolve(row, overrides)
    check_available(cfg, f"manifest {manifest.path}, row {row!r}")
    directory = records.run_dir(manifest.name, row, results)
    ctx = distributed.setup(device)
    prepared = False
    heartbeat = None  # rank 0's claim on the row, from the decision to start until the end
    try:
        plan = batch_plan(cfg["train"], ctx.world_size)
        decision = None
        if ctx.is_main:
            try:
                with records.row_lock(directory):
                    resuming = _start_records(manifest, row, cfg, overrides, directory, resume, force, ctx)
                    if resuming is not None:
                        heartbeat = records.Heartbeat(directory).start()
                decision = ("ok", resuming)
            except TimeoutError as e:  # the row's lock
                decision = ("error", RunError(f"{row}: {e}"))
            except Exception as e:  # noqa: BLE001 - handed to the other ranks, then raised everywhere
                decision = ("error", e)
        decision = ctx.broadcast(decision)
        if decision[0] == "error":
            raise decision[1]
        resuming = decision[1]
        if resuming is None:
            return directory
        prepared = True
        return _train(cfg, directory, resuming, ctx, plan, heartbeat)
    except (KeyboardInterrupt, SystemExit):
        if prepared and ctx.is_main:
            last = records.last_epoch(directory)
            print(f"{row}: interrupted; the record keeps epochs up to {last or 'none'} and resumes from "
                  f"{directory / 'checkpoint.pth'} (`run ... --resume`)", flush=True)
        raise
    except BaseException as e:
        if prepared and ctx.is_main:
            records.atomic_write(directory / "FAILED", f"{type(e).__name__}: {e}\n")
        raise
    finally:
        if heartbeat:
            heartbeat.stop()
        ctx.close()


def _start_records(manifest, row, cfg, overrides, directory, resume, force, ctx):
    resuming = prepare_run_dir(directory, row, resume, force)
    if resuming is None:
        return None
    if resuming:
        recorded = yaml.safe_load((directory / "config.yaml").read_text())
        added = set(new_default_keys(recorded, cfg))
        changed = [k for k in diff(recorded, cfg) if k not in added]
        if changed:
            raise RunError(f"{row}: the configuration differs from the recorded one in {directory}/config.yaml "
                           f"at {changed}; resume with the same overrides, or --force to start over")
    late = [e for e in cfg["train"]["lr_drop"] if e >= cfg["train"]["epochs"]]
    if late:  # allowed (shortened smoke runs of a table row), but usually an override that missed lr_drop
        print(f"{row}: note: train.lr_drop {late} at or after the last epoch ({cfg['train']['epochs']}): "
              f"{'this drop does' if len(late) == 1 else 'these drops do'} not happen in this run", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "FAILED").unlink(missing_ok=True)
    records.write_yaml(directory / "config.yaml", cfg)
    options, note = _launch(ctx)
    records.append_command(directory / "command.txt",
                           records.run_command(manifest.name, row, overrides, resume=bool(resuming), options=options)
                           + note)
    return resuming


def _train(cfg, directory, resuming, ctx, plan, heartbeat=None):
    """Trains and evaluates a prepared run. `heartbeat`: rank 0's running Heartbeat (stopped by the
    caller), updated with the progress."""
    tc = cfg["train"]
    device = ctx.device
    batch, accumulation, total = plan
    seed_everything(tc["seed"] + ctx.rank)
    train_set, val_set = build_data(cfg, ctx)
    torch.manual_seed(tc["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model, criterion = build_model(model_config(cfg), train_set.num_classes)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=tc["lr_drop"], gamma=0.1)
    history, start, start_step, partial = [], 0, 0, None  # start: epochs already completed
    checkpoint = directory / "checkpoint.pth"
    if resuming:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
        start_step, partial = state.get("step", 0), state.get("partial")
        if start_step and state.get("total_batch_size") not in (None, total):
            raise RunError(f"{checkpoint} was saved in the middle of epoch {start + 1} with a total batch of "
                           f"{state['total_batch_size']} images per step, but this launch has {total}; resume "
                           f"with the same number of processes x train.batch_size, or set train.total_batch_size")
        if ctx.is_main:
            records.write_log(directory / "log.jsonl", history)  # the checkpoint's history is authoritative
            where = f"after epoch {start}" + (f" and {start_step} steps of epoch {start + 1}" if start_step else "")
            print(f"resumed from {checkpoint} {where}", flush=True)
    elif ctx.is_main:
        records.write_log(directory / "log.jsonl", [])
    if ctx.is_main:
        records.write_json(directory / "env.json", environment(cfg, model, ctx, plan, start if resuming else None))
    seed_everything(tc["seed"] + ctx.rank)

    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc["find_unused_parameters"])

    teachers = TEACHER_BRANCHES[cfg["model"]["ks"]["mode"]] if tc["eval_teachers"] else ()
    workers = cfg["data"]["num_workers"]
    train_loader = make_train_loader(train_set, batch, workers, tc["seed"], ctx)
    val_loader = make_eval_loader(val_set, tc["eval_batch_size"] or batch, workers, ctx, tc["max_eval_images"])
    every = tc["checkpoint_every_iters"]
    for epoch in range(start + 1, tc["epochs"] + 1):  # epochs count from 1, as in the paper
        skip = start_step if epoch == start + 1 else 0
        train_loader.batch_sampler.sampler.set_epoch(epoch, skip * accumulation * batch)
        t0 = time.time()
        lr = main_lr(optimizer)
        label = f"{epoch}/{tc['epochs']}"

        def on_step(step, sums, count, epoch=epoch):
            if heartbeat:
                heartbeat.update(epoch=epoch, iteration=step, phase="train")
            if every and step % every == 0:
                means = _reduce_means(sums, count, ctx)
                if ctx.is_main:
                    save_checkpoint(checkpoint, model, optimizer, scheduler, epoch - 1, history, cfg, step=step,
                                    partial={"means": means, "count": count}, total_batch=total)

        if heartbeat:
            heartbeat.update(epoch=epoch, iteration=skip, phase="train")
        train_losses = train_one_epoch(net, criterion, train_loader, optimizer, device, tc["clip_max_norm"],
                                       label, tc["max_iters_per_epoch"], accumulation=accumulation, ctx=ctx,
                                       start_step=skip, partial=partial if skip else None, on_step=on_step,
                                       seed_key=(tc["seed"], epoch))
        scheduler.step()
        record = {"epoch": epoch, "lr": lr, "train": train_losses}
        if epoch == tc["epochs"] or epoch % tc["eval_every"] == 0:
            if heartbeat:
                heartbeat.update(phase="eval")
            record["eval"] = evaluate(model, val_loader, val_set, device, teachers, cfg["model"]["eval_topk"],
                                      None, desc=f"epoch {label} eval", ctx=ctx, moved=tc["eval_moved"])
        record["time_s"] = round(time.time() - t0, 1)
        history.append(record)
        if ctx.is_main:
            save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, history, cfg, total_batch=total)
            records.write_log(directory / "log.jsonl", history)
            summary = "  ".join(f"{b}: AP {m['AP']:.3f} AP50 {m['AP50']:.3f}"
                                for b, m in record.get("eval", {}).items())
            print(f"epoch {epoch}: loss {train_losses.get('loss', float('nan')):.3f}  {summary}  "
                  f"({record['time_s']} s)", flush=True)

    if ctx.is_main:
        final = history[-1]["eval"]
        records.write_json(directory / "eval.json", {"epoch": history[-1]["epoch"], **final})
        records.write_json(directory / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                               "epochs": tc["epochs"], "git_sha": records.git_sha()})
    ctx.barrier()
    return directory


# --------------------------------------------------------------------------------------------------
# `python -m experiments eval`

def eval_file(directory):
    """A new eval-<time>.json path in the run directory (never an existing file)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(directory) / f"eval-{stamp}.json", 1
    while path.exists():
        n += 1
        path = Path(directory) / f"eval-{stamp}-{n}.json"
    return path


def evaluate_row(manifest_name, row, checkpoint=None, teachers=False, overrides=(), device=None,
                 results=records.RESULTS, moved=False):
    """Evaluates a checkpoint of a row (default: the run's checkpoint.pth): the student and, with
    `teachers`, the teacher branches with GT masks; with `moved`, also the student's detections
    moved to other images (see `evaluate`). Writes eval-<time>.json in the run directory
    (never eval.json or DONE) and returns (metrics, path)."""
    manifest = Manifest(manifest_name)
    row_cfg = manifest.resolve(row)
    directory = records.run_dir(manifest.name, row, results)
    path = Path(checkpoint) if checkpoint else directory / "checkpoint.pth"
    if not path.is_file():
        raise RunError(f"{row}: no checkpoint at {path}" + ("" if checkpoint else " (the row has not finished an "
                                                             "epoch; pass --checkpoint PATH)"))
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path}: not a checkpoint of this project (expected a dict with 'model')")
    cfg = merge(DEFAULTS, state["config"], f"{path}, config") if state.get("config") else row_cfg
    source = "the checkpoint" if state.get("config") else f"manifest {manifest.path}"
    for text in overrides:
        try:
            cfg = merge(cfg, parse_override(text), f"override {text!r}")
        except ConfigError as e:
            raise ConfigError(f"row {row!r}: {e}") from None
    check_available(cfg, f"manifest {manifest.path}, row {row!r}")
    mode = cfg["model"]["ks"]["mode"]
    branches = TEACHER_BRANCHES[mode] if teachers else ()
    ctx = distributed.setup(device)
    try:
        if ctx.is_main:
            changed = [k for k in diff(row_cfg, cfg) if not k.startswith(("data.", "train."))]
            if state.get("config") and changed:
                print(f"{row}: the checkpoint's model configuration differs from the manifest row at {changed}; "
                      f"evaluating with the checkpoint's", file=sys.stderr)
            if teachers and not branches:
                print(f"{row}: model.ks.mode is {mode!r}: no teacher branches to evaluate", file=sys.stderr)
        _, val_set = build_data(cfg, ctx)
        model, _ = build_model(model_config(cfg), val_set.num_classes)
        model.load_state_dict(state["model"])
        model.to(ctx.device)
        tc = cfg["train"]
        loader = make_eval_loader(val_set, tc["eval_batch_size"] or tc["batch_size"], cfg["data"]["num_workers"], ctx,
                                  tc["max_eval_images"])
        metrics = evaluate(model, loader, val_set, ctx.device, branches, cfg["model"]["eval_topk"],
                           desc=f"eval {row}", ctx=ctx, moved=moved)
        out = None
        if ctx.is_main:
            out = eval_file(directory)
            records.write_json(out, {
                "manifest": manifest.name, "row": row, "checkpoint": str(path), "checkpoint_epoch": state.get("epoch"),
                "checkpoint_step": state.get("step", 0), "config_from": source, "overrides": list(overrides),
                "teachers": bool(branches), "moved": moved, "world_size": ctx.world_size, "git_sha": records.git_sha(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": metrics})
        return metrics, out
    finally:
        ctx.close()
