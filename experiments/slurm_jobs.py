"""Asking SLURM about jobs (squeue, sacct): the states of a row's jobs, for the decision whether a
row is being trained elsewhere (experiments/runs.py) and for `status` (experiments/slurm.py). No
SLURM client, or no controller, gives None rather than an error."""
import subprocess

# squeue/sacct states of a job that is queued or still holds resources
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


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
