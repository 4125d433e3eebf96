"""`python -m experiments submit/status` (slurm/): dry runs, refusals and records without SLURM, and
(marked `slurm`) the real thing on a single-node cluster started by tests/harness/local_cluster.sh:
both demo rows as a job array of 2-process DDP jobs, one job forced to time out (submitit's USR2) and requeued, and
every row ending with DONE and metrics, the timed-out one resumed from its checkpoint."""
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from experiments import records
from slurm import jobs as slurm_jobs
from slurm import launcher
from experiments.__main__ import main
from experiments.config import Manifest

from .helpers import TINY_RUN

REPO = records.REPO
CLUSTER = REPO / "tests" / "harness" / "local_cluster.sh"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client")


def options(**kw):
    base = dict(partition="gpu", gpus_per_node=8, tasks_per_node=0, nodes=1, timeout_min=60, qos=None, account=None,
                cpus_per_task=0, mem_per_gpu=None, constraint=None, exclude=None, job_name="ks-detr",
                signal_delay_s=90, max_timeouts=30, array_parallelism=256, sbatch=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_dry_run_prints_parameters_and_commands_and_submits_nothing(tmp_path, capsys):
    main(["--results", str(tmp_path), "submit", "table2", "--rows", "dab_r50", "dab_r50_ks", "--partition", "gpu",
          "--qos", "normal", "--account", "proj", "--mem-per-gpu", "40G", "--sbatch", "mail-type=END", "--dry-run",
          "train.epochs=2"])
    out = capsys.readouterr().out
    assert "nothing submitted" in out and "as one job array" in out
    for text in ("partition: gpu", "qos: normal", "account: proj", "mem_per_gpu: 40G", "gpus_per_node: 8",
                 "ntasks_per_node: 8", "time: 1440", "#SBATCH --array=0-1",
                 "#SBATCH --signal=USR2@90", "#SBATCH --mail-type=END", "#SBATCH --gpus-per-node=8",
                 "python -m experiments run table2 --row dab_r50 --resume train.epochs=2",
                 "total batch 16 = 2 x 8 x 1 accumulation"):
        assert text in out, text
    assert "/checkpoint" not in out and "$USER" not in out  # no cluster paths of ours
    assert not (tmp_path / "runs").exists() and not (tmp_path / "slurm").exists()


def test_total_batch_that_cannot_be_kept_is_refused(tmp_path):
    from experiments.errors import RunError

    with pytest.raises(RunError, match="row 'dab_r50'.*total_batch_size=16"):
        launcher.submit(Manifest("table2"), ["dab_r50"], [], options(gpus_per_node=3), results=tmp_path, dry_run=True)


class FakeJob:
    def __init__(self, job_id):
        self.job_id = job_id


class FakeExecutor:
    """submitit.SlurmExecutor stand-in: records what would be submitted."""
    instances = []

    def __init__(self, folder, max_num_timeout):
        self.folder, self.max_num_timeout, self.params, self.jobs, self.batched = folder, max_num_timeout, {}, [], False
        FakeExecutor.instances.append(self)

    def update_parameters(self, **params):
        self.params.update(params)

    def batch(self):
        executor = self

        class Ctx:
            def __enter__(self):
                executor.batched = True

            def __exit__(self, *exc):
                return False
        return Ctx()

    def submit(self, fn):
        self.jobs.append(fn)
        return FakeJob(f"77_{len(self.jobs) - 1}" if self.batched else "78")


def test_submit_records_job_ids_skips_done_rows_and_status_reads_them(tmp_path, monkeypatch, capsys):
    import submitit

    FakeExecutor.instances = []
    monkeypatch.setattr(submitit, "SlurmExecutor", FakeExecutor)
    queue = {"77_0": "RUNNING", "77_1": "PENDING"}
    monkeypatch.setattr(launcher, "job_states", lambda ids: {j: queue[j] for j in ids if j in queue})
    monkeypatch.setattr(launcher, "sacct_states", lambda ids: None)
    manifest = Manifest("demo")
    done = records.run_dir("demo", "def_r18", tmp_path)
    records.write_json(done / "DONE", {})
    ids = launcher.submit(manifest, list(manifest.rows), ["train.epochs=3"], options(gpus_per_node=0, tasks_per_node=2),
                       results=tmp_path)
    assert ids == {"ks_def_r18": "78"}  # the done row is skipped, one row is a plain job
    assert "def_r18: skipped (done" in capsys.readouterr().out
    (ex,) = FakeExecutor.instances
    assert ex.max_num_timeout == 30 and "gpus_per_node" not in ex.params and ex.params["ntasks_per_node"] == 2
    assert str(ex.folder) == str(tmp_path / "slurm" / "demo" / "%j")
    job = ex.jobs[0]
    assert (job.row, job.overrides, job.results) == ("ks_def_r18", ["train.epochs=3"], str(tmp_path))
    resubmit = job.checkpoint()  # what submitit requeues on timeout/preemption: the same row, resumed
    assert resubmit.function.row == "ks_def_r18" and resubmit.function.overrides == ["train.epochs=3"]
    (entry,) = slurm_jobs.submissions(records.run_dir("demo", "ks_def_r18", tmp_path))
    assert entry["job_id"] == "78" and entry["world_size"] == 2 and entry["overrides"] == ["train.epochs=3"]

    # --force reruns the done row (its record moved aside) and submits an array for two rows
    queue["78"] = "COMPLETED"
    ids = launcher.submit(manifest, list(manifest.rows), [], options(gpus_per_node=0), results=tmp_path, force=True)
    assert ids == {"def_r18": "77_0", "ks_def_r18": "77_1"}
    assert any(p.name.startswith("def_r18.replaced-") for p in done.parent.iterdir())
    # a queued or running row is not submitted twice
    assert launcher.submit(manifest, list(manifest.rows), [], options(gpus_per_node=0), results=tmp_path) == {}
    rows = {r["row"]: r for r in launcher.status_rows(manifest, tmp_path)}
    assert (rows["def_r18"]["slurm_job"], rows["def_r18"]["slurm_state"]) == ("77_0", "RUNNING")
    assert (rows["ks_def_r18"]["slurm_state"], rows["ks_def_r18"]["submissions"]) == ("PENDING", 2)


@pytest.mark.parametrize("results_after_command", [False, True])
def test_status_without_slurm(tmp_path, monkeypatch, capsys, results_after_command):
    monkeypatch.setattr(slurm_jobs, "_query", lambda *a, **k: None)  # no squeue, no sacct
    launcher.add_submission(records.run_dir("demo", "def_r18", tmp_path), {"job_id": "5"})
    args = ["status", "demo", "--json"]
    main(args + ["--results", str(tmp_path)] if results_after_command else ["--results", str(tmp_path)] + args)
    rows = {r["row"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["def_r18"]["slurm_state"] == "unknown (no squeue)" and rows["ks_def_r18"]["slurm_job"] == "-"
    assert rows["def_r18"]["status"] == "not started"


# --------------------------------------------------------------------------------------------------
# a real single-node SLURM cluster

def _install_slurm():
    """apt-get install the SLURM daemons and clients when missing (root with apt-get only)."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            return f"{' '.join(cmd)} failed: {done.stderr[-500:]}"
    return None if all(shutil.which(b) for b in BINARIES) else "SLURM binaries still missing after apt-get"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd)")
    problem = _install_slurm()
    if problem:
        pytest.skip(problem)
    state = tmp_path_factory.mktemp("slurm_cluster")
    up = subprocess.run([str(CLUSTER), "up", str(state)], capture_output=True, text=True, timeout=180)
    if up.returncode:
        pytest.fail(f"local SLURM cluster did not start:\n{up.stdout}\n{up.stderr}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run([str(CLUSTER), "down", str(state)], capture_output=True, timeout=60)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _cli(results, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "experiments", "--results", str(results), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _wait(predicate, timeout, what, debug=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{debug()}")


@pytest.mark.slurm
def test_submitted_rows_survive_a_timeout_and_finish(cluster, tmp_path):
    results = tmp_path / "results"
    epochs = 10
    overrides = [o for o in TINY_RUN if not o.startswith(("train.epochs", "train.batch_size"))]
    overrides += [f"data.root={tmp_path / 'data'}", "train.batch_size=1", f"train.epochs={epochs}"]
    t0 = time.time()
    sub = _cli(results, "submit", "demo", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "10",
               *overrides)
    assert sub.returncode == 0, sub.stderr
    dirs = {row: records.run_dir("demo", row, results) for row in ("def_r18", "ks_def_r18")}
    jobs = {row: slurm_jobs.submissions(d)[-1]["job_id"] for row, d in dirs.items()}
    assert all("_" in j for j in jobs.values())  # one job array

    def logs(row):
        folder = results / "slurm" / "demo" / jobs[row]
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.out"))) \
            if folder.is_dir() else ""

    def debug():
        return "\n".join(f"--- {row}\n{logs(row)[-3000:]}" for row in dirs) + \
            subprocess.run(["squeue"], capture_output=True, text=True).stdout

    # force a timeout of the KS row once its first epoch is recorded: submitit's USR2 signal
    ks = dirs["ks_def_r18"]
    _wait(lambda: len(records.read_log(ks / "log.jsonl")) >= 1, 240, "the first epoch of ks_def_r18", debug)
    signalled = subprocess.run(["scancel", "--signal=USR2", jobs["ks_def_r18"]], capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    assert len(records.read_log(ks / "log.jsonl")) < epochs, "the row finished before the signal"
    _wait(lambda: all((d / "DONE").is_file() for d in dirs.values()), 300, "DONE of both rows", debug)
    elapsed = time.time() - t0

    for row, d in dirs.items():
        assert records.status(d) == "done" and not (d / "FAILED").exists(), row
        log = records.read_log(d / "log.jsonl")
        assert [r["epoch"] for r in log] == list(range(1, epochs + 1)), row
        final = json.loads((d / "eval.json").read_text())
        branches = ["attn1"] + (["attn3", "attn2"] if row == "ks_def_r18" else []) + ["attn1_moved"]  # demo: eval_moved
        assert list(final)[1:] == branches and set(final["attn1"]) == set(records.METRICS), row
        env = json.loads((d / "env.json").read_text())
        assert (env["launcher"], env["world_size"], env["backend"], env["slurm_job_id"]) == \
            ("slurm", 2, "gloo", jobs[row]), row

    # the timed-out row was requeued and resumed from its checkpoint, not from epoch 0
    text = logs("ks_def_r18")
    assert "Caught signal SIGUSR2" in text and "Requeued job" in text
    assert "resumed from" in text and "after epoch 0" not in text
    env = json.loads((ks / "env.json").read_text())
    assert env["resumed_after_epoch"] >= 1
    commands = (ks / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and "--resume" not in commands[0] and " --resume " in commands[1]
    assert json.loads((dirs["def_r18"] / "env.json").read_text())["resumed_after_epoch"] is None

    # status shows the jobs; a second submit skips the finished rows
    status = _cli(results, "status", "demo", "--json")
    rows = {r["row"]: r for r in json.loads(status.stdout)}
    assert all(rows[r]["status"] == "done" and rows[r]["slurm_job"] == jobs[r] for r in dirs)
    again = _cli(results, "submit", "demo", "--gpus-per-node", "0", *overrides)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    print(f"SLURM round trip with a requeue: {elapsed:.0f} s")
