"""Training and evaluation of one manifest row, with its run record (experiments/records.py).

`train_row` decides how the row starts (experiments/runs.py), trains it epoch by epoch
(experiments/training.py), evaluates it (experiments/evaluation.py) and writes the records. One
process or several (DDP, experiments/distributed.py): every process trains on its shard of each
batch; only rank 0 writes records, checkpoints and the heartbeat.
"""
import os
import time

import torch
import yaml
from torch import nn

from models import build_model
from models.ks_encoder import TEACHER_BRANCHES

from . import distributed, records
from .build import build_data, check_available, model_config
from .config import Manifest, diff, new_default_keys
from .errors import RunError
from .evaluation import evaluate, make_eval_loader
from .runs import environment, prepare_run_dir, save_checkpoint
from .training import (_reduce_means, batch_plan, build_optimizer, main_lr, make_train_loader, seed_everything,
                       train_one_epoch)


def _launch(ctx):
    """(options for the recorded command, a comment) describing how this run's processes were started."""
    if not ctx.distributed:
        return [], ""
    if ctx.source == "local":
        return os.environ.get(distributed.LOCAL_LAUNCH, "").split(), f"  # {ctx.world_size} processes"
    job = records.slurm_job_id()
    return [], f"  # {ctx.world_size} processes ({ctx.source}{', SLURM job ' + job if job else ''})"



def train_row(manifest_name, row, overrides=(), resume=False, force=False, device=None, results=records.RESULTS):
    """Trains and evaluates one manifest row, writing its run record. Returns the run directory.

    Run by every process of a distributed launch (torchrun, SLURM, `run --gpus N`): rank 0 decides
    how the row starts and writes the records, the others follow."""
    manifest = Manifest(manifest_name)
    cfg = manifest.resolve(row, overrides)
    check_available(cfg, f"manifest {manifest.path}, row {row!r}")
    directory = records.run_dir(manifest.name, row, results)
    ctx = distributed.setup(device)
    prepared = False
    heartbeat = None  # rank 0's claim on the row, from the decision to start until the end
    try:
        plan = batch_plan(cfg["train"], ctx.world_size)
        decision = None
        if ctx.is_main:
            try:
                with records.row_lock(directory):
                    resuming = _start_records(manifest, row, cfg, overrides, directory, resume, force, ctx)
                    if resuming is not None:
                        heartbeat = records.Heartbeat(directory).start()
                decision = ("ok", resuming)
            except TimeoutError as e:  # the row's lock
                decision = ("error", RunError(f"{row}: {e}"))
            except Exception as e:  # noqa: BLE001 - handed to the other ranks, then raised everywhere
                decision = ("error", e)
        decision = ctx.broadcast(decision)
        if decision[0] == "error":
            raise decision[1]
        resuming = decision[1]
        if resuming is None:
            return directory
        prepared = True
        return _train(cfg, directory, resuming, ctx, plan, heartbeat)
    except (KeyboardInterrupt, SystemExit):
        if prepared and ctx.is_main:
            last = records.last_epoch(directory)
            print(f"{row}: interrupted; the record keeps epochs up to {last or 'none'} and resumes from "
                  f"{directory / 'checkpoint.pth'} (`run ... --resume`)", flush=True)
        raise
    except BaseException as e:
        if prepared and ctx.is_main:
            records.atomic_write(directory / "FAILED", f"{type(e).__name__}: {e}\n")
        raise
    finally:
        if heartbeat:
            heartbeat.stop()
        ctx.close()


def _start_records(manifest, row, cfg, overrides, directory, resume, force, ctx):
    resuming = prepare_run_dir(directory, row, resume, force)
    if resuming is None:
        return None
    if resuming:
        recorded = yaml.safe_load((directory / "config.yaml").read_text())
        added = set(new_default_keys(recorded, cfg))
        changed = [k for k in diff(recorded, cfg) if k not in added]
        if changed:
            raise RunError(f"{row}: the configuration differs from the recorded one in {directory}/config.yaml "
                           f"at {changed}; resume with the same overrides, or --force to start over")
    late = [e for e in cfg["train"]["lr_drop"] if e >= cfg["train"]["epochs"]]
    if late:  # allowed (shortened smoke runs of a table row), but usually an override that missed lr_drop
        print(f"{row}: note: train.lr_drop {late} at or after the last epoch ({cfg['train']['epochs']}): "
              f"{'this drop does' if len(late) == 1 else 'these drops do'} not happen in this run", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "FAILED").unlink(missing_ok=True)
    records.write_yaml(directory / "config.yaml", cfg)
    options, note = _launch(ctx)
    records.append_command(directory / "command.txt",
                           records.run_command(manifest.name, row, overrides, resume=bool(resuming), options=options)
                           + note)
    return resuming


def _train(cfg, directory, resuming, ctx, plan, heartbeat=None):
    """Trains and evaluates a prepared run. `heartbeat`: rank 0's running Heartbeat (stopped by the
    caller), updated with the progress."""
    tc = cfg["train"]
    device = ctx.device
    batch, accumulation, total = plan
    seed_everything(tc["seed"] + ctx.rank)
    train_set, val_set = build_data(cfg, ctx)
    torch.manual_seed(tc["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model, criterion = build_model(model_config(cfg), train_set.num_classes)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=tc["lr_drop"], gamma=0.1)
    history, start, start_step, partial = [], 0, 0, None  # start: epochs already completed
    checkpoint = directory / "checkpoint.pth"
    if resuming:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
        start_step, partial = state.get("step", 0), state.get("partial")
        if start_step and state.get("total_batch_size") not in (None, total):
            raise RunError(f"{checkpoint} was saved in the middle of epoch {start + 1} with a total batch of "
                           f"{state['total_batch_size']} images per step, but this launch has {total}; resume "
                           f"with the same number of processes x train.batch_size, or set train.total_batch_size")
        if ctx.is_main:
            records.write_log(directory / "log.jsonl", history)  # the checkpoint's history is authoritative
            where = f"after epoch {start}" + (f" and {start_step} steps of epoch {start + 1}" if start_step else "")
            print(f"resumed from {checkpoint} {where}", flush=True)
    elif ctx.is_main:
        records.write_log(directory / "log.jsonl", [])
    if ctx.is_main:
        records.write_json(directory / "env.json", environment(cfg, model, ctx, plan, start if resuming else None))
    seed_everything(tc["seed"] + ctx.rank)

    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc["find_unused_parameters"])

    teachers = TEACHER_BRANCHES[cfg["model"]["ks"]["mode"]] if tc["eval_teachers"] else ()
    workers = cfg["data"]["num_workers"]
    train_loader = make_train_loader(train_set, batch, workers, tc["seed"], ctx)
    val_loader = make_eval_loader(val_set, tc["eval_batch_size"] or batch, workers, ctx, tc["max_eval_images"])
    every = tc["checkpoint_every_iters"]
    for epoch in range(start + 1, tc["epochs"] + 1):  # epochs count from 1, as in the paper
        skip = start_step if epoch == start + 1 else 0
        train_loader.batch_sampler.sampler.set_epoch(epoch, skip * accumulation * batch)
        t0 = time.time()
        lr = main_lr(optimizer)
        label = f"{epoch}/{tc['epochs']}"

        def on_step(step, sums, count, epoch=epoch):
            if heartbeat:
                heartbeat.update(epoch=epoch, iteration=step, phase="train")
            if every and step % every == 0:
                means = _reduce_means(sums, count, ctx)
                if ctx.is_main:
                    save_checkpoint(checkpoint, model, optimizer, scheduler, epoch - 1, history, cfg, step=step,
                                    partial={"means": means, "count": count}, total_batch=total)

        if heartbeat:
            heartbeat.update(epoch=epoch, iteration=skip, phase="train")
        train_losses = train_one_epoch(net, criterion, train_loader, optimizer, device, tc["clip_max_norm"],
                                       label, tc["max_iters_per_epoch"], accumulation=accumulation, ctx=ctx,
                                       start_step=skip, partial=partial if skip else None, on_step=on_step,
                                       seed_key=(tc["seed"], epoch))
        scheduler.step()
        record = {"epoch": epoch, "lr": lr, "train": train_losses}
        if epoch == tc["epochs"] or epoch % tc["eval_every"] == 0:
            if heartbeat:
                heartbeat.update(phase="eval")
            record["eval"] = evaluate(model, val_loader, val_set, device, teachers, cfg["model"]["eval_topk"],
                                      None, desc=f"epoch {label} eval", ctx=ctx, moved=tc["eval_moved"])
        record["time_s"] = round(time.time() - t0, 1)
        history.append(record)
        if ctx.is_main:
            save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, history, cfg, total_batch=total)
            records.write_log(directory / "log.jsonl", history)
            summary = "  ".join(f"{b}: AP {m['AP']:.3f} AP50 {m['AP50']:.3f}"
                                for b, m in record.get("eval", {}).items())
            print(f"epoch {epoch}: loss {train_losses.get('loss', float('nan')):.3f}  {summary}  "
                  f"({record['time_s']} s)", flush=True)

    if ctx.is_main:
        final = history[-1]["eval"]
        records.write_json(directory / "eval.json", {"epoch": history[-1]["epoch"], **final})
        records.write_json(directory / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                               "epochs": tc["epochs"], "git_sha": records.git_sha()})
    ctx.barrier()
    return directory

