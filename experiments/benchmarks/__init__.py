"""Benchmark scripts: they print timings and ratios measured in one run (never asserted in tests)."""
import time

import torch


def mean_seconds(step, repeats, device=None):
    """Mean wall time of `step()` over `repeats` calls after one warm-up call (CUDA work is waited for)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def print_ratios(times, base, line):
    """One line per entry of `times` (name -> seconds), formatted by `line` with `name`, `ms` and
    `ratio` (to times[base])."""
    for name, t in times.items():
        print(line.format(name=name, ms=t * 1000, ratio=t / times[base]))
