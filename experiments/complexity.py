"""What each row of a manifest costs at inference (`python -m experiments complexity`).

    python -m experiments complexity table1 [--rows dab_r50 dab_r50_ks ...] [--size 800 1216]
                                            [--device cpu|cuda] [--repeats 10]

Every row is built from a random initialisation (the numbers do not depend on weights) and measured:

- params_train: every parameter as the model trains (a KS row with its teachers and sMLP);
  params_infer: the parameters an inference forward actually reads, recorded while it runs (a torch
  function mode notes every nn.Parameter handed to an operation), not taken from a list of names;
- GFLOPs of one inference forward of one --size (height, width) image, counted by
  torch.utils.flop_counter.FlopCounterMode at 2 FLOPs per multiply-add (half of it is the "GFLOPs"
  of papers that count multiply-adds with fvcore); the deformable sampling (run on its PyTorch
  path while counting: grid_sample; models.ops.ms_deform_attn.sampling_flops) and the CPU kernel
  of scaled_dot_product_attention are counted from their shapes, and the other operations the
  counter skips (normalisation, softmax, reductions) are named in the notes with their call counts;
- latency: the median wall time of an inference forward on --device over --repeats runs after two
  warm-ups, with the lowest and highest run; a baseline and the rows that name it are timed in
  turn, one forward each, so that drift of the machine hits them alike.

Rows with the same model configuration (e.g. 12- and 50-epoch rows) are built and timed once. The
table goes to <results>/tables/complexity_<manifest>.md and .csv, with KS rows' ratios to their
baseline.
"""
import argparse
import csv
import io
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from datasets.synthetic import CATEGORIES
from models import build_model
from models.ops.ms_deform_attn import pytorch_path, sampling_flops

from . import records
from .build import model_config, pick_device, resolve_row
from .config import Manifest
from .errors import is_user_error
from .timing import seconds

COCO_CLASSES = 80  # the labels of a COCO-format set are its categories (CocoDetection.num_classes)
aten = torch.ops.aten


def num_classes(cfg):
    return len(CATEGORIES) if cfg["data"]["dataset"] == "synthetic" else COCO_CLASSES


def build(cfg):
    """The row's model from a random initialisation (seed 0), evaluation mode, on the CPU."""
    torch.manual_seed(0)
    model, _ = build_model(model_config(cfg, pretrained=False), num_classes(cfg))
    return model.eval()


def image(size, device):
    """One random image of (height, width) pixels and its padding mask (no padding)."""
    h, w = size
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, h, w, generator=generator).to(device),
            torch.zeros(1, h, w, dtype=torch.bool, device=device))


class _ParametersRead(TorchFunctionMode):
    """Notes every nn.Parameter handed to a torch function (weights, biases, embeddings read directly)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(value, torch.nn.Parameter):
                self.seen[id(value)] = value
        return func(*args, **kwargs)


class _OperationsRun(TorchDispatchMode):
    """Counts the aten operations a forward runs, by overload packet."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def _grid_sampler_flops(input_shape, grid_shape, *args, out_shape=None, **kwargs):
    return sampling_flops(out_shape)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """The CPU kernel of scaled_dot_product_attention, which torch's counter knows only on CUDA."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# operations the counter does not know, counted here from their shapes
FORMULAS = {aten.grid_sampler_2d: _grid_sampler_flops,
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
# tensor creation and data movement: no arithmetic, not named in the notes
NO_ARITHMETIC = {"_to_copy", "_unsafe_view", "arange", "cat", "clone", "constant_pad_nd", "copy_", "empty",
                 "empty_like", "fill_", "flip", "full", "full_like", "gather", "index", "index_select", "linspace",
                 "new_empty", "new_full", "new_ones", "new_zeros", "ones", "ones_like", "promote_types", "repeat",
                 "scalar_tensor", "stack", "zeros", "zeros_like", "lift_fresh", "_local_scalar_dense"}


def _is_plain(packet):
    """Views and elementwise operations: not FLOP-counted by convention, and not worth naming."""
    overloads = [getattr(packet, name) for name in packet.overloads()]
    return (str(packet).removeprefix("aten.") in NO_ARITHMETIC or not overloads
            or any(torch.Tag.pointwise in o.tags or o.is_view for o in overloads))


@torch.no_grad()
def count(model, *inputs):
    """(params_train, params_infer, FLOPs, {operation not counted: calls}) of one forward `model(*inputs)`."""
    # no tensor wants gradients: FlopCounterMode's module tracker otherwise hooks tensors that a
    # no_grad forward leaves without a gradient function, and fails on them
    model.requires_grad_(False)
    reads, ops = _ParametersRead(), _OperationsRun()
    flops = FlopCounterMode(display=False, custom_mapping=FORMULAS)
    # the deformable sampling on its PyTorch path, whose grid_sample the counter sees (it cannot
    # see into the compiled kernels)
    with reads, flops, ops, pytorch_path():
        model(*inputs)
    counted = set(flop_registry) | set(FORMULAS)
    skipped = {str(p).removeprefix("aten."): n for p, n in sorted(ops.calls.items(), key=lambda kv: str(kv[0]))
               if p not in counted and not _is_plain(p)}
    n_train = sum(p.numel() for p in model.parameters())
    n_infer = sum(p.numel() for p in reads.seen.values())
    return n_train, n_infer, flops.get_total_flops(), skipped


@torch.no_grad()
def latencies(models, size, device, repeats):
    """{key: [seconds of each timed run]}: the models' inference forwards, one after the other in turn."""
    images, mask = image(size, device)
    on_device = {key: model.to(device) for key, model in models.items()}
    for _ in range(2):  # warm-up
        for model in on_device.values():
            model(images, mask)
    times = {key: [] for key in on_device}
    for _ in range(repeats):
        for key, model in on_device.items():
            times[key].append(seconds(lambda m=model: m(images, mask), device))
    for model in on_device.values():
        model.cpu()
    return times


def groups(manifest, rows):
    """[[row, ...]]: each baseline among `rows` with the rows that name it; other rows alone; in order."""
    grouped = {}
    for name in rows:
        base = manifest.rows[name].get("baseline")
        grouped.setdefault(base if base in rows else name, []).append(name)
    return list(grouped.values())


def measure(manifest, rows, size, device, repeats, progress=print):
    """One dict per row (manifest order) with its counts, latency and, for rows with a baseline among
    `rows`, the ratios to it."""
    cfgs = {name: resolve_row(manifest, name)[0] for name in rows}  # resolved and checked, once
    keys = {name: json.dumps([model_config(cfg), num_classes(cfg)], sort_keys=True, default=str)
            for name, cfg in cfgs.items()}
    measured = {}  # model configuration -> numbers
    for group in groups(manifest, rows):
        models = {}
        for name in group:
            if keys[name] in measured or keys[name] in models:
                continue
            progress(f"{name}: counting parameters and FLOPs")
            models[keys[name]] = build(cfgs[name])
            n_train, n_infer, flops, skipped = count(models[keys[name]], *image(size, "cpu"))
            measured[keys[name]] = {"params_train": n_train, "params_infer": n_infer, "flops": flops,
                                    "not_counted": skipped}
        if models:
            progress(f"{', '.join(group)}: timing {repeats} inference forwards each on {device}")
            for key, runs in latencies(models, size, device, repeats).items():
                measured[key].update(latency_ms=[1000 * t for t in runs])
    out = []
    for name, cfg in cfgs.items():
        m = measured[keys[name]]
        runs = m["latency_ms"]
        entry = {"row": name, "variant": cfg["model"]["variant"], "backbone": cfg["model"]["backbone"]["name"],
                 "ks": cfg["model"]["ks"]["mode"], "baseline": manifest.rows[name].get("baseline"),
                 "params_train_M": m["params_train"] / 1e6, "params_infer_M": m["params_infer"] / 1e6,
                 "params_train": m["params_train"], "params_infer": m["params_infer"],
                 "gflops": m["flops"] / 1e9, "flops": m["flops"],
                 "latency_ms": statistics.median(runs), "latency_min_ms": min(runs), "latency_max_ms": max(runs),
                 "not_counted": m["not_counted"]}
        out.append(entry)
    by_row = {e["row"]: e for e in out}
    for e in out:
        base = by_row.get(e["baseline"])
        if base:
            e["params_infer_ratio"] = e["params_infer"] / base["params_infer"]
            e["flops_ratio"] = e["flops"] / base["flops"]
            e["latency_ratio"] = e["latency_ms"] / base["latency_ms"]
    return out


COLUMNS = [("row", "row", "{}"), ("baseline", "baseline", "{}"), ("ks", "KS", "{}"),
           ("params_train_M", "params train (M)", "{:.3f}"), ("params_infer_M", "params inference (M)", "{:.3f}"),
           ("gflops", "GFLOPs", "{:.2f}"), ("latency_ms", "latency (ms)", "{:.0f}"),
           ("latency_spread", "spread (ms)", "{}"), ("params_infer_ratio", "params ratio", "{:.6f}"),
           ("flops_ratio", "FLOPs ratio", "{:.6f}"), ("latency_ratio", "latency ratio", "{:.3f}")]


def _cell(entry, key, fmt):
    if key == "latency_spread":
        return f"{entry['latency_min_ms']:.0f}-{entry['latency_max_ms']:.0f}"
    value = entry.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(entries, manifest, size, device, repeats):
    lines = [f"Inference cost of the rows of {manifest} (one {size[0]} x {size[1]} image, {device}; latency: median "
             f"of {repeats} forwards, spread: lowest-highest). Ratios: to the row's baseline.", "",
             "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join(" ---: " if k not in ("row", "baseline", "ks") else " --- " for k, _, _ in COLUMNS) + "|"]
    for e in entries:
        lines.append("| " + " | ".join(_cell(e, k, f) for k, _, f in COLUMNS) + " |")
    skipped = Counter()
    for e in entries:
        skipped.update(e["not_counted"])
    if skipped:
        lines += ["", "Not FLOP-counted (calls over all rows): "
                  + ", ".join(f"{name} {n}" for name, n in sorted(skipped.items())) + "."]
    return "\n".join(lines) + "\n"


def write_csv(entries):
    buf = io.StringIO()
    keys = [k for k in entries[0] if k != "not_counted"] + ["params_infer_ratio", "flops_ratio", "latency_ratio"]
    keys = list(dict.fromkeys(keys))
    writer = csv.DictWriter(buf, keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(e)
    return buf.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments complexity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="manifest name (experiments/<name>.yaml) or path")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="rows to measure (default: every row)")
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"),
                        help="image height and width in pixels (default: 800 1216)")
    parser.add_argument("--device", help="device of the latency runs (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per row (default: %(default)s)")
    parser.add_argument("--results", default=str(records.RESULTS),
                        help="results folder; the table goes to <results>/tables/ (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.size) < 32:
        parser.error("--repeats must be at least 1 and --size at least 32 x 32 pixels")
    try:
        device = pick_device(args.device)
        manifest = Manifest(args.manifest)
        rows = args.rows or list(manifest.rows)
        for name in rows:
            manifest.row(name)
        entries = measure(manifest, rows, tuple(args.size), device, args.repeats,
                          progress=lambda text: print(text, file=sys.stderr, flush=True))
    except Exception as e:
        if is_user_error(e):  # a bad manifest or row, a model that is not built: one line
            sys.exit(f"error: {e}")
        raise
    text = markdown(entries, manifest.name, args.size, device.type, args.repeats)
    print(text, end="")
    if not args.no_write:
        folder = Path(args.results) / "tables"
        records.atomic_write(folder / f"complexity_{manifest.name}.md", text)
        records.atomic_write(folder / f"complexity_{manifest.name}.csv", write_csv(entries))
        print(f"written to {folder / f'complexity_{manifest.name}.md'} and .csv", file=sys.stderr)
