"""COCO evaluation of the student and the teacher branches, during training and of a checkpoint
(`python -m experiments eval`).

Each process evaluates a shard of the validation images; rank 0 gathers the detections and runs
pycocotools. The detections themselves can be kept in COCO's results format (`evaluate(...,
detections=d)`, `write_detections`): `detections-<branch>.json` beside the metrics.
"""
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import datasets
from models.ks_encoder import STUDENT, MemoryDistance, branch_output, teacher_branches
from models.postprocess import postprocess

from . import distributed, records
from .build import build_data
from .checkpoints import load_checkpoint
from .signals import ignore_stop_signals
from .training import progress, to_device


def make_eval_loader(dataset, batch_size, num_workers, ctx, max_images=None):
    """This process's shard of the first `max_images` validation images, in order, unpadded. On
    CUDA its workers persist between the evaluations of a run (starting them takes seconds, which
    a GPU epoch of a small model notices) and batches come in pinned memory."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    shard = list(range(n))[ctx.rank::ctx.world_size]
    cuda = ctx.device.type == "cuda"
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=batch_size, shuffle=False,
        collate_fn=datasets.collate, num_workers=num_workers, pin_memory=cuda,
        persistent_workers=cuda and num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None)



@torch.no_grad()
def evaluate(model, loader, dataset, device, teachers=(), topk=300, max_images=None, desc="eval", ctx=None,
             moved=False, detections=None, memory_distance=None, clip=False):
    """COCO metrics of the student and, with `teachers` (branch names), of each teacher branch's
    last decoder layer with GT masks: {branch: {AP, AP50, ...}} on every process (each evaluates its
    `loader`'s images, rank 0 computes the metrics). `moved`: also `attn1_moved`, the student's
    detections scored on other images (CocoEvaluator.moved_to_other_images).

    `detections`: a dict that rank 0 fills with every process's detections per evaluated branch (not
    `attn1_moved`), as CocoEvaluator.results() gives them (rounded so that pycocotools computes the
    returned metrics from them, to about 1e-7), for `write_detections`; elsewhere it stays empty.

    `clip`: clip the detections to their image (model.eval_clip_boxes; models.postprocess).

    `memory_distance`: a dict filled on every process with {teacher branch: ||Z_t - Z_s|| / ||Z_s||},
    each teacher's encoder memory against the student's over the evaluated tokens
    (models.ks_encoder.MemoryDistance); needs `teachers`.
    """
    ctx = ctx or distributed.Context(device=torch.device(device))
    model.eval()
    branches = (STUDENT,) + tuple(teachers)
    evaluators = {b: datasets.CocoEvaluator(dataset.coco, dataset.category_ids) for b in branches}
    seen = 0
    distance = MemoryDistance(model)
    bar = progress(loader, desc=desc, leave=False, disable=not ctx.is_main)
    with distance if memory_distance is not None else nullcontext():  # its hooks, for the whole pass
        for batch in bar:
            if max_images is not None and seen >= max_images:
                break
            images, mask, targets = to_device(batch, device)
            outputs = model(images, mask, targets if teachers else None, with_teachers=bool(teachers) or None)
            orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            image_ids = [int(t["image_id"]) for t in targets]
            for b in branches:
                out = branch_output(outputs, b)
                dets = postprocess(out["pred_logits"], out["pred_boxes"], orig_sizes, topk, clip)
                evaluators[b].update(image_ids, [d["boxes"] for d in dets], [d["scores"] for d in dets],
                                     [d["labels"] for d in dets])
            seen += len(targets)
    bar.close()
    if memory_distance is not None:
        sums = ctx.all_reduce_sum(distance.sums().to(ctx.device))  # every process's tokens
        memory_distance.update(distance.relative(sums.cpu()))
    if ctx.distributed:
        shards = ctx.gather({b: (e.detections, e.image_ids) for b, e in evaluators.items()})
        if ctx.is_main:
            for b, e in evaluators.items():
                e.detections, e.image_ids = [], []
                for shard in shards:
                    e.detections.extend(shard[b][0])
                    e.image_ids.extend(shard[b][1])
    metrics = None
    if ctx.is_main:
        if detections is not None:
            detections.update({b: e.results() for b, e in evaluators.items()})
        metrics = {b: e.summarize() for b, e in evaluators.items()}
        if moved:  # needs two images to swap; with fewer, undefined (NaN) rather than an error on rank 0 only
            student = evaluators[STUDENT]
            metrics[f"{STUDENT}_moved"] = (student.moved_to_other_images().summarize()
                                           if len(set(student.image_ids)) >= 2
                                           else dict.fromkeys(records.METRICS, math.nan))
    return ctx.broadcast(metrics)


def detections_file(directory, prefix, branch):
    """Where `write_detections` puts a branch's detections: <directory>/<prefix>detections-<branch>.json."""
    return Path(directory) / f"{prefix}detections-{branch}.json"


def write_detections(directory, prefix, detections):
    """Writes the detections that `evaluate(..., detections=...)` collected, one file per branch:
    <directory>/<prefix>detections-<branch>.json, a JSON list in COCO's results format (one
    detection a line), which pycocotools' `COCO.loadRes` reads as it is. Each file is written
    atomically and replaces a file of the same name. Returns the paths written, in the order of
    `detections` (none for an empty dict, e.g. on a process other than rank 0). A branch without
    any detection gets an empty list, which loadRes cannot read (its metrics are all 0).

    A run's final evaluation: write_detections(run_dir, "", dets) -> detections-attn1.json, ...
    beside eval.json. `python -m experiments eval` writes its own into a folder named after its
    eval-<time>.json: write_detections(run_dir / "eval-<time>", "", dets) ->
    eval-<time>/detections-attn1.json, ... (a folder, so that eval-*.json finds only the metrics)."""
    paths = []
    for branch, dets in detections.items():
        path = detections_file(directory, prefix, branch)
        lines = ",\n".join(json.dumps(d, separators=(",", ":")) for d in dets)
        records.atomic_write(path, f"[\n{lines}\n]\n" if dets else "[]\n")
        paths.append(path)
    return paths


def eval_file(directory):
    """A new eval-<time>.json path in the run directory: neither it nor the folder of its detection
    files (eval-<time>/) exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(directory) / f"eval-{stamp}.json", 1
    while os.path.lexists(path) or os.path.lexists(path.with_suffix("")):
        n += 1
        path = Path(directory) / f"eval-{stamp}-{n}.json"
    return path


def unwritable(directory):
    """None when files can be written to `directory` or, when it does not exist yet, in its nearest
    existing parent (where it would be created); else why not (a short text). It tries: creates
    and removes a temporary file, since permission bits do not tell (root writes past them, and a
    read-only mount stops root too)."""
    directory = Path(directory).absolute()
    target = next(p for p in (directory, *directory.parents) if os.path.lexists(p))
    try:
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".write-test-")
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return reason if target == directory else f"{reason}: {target}"
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return None


@dataclass
class EvalResult:
    """What `evaluate_row` returns. Unpacks as `metrics, path = ...`, as before.

    metrics: {branch: {AP, ...}} on every process. path: the eval-<time>.json written; None on the
    other processes and on rank 0 when nothing could be written. is_main: rank 0, the process that
    writes (and prints). not_saved: on rank 0, why nothing was written (None when written).
    detection_files: the detection files written (eval-<time>/detections-<branch>.json)."""
    metrics: dict
    path: Path | None = None
    is_main: bool = False
    not_saved: str | None = None
    detection_files: list = field(default_factory=list)

    @property
    def saved(self):
        return self.path is not None

    def __iter__(self):
        return iter((self.metrics, self.path))


def evaluate_row(manifest_name, row, checkpoint=None, teachers=False, overrides=(), device=None,
                 results=records.RESULTS, moved=False):
    """Evaluates a checkpoint of a row (default: the run's checkpoint.pth): the student and, with
    `teachers`, the teacher branches with GT masks; with `moved`, also the student's detections
    moved to other images (see `evaluate`). Writes, in the run directory, eval-<time>.json (never
    eval.json or DONE; its "detections" names the detection files, relative to the run directory)
    and each evaluated branch's detections, eval-<time>/detections-<branch>.json
    (`write_detections`); no existing file is replaced. Returns an EvalResult (unpacks as
    `metrics, path`).

    When the run directory (or, before it exists, its nearest existing parent) cannot be written
    to, a note on stderr says so before the evaluation, and rank 0's result has path None and
    `not_saved` set: the metrics are for printing only."""
    ck = load_checkpoint(manifest_name, row, checkpoint, overrides, results)
    cfg = ck.cfg
    directory = records.run_dir(*ck.manifest.record_of(row), results)
    ctx = distributed.setup(device)
    try:
        not_saved = None
        if ctx.is_main:
            note = ck.note()
            if note:
                print(note, file=sys.stderr)
            reason = unwritable(directory)
            if reason:
                not_saved = f"cannot write to {directory} ({reason})"
                print(f"{not_saved}: the metrics are printed but not saved", file=sys.stderr)
        _, val_set = build_data(cfg, ctx)
        model = ck.build_model(val_set.num_classes, ctx.device)
        branches = teacher_branches(model) if teachers else ()
        if ctx.is_main and teachers and not branches:
            print(f"{row}: model.ks.mode is {cfg['model']['ks']['mode']!r}: no teacher branches to evaluate",
                  file=sys.stderr)
        tc = cfg["train"]
        loader = make_eval_loader(val_set, tc["eval_batch_size"] or tc["batch_size"], cfg["data"]["num_workers"], ctx,
                                  tc["max_eval_images"])
        dets = None if not_saved else {}
        metrics = evaluate(model, loader, val_set, ctx.device, branches, cfg["model"]["eval_topk"],
                           desc=f"eval {row}", ctx=ctx, moved=moved, detections=dets,
                           clip=cfg["model"]["eval_clip_boxes"])
        if not ctx.is_main:
            return EvalResult(metrics)
        if not_saved:
            return EvalResult(metrics, None, True, not_saved)
        out = eval_file(directory)
        files = []
        try:
            files = write_detections(out.with_suffix(""), "", dets)
            records.write_json(out, {
                "manifest": ck.manifest.name, "row": row, "checkpoint": str(ck.path),
                "checkpoint_epoch": ck.state.get("epoch"), "checkpoint_step": ck.state.get("step", 0),
                "config_from": ck.source, "overrides": list(overrides), "teachers": bool(branches), "moved": moved,
                "world_size": ctx.world_size, "git_sha": records.git_sha(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "metrics": metrics, "detections": {b: f"{p.parent.name}/{p.name}" for b, p in zip(dets, files)}})
        except OSError as e:  # e.g. a full disk: the evaluation is not lost, its metrics still print
            not_saved = f"cannot write to {directory} ({e.strerror or e})"
            print(f"{not_saved}: the metrics are printed but not saved"
                  + (f" (detection files written to {files[0].parent})" if files else ""),
                  file=sys.stderr)
            return EvalResult(metrics, None, True, not_saved, files)
        return EvalResult(metrics, out, True, None, files)
    finally:
        ctx.close()
