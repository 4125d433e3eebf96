"""Training and evaluation of one manifest row, with its run record (experiments/records.py)."""
import math
import platform
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from torch import nn
from tqdm import tqdm

import datasets
from models import build_model, is_teacher_parameter, model_targets
from models.ks_encoder import STUDENT, TEACHER_BRANCHES
from models.postprocess import postprocess

from . import records
from .config import Manifest, diff

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm)


class RunError(RuntimeError):
    pass


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name=None):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_root(path):
    """Relative data paths are relative to the repository root."""
    return str(path if path is None or Path(path).is_absolute() else records.REPO / path)


# --------------------------------------------------------------------------------------------------
# building blocks

def build_data(cfg):
    """(train set, val set) for a run configuration; the synthetic set is generated if missing."""
    data = dict(cfg["data"])
    data["root"] = resolve_root(data["root"])
    if data["dataset"] == "synthetic":
        if not data["root"]:
            raise RunError("data.root must name a folder for the synthetic data set")
        s = data["synthetic"]
        datasets.ensure_synthetic(data["root"], s["train"], s["val"], s["seed"], s["size"])
    return (datasets.build_dataset(data, data["train_split"], train=True),
            datasets.build_dataset(data, data["val_split"], train=False))


def make_loader(dataset, batch_size, train, num_workers, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=train, collate_fn=datasets.collate,
        num_workers=num_workers, generator=generator, persistent_workers=num_workers > 0)


def build_optimizer(model, train_cfg):
    """AdamW; the backbone at its own (lower) lr; no weight decay on normalisation parameters."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("backbone.")
        decay = 0.0 if id(p) in norm_params else train_cfg["weight_decay"]
        key = (backbone, decay)
        if key not in groups:
            lr = train_cfg["lr_backbone"] if backbone else train_cfg["lr"]
            groups[key] = {"params": [], "lr": lr, "weight_decay": decay}
        groups[key]["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])


def to_device(batch, device):
    return (batch["images"].to(device, non_blocking=True), batch["padding_mask"].to(device, non_blocking=True),
            model_targets(batch["targets"], device))


def progress(iterable, **kwargs):
    interactive = sys.stderr.isatty()
    return tqdm(iterable, dynamic_ncols=True, mininterval=0.5 if interactive else 30, **kwargs)


# --------------------------------------------------------------------------------------------------
# one epoch of training, one evaluation

LOGGED_LOSSES = ("loss", "loss_attn1", "loss_attn2", "loss_attn3", "loss_class", "loss_bbox", "loss_giou")


def train_one_epoch(model, criterion, loader, optimizer, device, clip_max_norm, epoch, max_iters=None):
    """Returns the mean of the logged losses over the epoch."""
    model.train()
    criterion.train()
    sums, count = {}, 0
    total = len(loader) if max_iters is None else min(max_iters, len(loader))
    bar = progress(loader, total=total, desc=f"epoch {epoch} train", leave=False)
    for it, batch in enumerate(bar):
        if it >= total:
            break
        images, mask, targets = to_device(batch, device)
        losses = criterion(model(images, mask, targets), targets)
        loss = losses["loss"]
        if not math.isfinite(loss.item()):
            raise RunError(f"non-finite loss {loss.item()} at epoch {epoch}, iteration {it}: "
                           + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        for k in LOGGED_LOSSES:
            if k in losses:
                sums[k] = sums.get(k, 0.0) + losses[k].item()
        count += 1
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}")
    bar.close()
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(model, loader, dataset, device, teachers=(), topk=300, max_images=None, desc="eval"):
    """COCO metrics of the student and, with `teachers` (branch names), of each teacher branch's
    last decoder layer with GT masks. Returns {branch: {AP, AP50, ...}}."""
    model.eval()
    branches = (STUDENT,) + tuple(teachers)
    evaluators = {b: datasets.CocoEvaluator(dataset.coco, dataset.category_ids) for b in branches}
    seen = 0
    bar = progress(loader, desc=desc, leave=False)
    for batch in bar:
        if max_images is not None and seen >= max_images:
            break
        images, mask, targets = to_device(batch, device)
        outputs = model(images, mask, targets if teachers else None, with_teachers=bool(teachers) or None)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        image_ids = [int(t["image_id"]) for t in targets]
        per_branch = {STUDENT: outputs}
        per_branch.update({b: outputs["teacher_outputs"][b][-1] for b in teachers})
        for b, out in per_branch.items():
            dets = postprocess(out["pred_logits"], out["pred_boxes"], orig_sizes, topk)
            evaluators[b].update(image_ids, [d["boxes"] for d in dets], [d["scores"] for d in dets],
                                 [d["labels"] for d in dets])
        seen += len(targets)
    bar.close()
    return {b: e.summarize() for b, e in evaluators.items()}


# --------------------------------------------------------------------------------------------------
# a whole row

def environment(cfg, model, device):
    n_params = sum(p.numel() for p in model.parameters())
    n_teacher = sum(p.numel() for n, p in model.named_parameters() if is_teacher_parameter(n))
    return {
        "git_sha": records.git_sha(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "world_size": 1,
        "batch_size_per_process": cfg["train"]["batch_size"],
        "total_batch_size": cfg["train"]["batch_size"],
        "backbone_init": model.backbone.init,
        "parameters": n_params,
        "teacher_parameters": n_teacher,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save_checkpoint(path, model, optimizer, scheduler, epoch, history, cfg):
    """Everything needed to resume after `epoch` completed epochs, written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history, "config": cfg,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def prepare_run_dir(directory, row, resume, force):
    """Decides how a row starts. Returns True when it resumes from a checkpoint, False for a fresh
    start, None when it is already done. Never deletes a record: --force moves the old one aside."""
    directory = Path(directory)
    state = records.status(directory)
    if force and directory.exists():
        aside = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(directory), aside)
        print(f"{row}: --force: the previous record was moved to {aside}")
        return False
    if state == "done":
        print(f"{row}: already done ({directory}); pass --force to run it again")
        return None
    if state in ("interrupted", "failed"):
        if (directory / "checkpoint.pth").is_file() and resume:
            return True
        if not resume:
            last = records.read_log(directory / "log.jsonl")
            raise RunError(
                f"{row}: {directory} holds an unfinished run ({state}, last finished epoch "
                f"{last[-1]['epoch'] if last else 'none'}); pass --resume to continue it from its checkpoint "
                f"or --force to start over (the old record is then moved aside)")
        print(f"{row}: --resume: no checkpoint in {directory} (no epoch finished); starting from epoch 0")
    return False


def train_row(manifest_name, row, overrides=(), resume=False, force=False, device=None, results=records.RESULTS):
    """Trains and evaluates one manifest row, writing its run record. Returns the run directory."""
    manifest = Manifest(manifest_name)
    cfg = manifest.resolve(row, overrides)
    directory = records.run_dir(manifest.name, row, results)
    resuming = prepare_run_dir(directory, row, resume, force)
    if resuming is None:
        return directory
    if resuming:
        recorded = yaml.safe_load((directory / "config.yaml").read_text())
        changed = diff(recorded, cfg)
        if changed:
            raise RunError(f"{row}: the configuration differs from the recorded one in {directory}/config.yaml "
                           f"at {changed}; resume with the same overrides, or --force to start over")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "FAILED").unlink(missing_ok=True)
    records.write_yaml(directory / "config.yaml", cfg)
    records.append_command(directory / "command.txt",
                           records.run_command(manifest.name, row, overrides, resume=bool(resuming)))
    try:
        return _train(cfg, directory, resuming, pick_device(device))
    except BaseException as e:
        records.atomic_write(directory / "FAILED", f"{type(e).__name__}: {e}\n")
        raise


def _train(cfg, directory, resuming, device):
    tc = cfg["train"]
    seed_everything(tc["seed"])
    train_set, val_set = build_data(cfg)
    model, criterion = build_model(cfg["model"], train_set.num_classes)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=tc["lr_drop"], gamma=0.1)
    history, start = [], 0  # start: epochs already completed
    checkpoint = directory / "checkpoint.pth"
    if resuming:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        records.write_log(directory / "log.jsonl", history)  # the checkpoint's history is authoritative
        print(f"resumed from {checkpoint} after epoch {state['epoch']}")
    else:
        records.write_log(directory / "log.jsonl", [])
    records.write_json(directory / "env.json", environment(cfg, model, device))

    teachers = TEACHER_BRANCHES[cfg["model"]["ks"]["mode"]] if tc["eval_teachers"] else ()
    workers = cfg["data"]["num_workers"]
    train_loader = make_loader(train_set, tc["batch_size"], True, workers, seed=tc["seed"])
    val_loader = make_loader(val_set, tc["batch_size"], False, workers)
    for epoch in range(start + 1, tc["epochs"] + 1):  # epochs count from 1, as in the paper
        train_loader.generator.manual_seed(tc["seed"] + epoch)  # the same order whether resumed or not
        t0 = time.time()
        lr = optimizer.param_groups[0]["lr"]
        train_losses = train_one_epoch(model, criterion, train_loader, optimizer, device, tc["clip_max_norm"],
                                       f"{epoch}/{tc['epochs']}", tc["max_iters_per_epoch"])
        scheduler.step()
        record = {"epoch": epoch, "lr": lr, "train": train_losses}
        if epoch == tc["epochs"] or epoch % tc["eval_every"] == 0:
            record["eval"] = evaluate(model, val_loader, val_set, device, teachers, cfg["model"]["eval_topk"],
                                      tc["max_eval_images"], desc=f"epoch {epoch}/{tc['epochs']} eval")
        record["time_s"] = round(time.time() - t0, 1)
        history.append(record)
        save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, history, cfg)
        records.write_log(directory / "log.jsonl", history)
        summary = "  ".join(f"{b}: AP {m['AP']:.3f} AP50 {m['AP50']:.3f}" for b, m in record.get("eval", {}).items())
        print(f"epoch {epoch}: loss {train_losses.get('loss', float('nan')):.3f}  {summary}  ({record['time_s']} s)")

    final = history[-1]["eval"]
    records.write_json(directory / "eval.json", {"epoch": history[-1]["epoch"], **final})
    records.write_json(directory / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "epochs": tc["epochs"], "git_sha": records.git_sha()})
    return directory
