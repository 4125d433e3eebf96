"""The training loop of one process: seeded data order and augmentation, optimizer, one epoch.

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
from .errors import RunError

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
        persistent_workers=num_workers > 0, pin_memory=ctx.device.type == "cuda")



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
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, sums, count)
    bar.close()
    return _reduce_means(sums, count, ctx)

