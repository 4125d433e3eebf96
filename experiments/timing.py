"""Wall time of a step with its CUDA work included: used by the latency runs of
experiments/complexity.py and by the benchmark scripts (benchmarks/)."""
import time

import torch


def synchronize(device):
    """Waits for queued CUDA work on `device` (nothing on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(step, device=None):
    """Wall time of one call of `step()`, CUDA work included."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - t0
