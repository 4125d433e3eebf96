"""Training-step time of manifest rows at COCO image sizes, for the cost estimate of `list --cost`.

    python -m benchmarks.step_time --manifest table1 [--rows dab_r50 dab_r50_ks ...]
                                               [--size 800 1216] [--repeats 10] [--write]

Each row is built from a random initialisation (its backbone weights do not change the time) and
timed on its own per-GPU batch (`train.batch_size`) of random images of --size (height, width; the
default is a typical resized COCO image, shorter side 800) with random boxes: forward, loss,
backward and optimizer step, the median of --repeats steps after two warm-up steps. Rows of the
same variant, backbone, KS mode and batch are measured once. --write adds the times to
results/step_times.json with the GPU's name, the torch version and the date (replacing earlier
times of the same key on the same GPU); `python -m experiments list M --cost` turns them into
GPU-hours. Only CUDA measurements are written, unless --allow-cpu (for trying the command).
"""
import argparse
import datetime
import statistics
from functools import partial

import torch

from experiments import cost
from benchmarks import seconds, train_step
from benchmarks.ks_overhead import build
from experiments.build import pick_device
from experiments.config import Manifest


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def measure(manifest, rows, size, repeats, device):
    """[(row, entry)] for the rows of distinct keys (later rows of a measured key are skipped)."""
    out, seen = [], set()
    for row in rows:
        cfg = manifest.resolve(row)
        key = {**cost.row_key(cfg), "image_size": list(size)}
        frozen = tuple(str(key[k]) for k in cost.KEY_FIELDS)
        if frozen in seen:
            continue
        seen.add(frozen)
        _, trainee, batch = build(manifest, row, device, tuple(size))
        for _ in range(2):  # warm-up (kernels, allocator, autotuning)
            train_step(*trainee, batch)
        step = partial(train_step, *trainee, batch)
        step_seconds = statistics.median(seconds(step, device) for _ in range(repeats))
        del trainee, batch, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.append((row, {**key, "seconds_per_step": round(step_seconds, 5), "gpu": device_name(device),
                          "torch": torch.__version__, "date": datetime.date.today().isoformat()}))
        print(f"{row:22s} {key['variant']:18s} {key['backbone']:9s} ks={key['ks_mode']:13s} batch "
              f"{key['batch_size']}  {step_seconds * 1e3:9.1f} ms/step", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="table1", help="manifest name or path (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", help="rows to measure (default: every row)")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"),
                        help="image height and width in pixels (default: 800 1216)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per row (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--write", action="store_true", help=f"add the times to {cost.STEP_TIMES}")
    parser.add_argument("--allow-cpu", action="store_true", help="let --write store CPU times")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.write and device.type != "cuda" and not args.allow_cpu:
        parser.error("--write stores GPU step times for the cost estimate; this device is "
                     f"{device}. Pass --allow-cpu to store CPU times anyway.")
    manifest = Manifest(args.manifest)
    unknown = sorted(set(args.rows or ()) - set(manifest.rows))
    if unknown:
        parser.error(f"manifest {manifest.path} has no row(s) {unknown}")
    print(f"{manifest.name} on {device_name(device)}, torch {torch.__version__}, {args.size[0]}x{args.size[1]} px, "
          f"median of {args.repeats} steps", flush=True)
    results = measure(manifest, args.rows or list(manifest.rows), args.size, args.repeats, device)
    if args.write:
        for _, entry in results:
            cost.add_step_time(entry)
        print(f"wrote {len(results)} step time(s) to {cost.STEP_TIMES}")


if __name__ == "__main__":
    main()
