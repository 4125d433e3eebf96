"""CPU training steps with glibc's default malloc against freed memory kept (experiments/allocator.py).

    python -m benchmarks.allocator [--manifest table1] [--rows def_r50_12ep def_r50_12ep_ks]
                                               [--size 256] [--steps 6] [--rounds 2] [--threads 1]

The allocator's setting holds for a whole process, so every measurement is a child process: it
builds the row from a random initialisation (seed 0; benchmarks/ks_overhead.py's
`build`: `train.batch_size` random images of S x S pixels), keeps freed memory or not, runs two
training steps to warm up and then --steps timed ones, and reports their median wall time and the
page faults and system time per step. Children run in --rounds rounds, each round every row with
both settings (their order alternating from round to round); printed per row, all from this run:
the medians over rounds with the default allocator and with freed memory kept, and their ratio.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from experiments.allocator import keep_freed_memory
from benchmarks import train_step
from experiments.config import Manifest

SETTINGS = ("default", "kept")


def child(manifest, row, size, steps, setting):
    """Runs in a fresh process: the JSON line of `steps` timed training steps of `row`."""
    from benchmarks.ks_overhead import build

    state = keep_freed_memory() if setting == "kept" else "default"
    _, trainee, batch = build(Manifest(manifest), row, torch.device("cpu"), size)
    for _ in range(2):
        train_step(*trainee, batch)
    walls, faults, system = [], [], []
    for _ in range(steps):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        train_step(*trainee, batch)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    print(json.dumps({"state": state, "wall": statistics.median(walls), "faults": statistics.median(faults),
                      "system": statistics.median(system)}))


def measure(manifest, row, size, steps, setting, threads):
    command = [sys.executable, "-m", "benchmarks.allocator", "--child", manifest, row, str(size),
               str(steps), setting]
    if threads:
        command[3:3] = ["--threads", str(threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"error: the child for {row} ({setting}) failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if setting == "kept" and result["state"] != "kept":
        raise SystemExit(f"error: freed memory could not be kept here: {result['state']}")
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.allocator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="table1", help="manifest name or path (default: %(default)s)")
    p.add_argument("--rows", nargs="+", default=["def_r50_12ep", "def_r50_12ep_ks"], help="rows to time")
    p.add_argument("--size", type=int, default=256, help="square image side in px (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per child (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="children per row and setting (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads of the children (default: torch's)")
    p.add_argument("--child", nargs=5, metavar=("MANIFEST", "ROW", "SIZE", "STEPS", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        manifest, row, size, steps, setting = args.child
        return child(manifest, row, int(size), int(steps), setting)
    manifest = Manifest(args.manifest)
    unknown = [r for r in args.rows if r not in manifest.rows]
    if unknown:
        p.error(f"manifest {manifest.path} has no row(s) {unknown}")
    results = {(row, s): [] for row in args.rows for s in SETTINGS}
    print(f"{manifest.name}, CPU, {args.threads or torch.get_num_threads()} threads, batch of random "
          f"{args.size} x {args.size} px images, medians of {args.steps} steps per child, {args.rounds} rounds",
          flush=True)
    for r in range(args.rounds):
        for row in args.rows:
            for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                results[row, setting].append(measure(str(manifest.path), row, args.size, args.steps, setting,
                                                     args.threads))
    for row in args.rows:
        med = {s: {k: statistics.median(c[k] for c in results[row, s]) for k in ("wall", "faults", "system")}
               for s in SETTINGS}
        d, k = med["default"], med["kept"]
        print(f"  {row}: step {d['wall'] * 1e3:.0f} -> {k['wall'] * 1e3:.0f} ms = {k['wall'] / d['wall']:.3f}x; "
              f"page faults per step {d['faults']:,.0f} -> {k['faults']:,.0f}, system time per step "
              f"{d['system'] * 1e3:.0f} -> {k['system'] * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
