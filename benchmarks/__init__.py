"""Benchmark scripts: they print timings and ratios measured in one run (never asserted in tests).
Run from the repository root as `python -m benchmarks.<script>`; no library module imports them.

Shared here: timing (CUDA work is waited for before the clock is read: experiments/timing.py),
interleaved medians, a random detection batch, and one training step and one inference forward of a
model."""
import statistics

import torch

from experiments.timing import seconds, synchronize  # noqa: F401 - shared with the scripts
from models import model_targets


def mean_seconds(step, repeats, device=None):
    """Mean wall time of `step()` over `repeats` calls after one warm-up call (CUDA work is waited for)."""
    def repeated():
        for _ in range(repeats):
            step()

    step()  # warm-up
    return seconds(repeated, device) / repeats


def interleaved_medians(steps, repeats, device=None):
    """{name: median seconds} of the `steps` (name -> callable) run in turn, `repeats` rounds after one
    warm-up call each, so that a machine's drift hits all of them alike."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def print_ratios(times, base, line):
    """One line per entry of `times` (name -> seconds), formatted by `line` with `name`, `ms` and
    `ratio` (to times[base])."""
    for name, t in times.items():
        print(line.format(name=name, ms=t * 1000, ratio=t / times[base]))


def random_batch(batch_size, size, num_classes, device, generator):
    """Random images of size x size pixels (or size = (height, width)) with 1-5 random boxes each:
    (images, padding mask, model targets) on `device`."""
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch_size, 3, h, w, generator=generator)
    extent = torch.tensor([w, h], dtype=torch.float32)
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, 6, (), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * extent * 0.6
        wh = torch.rand(n, 2, generator=generator) * (extent * 0.4 - 8) + 8  # xy + wh stays inside the image
        labels = torch.randint(num_classes, (n,), generator=generator)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels, "size": torch.tensor([h, w])})
    padding = torch.zeros(batch_size, h, w, dtype=torch.bool)
    return images.to(device), padding.to(device), model_targets(targets, device)


def train_step(model, criterion, optimizer, batch):
    """One training step on `batch` (from random_batch): forward, loss, backward, optimizer step."""
    images, padding, targets = batch
    model.train()
    optimizer.zero_grad(set_to_none=True)
    criterion(model(images, padding, targets), targets)["loss"].backward()
    optimizer.step()


@torch.no_grad()
def infer_step(model, batch):
    """One evaluation forward on `batch` (from random_batch), without gradients."""
    model.eval()
    model(batch[0], batch[1])
