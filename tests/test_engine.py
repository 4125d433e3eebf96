"""Train + eval smoke runs of both demo rows, run records, resume, and clear errors."""
import json
import math
import shlex

import pytest
import torch

from experiments import checkpoints, engine, evaluation, records
from experiments.engine import train_row
from experiments.errors import RunError
from models.ops.ms_deform_attn import path_taken

from .helpers import interrupt_during_second_evaluation, overrides

@pytest.mark.parametrize("row,branches", [("def_r18", ["attn1", "attn1_moved"]),
                                          ("ks_def_r18", ["attn1", "attn3", "attn2", "attn1_moved"])])
def test_demo_row_trains_evaluates_and_records(tmp_path, data_root, row, branches):
    directory = train_row("demo", row, overrides(data_root), results=tmp_path)
    assert directory == tmp_path / "runs" / "demo" / row
    assert records.status(directory) == "done"
    for name in ("config.yaml", "command.txt", "env.json", "log.jsonl", "eval.json", "DONE", "checkpoint.pth"):
        assert (directory / name).is_file(), name
    log = records.read_log(directory / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[0]["lr"] == pytest.approx(4e-4) and log[1]["lr"] == pytest.approx(4e-5)  # lr drop after epoch 1
    for record in log:
        assert list(record["eval"]) == branches
        assert set(record["eval"]["attn1"]) == set(records.METRICS)
        assert record["train"]["loss"] > 0
    final = json.loads((directory / "eval.json").read_text())
    assert final["epoch"] == 2 and final["attn1"] == log[-1]["eval"]["attn1"]
    env = json.loads((directory / "env.json").read_text())
    # the demo's backbone: the committed synthetic-pretrained trunk, named with its sha256 prefix
    assert env["backbone_init"].startswith("synthetic:resnet18_synthetic.pth sha256:")
    assert (env["teacher_parameters"] > 0) == (row == "ks_def_r18")
    assert env["cpu"] and env["cpu_threads"] == torch.get_num_threads()  # where the time per epoch comes from
    assert env["ms_deform_attn"] == path_taken("cpu") and env["ms_deform_attn"] in ("CPU kernels", "PyTorch path")

    # a finished row is skipped, not retrained or overwritten
    done = (directory / "DONE").read_text()
    assert train_row("demo", row, overrides(data_root), results=tmp_path) == directory
    assert (directory / "DONE").read_text() == done


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, data_root, monkeypatch, capsys):
    interrupt_during_second_evaluation(monkeypatch, "ks_def_r18", data_root, tmp_path)
    directory = records.run_dir("demo", "ks_def_r18", tmp_path)
    started_at = json.loads((directory / "env.json").read_text())
    assert started_at["git_shas"] == [started_at["git_sha"]]
    assert records.status(directory) == "interrupted"  # an interruption is not a failure: no FAILED
    assert not (directory / "FAILED").exists() and not (directory / records.HEARTBEAT).exists()
    assert [r["epoch"] for r in records.read_log(directory / "log.jsonl")] == [1]

    with pytest.raises(RunError, match="--resume"):
        train_row("demo", "ks_def_r18", overrides(data_root), results=tmp_path)
    with pytest.raises(RunError, match="configuration differs.*train.epochs"):
        train_row("demo", "ks_def_r18", overrides(data_root, "train.epochs=3"), resume=True, results=tmp_path)

    trained = []
    real_train = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: trained.append(a[6]) or real_train(*a, **k))
    monkeypatch.setattr(records, "git_sha", lambda: "c0ffee0")  # resumed at another commit
    capsys.readouterr()
    train_row("demo", "ks_def_r18", overrides(data_root), resume=True, results=tmp_path)
    assert trained == ["2/2"]  # only the unfinished epoch
    env = json.loads((directory / "env.json").read_text())
    assert env["git_sha"] == "c0ffee0" and env["git_shas"] == [started_at["git_sha"], "c0ffee0"]
    assert f"trained at {started_at['git_sha']} and resumes at c0ffee0" in capsys.readouterr().out
    assert records.status(directory) == "done"
    assert [r["epoch"] for r in records.read_log(directory / "log.jsonl")] == [1, 2]
    commands = (directory / "command.txt").read_text().splitlines()  # every start is recorded
    assert len(commands) == 2 and commands[1].endswith(
        "python -m experiments run demo --row ks_def_r18 --resume " + shlex.join(overrides(data_root)))


def test_force_moves_the_old_record_aside(tmp_path, data_root):
    directory = train_row("demo", "def_r18", overrides(data_root, "train.epochs=1", "train.lr_drop=[]"),
                          results=tmp_path)
    first = (directory / "DONE").read_text()
    train_row("demo", "def_r18", overrides(data_root, "train.epochs=1", "train.lr_drop=[]"), force=True,
              results=tmp_path)
    aside = [p for p in directory.parent.iterdir() if p.name.startswith("def_r18.replaced-")]
    assert len(aside) == 1 and (aside[0] / "DONE").read_text() == first
    assert records.status(directory) == "done"


def test_missing_data_set_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_coco_here"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train_row("demo", "def_r18", [f"data.root={missing}", "data.dataset=coco"], results=tmp_path)
    # found before any record is written: nothing blocks a plain rerun once the data is there
    assert records.status(records.run_dir("demo", "def_r18", tmp_path)) == "not started"


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path, data_root, monkeypatch):
    """With train.checkpoint_every_iters, a run stopped in the middle of an epoch resumes at the next
    step and ends with the same weights and losses as an uninterrupted run (data order, augmentation
    and dropout are functions of seed, epoch and step)."""
    import torch

    args = overrides(data_root, "train.checkpoint_every_iters=1", "train.eval_every=2", "model.dropout=0.1")
    whole = train_row("demo", "ks_def_r18", args, results=tmp_path / "a")
    reference = torch.load(whole / "checkpoint.pth", weights_only=False)

    real_save = engine.save_checkpoint

    def save_then_stop(path, model, optimizer, scheduler, epoch, history, cfg, step=0, **kwargs):
        real_save(path, model, optimizer, scheduler, epoch, history, cfg, step=step, **kwargs)
        if epoch == 1 and step == 1:  # after the first step of epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_row("demo", "ks_def_r18", args, results=tmp_path / "b")
    directory = records.run_dir("demo", "ks_def_r18", tmp_path / "b")
    state = torch.load(directory / "checkpoint.pth", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1) and records.status(directory) == "interrupted"
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    steps = []
    real_train = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: steps.append(k["start_step"]) or real_train(*a, **k))
    train_row("demo", "ks_def_r18", args, resume=True, results=tmp_path / "b")
    assert steps == [1]  # only the second step of epoch 2 was trained again
    resumed = torch.load(directory / "checkpoint.pth", weights_only=False)
    for k, v in reference["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0, msg=k)
    assert [r["train"] for r in resumed["history"]] == [r["train"] for r in reference["history"]]
    assert json.loads((directory / "env.json").read_text())["resumed_after_epoch"] == 1


def test_heartbeat_marks_a_running_row_and_blocks_a_second_run(tmp_path, data_root):
    import os
    import time

    directory = records.run_dir("demo", "def_r18", tmp_path)
    records.write_yaml(directory / "config.yaml", {})
    beat = {"time": time.time(), "host": "another-host", "pid": 1, "slurm_job_id": None}
    records.write_json(directory / records.HEARTBEAT, beat)
    assert records.status(directory) == "running"
    with pytest.raises(RunError, match="being trained by another process.*another-host"):
        train_row("demo", "def_r18", overrides(data_root), resume=True, results=tmp_path)
    records.write_json(directory / records.HEARTBEAT, {**beat, "time": time.time() - records.HEARTBEAT_STALE_S - 1})
    assert records.status(directory) == "interrupted"  # stale
    import socket

    records.write_json(directory / records.HEARTBEAT, {**beat, "host": socket.gethostname(), "pid": 2 ** 22 + 7})
    assert records.status(directory) == "interrupted"  # a process of this host that no longer exists
    records.write_json(directory / records.HEARTBEAT, {**beat, "host": socket.gethostname(), "pid": os.getpid()})
    assert records.status(directory) == "running"

    hb = records.Heartbeat(directory, interval=0.05).start()
    hb.update(epoch=3, iteration=7, phase="train")
    time.sleep(0.2)
    assert json.loads((directory / records.HEARTBEAT).read_text())["epoch"] == 3
    hb.stop()
    assert not (directory / records.HEARTBEAT).exists()


def test_two_launches_of_one_row_at_once_start_it_only_once(tmp_path, data_root, monkeypatch):
    import threading
    import time

    real_start = engine._start_records

    def slow_start(*args):  # widens the window between the checks and the claim
        decision = real_start(*args)
        time.sleep(0.5)
        return decision

    release = threading.Event()
    monkeypatch.setattr(engine, "_start_records", slow_start)
    monkeypatch.setattr(engine, "_train", lambda cfg, directory, *args: release.wait(10) and directory)
    outcomes = []

    def launch():
        try:
            outcomes.append(train_row("demo", "def_r18", overrides(data_root), results=tmp_path))
        except RunError as e:
            outcomes.append(e)
            release.set()

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    errors = [o for o in outcomes if isinstance(o, RunError)]
    assert len(outcomes) == 2 and len(errors) == 1, outcomes
    assert "being trained by another process" in str(errors[0])
    assert not (records.run_dir("demo", "def_r18", tmp_path) / records.HEARTBEAT).exists()  # claim released


def test_eval_command_writes_a_new_file_and_leaves_the_record(tmp_path, data_root, capsys, monkeypatch):
    from experiments.__main__ import main

    directory = train_row("demo", "ks_def_r18", overrides(data_root, "train.epochs=1", "train.lr_drop=[]"),
                          results=tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    main(["--results", str(tmp_path), "eval", "demo", "--row", "ks_def_r18", "--teachers",
          f"data.root={data_root}"])
    out = capsys.readouterr().out
    assert "attn1" in out and "attn2" in out and "attn3" in out
    main(["--results", str(tmp_path), "eval", "demo", "--row", "ks_def_r18", "--moved", "--checkpoint",
          str(directory / "checkpoint.pth")])
    files = sorted(directory.glob("eval-*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2  # never overwritten
    first, second = (json.loads(p.read_text()) for p in files)
    assert list(first["metrics"]) == ["attn1", "attn3", "attn2"] and list(second["metrics"]) == ["attn1", "attn1_moved"]
    assert first["checkpoint_epoch"] == 1 and first["teachers"] is True and not first["moved"] and second["moved"]
    final = json.loads((directory / "eval.json").read_text())
    assert first["metrics"]["attn1"] == final["attn1"]  # the same weights, the same images
    for name, data in before.items():  # eval.json, DONE, log... untouched
        assert (directory / name).read_bytes() == data, name
    # one image: nothing to move the detections to, so the moved metrics are undefined (not an error)
    metrics, _ = evaluation.evaluate_row("demo", "ks_def_r18", results=tmp_path, moved=True,
                                     overrides=[f"data.root={data_root}", "train.max_eval_images=1"])
    assert list(metrics) == ["attn1", "attn1_moved"] and all(math.isnan(v) for v in metrics["attn1_moved"].values())
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["--results", str(tmp_path), "eval", "demo", "--row", "def_r18"])

    # the checkpoint holds every weight: evaluating needs no pretrained backbone file
    import models.backbone

    ck = checkpoints.load_checkpoint("demo", "ks_def_r18", results=tmp_path)
    monkeypatch.setattr(models.backbone, "SYNTHETIC_WEIGHTS", tmp_path / "gone.pth")
    model = ck.build_model(num_classes=5)
    state = model.state_dict()
    assert state.keys() == ck.state["model"].keys()
    for key, value in ck.state["model"].items():
        assert torch.equal(state[key], value), key


def test_a_requeued_job_resumes_despite_its_own_fresh_heartbeat(tmp_path, data_root, monkeypatch):
    """A job killed without cleanup (preemption, node failure) leaves a fresh heartbeat behind; when
    SLURM requeues the same job within HEARTBEAT_STALE_S, the row must resume, not start over."""
    import time

    interrupt_during_second_evaluation(monkeypatch, "def_r18", data_root, tmp_path)
    directory = records.run_dir("demo", "def_r18", tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    beat = {"time": time.time(), "host": "node-that-died", "pid": 1, "slurm_job_id": "4242", "slurm_restart": 0}
    records.write_json(directory / records.HEARTBEAT, beat)
    assert records.status(directory) == "running"
    # a second launch inside the same job (not requeued: the same restart count) is another process
    with pytest.raises(RunError, match="being trained by another process.*SLURM job 4242"):
        train_row("demo", "def_r18", overrides(data_root), resume=True, results=tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued
    trained = []
    real_train = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: trained.append(a[6]) or real_train(*a, **k))
    train_row("demo", "def_r18", overrides(data_root), resume=True, results=tmp_path)
    assert trained == ["2/2"] and records.status(directory) == "done"
    assert [r["epoch"] for r in records.read_log(directory / "log.jsonl")] == [1, 2]


def test_finished_epochs_without_a_checkpoint_are_never_overwritten(tmp_path, data_root, monkeypatch):
    interrupt_during_second_evaluation(monkeypatch, "def_r18", data_root, tmp_path)
    directory = records.run_dir("demo", "def_r18", tmp_path)
    (directory / "checkpoint.pth").unlink()
    log = (directory / "log.jsonl").read_text()
    with pytest.raises(RunError, match="checkpoint is missing.*--force"):
        train_row("demo", "def_r18", overrides(data_root), resume=True, results=tmp_path)
    assert (directory / "log.jsonl").read_text() == log


@pytest.mark.parametrize("drops,noted", [("[2]", True), ("[1]", False)])
def test_a_drop_at_or_after_the_last_epoch_is_noted(tmp_path, data_root, monkeypatch, capsys, drops, noted):
    monkeypatch.setattr(engine, "_train", lambda cfg, directory, *args: directory)
    train_row("demo", "def_r18", overrides(data_root, f"train.lr_drop={drops}"), results=tmp_path)
    out = capsys.readouterr().out
    assert ("note: train.lr_drop" in out) == noted
    if noted:
        assert "train.lr_drop [2] at or after the last epoch (2): this drop does not happen" in out


def test_a_file_system_without_locks_still_runs(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with records.row_lock(tmp_path / "runs" / "demo" / "def_r18"):
        entered = True
    assert entered and "cannot lock" in capsys.readouterr().out


def test_a_lock_held_too_long_is_a_clear_error(tmp_path, capsys):
    directory = tmp_path / "runs" / "demo" / "def_r18"
    with records.row_lock(directory):
        with pytest.raises(TimeoutError, match=r"\.def_r18\.lock has been locked by another launch"):
            with records.row_lock(directory, timeout_s=0.5):
                pass
    with records.row_lock(directory, timeout_s=0.5):  # released
        pass
