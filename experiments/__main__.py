"""python -m experiments: run, submit and inspect the rows of the experiment manifests.

    python -m experiments list table1                          # rows, settings, status
    python -m experiments run demo                             # every row of experiments/demo.yaml
    python -m experiments run demo --row ks_def_r18 train.epochs=2
    python -m experiments run table1 --row dab_r50_ks --gpus 8 # one row on 8 local GPUs (DDP)
    python -m experiments submit table1 --partition P --timeout-min 1440 --dry-run
    python -m experiments status table1                        # run status and SLURM jobs
    python -m experiments eval table1 --row dab_r50_ks --teachers
    python -m experiments predict demo --row ks_def_r18 photo.jpg my_folder/   # your own images
    python -m experiments pretrain --task segmentation --out PATH  # backbone on the synthetic generator
    python -m experiments import-weights --from ks-detr PATH table1 --row dab_r50_ks  # the authors' weights

Overrides `key.sub=value` (any configuration key; the value is parsed as YAML) may follow the
options of run, submit and eval; they are recorded in the run's config.yaml and command.txt.
`python -m experiments COMMAND --help` describes each command.
"""
import argparse
import json
import re
import signal
import sys

from . import records
from .config import ConfigError, Manifest

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def _table(rows, cols=None):
    cols = cols or list(rows[0])
    text = {c: [("-" if r[c] is None else str(r[c])) for r in rows] for c in cols}
    widths = {c: max(len(c), *(len(v) for v in text[c])) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    for i in range(len(rows)):
        lines.append("  ".join(text[c][i].ljust(widths[c]) for c in cols).rstrip())
    return "\n".join(lines)


def cmd_list(args):
    manifest = Manifest(args.manifest)
    rows, cfgs = [], {}
    for name, row in manifest.rows.items():
        cfg = cfgs[name] = manifest.resolve(name)
        m = cfg["model"]
        run = records.read_run(records.run_dir(*manifest.record_of(name), args.results))
        paper = row.get("paper")
        rows.append({"row": name, "variant": m["variant"], "ks": m["ks"]["mode"], "backbone": m["backbone"]["name"],
                     "epochs": cfg["train"]["epochs"], "status": run.state, "last_epoch": run.last_epoch,
                     "paper": f"T{paper['table']}/{paper['row']} {paper['source']}" if paper else None,
                     "family": row.get("family"), "baseline": row.get("baseline"), "note": row.get("note")})
    costs = None
    if args.cost:
        from . import cost
        from .errors import RunError

        try:
            entries = cost.load_step_times()
        except ValueError as e:
            raise RunError(str(e)) from None
        costs = {r["row"]: cost.row_cost(cfgs[r["row"]], entries, args.gpu) for r in rows}
        for r in rows:
            c = costs[r["row"]]
            r.update(gpu_hours=None if c["gpu_hours"] is None else round(c["gpu_hours"], 1),
                     seconds_per_step=c["seconds_per_step"], steps=c["steps"], measured_on=c["measured"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = ["row", "variant", "ks", "backbone", "epochs", "status", "last_epoch", "paper"]
    print(_table(rows, cols + (["steps", "seconds_per_step", "gpu_hours", "measured_on"] if costs else [])))
    if costs:
        print("\n" + "\n".join(cost.cost_lines(costs)))


def _local_processes(args):
    """(number of processes, device) for run/eval: --gpus N (CUDA) or --nproc N (CPU, gloo)."""
    import torch

    if args.gpus and args.nproc:
        raise ConfigError("give either --gpus N (GPU processes) or --nproc N (CPU processes), not both")
    if args.gpus:
        have = torch.cuda.device_count()
        if have < args.gpus:
            raise ConfigError(f"--gpus {args.gpus}: only {have} CUDA device(s) visible"
                              + ("; use --nproc N for CPU processes" if not have else ""))
        return args.gpus, args.device
    if args.nproc:
        return args.nproc, args.device or "cpu"
    return 1, args.device


def cmd_run(args):
    from . import distributed
    from .build import resolve_row
    from .engine import train_row
    from .errors import RunError

    distributed.pick_device(args.device)  # a bad --device: one line, before anything is read or built
    manifest = Manifest(args.manifest)
    rows = args.row or list(manifest.rows)
    nprocs, device = _local_processes(args)
    for row in rows:  # fail early on a typo, an unknown key or a variant that is not built, before training
        # under a distributed launch the world size is the launcher's: train_row checks the batch plan
        resolve_row(manifest, row, args.overrides, nprocs if distributed.from_environment() is None else None)
    for row in rows:
        print(f"== {manifest.name} / {row}", flush=True)
        kwargs = dict(resume=args.resume, force=args.force, device=device, results=args.results)
        if nprocs > 1:
            launch = distributed.from_environment()
            if launch is not None and launch.world_size > 1:  # a one-task `srun --pty bash` is fine
                raise RunError("--gpus/--nproc inside an already distributed launch (torchrun or srun); "
                               "let the launcher start the processes")
            distributed.spawn(nprocs, train_row, str(manifest.path), row, list(args.overrides),
                              launch_option=f"--gpus {nprocs}" if args.gpus else f"--nproc {nprocs}", **kwargs)
            directory = records.run_dir(*manifest.record_of(row), args.results)
        else:
            directory = train_row(str(manifest.path), row, args.overrides, **kwargs)
        print(f"== {row}: record in {directory}", flush=True)


def cmd_submit(args):
    from slurm.launcher import submit

    manifest = Manifest(args.manifest)
    rows = args.rows or list(manifest.rows)
    for row in rows:
        manifest.row(row)
    if args.gpus_per_node < 0 or args.nodes < 1:
        raise ConfigError("--gpus-per-node must be >= 0 and --nodes >= 1")
    submit(manifest, rows, args.overrides, args, results=args.results, dry_run=args.dry_run, force=args.force)


def cmd_status(args):
    from slurm.launcher import status_rows

    manifest = Manifest(args.manifest)
    rows = status_rows(manifest, args.results)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ["row", "status", "last_epoch", "slurm_job", "slurm_state", "submissions", "host"]))


def cmd_eval(args):
    from . import distributed

    distributed.pick_device(args.device)  # a bad --device: one line, before anything is read or built
    manifest = Manifest(args.manifest)
    manifest.row(args.row)
    nprocs, device = _local_processes(args)
    kwargs = dict(checkpoint=args.checkpoint, teachers=args.teachers, overrides=list(args.overrides),
                  device=device, results=args.results, moved=args.moved)
    if nprocs > 1:
        distributed.spawn(nprocs, _eval_and_print, str(manifest.path), args.row,
                          launch_option=f"--gpus {nprocs}" if args.gpus else f"--nproc {nprocs}", **kwargs)
    else:
        _eval_and_print(str(manifest.path), args.row, **kwargs)


def _eval_and_print(manifest, row, **kwargs):
    from .evaluation import evaluate_row

    result = evaluate_row(manifest, row, **kwargs)
    if not result.is_main:
        return
    lines = [{"branch": b, **{k: f"{100 * v:.1f}" for k, v in m.items()}} for b, m in result.metrics.items()]
    print(_table(lines))
    if result.saved:
        print(f"(COCO box AP in percent; written to {result.path}, the detections to {result.path.with_suffix('')}/)")
    else:
        print("(COCO box AP in percent; not saved: see the note above)")


def cmd_predict(args):
    from .distributed import pick_device
    from .predict import predict

    pick_device(args.device)  # a bad --device: one line, before anything is read or built
    Manifest(args.manifest).row(args.row)
    found, out, skipped = predict(args.manifest, args.row, args.images, args.checkpoint, args.score, args.out,
                                  args.device, args.batch_size, results=args.results, draw=not args.no_pictures)
    n = sum(len(entry["detections"]) for entry in found.values())
    print(f"{len(found)} image(s), {n} detection(s) with score >= {args.score}: {out / 'detections.json'}"
          + ("" if args.no_pictures else f" and one PNG per image in {out}/")
          + (f"; {len(skipped)} file(s) skipped (named above)" if skipped else ""))


def cmd_import_weights(args):
    from .import_weights import import_weights

    done = import_weights(args.source, args.path, args.manifest, args.row, args.out, args.overrides, args.force,
                          args.results)
    kinds = {"training state": "training-state entries", "alias of": "aliases (checked equal)",
             "computed here": "computed buffers (checked equal)"}
    counts = {}
    for reason in done.leftovers.values():
        kind = next((k for prefix, k in kinds.items() if reason.startswith(prefix)), reason)
        counts[kind] = counts.get(kind, 0) + 1
    print(f"{args.path}: {done.summary}")
    print(f"{done.mapped} tensors mapped; left out: "
          + (", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing"))
    print(f"wrote {done.path}\nevaluate it with: python -m experiments eval {args.manifest} --row {args.row} "
          f"--checkpoint {done.path}")


def _add_overrides(p):
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="configuration overrides (YAML values), recorded with the run")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    results_help = "results folder holding runs/<manifest>/<row>/ (default: %s)" % records.RESULTS
    parser.add_argument("--results", default=str(records.RESULTS), help=results_help)
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of configuration, data and run errors (by default they "
                             "are one `error:` line)")
    # --results also after the command (`run demo --results DIR`); SUPPRESS keeps the top-level value
    # when the command does not give one
    results_option = argparse.ArgumentParser(add_help=False)
    results_option.add_argument("--results", default=argparse.SUPPRESS, help=results_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    manifest_help = "manifest name (experiments/<name>.yaml) or path to a manifest YAML"
    # options that several commands share (argparse parent parsers)
    processes = argparse.ArgumentParser(add_help=False)  # run, eval: where the processes run
    processes.add_argument("--gpus", type=int, default=0, metavar="N", help="number of local GPU processes")
    processes.add_argument("--nproc", type=int, default=0, metavar="N", help="number of local CPU processes (gloo)")
    processes.add_argument("--device", help="device of a single process: cpu, cuda or cuda:N (default: cuda if "
                                            "available, else cpu)")
    trained_row = argparse.ArgumentParser(add_help=False)  # eval, predict: a row's checkpoint
    trained_row.add_argument("manifest", help=manifest_help)
    trained_row.add_argument("--row", required=True, help="the row whose checkpoint is read")
    trained_row.add_argument("--checkpoint",
                             help="checkpoint file (default: results/runs/<manifest>/<row>/checkpoint.pth)")

    p = sub.add_parser("list", parents=[results_option], help="rows of a manifest with their settings and status",
                       description="Rows of a manifest: variant, KS mode, backbone, epochs, the paper row they "
                                   "reproduce, and their status read from results/runs/ (not started, running, "
                                   "interrupted, done, failed).")
    p.add_argument("manifest", help=manifest_help)
    p.add_argument("--json", action="store_true", help="print JSON (with family, baseline, note) instead of a table")
    p.add_argument("--cost", action="store_true",
                   help="estimated GPU-hours of each row's training steps, from the step times measured on a GPU "
                        "in results/step_times.json (python -m benchmarks.step_time); rows without "
                        "a measurement say so")
    p.add_argument("--gpu", help="with --cost: use only step times measured on this GPU (its CUDA name)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", parents=[results_option, processes], help="train and evaluate rows on this machine",
                       description="Train and evaluate rows on this machine, writing results/runs/<manifest>/<row>/. "
                                   "One process by default (GPU if available); --gpus N starts N GPU processes "
                                   "(DDP, NCCL), --nproc N starts N CPU processes (DDP, gloo; for tests). Under "
                                   "torchrun or srun the launcher's processes are used. When fewer images per step "
                                   "than train.total_batch_size fit, gradients are accumulated (recorded in "
                                   "env.json). A finished row is skipped.")
    p.add_argument("manifest", help=manifest_help)
    p.add_argument("--row", action="append", help="row to run (repeatable; default: every row)")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished run from its last checkpoint (starts fresh, saying so, if it has none)")
    p.add_argument("--force", action="store_true",
                   help="start over even if a record exists (the old record is moved aside, not deleted)")
    _add_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", parents=[results_option], help="submit rows as SLURM jobs (submitit)",
                       description="Submit one SLURM job per row (a job array for several rows) through submitit. "
                                   "Each job runs nodes x tasks-per-node processes (one per GPU) that train the row "
                                   "with DDP and always resume from the row's checkpoint: a job that times out or is "
                                   "preempted is requeued and continues, never starts over. Rows that are done, "
                                   "running or queued are skipped (--force reruns done rows, moving their record "
                                   "aside). Rows whose model cannot be built stop the submission before anything "
                                   "is submitted. submitit's logs go to <results>/slurm/<manifest>/<job id>/.")
    p.add_argument("manifest", help=manifest_help)
    p.add_argument("--rows", nargs="+", metavar="ROW", help="rows to submit (default: every row)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one process each (default: 8; "
                                                                 "0 for CPU jobs)")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per job (default: 1)")
    p.add_argument("--timeout-min", type=int, default=1440,
                   help="time limit of one job in minutes; a job that reaches it is requeued (default: 1440)")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--cpus-per-task", type=int, default=0,
                   help="CPUs per process (default: data.num_workers + 1 of the rows)")
    p.add_argument("--mem-per-gpu", help="memory per GPU, e.g. 40G (default: the cluster's)")
    p.add_argument("--constraint", help="SLURM node constraint (features)")
    p.add_argument("--exclude", help="nodes to exclude")
    p.add_argument("--job-name", default="ks-detr", help="SLURM job name (default: %(default)s)")
    p.add_argument("--signal-delay-s", type=int, default=90,
                   help="seconds before the time limit at which the job is signalled to requeue (default: 90)")
    p.add_argument("--max-timeouts", type=int, default=30,
                   help="how many times one job may be requeued after reaching its time limit (default: 30; "
                        "preemptions do not count)")
    p.add_argument("--array-parallelism", type=int, default=256, help="jobs of the array running at once")
    p.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch mail-type=END (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and each row's command; "
                                                          "submit nothing")
    p.add_argument("--force", action="store_true", help="also submit rows that are done (their record is moved aside)")
    _add_overrides(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[results_option], help="rows with their run status and SLURM jobs",
                       description="Rows with their run status, last finished epoch, latest SLURM job id and its "
                                   "state (squeue; sacct where accounting is enabled; '-' without SLURM).")
    p.add_argument("manifest", help=manifest_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("eval", parents=[results_option, trained_row, processes],
                       help="evaluate a row's checkpoint (student, optionally the teachers)",
                       description="Evaluate a checkpoint of a row (default: its checkpoint.pth) on the validation "
                                   "set: the student (attn1) and, with --teachers, the KS teacher branches with "
                                   "ground-truth masks (paper Fig. 4). Prints the metrics and writes "
                                   "eval-<time>.json in the run directory, with each branch's detections in "
                                   "COCO's results format in eval-<time>/detections-<branch>.json; eval.json and "
                                   "DONE are never touched. If the folder cannot be written, the metrics are "
                                   "printed with a note. "
                                   "The model configuration comes from the checkpoint; overrides may change data "
                                   "and evaluation keys (e.g. data.root, train.max_eval_images).")
    p.add_argument("--teachers", action="store_true", help="also evaluate the teacher branches with GT masks")
    p.add_argument("--moved", action="store_true",
                   help="also score the student's detections with each image's given to the next image "
                        "(attn1_moved): a detector that ignores its input scores its own AP there, one that "
                        "reads the image scores clearly less")
    _add_overrides(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", parents=[results_option, trained_row], help="run a trained row's student on your own images",
                       description="Run a trained row's student on image files or folders (read recursively): any "
                                   "size, JPEG/PNG/..., greyscale, RGBA, 16-bit, EXIF-rotated (read as a viewer shows "
                                   "them), with the row's test-time resizing and normalisation, in padded batches. "
                                   "Writes one PNG per image with the detections above --score (its longer side "
                                   "800 to 2048 pixels: larger images are drawn reduced, boxes with them) and "
                                   "detections.json (COCO results-format entries keyed by file, with the image id "
                                   "where the file is an image of the row's validation set, and under the key "
                                   "\"checkpoint/\", which no file path has, the checkpoint's path and sha256). No "
                                   "ground truth is needed. A file that cannot be read is named and skipped.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders")
    p.add_argument("--score", type=float, default=0.5, help="lowest score kept (default: %(default)s)")
    p.add_argument("--out", help="output folder, which must not hold a detections.json yet (default: "
                                 "<results>/predictions/<manifest>/<row>/<time>/)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, help="images per forward, at least 1 (default: the row's evaluation "
                                                  "batch size)")
    p.add_argument("--no-pictures", action="store_true", help="write detections.json only")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("import-weights", parents=[results_option],
                       help="convert another code base's checkpoint (the KS-DETR authors') for a row",
                       description="Convert a checkpoint of another code base into a checkpoint of a manifest row, "
                                   "which `eval MANIFEST --row ROW --checkpoint P` evaluates. --from ks-detr: the "
                                   "checkpoints the KS-DETR authors release (detrex/detectron2 state dicts; "
                                   "models/convert_ksdetr.py). The row must describe the checkpoint's model "
                                   "(variant, KS mode, sizes, backbone); every entry of the checkpoint is mapped "
                                   "or named as an expected leftover (training state, aliases), anything else is "
                                   "an error. The file holds the weights, the row's configuration and where they "
                                   "came from; the row's own records are not touched.")
    p.add_argument("--from", dest="source", required=True, choices=["ks-detr"],
                   help="the code base the checkpoint comes from")
    p.add_argument("path", help="the checkpoint file")
    p.add_argument("manifest", help=manifest_help)
    p.add_argument("--row", required=True, help="the row whose model the checkpoint holds")
    p.add_argument("--out", help="where to write (default: <results>/runs/<manifest>/<row>/authors_checkpoint.pth)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_overrides(p)
    p.set_defaults(func=cmd_import_weights)

    # listed for --help; main() hands `complexity` and `pretrain` with their options to their modules
    sub.add_parser("complexity", help="parameters, GFLOPs and latency of each row at inference, KS rows beside their "
                                      "baselines; see `complexity --help`", add_help=False)
    sub.add_parser("pretrain", help="pretrain a backbone on the synthetic generator (model.backbone.weights: "
                                    "synthetic); see `pretrain --help`", add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pretrain"]:  # its own options (experiments/pretrain.py), no manifest
        from .pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    if argv[:1] == ["complexity"]:  # its own options (experiments/complexity.py)
        from .complexity import main as complexity_main

        return complexity_main(argv[1:])
    parser = build_parser()
    global_options = argparse.ArgumentParser(add_help=False)
    global_options.add_argument("--results")
    if global_options.parse_known_args(argv)[1][:1] == ["pretrain"]:
        parser.error("pretrain writes its weights to its --out file and takes no --results: "
                     "python -m experiments pretrain --out PATH (see `python -m experiments pretrain --help`)")
    # Overrides may come after options too (`run demo --row x train.epochs=2`), which argparse's
    # positional handling does not allow: collect them from the unrecognised arguments.
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not OVERRIDE.match(a)]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (signals.Stopped): said where it happened, no traceback
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"stopped ({signal.Signals(signum).name})" if signum else "stopped", file=sys.stderr)
        sys.exit(128 + (signum or signal.SIGINT))
    except Exception as e:
        from .distributed import WorkerFailed
        from .errors import is_user_error

        # a bad configuration, data set, weights file or results folder: one line (--traceback: all)
        if (is_user_error(e) or isinstance(e, WorkerFailed)) and not args.traceback:
            sys.exit(f"error: {e}")
        raise


if __name__ == "__main__":
    main()
