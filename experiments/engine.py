"""Training and evaluation of one manifest row, with its run record (experiments/records.py).

`train_row` decides how the row starts (experiments/runs.py), trains it epoch by epoch
(experiments/training.py), evaluates it (experiments/evaluation.py) and writes the records. One
process or several (DDP, experiments/distributed.py): every process trains on its shard of each
batch; only rank 0 writes records, checkpoints (experiments/checkpoints.py) and the heartbeat.
"""
import errno
import os
import sys
import time

import torch
from torch import nn

from models import build_model
from models.ks_encoder import teacher_branches
from slurm import jobs as slurm_jobs

from . import distributed, records
from .allocator import keep_freed_memory
from .build import build_data, model_config, resolve_row
from .checkpoints import (CHECKPOINT, check_weights, has_checkpoint, read_checkpoint, save_checkpoint,
                          set_damaged_aside)
from .config import Manifest, diff, flatten, new_default_keys
from .evaluation import evaluate, make_eval_loader, write_detections
from .errors import RunError
from .runs import environment, prepare_run_dir
from .signals import Stopped, StopRequest
from .training import (build_optimizer, main_lr, make_train_loader, optimizer_steps, reduce_means, seed_everything,
                       train_one_epoch)


def _launch(ctx):
    """(options for the recorded command, a comment) describing how this run's processes were started."""
    if not ctx.distributed:
        return [], ""
    if ctx.source == "local":
        return os.environ.get(distributed.LOCAL_LAUNCH, "").split(), f"  # {ctx.world_size} processes"
    job = slurm_jobs.job_id()
    return [], f"  # {ctx.world_size} processes ({ctx.source}{', SLURM job ' + job if job else ''})"



def train_row(manifest_name, row, overrides=(), resume=False, force=False, device=None, results=records.RESULTS):
    """Trains and evaluates one manifest row, writing its run record. Returns the run directory.

    Run by every process of a distributed launch (torchrun, SLURM, `run --gpus N`): rank 0 decides
    how the row starts and writes the records, the others follow. The data sets are built and
    checked before any record is written, so a data error leaves no record behind. SIGTERM and
    SIGINT write a checkpoint at the current step and stop (signals.StopRequest)."""
    if force and resume:
        raise RunError(f"{row}: --force (start over, moving the record aside) and --resume (continue it) "
                       f"contradict each other; give one")
    manifest = Manifest(manifest_name)
    owner = manifest.record_of(row)
    if owner != (manifest.name, row):  # `same_as`: one run, in the other row's records
        if force:  # its record belongs to the other manifest's table too
            raise RunError(f"{row}: this row is the same run as {'/'.join(owner)} (same_as in {manifest.path}); "
                           f"--force would replace that manifest's record: run it there "
                           f"(`run {owner[0]} --row {owner[1]} --force`)")
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"{row}: the same run as {'/'.join(owner)} (same_as); its records are used", flush=True)
        return train_row(*owner, overrides, resume=resume, force=force, device=device, results=results)
    directory = records.run_dir(manifest.name, row, results)
    ctx = distributed.setup(device)
    if ctx.device.type == "cpu":  # steps reuse their freed memory instead of faulting in new pages
        keep_freed_memory()
    stop = StopRequest().install()
    prepared = False
    heartbeat = None  # rank 0's claim on the row, from the decision to start until the end
    try:
        cfg, plan = resolve_row(manifest, row, overrides, ctx.world_size)
        built = None
        if ctx.broadcast(force or records.status(directory) != "done"):
            built = _agreed(lambda: _build(row, cfg, ctx, plan), ctx, "building the data sets and the model")
        decision, state = None, None
        if ctx.is_main:
            try:
                with records.row_lock(directory):
                    resuming, state = _start_records(manifest, row, cfg, overrides, directory, resume, force, ctx)
                    if resuming is not None:
                        heartbeat = records.Heartbeat(directory).start()
                decision = ("ok", resuming)
            except TimeoutError as e:  # the row's lock
                decision = ("error", RunError(f"{row}: {e}"))
            except OSError as e:  # a results folder that cannot be written
                decision = ("error", RunError(f"{row}: cannot write the run record in {directory}: {e}"
                                              if isinstance(e, (PermissionError, NotADirectoryError)) or e.errno in
                                              (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else
                                              f"{row}: the run record in {directory} cannot be used: {e}"))
            except Exception as e:  # noqa: BLE001 - handed to the other ranks, then raised everywhere
                decision = ("error", e)
        decision = ctx.broadcast(decision)
        if decision[0] == "error":
            raise decision[1]
        resuming = decision[1]  # the checkpoint file to resume from, False (fresh start) or None (done)
        if resuming is None:
            return directory
        prepared = True
        if built is None:  # the row was done when the launch began and is not now (moved aside meanwhile)
            built = _build(row, cfg, ctx, plan)
        return _train(cfg, directory, resuming, ctx, plan, built, state, heartbeat, stop)
    except Stopped as e:
        if prepared and ctx.is_main:
            if e.saved:
                kept = f"a checkpoint of where it stopped, {directory / CHECKPOINT}"
            else:
                last = _last_epoch_or_none(directory)
                kept = f"epochs up to {last or 'none'}" + (f" ({directory / CHECKPOINT})"
                                                             if has_checkpoint(directory) else "")
            print(f"{row}: {e}; the record keeps {kept}; continue with `run ... --resume`", flush=True)
        raise
    except (KeyboardInterrupt, SystemExit):
        if prepared and ctx.is_main:
            last = _last_epoch_or_none(directory)
            print(f"{row}: interrupted; the record keeps epochs up to {last or 'none'} and resumes from "
                  f"{directory / CHECKPOINT} (`run ... --resume`)", flush=True)
        raise
    except BaseException as e:
        if prepared and ctx.is_main:
            try:
                records.atomic_write(directory / "FAILED", f"{type(e).__name__}: {e}\n")
            except OSError as failed:  # e.g. the full disk that stopped the run: its message comes first
                print(f"{row}: the FAILED record could not be written ({failed})", file=sys.stderr, flush=True)
        raise
    finally:
        stop.restore()
        if heartbeat:
            heartbeat.stop()
        ctx.close()


def _last_epoch_or_none(directory):
    """The last logged epoch for a message on the way out; None when the log cannot be read (a
    damaged log is rewritten from the checkpoint when the run resumes)."""
    try:
        return records.last_epoch(directory)
    except RunError:
        return None


def _agreed(step, ctx, what):
    """step() on every process; when it raises on any of them, every process raises (its own error,
    or a RunError naming the process that failed), so none is left waiting in a later collective."""
    error = None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 - raised below, on every process
        error = e
    failed = ctx.all_reduce_sum(torch.tensor([float(error is not None)], device=ctx.device))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RunError(f"{what} failed on another process (its error is printed there)")
    return result


def _build(row, cfg, ctx, plan):
    """(train set, val set, model, criterion), built and checked before any record is written: a
    problem with the data, the weights or the batch plan leaves no record behind."""
    tc = cfg["train"]
    seed_everything(tc["seed"] + ctx.rank)
    train_set, val_set = build_data(cfg, ctx)
    check_steps(row, (train_set, val_set), plan, ctx.world_size)
    torch.manual_seed(tc["seed"])  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model, criterion = build_model(model_config(cfg), train_set.num_classes)
    return train_set, val_set, model, criterion


def check_steps(row, data, plan, world_size):
    """RunError when an epoch would train no optimizer step or there is nothing to evaluate."""
    train_set, val_set = data
    batch, accumulation, total = plan
    if optimizer_steps(len(train_set), plan, world_size) == 0:
        raise RunError(
            f"{row}: the training set has {len(train_set)} images, fewer than one optimizer step takes ({total} = "
            f"{world_size} process(es) x train.batch_size {batch} x {accumulation} accumulation step(s); incomplete "
            f"batches are dropped), so no step would run. Lower train.batch_size (or train.total_batch_size) or "
            f"use a larger training set")
    if len(val_set) == 0:
        raise RunError(f"{row}: the validation set has no images")


def _changes(recorded, cfg):
    """'key: recorded -> now' for every key where `cfg` differs from a recorded configuration (keys
    added to DEFAULTS since, at their default, do not count)."""
    added = set(new_default_keys(recorded, cfg))
    old, new = flatten(recorded), flatten(cfg)
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
            for k in diff(recorded, cfg) if k not in added]


def _start_records(manifest, row, cfg, overrides, directory, resume, force, ctx):
    """Decides how the row starts and writes its first records. Returns (the checkpoint file to
    resume from, False for a fresh start or None when the row is done; the checkpoint's state)."""
    resuming = prepare_run_dir(directory, row, resume, force)
    if resuming is None:
        changed = _changes(records.read_config(directory / "config.yaml"), cfg)
        if changed:
            raise RunError(f"{row}: this row is done ({directory}) with another configuration: "
                           f"{'; '.join(changed)}. Pass --force to train it again with this one (the finished "
                           f"record is moved aside), or run it under another manifest name")
        return None, None
    state = None
    if resuming:
        changed = _changes(records.read_config(directory / "config.yaml"), cfg)
        if changed:
            raise RunError(f"{row}: the configuration differs from the recorded one in {directory}/config.yaml "
                           f"({'; '.join(changed)}); resume with the same overrides, or --force to start over")
        state, resuming = read_checkpoint(directory / CHECKPOINT)
        if resuming.name != CHECKPOINT:  # the previous one: keep the damaged latest out of its way
            set_damaged_aside(directory / CHECKPOINT)
        changed = _changes(state["config"], cfg) if state.get("config") else []
        if changed:
            raise RunError(f"{row}: the checkpoint {resuming} was saved with another configuration "
                           f"({'; '.join(changed)}); resume with the configuration it was trained with, or "
                           f"--force to start over")
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
    return (str(resuming) if resuming else False), state


def _trained_at(directory, sha, resuming):
    """Every commit that trained part of the run, in order (env.json's `git_shas`): a resume keeps the
    earlier ones, and says so when this commit is another one (its code may compute differently)."""
    earlier = (records.read_json(directory / "env.json", None) or {}) if resuming else {}
    shas = list(earlier.get("git_shas") or ([earlier["git_sha"]] if earlier.get("git_sha") else []))
    if shas and shas[-1] != sha:
        print(f"note: this run was trained at {shas[-1]} and resumes at {sha}; the record keeps both "
              f"(env.json git_shas)", flush=True)
    return shas if shas and shas[-1] == sha else shas + [sha]


def _train(cfg, directory, resuming, ctx, plan, built, state=None, heartbeat=None, stop=None):
    """Trains and evaluates a prepared run. `resuming`: the checkpoint file to continue from (its
    `state` when rank 0 has read it already) or False; `built`: _build's data sets, model and
    criterion (the model as initialised from the seed); `heartbeat`:
    rank 0's running Heartbeat (stopped by the caller), updated with the progress; `stop`: the
    StopRequest of the signals."""
    tc = cfg["train"]
    device = ctx.device
    batch, accumulation, total = plan
    train_set, val_set, model, criterion = built
    stop = stop or StopRequest()  # not installed: no signal handling
    model.to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=tc["lr_drop"], gamma=0.1)
    history, start, start_step, partial = [], 0, 0, None  # start: epochs already completed
    checkpoint = directory / CHECKPOINT
    if resuming:
        if state is None:
            state, _ = read_checkpoint(resuming)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
        start_step, partial = state.get("step", 0), state.get("partial")
        if start_step and state.get("total_batch_size") not in (None, total):
            raise RunError(f"{resuming} was saved in the middle of epoch {start + 1} with a total batch of "
                           f"{state['total_batch_size']} images per step, but this launch has {total}; resume "
                           f"with the same number of processes x train.batch_size, or set train.total_batch_size")
        state = None  # the weights are in the model now
        if ctx.is_main:
            records.write_log(directory / "log.jsonl", history)  # the checkpoint's history is authoritative
            where = f"after epoch {start}" + (f" and {start_step} steps of epoch {start + 1}" if start_step else "")
            print(f"resumed from {resuming} {where}", flush=True)
    elif ctx.is_main:
        records.write_log(directory / "log.jsonl", [])
    if ctx.is_main:
        env = environment(cfg, model, ctx, plan, start if resuming else None)
        env["git_shas"] = _trained_at(directory, env["git_sha"], resuming)
        records.write_json(directory / "env.json", env)
    seed_everything(tc["seed"] + ctx.rank)

    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc["find_unused_parameters"])

    teachers = teacher_branches(model) if tc["eval_teachers"] else ()
    workers = cfg["data"]["num_workers"]
    train_loader = make_train_loader(train_set, batch, workers, tc["seed"], ctx)
    val_loader = make_eval_loader(val_set, tc["eval_batch_size"] or batch, workers, ctx, tc["max_eval_images"])
    every = tc["checkpoint_every_iters"]
    detections = {}  # of the final evaluation, in COCO's results format (rank 0)
    # from here a signal is answered after the next optimizer step, with a checkpoint of it
    stop.in_steps = True
    for epoch in range(start + 1, tc["epochs"] + 1):  # epochs count from 1, as in the paper
        skip = start_step if epoch == start + 1 else 0
        train_loader.batch_sampler.sampler.set_epoch(epoch, skip * accumulation * batch)
        t0 = time.time()
        lr = main_lr(optimizer)
        label = f"{epoch}/{tc['epochs']}"

        def save_mid_epoch(step, sums, count, epoch=epoch):
            means = reduce_means(sums, count, ctx)
            check_weights(model, f"at epoch {epoch}, iteration {step}")  # on every process (DDP: equal weights)
            if ctx.is_main:
                save_checkpoint(checkpoint, model, optimizer, scheduler, epoch - 1, history, cfg, step=step,
                                partial={"means": means, "count": count}, total_batch=total,
                                classes=train_set.classes())

        def on_step(step, sums, count, epoch=epoch):
            if heartbeat:
                heartbeat.update(epoch=epoch, iteration=step, phase="train")
            if every and step % every == 0:
                save_mid_epoch(step, sums, count)

        def on_stop(step, sums, count):
            if not (every and step % every == 0):  # else on_step has just saved this step
                save_mid_epoch(step, sums, count)

        if heartbeat:
            heartbeat.update(epoch=epoch, iteration=skip, phase="train")
        train_losses = train_one_epoch(net, criterion, train_loader, optimizer, device, tc["clip_max_norm"],
                                       label, tc["max_iters_per_epoch"], accumulation=accumulation, ctx=ctx,
                                       start_step=skip, partial=partial if skip else None, on_step=on_step,
                                       seed_key=(tc["seed"], epoch), stop=stop, on_stop=on_stop)
        scheduler.step()
        record = {"epoch": epoch, "lr": lr, "train": train_losses}
        if epoch == tc["epochs"] or epoch % tc["eval_every"] == 0:
            if heartbeat:
                heartbeat.update(phase="eval")
            # a signal during the evaluation waits for its end and the epoch's checkpoint (below)
            distance = {} if teachers else None
            record["eval"] = evaluate(model, val_loader, val_set, device, teachers, cfg["model"]["eval_topk"],
                                      None, desc=f"epoch {label} eval", ctx=ctx, moved=tc["eval_moved"],
                                      detections=detections if epoch == tc["epochs"] else None,
                                      memory_distance=distance, clip=cfg["model"]["eval_clip_boxes"])
            if distance:
                record["memory_distance"] = distance
        record["time_s"] = round(time.time() - t0, 1)
        history.append(record)
        check_weights(model, f"after epoch {epoch}")
        if ctx.is_main:
            save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, history, cfg, total_batch=total,
                            classes=train_set.classes())
            records.write_log(directory / "log.jsonl", history)
            summary = "  ".join(f"{b}: AP {m['AP']:.3f} AP50 {m['AP50']:.3f}"
                                for b, m in record.get("eval", {}).items())
            print(f"epoch {epoch}: loss {train_losses.get('loss', float('nan')):.3f}  {summary}  "
                  f"({record['time_s']} s)", flush=True)
        if epoch < tc["epochs"] and stop.poll(ctx) == "stop":
            raise Stopped(f"stopped by {stop.name} after epoch {epoch}", max(stop.signum or 0, 0), saved=True)
    stop.in_steps = False

    if start >= tc["epochs"]:  # resumed after the last epoch's checkpoint: its detections were not kept
        evaluate(model, val_loader, val_set, device, teachers, cfg["model"]["eval_topk"], None,
                 desc=f"epoch {start}/{tc['epochs']} eval", ctx=ctx, detections=detections,
                 clip=cfg["model"]["eval_clip_boxes"])

    if ctx.is_main:
        final = history[-1]["eval"]
        records.write_json(directory / "eval.json", {"epoch": history[-1]["epoch"], **final})
        write_detections(directory, "", detections)
        records.write_json(directory / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                               "epochs": tc["epochs"], "git_sha": records.git_sha()})
    ctx.barrier()
    return directory

