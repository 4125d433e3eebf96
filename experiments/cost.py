"""What a manifest row costs in GPU-hours, from measured step times.

The step times live in results/step_times.json, written by `python -m benchmarks.step_time`
on a GPU: one entry per (variant, backbone, KS mode, per-GPU batch, image size) with the GPU's name,
the torch version, the date and the median seconds of one training step (forward, loss, backward,
optimizer) of one process. A row's cost is

    epochs x (training images / per-GPU batch) x seconds per step / 3600   GPU-hours,

whatever the number of GPUs (they share the steps). Evaluation, data loading stalls and start-up are
not counted. Where no entry matches a row, the row's cost is unknown and says so; nothing is guessed
from other variants or GPUs.
"""
import json
import math
from pathlib import Path

from . import records

STEP_TIMES = records.RESULTS / "step_times.json"
# Training-set sizes of the splits the manifests name (COCO train2017, images without annotations kept).
TRAIN_IMAGES = {("coco", "train2017"): 118287}
KEY_FIELDS = ("variant", "backbone", "ks_mode", "batch_size", "image_size")


def row_key(cfg):
    """What a step time depends on in a resolved row configuration (KEY_FIELDS but the image size)."""
    m = cfg["model"]
    return {"variant": m["variant"], "backbone": m["backbone"]["name"], "ks_mode": m["ks"]["mode"],
            "batch_size": cfg["train"]["batch_size"]}


def train_images(cfg):
    """Images of one epoch, or None when the training set's size is not known without reading it."""
    data = cfg["data"]
    if data["dataset"] == "synthetic":
        return data["synthetic"]["train"]
    return TRAIN_IMAGES.get((data["dataset"], data["train_split"]))


def load_step_times(path=None):
    """The measurement entries (a list; [] when the file does not exist)."""
    path = Path(path or STEP_TIMES)
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    entries = doc.get("measurements") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object with a list 'measurements'")
    for i, entry in enumerate(entries):
        missing = [k for k in KEY_FIELDS + ("seconds_per_step", "gpu", "torch", "date") if k not in entry]
        if missing:
            raise ValueError(f"{path}: measurement {i} lacks {missing}")
    return entries


def add_step_time(entry, path=None):
    """Adds a measurement, replacing an earlier one of the same key on the same GPU."""
    path = Path(path or STEP_TIMES)
    entries = [e for e in load_step_times(path)
               if not (all(e[k] == entry[k] for k in KEY_FIELDS) and e["gpu"] == entry["gpu"])]
    entries.append(entry)
    entries.sort(key=lambda e: tuple(str(e[k]) for k in KEY_FIELDS + ("gpu",)))
    records.atomic_write(path, json.dumps({"measurements": entries}, indent=1) + "\n")


def row_cost(cfg, entries, gpu=None):
    """dict(gpu_hours, seconds_per_step, steps, gpu, measured) for a resolved row; gpu_hours None and
    `reason` set when no measurement (on `gpu`, when given) matches the row or the epoch size is unknown."""
    epoch_images = train_images(cfg)
    want = row_key(cfg)
    matches = [e for e in entries if all(e[k] == v for k, v in want.items()) and (gpu is None or e["gpu"] == gpu)]
    out = {"gpu_hours": None, "seconds_per_step": None, "steps": None, "gpu": None, "measured": None, "reason": None}
    if epoch_images is None:
        out["reason"] = f"training set size of {cfg['data']['dataset']}/{cfg['data']['train_split']} unknown"
        return out
    steps = cfg["train"]["epochs"] * math.ceil(epoch_images / cfg["train"]["batch_size"])
    out["steps"] = steps
    if not matches:
        out["reason"] = (f"no step time measured for {want['variant']} {want['backbone']} ks={want['ks_mode']} "
                         f"batch {want['batch_size']}" + (f" on {gpu}" if gpu else ""))
        return out
    entry = max(matches, key=lambda e: e["date"])  # the newest measurement
    out.update(gpu_hours=steps * entry["seconds_per_step"] / 3600, seconds_per_step=entry["seconds_per_step"],
               gpu=entry["gpu"], measured=f"{entry['gpu']}, torch {entry['torch']}, {entry['date']}, "
                                          f"{entry['image_size'][0]}x{entry['image_size'][1]} px")
    return out


def cost_lines(rows_costs):
    """Summary lines: the measured total and the rows without a measurement."""
    known = [c["gpu_hours"] for c in rows_costs.values() if c["gpu_hours"] is not None]
    unknown = {row: c["reason"] for row, c in rows_costs.items() if c["gpu_hours"] is None}
    lines = [f"estimated training cost: {sum(known):,.0f} GPU-hours for {len(known)} of {len(rows_costs)} row(s) "
             f"(training steps only, from {STEP_TIMES.name})"]
    if unknown:
        lines.append(f"no estimate for {len(unknown)} row(s) (measure them on a GPU with "
                     f"`python -m benchmarks.step_time --manifest M`):")
        lines += [f"  {row}: {reason}" for row, reason in unknown.items()]
    return lines
