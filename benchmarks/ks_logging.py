"""What the KS logging of the synthetic tables costs against an epoch of a row.

    python -m benchmarks.ks_logging [--manifest demo] [--row ks_def_r18] [--images 64]
                                                [--steps 10] [--repeats 3]

Two additions are timed, on the row's model (its configuration and weights; no training) and on its
own data set (generated when missing):
- the teacher-student memory distance (`memory_distance` in log.jsonl): an evaluation of the first
  --images validation images with the teachers, with and without models.ks_encoder.MemoryDistance,
  interleaved --repeats times (medians);
- the three last-decoder-layer losses read per optimizer step (`train.loss_last_layer_*`): the time
  of reading them (`.item()`) against a training step on a batch of the row's training set.
Both are printed as a share of one epoch estimated from the same measurements (steps per epoch x the
measured step time, plus the evaluation of the whole validation set).
"""
import argparse
import statistics
import time

import torch

from benchmarks import seconds
from experiments.build import build_data, model_config, pick_device
from experiments.config import Manifest
from experiments.evaluation import evaluate, make_eval_loader
from experiments.training import build_optimizer, make_train_loader, optimizer_steps, to_device
from experiments import distributed
from models import build_model
from models.ks_encoder import teacher_branches


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ks_logging", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="demo")
    parser.add_argument("--row", default="ks_def_r18", help="a KS row (default: %(default)s)")
    parser.add_argument("--images", type=int, default=64, help="validation images per timed evaluation")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    cfg = Manifest(args.manifest).resolve(args.row)
    if cfg["model"]["ks"]["mode"] == "none":
        parser.error(f"row {args.row!r} is not a KS row")
    device = pick_device(args.device)
    ctx = distributed.Context(device=device)
    train_set, val_set = build_data(cfg)
    torch.manual_seed(0)
    model, criterion = build_model(model_config(cfg), train_set.num_classes)
    model.to(device)
    teachers = teacher_branches(model)
    tc = cfg["train"]
    val_loader = make_eval_loader(val_set, tc["eval_batch_size"] or tc["batch_size"], 0, ctx, args.images)
    topk = cfg["model"]["eval_topk"]

    def run_eval(distance):
        evaluate(model, val_loader, val_set, device, teachers, topk, desc="timing", ctx=ctx,
                 memory_distance={} if distance else None)

    run_eval(True)  # warm-up
    plain, hooked = [], []
    for _ in range(args.repeats):
        plain.append(seconds(lambda: run_eval(False), device))
        hooked.append(seconds(lambda: run_eval(True), device))
    plain_s, hooked_s = statistics.median(plain), statistics.median(hooked)

    loader = make_train_loader(train_set, tc["batch_size"], 0, tc["seed"], ctx)
    optimizer = build_optimizer(model, tc)
    batches = iter(loader)
    step_times, read_times = [], []
    model.train()
    for i in range(args.steps + 1):
        images, mask, targets = to_device(next(batches), device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses = criterion(model(images, mask, targets), targets)
        losses["loss"].backward()
        optimizer.step()
        t1 = time.perf_counter()
        _ = [losses[k].item() for k in losses if k.startswith("loss_last_layer_")]
        t2 = time.perf_counter()
        if i:  # the first step warms up
            step_times.append(t1 - t0)
            read_times.append(t2 - t1)
    step_s, read_s = statistics.median(step_times), statistics.median(read_times)

    steps = optimizer_steps(len(train_set), (tc["batch_size"], 1, tc["batch_size"]), 1)
    n_val = len(val_set)
    epoch_s = steps * step_s + plain_s * n_val / min(args.images, n_val)
    distance_s = (hooked_s - plain_s) * n_val / min(args.images, n_val)
    print(f"{args.manifest} / {args.row} on {device}: {steps} steps of {tc['batch_size']} images per epoch, "
          f"{n_val} validation images")
    print(f"evaluation of {min(args.images, n_val)} images with teachers: {plain_s:.3f} s; with the memory "
          f"distance {hooked_s:.3f} s (ratio {hooked_s / plain_s:.3f}; medians of {args.repeats}, interleaved)")
    print(f"training step {step_s * 1000:.1f} ms; reading the last-layer losses {read_s * 1e6:.1f} us per step")
    print(f"estimated epoch {epoch_s:.1f} s: memory distance {100 * distance_s / epoch_s:+.2f}% of it, "
          f"last-layer losses {100 * steps * read_s / epoch_s:.3f}%")


if __name__ == "__main__":
    main()
