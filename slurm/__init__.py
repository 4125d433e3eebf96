"""Everything SLURM, in one place.

- `slurm.launcher`: `python -m experiments submit` and `status`: one submitit job per manifest row
  (a job array for several), requeued on preemption and time-out, resuming from the row's last
  checkpoint; the rows' job states. It sits on top of the training engine (experiments/).
- `slurm.jobs`: what a training process asks of SLURM: its own job id and restart count, the jobs
  submitted for a row (slurm.json) and their states (squeue, sacct). It imports nothing of the
  project, so the engine (experiments/) may use it.

The test harness that starts a throw-away single-node cluster is tests/harness/local_cluster.sh.
"""
