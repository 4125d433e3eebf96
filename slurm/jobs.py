"""What a process knows about SLURM without submitting anything: its own job (`job_id`,
`restart_count`, from the environment SLURM sets), the jobs submitted for a row (`submissions`, its
slurm.json), and their states (`job_states` from squeue, `sacct_states` from sacct). The training
engine uses these to record its job and to decide whether a row is being trained elsewhere
(experiments/runs.py); `status` (slurm/launcher.py) shows them. No SLURM client, or no controller,
gives None rather than an error.

This module imports nothing of the project (it sits below experiments/, as models/ and datasets/
do); slurm/launcher.py, which submits rows, sits on top of experiments/.
"""
import json
import os
import subprocess
from pathlib import Path

# squeue/sacct states of a job that is queued or still holds resources
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


# the SLURM submissions of a row, beside its run records: {"jobs": [{"job_id", "submitted", ...}, ...]},
# written by `python -m experiments submit` (slurm/launcher.py)
SUBMISSIONS = "slurm.json"


def job_id():
    """This process's SLURM job id (array jobs: <array id>_<task>), or None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def restart_count():
    """How many times SLURM has requeued this job (0 for its first run, and outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def submissions(directory):
    """The SLURM jobs submitted for a run (its slurm.json), oldest first; [] without a readable one."""
    try:
        doc = json.loads((Path(directory) / SUBMISSIONS).read_text())
    except (OSError, ValueError):
        return []
    return doc.get("jobs", []) if isinstance(doc, dict) else []


def _query(cmd, timeout=20):
    """stdout of a SLURM client command, or None when it is missing or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def job_states(job_ids):
    """{job id: state} from squeue for those of the jobs still in the queue (this user's jobs); None
    when squeue cannot be run or reach the controller. Array tasks are given as <array id>_<task>."""
    ids = {str(j) for j in job_ids if j}
    if not ids:
        return {}
    out = _query(["squeue", "-h", "-r", "--me", "-o", "%i|%T"])
    if out is None:
        return None
    states = {}
    for line in out.splitlines():
        if "|" in line:
            job, state = line.strip().split("|", 1)
            states[job] = state.strip()
    return {j: states[j] for j in sorted(ids) if j in states}


def sacct_states(job_ids):
    """{job id: state} from sacct (finished jobs too); None without accounting."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    out = _query(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"])
    if out is None:
        return None
    states = {}
    for line in out.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job.strip()] = state.split()[0] if state.strip() else ""
    return {j: states[j] for j in ids if j in states}
