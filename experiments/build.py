"""What a run needs, built from its configuration: the model section with resolved paths, the
start-up checks of a row (its model can be built, its batch plan holds), the data sets (generating
the synthetic one), the device."""
import copy
from pathlib import Path

import torch

import datasets
from models import build_model

from . import distributed, records
from .errors import RunError
from .training import batch_plan


def pick_device(name=None):
    return distributed.pick_device(name)



def resolve_root(path):
    """Relative data and weight paths are relative to the repository root."""
    return str(path if path is None or Path(path).is_absolute() else records.REPO / path)


def model_config(cfg, pretrained=True):
    """The `model` section as the model builders take it (weights_path resolved). With `pretrained`
    False the backbone starts from a random initialisation, for models whose weights come from a
    checkpoint or do not matter (no pretrained file is needed then)."""
    m = copy.deepcopy(cfg["model"])
    if not pretrained:
        m["backbone"].update(weights=None, weights_path=None)
    elif m["backbone"].get("weights_path"):
        m["backbone"]["weights_path"] = resolve_root(m["backbone"]["weights_path"])
    return m


def check_buildable(cfg, where):
    """Raises RunError when the row's model cannot be built from its configuration. Builds the model
    on the meta device (no memory, no weights) to find out, so a row that cannot run fails before any
    record is written or any job is submitted."""
    m = model_config(cfg)
    m["backbone"]["weights"] = None
    try:
        with torch.device("meta"):
            build_model(m, 2)
        return
    except Exception:  # noqa: BLE001 - maybe only the meta device's limits: build it for real to know
        pass
    try:
        build_model(m, 2)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{where}: the model cannot be built: {type(e).__name__}: {e}") from None


def resolve_row(manifest, row, overrides=(), world_size=None, where=None):
    """A row's start-up checks, before any record is written or job submitted: (its resolved
    configuration, its batch plan for `world_size` processes (training.batch_plan) or None without
    one). Raises ConfigError for the configuration, check_buildable's RunError (`where`, default
    "manifest <path>, row '<row>'", starts their message) and BatchPlanError."""
    cfg = manifest.resolve(row, overrides)
    check_buildable(cfg, f"manifest {manifest.path}, row {row!r}" if where is None else where)
    return cfg, None if world_size is None else batch_plan(cfg["train"], world_size)


def data_config(cfg):
    """The `data` section with its paths resolved (relative ones are relative to the repository root)."""
    data = dict(cfg["data"])
    for key in ("root", "train_images", "train_annotations", "val_images", "val_annotations"):
        data[key] = resolve_root(data[key]) if data[key] else data[key]
    return data


def build_data(cfg, ctx=None):
    """(train set, val set) for a run configuration; the synthetic set is generated if missing
    (by rank 0, the others wait). Relative paths are relative to the repository root."""
    ctx = ctx or distributed.Context()
    data = data_config(cfg)
    if data["dataset"] == "synthetic":
        if not data["root"]:
            raise RunError("data.root must name a folder for the synthetic data set")
        s = data["synthetic"]
        error = None
        if ctx.is_main:
            try:
                datasets.ensure_synthetic(data["root"], s["train"], s["val"], s["seed"], s["size"])
            except Exception as e:  # noqa: BLE001 - raised after the barrier, so that no process waits in it
                error = e
        ctx.barrier()
        if error is not None:
            raise error
    return datasets.build_split(data, "train"), datasets.build_split(data, "val")

