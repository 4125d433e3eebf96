"""SLURM submission of manifest rows through submitit, and the state of their jobs.

`python -m experiments submit MANIFEST` submits one job per row (one job array for several rows):
each job runs `nodes x tasks_per_node` processes with srun, one per GPU, which train the row with DDP
(experiments/distributed.py reads the SLURM step's environment). Every job runs the row with
`--resume`: it starts fresh when the row has no checkpoint and continues from its checkpoint
otherwise, so a job that SLURM requeues never starts over. submitit sends the job USR2
`signal_delay_s` seconds before its time limit (and SLURM sends it on preemption); rank 0 then calls
`RowJob.checkpoint()`, which requeues the same call, and exits. The last checkpoint (after each epoch,
and every `train.checkpoint_every_iters` steps when set) is where the requeued job continues.

Nothing here knows a cluster: partition, account, QoS, time limit, GPUs, memory come from the
command line; submitit's logs and pickles go to results/slurm/<manifest>/<job id>/ (beside the run
records, which must be on a file system the nodes share). Job ids are recorded in each row's
slurm.json, which `status` reads together with squeue (and sacct where accounting is enabled).

This module sits on top of the training engine (experiments/); only the command line
(experiments/__main__.py) imports it. What the engine itself asks of SLURM is slurm/jobs.py.
"""
import shlex
import sys
import time
from pathlib import Path

from experiments import records

from .jobs import ACTIVE_STATES, SUBMISSIONS, job_states, sacct_states, submissions


class RowJob:
    """What each task of a row's SLURM job runs: `python -m experiments run MANIFEST --row ROW
    --resume [overrides]` in-process, as one rank of the row's DDP group."""

    def __init__(self, manifest, row, overrides, results):
        self.manifest, self.row, self.overrides, self.results = str(manifest), row, list(overrides), str(results)

    def __call__(self):
        from experiments.engine import train_row

        return str(train_row(self.manifest, self.row, self.overrides, resume=True, results=Path(self.results)))

    def checkpoint(self, *args, **kwargs):
        """Called by submitit (rank 0) on timeout or preemption: requeue the same call. It resumes
        from the row's last checkpoint, never from scratch."""
        import submitit

        print(f"{self.row}: timeout or preemption signal; requeueing (the row resumes from its last checkpoint)",
              flush=True)
        return submitit.helpers.DelayedSubmission(RowJob(self.manifest, self.row, self.overrides, self.results))

    def command(self, manifest_name):
        return records.run_command(manifest_name, self.row, self.overrides, resume=True)


def add_submission(directory, job):
    """Appends one submission ({"job_id", "submitted", ...}) to the run's slurm.json (written atomically)."""
    records.write_json(Path(directory) / SUBMISSIONS, {"jobs": submissions(directory) + [job]})


def executor_parameters(opts, cpus_per_task):
    """submitit SlurmExecutor parameters (sbatch options) from the submit options."""
    tasks = opts.tasks_per_node or max(opts.gpus_per_node, 1)
    params = {
        "job_name": opts.job_name,
        "time": opts.timeout_min,
        "nodes": opts.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": cpus_per_task,
        "signal_delay_s": opts.signal_delay_s,
        "array_parallelism": opts.array_parallelism,
        # the job runs from this repository (found from this file, not a fixed path)
        "setup": [f"cd {shlex.quote(str(records.REPO))}",
                  f"export PYTHONPATH={shlex.quote(str(records.REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
                  # one process per GPU: its CPU threads share the task's CPUs (as torchrun does)
                  "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"],
        "srun_args": ["--kill-on-bad-exit=1"],  # one rank failing ends the job instead of hanging the others
        "stderr_to_stdout": True,
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    for key, value in (("partition", opts.partition), ("qos", opts.qos), ("account", opts.account),
                       ("mem_per_gpu", opts.mem_per_gpu), ("constraint", opts.constraint),
                       ("exclude", opts.exclude)):
        if value:
            params[key] = value
    extra = {}
    for item in opts.sbatch or []:
        key, _, value = item.partition("=")
        extra[key.lstrip("-")] = value if value else True
    if extra:
        params["additional_parameters"] = extra
    return params


def submitit_folder(manifest_name, results):
    return Path(results) / "slurm" / manifest_name / "%j"


def sbatch_preview(folder, params):
    """The sbatch script submitit would write (for --dry-run), or None if it cannot be rendered."""
    try:
        from submitit.slurm.slurm import _make_sbatch_string

        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        return _make_sbatch_string(command=command, folder=folder, **params)
    except Exception:  # noqa: BLE001 - a private helper of submitit; the parameters are printed anyway
        return None


def plan_rows(manifest, rows, overrides, results, force):
    """[(row, action, reason)]: action 'submit' or 'skip'."""
    out = []
    for row in rows:
        directory = records.run_dir(*manifest.record_of(row), results)
        state = records.status(directory)
        jobs = submissions(directory)
        active = {}
        if jobs:
            active = {j: s for j, s in (job_states([jobs[-1]["job_id"]]) or {}).items() if s in ACTIVE_STATES}
        if active:
            job, s = next(iter(active.items()))
            out.append((row, "skip", f"SLURM job {job} is {s}"))
        elif state == "running":
            beat = records.heartbeat_holder(directory) or {}
            out.append((row, "skip", f"running (host {beat.get('host')}, pid {beat.get('pid')})"))
        elif state == "done" and not force:
            out.append((row, "skip", "done (pass --force to run it again; the old record is moved aside)"))
        else:
            out.append((row, "submit", state))
    return out


def submit(manifest, rows, overrides, opts, results=records.RESULTS, dry_run=False, force=False, out=None):
    """Submits the rows (one job each, a job array for several). Returns {row: job id} (empty for a dry
    run). Raises RunError before submitting anything when a row cannot run."""
    from experiments.build import resolve_row
    from experiments.errors import BatchPlanError, RunError
    from experiments.runs import move_aside

    out = out or sys.stdout
    shared = [row for row in rows if manifest.record_of(row) != (manifest.name, row)]
    if force and shared:  # their records belong to the other manifests' tables too
        raise RunError(f"not submitting anything: --force would replace the records of rows that are the same runs "
                       f"as rows of other manifests (same_as): {', '.join(shared)}; force those in their own "
                       f"manifests, and select this manifest's own rows with --rows")
    results = Path(results).resolve()  # the jobs run in the repository, not in the caller's folder
    world = opts.nodes * (opts.tasks_per_node or max(opts.gpus_per_node, 1))
    cfgs, plans, unbuildable = {}, {}, {}
    for row in rows:
        try:
            cfgs[row], plans[row] = resolve_row(manifest, row, overrides, world, where=f"row {row!r}")
        except BatchPlanError as e:
            raise RunError(f"manifest {manifest.path}, row {row!r}: {e}") from None
        except RunError as e:  # the model cannot be built
            unbuildable[row] = str(e)
    if unbuildable:
        lines = "\n  ".join(unbuildable.values())
        raise RunError(f"not submitting anything: {len(unbuildable)} row(s) cannot run:\n  {lines}\n"
                       f"(fix their configuration, or select the other rows with --rows)")
    plan = plan_rows(manifest, list(cfgs), overrides, results, force)
    for row, action, reason in plan:
        if action == "skip":
            print(f"{row}: skipped ({reason})", file=out)
    todo = [row for row, action, _ in plan if action == "submit"]
    if not todo:
        print("nothing to submit", file=out)
        return {}
    workers = max(cfgs[r]["data"]["num_workers"] for r in todo)
    params = executor_parameters(opts, opts.cpus_per_task or workers + 1)
    folder = submitit_folder(manifest.name, results)
    jobs = {row: RowJob(manifest.path, row, overrides, results) for row in todo}

    if dry_run:
        print(f"dry run: {len(todo)} job(s) of {world} process(es) each"
              f"{' as one job array' if len(todo) > 1 else ''}; nothing submitted", file=out)
        print("sbatch parameters (submitit SlurmExecutor):", file=out)
        for k, v in params.items():
            print(f"  {k}: {v}", file=out)
        for row, job in jobs.items():
            _, accumulation, total = plans[row]
            print(f"{row}: srun (x{world}) {job.command(manifest.name)}   "
                  f"[total batch {total} = {cfgs[row]['train']['batch_size']} x {world} x {accumulation} "
                  f"accumulation]", file=out)
        from experiments import cost

        try:
            entries = cost.load_step_times()
        except ValueError as e:  # a broken step-time file must not hide the dry run itself
            print(f"no cost estimate: {e}", file=out)
        else:
            print("\n".join(cost.cost_lines({row: cost.row_cost(cfgs[row], entries) for row in todo})), file=out)
        script = sbatch_preview(folder, {**params, **({"map_count": len(todo)} if len(todo) > 1 else {})})
        if script:
            print("sbatch script (per job):\n" + script, file=out)
        return {}

    import submitit

    if force:
        for row in todo:
            directory = records.run_dir(*manifest.record_of(row), results)
            if directory.exists() and records.status(directory) == "done":  # unfinished rows resume
                move_aside(directory, row)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_timeouts)
    executor.update_parameters(**params)
    if len(todo) == 1:
        submitted = {todo[0]: executor.submit(jobs[todo[0]])}
    else:
        with executor.batch():
            handles = {row: executor.submit(job) for row, job in jobs.items()}
        submitted = handles
    ids = {}
    for row, handle in submitted.items():
        job_id = str(handle.job_id)
        ids[row] = job_id
        _, accumulation, total = plans[row]
        add_submission(records.run_dir(*manifest.record_of(row), results), {
            "job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": jobs[row].command(manifest.name), "overrides": list(overrides),
            "nodes": opts.nodes, "tasks_per_node": params["ntasks_per_node"], "gpus_per_node": opts.gpus_per_node,
            "world_size": world, "accumulation_steps": accumulation, "total_batch_size": total,
            "partition": opts.partition, "qos": opts.qos, "account": opts.account, "timeout_min": opts.timeout_min,
            "log_folder": str(Path(str(folder).replace("%j", job_id)))})
        print(f"{row}: submitted SLURM job {job_id} (logs: {str(folder).replace('%j', job_id)})", file=out)
    return ids


def status_rows(manifest, results=records.RESULTS):
    """One dict per row: run status, last epoch, latest SLURM job, its state."""
    rows, latest = [], {}
    for name in manifest.rows:
        jobs = submissions(records.run_dir(*manifest.record_of(name), results))
        if jobs:
            latest[name] = jobs[-1]["job_id"]
    queue = job_states(latest.values()) if latest else {}
    accounting = None
    missing = [j for j in latest.values() if queue is not None and j not in queue]
    if latest and (queue is None or missing):
        accounting = sacct_states(latest.values() if queue is None else missing)
    for name in manifest.rows:
        directory = records.run_dir(*manifest.record_of(name), results)
        job = latest.get(name)
        if job is None:
            state = "-"
        elif queue and job in queue:
            state = queue[job]
        elif accounting and job in accounting:
            state = accounting[job]
        elif queue is None:
            state = "unknown (no squeue)"
        else:
            state = "not in queue"
        beat = records.heartbeat_holder(directory)
        run = records.read_run(directory)
        rows.append({"row": name, "status": run.state, "last_epoch": run.last_epoch,
                     "slurm_job": job or "-", "slurm_state": state,
                     "submissions": len(submissions(directory)),
                     "host": beat.get("host") if beat else None})
    return rows
