"""The training loop of one process: seeded data order and augmentation, optimizer, one epoch.

Batches. `train.batch_size` images per process and step; one optimizer step sees batch_size x
processes x accumulation images, where accumulation = total_batch_size / (batch_size x processes)
when `train.total_batch_size` is set (else 1). Each micro-batch's loss is weighted by its share of
the step's (all-reduced) box count, so a step's gradient is the criterion's on the whole step batch:
2 processes x 2 images, 1 x 2 x 2 accumulation steps and 1 x 4 give the same losses and weights
(tests/test_distributed.py), up to float rounding and padding (DETR pads a batch to its largest
image, so the grouping into per-process batches changes the padding). Unlike the authors'
detectron2, batches are not grouped by aspect ratio.

Data order and randomness are functions of (seed, epoch, step), not of the process layout: an
epoch's permutation is drawn from (seed, epoch) and split into per-step blocks; sample i's
augmentation in epoch e from (seed, e, i); dropout is reseeded per step and rank. So a resumed run
continues exactly as an uninterrupted one, at an epoch boundary or (with
`train.checkpoint_every_iters`) in the middle of an epoch.
"""
import math
import sys
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import datasets
from models import model_targets

from . import distributed
from .errors import BatchPlanError, RunError, first_names
from .signals import Stopped, ignore_stop_signals

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)


def mix_seed(*parts):
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed):
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



def batch_plan(train_cfg, world_size):
    """(per-process batch, accumulation steps, total batch per optimizer step) for `world_size`
    processes; a BatchPlanError when train.total_batch_size cannot be kept."""
    b, total = train_cfg["batch_size"], train_cfg["total_batch_size"]
    per_step = b * world_size
    if total is None:
        return b, 1, per_step
    if per_step > total or total % per_step:
        raise BatchPlanError(f"train.total_batch_size={total} cannot be kept with train.batch_size={b} on {world_size} "
                       f"process(es) ({per_step} images per micro-step): it must be a multiple of it. "
                       f"Change train.batch_size or the number of processes.")
    return b, total // per_step, total


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



def make_train_loader(dataset, batch_size, num_workers, seed, ctx):
    sampler = TrainSampler(len(dataset), ctx.world_size, ctx.rank, seed)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    return torch.utils.data.DataLoader(
        SeededDataset(dataset, seed), batch_sampler=batches, collate_fn=datasets.collate, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=ctx.device.type == "cuda",
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None)


def optimizer_steps(n_images, plan, world_size):
    """Optimizer steps of one epoch over `n_images` training images (the sampler and loader drop the
    remainders), for the batch plan (batch, accumulation, total) of `world_size` processes."""
    batch, accumulation, _ = plan
    return (n_images // world_size // batch) // accumulation



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



LOGGED_LOSSES = ("loss", "loss_attn1", "loss_attn2", "loss_attn3", "loss_class", "loss_bbox", "loss_giou",
                 "loss_last_layer_attn1", "loss_last_layer_attn2", "loss_last_layer_attn3")
PREDICTIONS = ("pred_logits", "pred_boxes")


def reduce_means(sums, count, ctx):
    """Mean over the steps of every process of per-step loss sums (each rank: its own sums)."""
    if not sums:
        return {}
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=ctx.device)
    ctx.all_reduce_sum(t)
    total = max(t[-1].item(), 1.0)
    return {k: v for k, v in zip(keys, (t[:-1] / total).tolist())}


def _prediction_tensors(outputs, path=""):
    """(name, tensor) of every pred_logits / pred_boxes in a model's (nested) outputs."""
    if isinstance(outputs, dict):
        for k, v in outputs.items():
            name = f"{path}.{k}" if path else str(k)
            if k in PREDICTIONS and isinstance(v, torch.Tensor):
                yield name, v
            elif isinstance(v, (dict, list, tuple)):
                yield from _prediction_tensors(v, name)
    elif isinstance(outputs, (list, tuple)):
        for i, v in enumerate(outputs):
            yield from _prediction_tensors(v, f"{path}[{i}]")


def nonfinite_outputs(outputs):
    """Names of the predictions (pred_logits/pred_boxes, at any depth) holding NaN or inf."""
    named = list(_prediction_tensors(outputs))
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _check_finite(problem, ctx, where):
    """Raises RunError on every process when any process found a non-finite value (`problem`: its
    description or None), so that no process is left waiting in a collective."""
    flag = torch.tensor([0.0 if problem is None else 1.0], device=ctx.device)
    if ctx.distributed:
        ctx.all_reduce_sum(flag)
    if flag.item() > 0:
        what = (f"rank {ctx.rank}: " if ctx.distributed else "") + problem if problem else "on another process"
        raise RunError(f"training diverged at {where}: {what}. Lower train.lr / train.lr_backbone, or clip the "
                       f"gradients (train.clip_max_norm)")


def _nonfinite_grads(named_params):
    return [n for n, p in named_params if p.grad is not None and not torch.isfinite(p.grad).all()]


def train_one_epoch(model, criterion, loader, optimizer, device, clip_max_norm, epoch, max_iters=None, *,
                    accumulation=1, ctx=None, start_step=0, partial=None, on_step=None, seed_key=None,
                    stop=None, on_stop=None):
    """Trains one epoch; returns the mean of the logged losses over its optimizer steps (over all
    processes). `loader` yields this process's micro-batches; `accumulation` micro-batches make one
    step. `start_step`/`partial` continue an epoch from a mid-epoch checkpoint; `on_step(step, sums,
    count)` is called after every optimizer step; `seed_key` (seed, epoch) reseeds dropout per step.

    Divergence: non-finite predictions are caught before the matcher, non-finite losses before
    backward and a non-finite gradient norm before optimizer.step(), with a RunError naming the
    epoch, the iteration and what was not finite. `stop` (StopRequest): after a step where a signal
    arrived, `on_stop(step, sums, count)` writes a checkpoint and Stopped is raised ("checkpoint":
    the loop goes on)."""
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
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    in_steps = stop.in_steps if stop is not None else False
    try:
        if stop is not None:
            stop.in_steps = True
        for step in range(start_step, steps):
            where = f"epoch {epoch}, iteration {step + 1} of {steps}"
            if seed_key is not None:
                torch.manual_seed(mix_seed(*seed_key, step, ctx.rank))
            micro = [to_device(next(batches), device) for _ in range(accumulation)]
            # each micro-batch's loss is normalised by its own (global) box count: reweight to the step's
            counts = torch.tensor([float(sum(len(t["labels"]) for t in m[2])) for m in micro], dtype=torch.float64,
                                  device=ctx.device)
            counts = ctx.all_reduce_sum(counts) / ctx.world_size
            weights = (counts.clamp(min=1) / counts.sum().clamp(min=1)).tolist()
            optimizer.zero_grad(set_to_none=True)
            step_losses = {}
            for i, (images, mask, targets) in enumerate(micro):
                last = i == accumulation - 1
                with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                    outputs = model(images, mask, targets)
                    bad, problem = nonfinite_outputs(outputs), None
                    if bad:  # the matcher cannot match NaN boxes: stop before it
                        problem = f"non-finite predictions {first_names(bad, 6)}"
                    else:
                        losses = criterion(outputs, targets)
                        if not math.isfinite(losses["loss"].item()):
                            problem = "non-finite loss: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    _check_finite(problem, ctx, where)
                    (losses["loss"] * weights[i]).backward()
                for k in LOGGED_LOSSES:
                    if k in losses:
                        step_losses[k] = step_losses.get(k, 0.0) + losses[k].item() * weights[i]
            # gradients are the same on every process (DDP averaged them): all raise together
            if clip_max_norm > 0:
                norm = nn.utils.clip_grad_norm_(params, clip_max_norm)
            else:
                norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not math.isfinite(norm.item()):
                bad = _nonfinite_grads(named_params)
                what = (f"non-finite gradients of {first_names(bad)}" if bad else
                        "every gradient is finite, their norm overflows")
                _check_finite(f"the gradient norm is {norm.item()} ({what}); the step was not taken", ctx, where)
            optimizer.step()
            for k, v in step_losses.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            if ctx.is_main:
                bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", refresh=False)
            if on_step is not None:
                on_step(step + 1, sums, count)
            request = stop.poll(ctx) if stop is not None else None
            if request is not None:
                if on_stop is not None:
                    on_stop(step + 1, sums, count)
                if request == "stop":
                    raise Stopped(f"stopped by {stop.name} after iteration {step + 1} of {steps} of epoch {epoch}",
                                  max(stop.signum or 0, 0), saved=on_stop is not None)
    finally:
        if stop is not None:
            stop.in_steps = in_steps
        bar.close()
    return reduce_means(sums, count, ctx)
