"""What knowledge sharing costs: each variant's ResNet-50 baseline row against its KS row.

    python -m benchmarks.ks_overhead [--manifest table1] [--sizes 256 512] [--device cpu|cuda]
                                                 [--variants dab_detr deformable_detr ...] [--repeats 5]

For every variant of the manifest, the first pair of rows on --backbone (a KS row and the row it
names as its baseline) is built with the same seed from a random initialisation and fed the same
random batch of `train.batch_size` images of S x S pixels with random boxes. Printed per variant
and size, all measured in this one run:

- train (forward, loss, backward, optimizer step) and infer (an evaluation forward without
  gradients; the KS row runs its student only): the KS row over the baseline, each the median over
  --repeats steps, the two rows interleaved so that a machine's drift hits both alike;
- peak memory of two training steps above what the built model holds: max_memory_allocated on
  CUDA; on CPU (Linux) the peak resident set size of a child process that builds the row and runs
  the steps, less its size before the first step (the whole peak, torch included, beside it);
- the parameter counts of both rows and of the KS row without its teachers (what runs at inference;
  it should equal the baseline's);
- f_dec and f_last: the shares of the baseline's training step taken by its decoder and by its last
  encoder layer (each one's forward + backward on inputs captured in a training step, timed alone),
  and the floor of the train ratio for k teachers that the teachers' decoder passes set: 1 + k f_dec;
- the same two parts of the KS row, timed alike: its decoder (on the k + 1 branches stacked on the
  batch axis; k + 1 times the baseline's is linear) and its KS layer (the student's and the
  teachers' branches), each against the baseline's; and the floor that these measured parts set,
  1 + (KS decoder - decoder + KS layer - last layer) / baseline step. What the KS row's step takes
  above it is the teachers' heads, matching and losses, the GT mask and the teacher bookkeeping;
- the FLOPs of the same parts (torch's FLOP counter: matrix products, convolutions, SDPA; not the
  deformable sampling) KS row over baseline, and the floor if each KS part took its baseline part's
  time scaled by its FLOPs: 1 + sum over parts of (FLOP ratio - 1) x the part's share of the step.
"""
import argparse
import json
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.allocator import keep_freed_memory
from benchmarks import infer_step, interleaved_medians, random_batch, seconds, train_step
from experiments.build import model_config, pick_device
from experiments.config import Manifest
from experiments.training import build_optimizer
from models import build_model, is_teacher_parameter
from models.ks_encoder import teacher_branches

NUM_CLASSES = 91  # COCO's category ids, as the table rows build them
BACKBONE = "resnet50"


def row_pairs(manifest, variants=None, backbone=BACKBONE):
    """[(variant, baseline row, KS row)]: per variant, the first KS row on `backbone` with a baseline."""
    pairs, seen = [], set()
    for name, row in manifest.rows.items():
        cfg = manifest.resolve(name)
        variant = cfg["model"]["variant"]
        if (row.get("baseline") and cfg["model"]["ks"]["mode"] != "none" and variant not in seen
                and cfg["model"]["backbone"]["name"] == backbone and (not variants or variant in variants)):
            seen.add(variant)
            pairs.append((variant, row["baseline"], name))
    missing = sorted(set(variants or ()) - seen)
    if missing:
        raise SystemExit(f"error: manifest {manifest.path} has no {backbone} baseline/KS pair for {missing}")
    if not pairs:
        raise SystemExit(f"error: manifest {manifest.path} has no {backbone} baseline/KS pair")
    return pairs


def build(manifest, row, device, size):
    """(cfg, (model, criterion, optimizer), batch): the row from a random initialisation (seed 0) on
    `device`, and a random batch of its `train.batch_size` images of `size` (random_batch)."""
    cfg = manifest.resolve(row, ["model.backbone.weights=null"])
    torch.manual_seed(0)
    model, criterion = build_model(model_config(cfg), NUM_CLASSES)
    model.to(device)
    batch = random_batch(cfg["train"]["batch_size"], size, NUM_CLASSES, device, torch.Generator().manual_seed(0))
    return cfg, (model, criterion, build_optimizer(model, cfg["train"])), batch


def module_step(trainee, module, batch):
    """A callable running `module`'s forward + backward alone (a submodule of the trainee's model,
    e.g. its decoder) on inputs captured in a training step (trainee: model, criterion, optimizer)."""
    seen = {}
    handle = module.register_forward_hook(
        lambda module, args, kwargs, out: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    try:
        train_step(*trainee, batch)
    finally:
        handle.remove()

    def leaf(v):  # float tensors become leaves that want gradients, as the encoder output does in training
        return v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v

    args = [leaf(a) for a in seen["args"]]
    kwargs = {k: leaf(v) for k, v in seen["kwargs"].items()}

    def tensors(out):  # the modules return tensors or (nested) lists, tuples and dicts of them
        if torch.is_tensor(out):
            return [out] if out.requires_grad else []
        items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
        return [t for item in items for t in tensors(item)]

    def step():
        sum(t.float().mean() for t in tensors(module(*args, **kwargs))).backward()

    return step


def module_cost(trainee, module, batch, repeats, device):
    """(median seconds, FLOPs) of `module`'s forward + backward alone (module_step). The FLOPs are
    those torch's FLOP counter sees (matrix products, convolutions, SDPA; not the deformable
    sampling, a custom op), counted on the warm-up call."""
    step = module_step(trainee, module, batch)
    with FlopCounterMode(display=False) as counter:
        step()
    return statistics.median(seconds(step, device) for _ in range(repeats)), counter.get_total_flops()


def peak_memory(manifest_name, row, size, device):
    """(step bytes, whole peak bytes) of two training steps: CUDA in this process, CPU in a child."""
    if device.type == "cuda":
        _, trainee, batch = build(Manifest(manifest_name), row, device, size)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            train_step(*trainee, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        del trainee, batch
        torch.cuda.empty_cache()
        return peak - before, peak
    out = subprocess.run([sys.executable, "-m", "benchmarks.ks_overhead", "--child-memory", manifest_name,
                          row, str(size)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"error: the memory child for {row} at {size} px failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["step"], result["peak"]


def _status_bytes(key):
    """A size from /proc/self/status (VmRSS: now, VmHWM: the peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child_memory(manifest_name, row, size):
    """Run in a fresh process: the resident set's peak during two CPU training steps above its size
    before them. Linux resets the peak (VmHWM) when 5 is written to /proc/self/clear_refs, so the
    model's construction does not count."""
    keep_freed_memory()  # as the training engine on CPU
    _, trainee, batch = build(Manifest(manifest_name), row, torch.device("cpu"), size)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
    except OSError:  # no reset allowed: the peak may then include the model's construction
        before = _status_bytes("VmHWM")
    for _ in range(2):
        train_step(*trainee, batch)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"step": peak - before, "peak": peak}))


def count(model, inference=False):
    return sum(p.numel() for n, p in model.named_parameters() if not (inference and is_teacher_parameter(n)))


def measure_pair(manifest, variant, base_row, ks_row, size, repeats, device):
    cfg, base, batch = build(manifest, base_row, device, size)
    _, ks, _ = build(manifest, ks_row, device, size)  # the same batch: the rows share train.batch_size
    steps = {"train_base": partial(train_step, *base, batch), "train_ks": partial(train_step, *ks, batch),
             "infer_base": partial(infer_step, base[0], batch), "infer_ks": partial(infer_step, ks[0], batch)}
    median = interleaved_medians(steps, repeats, device)
    # {part: ((baseline seconds, FLOPs), (KS row seconds, FLOPs))}: forward + backward of each model's own module
    modules = {"decoder": lambda m: m.decoder, "last_layer": lambda m: m.encoder.layers[-1]}
    costs = {name: [module_cost(trainee, module(trainee[0]), batch, repeats, device) for trainee in (base, ks)]
             for name, module in modules.items()}
    parts = {name: (b[0], k[0]) for name, (b, k) in costs.items()}
    part_flops = {name: (b[1], k[1]) for name, (b, k) in costs.items()}
    f_dec, f_last = (parts[name][0] / median["train_base"] for name in ("decoder", "last_layer"))
    teachers = len(teacher_branches(ks[0]))
    params = (count(base[0]), count(ks[0]), count(ks[0], inference=True))
    del base, ks, steps
    memory = {row: peak_memory(str(manifest.path), row, size, device) for row in (base_row, ks_row)}
    growth = sum(k - b for b, k in parts.values())
    flops_growth = sum((k / b - 1) * parts[name][0] for name, (b, k) in part_flops.items())
    return dict(variant=variant, rows=(base_row, ks_row), size=size, batch=cfg["train"]["batch_size"],
                teachers=teachers, f_dec=f_dec, f_last=f_last, floor=1 + teachers * f_dec, parts=parts,
                floor_parts=1 + growth / median["train_base"], part_flops=part_flops,
                floor_flops=1 + flops_growth / median["train_base"], params=params,
                memory=(memory[base_row], memory[ks_row]), **median)


def report(r):
    (base_step, base_peak), (ks_step, ks_peak) = r["memory"]
    gib = 2 ** 30
    train, infer = r["train_ks"] / r["train_base"], r["infer_ks"] / r["infer_base"]
    dec, last, flops = r["parts"]["decoder"], r["parts"]["last_layer"], r["part_flops"]
    return "\n".join([
        f"{r['variant']} ({r['rows'][0]} vs {r['rows'][1]}), batch {r['batch']} x {r['size']} px:",
        f"  train  {r['train_base'] * 1e3:8.1f} ms -> {r['train_ks'] * 1e3:8.1f} ms   {train:5.2f}x   "
        f"(floor 1 + {r['teachers']} f_dec = {r['floor']:.2f}, f_dec {r['f_dec']:.2f}; {train / r['floor']:.2f}x the floor)",
        f"  parts  decoder {dec[0] * 1e3:.1f} -> {dec[1] * 1e3:.1f} ms "
        f"({dec[1] / dec[0]:.2f}x; {r['teachers'] + 1} branches), "
        f"last encoder layer {last[0] * 1e3:.1f} -> {last[1] * 1e3:.1f} ms ({last[1] / last[0]:.2f}x); "
        f"f_last {r['f_last']:.2f}",
        f"         floor of these parts 1 + (their growth) / baseline step = {r['floor_parts']:.2f}; "
        f"{train / r['floor_parts']:.2f}x it (the rest: {(r['train_ks'] - r['floor_parts'] * r['train_base']) * 1e3:.0f} ms)",
        f"         FLOPs of the parts: decoder {flops['decoder'][1] / flops['decoder'][0]:.2f}x, last encoder layer "
        f"{flops['last_layer'][1] / flops['last_layer'][0]:.2f}x; the floor if each part took its FLOPs' time: "
        f"{r['floor_flops']:.2f} = {r['floor_flops'] / r['floor']:.2f}x the floor 1 + {r['teachers']} f_dec",
        f"  infer  {r['infer_base'] * 1e3:8.1f} ms -> {r['infer_ks'] * 1e3:8.1f} ms   {infer:5.2f}x",
        f"  memory {base_step / gib:6.2f} GiB -> {ks_step / gib:6.2f} GiB per step   "
        f"{ks_step / max(base_step, 1):5.2f}x   (whole peak {base_peak / gib:.2f} -> {ks_peak / gib:.2f} GiB)",
        f"  params {r['params'][0]:,} -> {r['params'][1]:,} in training, {r['params'][2]:,} at inference"
        + ("" if r["params"][2] == r["params"][0] else "  (NOT the baseline's)"),
    ])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child-memory"]:
        return child_memory(argv[1], argv[2], int(argv[3]))
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ks_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="table1", help="manifest name or path (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sides in px")
    parser.add_argument("--variants", nargs="+", help="variants to measure (default: every variant of the manifest)")
    parser.add_argument("--backbone", default=BACKBONE, help="backbone of the row pairs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row and kind (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":  # as the training engine
        keep_freed_memory()
    manifest = Manifest(args.manifest)
    pairs = row_pairs(manifest, args.variants, args.backbone)
    print(f"{manifest.name} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, medians of {args.repeats} interleaved steps",
          flush=True)
    for variant, base_row, ks_row in pairs:
        for size in args.sizes:
            print(report(measure_pair(manifest, variant, base_row, ks_row, size, args.repeats, device)), flush=True)


if __name__ == "__main__":
    main()
