"""Runs that go wrong: divergence, reruns with another configuration, runs with no step, signals,
damaged checkpoints, record permissions, and contradictory command lines."""
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from experiments import checkpoints, engine, records, runs
from experiments.__main__ import main
from experiments.engine import train_row
from experiments.errors import RunError
from experiments.signals import Stopped, StopRequest
from experiments.training import train_one_epoch

from .helpers import TINY_RUN, interrupt_during_second_evaluation, overrides

REPO = records.REPO


ONE_EPOCH = ("train.epochs=1", "train.lr_drop=[]")


# ------------------------------------------------------------------------------------------------
# divergence

class Toy(nn.Module):
    """Predictions from one weight: `poison` makes them non-finite."""

    def __init__(self, poison=None):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.poison = poison

    def forward(self, images, mask, targets=None):
        boxes = self.w * torch.full((len(images), 3, 4), 0.5)
        logits = self.w * torch.zeros(len(images), 3, 2)
        if self.poison == "boxes":
            boxes = boxes * float("nan")
        return {"pred_logits": logits, "pred_boxes": boxes,
                "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}]}


def toy_loader(n=3):
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 0,
              "orig_size": torch.tensor([8, 8]), "size": torch.tensor([8, 8])}
    batch = {"images": torch.zeros(1, 3, 8, 8), "padding_mask": torch.zeros(1, 8, 8, dtype=torch.bool),
             "targets": [target]}
    return [batch] * n


def test_non_finite_predictions_stop_before_the_matcher():
    model, called = Toy(poison="boxes"), []

    def criterion(outputs, targets):  # the matcher lives here: it must never see NaN boxes
        called.append(1)
        return {"loss": outputs["pred_boxes"].sum()}

    criterion.train = lambda: None
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(RunError, match=r"diverged at epoch 2/5, iteration 1 of 3: non-finite predictions "
                                       r"pred_boxes, aux_outputs\[0\].pred_boxes"):
        train_one_epoch(model, criterion, toy_loader(), opt, "cpu", 0.0, "2/5")
    assert not called


@pytest.mark.parametrize("clip", [0.0, 0.1])
def test_a_non_finite_gradient_is_never_stepped(clip):
    model = Toy()

    def criterion(outputs, targets):  # finite loss, infinite gradient: d sqrt(x)/dx at 0
        return {"loss": (outputs["pred_logits"].sum() * 0 + (model.w - 1)).abs().sqrt().sum()}

    criterion.train = lambda: None
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(RunError, match=r"diverged at epoch 1/1, iteration 1 of 3: the gradient norm is (inf|nan) "
                                       r"\(non-finite gradients of w\); the step was not taken"):
        train_one_epoch(model, criterion, toy_loader(), opt, "cpu", clip, "1/1")
    assert model.w.item() == 1.0


def test_an_overflowing_gradient_norm_of_finite_gradients_is_named_as_such():
    model = Toy()
    model.v = nn.Parameter(torch.ones(3))

    def criterion(outputs, targets):  # three gradients of 1e20 (finite); their squares overflow float32
        return {"loss": outputs["pred_boxes"].sum() * 0 + (model.v * 1e20).sum()}

    criterion.train = lambda: None
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(RunError, match=r"iteration 1 of 3: the gradient norm is inf \(every gradient is finite, "
                                       r"their norm overflows\); the step was not taken"):
        train_one_epoch(model, criterion, toy_loader(), opt, "cpu", 0.0, "1/1")
    assert model.v.tolist() == [1.0, 1.0, 1.0]


def test_a_diverging_run_fails_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path, data_root):
    args = overrides(data_root, *ONE_EPOCH, "train.lr=1e6", "train.lr_backbone=1e6", "train.clip_max_norm=0",
                     "train.checkpoint_every_iters=1", "train.max_iters_per_epoch=4")
    # the first step makes the weights huge: the next step's predictions, or the weights themselves
    # when they are saved, are not finite
    with pytest.raises(RunError, match=r"training diverged at epoch 1/1, iteration \d of 4: non-finite|"
                                       r"the weights at epoch 1, iteration \d are not finite") as e:
        train_row("demo", "def_r18", args, results=tmp_path)
    directory = records.run_dir("demo", "def_r18", tmp_path)
    assert records.status(directory) == "failed"
    assert str(e.value) in (directory / "FAILED").read_text()
    # every step before the failing one was saved (a checkpoint per step), and only those
    failed_at = int(re.search(r"iteration (\d)", str(e.value)).group(1))
    assert failed_at >= 2, "the first step starts from finite weights"
    state = torch.load(directory / "checkpoint.pth", weights_only=False)
    assert (state["epoch"], state["step"]) == (0, failed_at - 1)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def saved_linear(path):
    """A small model, optimizer and scheduler, with a checkpoint of them after epoch 1 at `path`."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1])
    checkpoints.save_checkpoint(path, model, opt, sched, 1, [], {})
    return model, opt, sched


def test_weights_that_are_not_finite_never_replace_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    model, opt, sched = saved_linear(path)
    good = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(RunError, match=r"weights at epoch 3, iteration 3 are not finite \(weight\); not saved"):
        checkpoints.save_checkpoint(path, model, opt, sched, 2, [], {}, step=3)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


# ------------------------------------------------------------------------------------------------
# configuration of reruns and resumes

def test_a_finished_row_rerun_with_another_configuration_is_refused(tmp_path, data_root, capsys):
    args = overrides(data_root, *ONE_EPOCH)
    directory = train_row("demo", "def_r18", args, results=tmp_path)
    done = (directory / "DONE").read_bytes()
    assert train_row("demo", "def_r18", args, results=tmp_path) == directory  # the same: skipped
    assert "already done" in capsys.readouterr().out
    with pytest.raises(RunError, match=r"done .* with another configuration: train.lr: 0.0004 -> 0.001\. "
                                       r"Pass --force"):
        train_row("demo", "def_r18", args + ["train.lr=1e-3"], results=tmp_path)
    with pytest.raises(SystemExit, match="^error: def_r18: this row is done"):
        main(["--results", str(tmp_path), "run", "demo", "--row", "def_r18", *args, "train.lr=1e-3"])
    assert (directory / "DONE").read_bytes() == done


def test_resume_refuses_a_checkpoint_saved_with_another_configuration(tmp_path, data_root, monkeypatch):
    interrupt_during_second_evaluation(monkeypatch, "def_r18", data_root, tmp_path)
    directory = records.run_dir("demo", "def_r18", tmp_path)
    state = torch.load(directory / "checkpoint.pth", weights_only=False)
    state["config"]["train"]["lr"] = 1e-3
    state[checkpoints.CHECKSUM] = checkpoints.content_checksum(state)  # a sound checkpoint of another configuration
    torch.save(state, directory / "checkpoint.pth")
    with pytest.raises(RunError, match=r"checkpoint .*checkpoint.pth was saved with another configuration "
                                       r"\(train.lr: 0.001 -> 0.0004\)"):
        train_row("demo", "def_r18", overrides(data_root), resume=True, results=tmp_path)
    assert records.status(directory) == "interrupted"  # refused before anything was written


@pytest.mark.parametrize("extra,message", [
    # 8 images, batches of 8 with the last one dropped: 7 images make no batch
    (["data.synthetic.train=7", "train.batch_size=8"], r"has 7 images, fewer than one optimizer step takes \(8 = "
                                                       r"1 process\(es\) x train.batch_size 8 x 1 accumulation"),
    # 3 micro-batches of 2 cannot make one step of 16 (8 micro-batches)
    (["data.synthetic.train=6", "train.total_batch_size=16"], r"has 6 images, fewer than one optimizer step takes "
                                                              r"\(16 = 1 process\(es\) x train.batch_size 2 x 8"),
])
def test_a_run_with_no_training_step_stops_before_any_record(tmp_path, extra, message):
    args = TINY_RUN + [f"data.root={tmp_path / 'small'}", *extra]
    with pytest.raises(RunError, match=message):
        train_row("demo", "def_r18", args, results=tmp_path)
    assert records.status(records.run_dir("demo", "def_r18", tmp_path)) == "not started"


def test_contradictory_or_malformed_command_lines_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: def_r18: --force .* and --resume .* contradict each other"):
        main(["--results", str(tmp_path), "run", "demo", "--row", "def_r18", "--force", "--resume"])
    with pytest.raises(SystemExit, match=r"^error: override 'train.seed=\[1': the value '\[1' is not valid YAML"):
        main(["--results", str(tmp_path), "run", "demo", "--row", "def_r18", "train.seed=[1"])
    with pytest.raises(SystemExit, match=r"^error: .*key 'train.lr' must be a finite number, got nan"):
        main(["--results", str(tmp_path), "run", "demo", "--row", "def_r18", "train.lr=nan"])
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# checkpoints and record files

def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, data_root, monkeypatch, capsys):
    args = overrides(data_root, "train.checkpoint_every_iters=1")
    interrupt_during_second_evaluation(monkeypatch, "def_r18", data_root, tmp_path, "train.checkpoint_every_iters=1")
    directory = records.run_dir("demo", "def_r18", tmp_path)
    latest, previous = directory / "checkpoint.pth", directory / "checkpoint.prev.pth"
    assert torch.load(latest, weights_only=False)["step"] == 2
    assert torch.load(previous, weights_only=False)["step"] == 1  # the checkpoint before the latest is kept
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    state, used = checkpoints.read_checkpoint(latest)
    assert used == previous and (state["epoch"], state["step"]) == (1, 1)
    capsys.readouterr()
    damaged = latest.read_bytes()
    train_row("demo", "def_r18", args, resume=True, results=tmp_path)
    err = capsys.readouterr().err
    assert f"{latest} cannot be read" in err and f"using the previous checkpoint {previous}" in err
    assert records.status(directory) == "done"
    # the damaged file was set aside, not rotated over the checkpoint the run resumed from
    aside = list(directory.glob("checkpoint.pth.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged and "was renamed to" in err

    previous.write_bytes(b"not a checkpoint")
    latest.write_bytes(b"")
    with pytest.raises(RunError, match=f"{latest} cannot be read .*the previous checkpoint cannot be used either: "
                                       f"{previous} cannot be read"):
        checkpoints.read_checkpoint(latest)
    with pytest.raises(RunError, match=f"{previous} cannot be read"):  # named also when asked for directly
        checkpoints.read_checkpoint(previous)


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "checkpoint.pth"
    model, opt, sched = saved_linear(path)
    good = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save_checkpoint(path, model, opt, sched, 2, [], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"] and path.read_bytes() == good


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_record_files_get_the_permissions_of_a_plain_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        records.write_json(tmp_path / "eval.json", {})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "eval.json").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == mode


# ------------------------------------------------------------------------------------------------
# signals

def test_a_signal_during_the_steps_waits_for_the_end_of_the_step():
    stop = StopRequest().install()
    try:
        stop.in_steps = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.signum == signal.SIGTERM  # noted, nothing raised yet
        os.kill(os.getpid(), signal.SIGTERM)  # the same signal again at once: delivered twice, one request
        time.sleep(0.1)
        assert stop.signum == signal.SIGTERM
        stop._first = (signal.SIGTERM, time.monotonic() - StopRequest.DUPLICATE_S - 1)
        with pytest.raises(Stopped, match="SIGTERM"):  # a second one later stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        stop.in_steps, stop.signum = False, None
        with pytest.raises(KeyboardInterrupt):  # outside the steps: Ctrl-C as usual
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_during_an_evaluation_waits_for_the_epochs_checkpoint(tmp_path, data_root, monkeypatch):
    real_evaluate = engine.evaluate

    def evaluate_signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "evaluate", evaluate_signalled)
    with pytest.raises(Stopped, match="stopped by SIGTERM after epoch 1") as e:
        train_row("demo", "def_r18", overrides(data_root), results=tmp_path)
    assert e.value.signum == signal.SIGTERM and e.value.saved
    directory = records.run_dir("demo", "def_r18", tmp_path)
    state = torch.load(directory / "checkpoint.pth", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 0) and "eval" in state["history"][0]
    assert records.status(directory) == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are restored


def _handlers_in_a_worker(_):
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_loader_workers_leave_the_signals_to_the_training_process():
    from experiments.signals import ignore_stop_signals

    loader = torch.utils.data.DataLoader([0], batch_size=None, num_workers=1, collate_fn=_handlers_in_a_worker,
                                         worker_init_fn=ignore_stop_signals)
    assert next(iter(loader)) == (signal.SIG_IGN, signal.SIG_IGN)


def test_a_launcher_that_handles_sigterm_gets_a_checkpoint_and_decides(monkeypatch):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # as submitit's bypass
    try:
        stop = StopRequest().install()
        stop.in_steps = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        from experiments.distributed import Context

        assert seen == [signal.SIGTERM] and stop.poll(Context()) == "checkpoint" and stop.poll(Context()) is None
        stop.restore()
    finally:
        signal.signal(signal.SIGTERM, previous)


def assert_checkpoint_of_the_stop(out, directory, name):
    """The message names where the run stopped (after an optimizer step, or after an epoch's
    checkpoint when the signal came between epochs) and checkpoint.pth holds exactly that state."""
    stop = re.search(rf"def_r18: stopped by {name} after (?:iteration (\d+) of \d+ of epoch (\d+)/\d+|epoch (\d+))"
                     rf"; the record keeps a checkpoint of where it stopped", out)
    assert stop, out
    state = torch.load(directory / "checkpoint.pth", weights_only=False)
    if stop.group(1):
        assert (state["epoch"], state["step"]) == (int(stop.group(2)) - 1, int(stop.group(1)))
    else:
        assert (state["epoch"], state["step"]) == (int(stop.group(3)), 0)


def _start(tmp_path, data_root, *extra, resume=False, options=()):
    cmd = [sys.executable, "-m", "experiments", "--results", str(tmp_path), "run", "demo", "--row", "def_r18",
           *(["--resume"] if resume else []), *options, *overrides(data_root, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# 20 epochs of 4 steps: long enough to be signalled in the middle of an epoch
LONG = ("train.epochs=20", "train.lr_drop=[15]", "train.eval_every=20", "train.max_iters_per_epoch=null")


def _signal_while_training(proc, directory, sig):
    deadline = time.time() + 120
    while time.time() < deadline:  # the heartbeat says "train" as soon as the first epoch starts
        beat = records.read_json(directory / records.HEARTBEAT)
        if isinstance(beat, dict) and beat.get("phase") == "train":
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was signalled: {proc.communicate()}")
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    return proc.communicate(timeout=120)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signalled_run_checkpoints_its_step_and_resumes_exactly(tmp_path, data_root, sig, code):
    directory = records.run_dir("demo", "def_r18", tmp_path / "stopped")
    proc = _start(tmp_path / "stopped", data_root, *LONG)
    out, err = _signal_while_training(proc, directory, sig)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err, err
    assert records.status(directory) == "interrupted" and not (directory / "FAILED").exists()
    assert_checkpoint_of_the_stop(out, directory, signal.Signals(sig).name)
    if sig == signal.SIGINT:
        return
    # the resumed run ends where an uninterrupted one does
    resumed = _start(tmp_path / "stopped", data_root, *LONG, resume=True)
    assert resumed.wait(300) == 0, resumed.communicate()
    whole = _start(tmp_path / "whole", data_root, *LONG)
    assert whole.wait(300) == 0, whole.communicate()
    a = torch.load(directory / "checkpoint.pth", weights_only=False)
    b = torch.load(records.run_dir("demo", "def_r18", tmp_path / "whole") / "checkpoint.pth", weights_only=False)
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=0, atol=0, msg=k)
    assert json.loads((directory / "eval.json").read_text()) == json.loads(
        (records.run_dir("demo", "def_r18", tmp_path / "whole") / "eval.json").read_text())


def test_sigterm_to_a_multi_process_launch_checkpoints_every_process_step(tmp_path, data_root):
    """`run --nproc 2`: the launcher forwards the signal; both processes stop after the same step and
    rank 0 writes its checkpoint; the launcher exits 143 like a single process."""
    directory = records.run_dir("demo", "def_r18", tmp_path)
    proc = _start(tmp_path, data_root, *LONG, "train.batch_size=1", options=("--nproc", "2"))
    out, err = _signal_while_training(proc, directory, signal.SIGTERM)
    assert proc.returncode == 143, (out, err)
    assert "Traceback" not in err, err
    assert_checkpoint_of_the_stop(out, directory, "SIGTERM")
    assert records.status(directory) == "interrupted" and not (directory / "FAILED").exists()


# ------------------------------------------------------------------------------------------------
# start-up errors on the command line, data sets as people have them

def test_start_up_errors_are_one_line_and_leave_no_record(tmp_path, data_root, capsys):
    run = ["--results", str(tmp_path / "results"), "run", "demo", "--row", "def_r18", *overrides(data_root)]
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(SystemExit, match=f"^error: synthetic-pretrained weights for backbone 'resnet18' not found: "
                                         f"no file {missing}"):
        main(run + [f"model.backbone.weights_path={missing}"])
    with pytest.raises(SystemExit, match=f"^error: COCO data not found: image folder {data_root / 'val2017'} does "
                                         f"not exist \\(data.val_split = 'val2017'"):
        main(run + ["data.dataset=coco", "data.train_split=train", "data.val_split=val2017"])
    assert records.status(records.run_dir("demo", "def_r18", tmp_path / "results")) == "not started"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"^error: def_r18: cannot write the run record in {blocker}/runs/demo/def_r18"):
        main(["--results", str(blocker)] + run[2:] + list(ONE_EPOCH))
    with pytest.raises(FileNotFoundError):  # --traceback: the error itself
        main(["--traceback"] + run + [f"model.backbone.weights_path={missing}"])


def test_explicit_image_and_annotation_paths_train_a_row(tmp_path, data_root):
    """A COCO-format set given as image folders and annotation files of any name (here the synthetic
    set's, the annotations copied under other names) trains like the same set given by its root."""
    import shutil

    train_row("demo", "def_r18", overrides(data_root, *ONE_EPOCH), results=tmp_path / "a")  # makes the set
    for split in ("train", "val"):
        shutil.copy(data_root / "annotations" / f"instances_{split}.json", tmp_path / f"my {split} labels.json")
    explicit = [f"data.train_images={data_root / 'train'}", f"data.train_annotations={tmp_path / 'my train labels.json'}",
                f"data.val_images={data_root / 'val'}", f"data.val_annotations={tmp_path / 'my val labels.json'}"]
    directory = train_row("demo", "def_r18", overrides(tmp_path / "no_root", *ONE_EPOCH, "data.dataset=coco",
                                                       *explicit), results=tmp_path / "b")
    a = json.loads((tmp_path / "a" / "runs" / "demo" / "def_r18" / "eval.json").read_text())
    assert json.loads((directory / "eval.json").read_text()) == a  # the same data, the same run


def test_a_finished_row_under_another_manifest_file_of_the_same_name_is_refused(tmp_path, data_root):
    args = overrides(data_root, *ONE_EPOCH)
    train_row("demo", "def_r18", args, results=tmp_path)
    other = tmp_path / "elsewhere" / "demo.yaml"
    other.parent.mkdir()
    text = (REPO / "experiments" / "demo.yaml").read_text()
    assert "    lr: 4.0e-4\n" in text
    other.write_text(text.replace("    lr: 4.0e-4\n", "    lr: 3.0e-4\n"))
    with pytest.raises(RunError, match=r"this row is done .* with another configuration: train.lr: 0.0004 -> 0.0003"):
        train_row(str(other), "def_r18", args, results=tmp_path)


# ------------------------------------------------------------------------------------------------
# data errors found by a loader worker in the middle of a run

def _copy_with_truncated_image(data_root, tmp_path, split):
    """A copy of the tiny synthetic set (made by a first run if needed) with one image of `split`
    cut in half; returns (the copy's root, the damaged file)."""
    import shutil

    from datasets import ensure_synthetic

    ensure_synthetic(data_root, 8, 4, 0, 96)  # the set TINY_RUN trains on
    copy = tmp_path / "data"
    shutil.copytree(data_root, copy)
    bad = sorted((copy / split).glob("*.png"))[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return copy, bad


@pytest.mark.parametrize("split,options", [("train", ()), ("val", ()), ("train", ("--nproc", "2"))])
def test_an_unreadable_image_in_a_loader_worker_ends_the_run_at_once(tmp_path, data_root, split, options):
    """The worker's DataError reaches the training process, which exits with its one error line
    (every process of a --nproc launch too) instead of waiting forever for the worker at exit."""
    root, bad = _copy_with_truncated_image(data_root, tmp_path, split)
    extra = ("data.num_workers=1", "train.max_iters_per_epoch=null", *ONE_EPOCH) + (("train.batch_size=1",) if options else ())
    cmd = [sys.executable, "-m", "experiments", "--results", str(tmp_path / "results"), "run", "demo", "--row",
           "def_r18", *options, *TINY_RUN, f"data.root={root}", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)  # it hung without limit
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert elapsed < 90, f"the run took {elapsed:.0f} s to end after the data error"
    message = f"image {bad} (image id {int(bad.stem)}) cannot be read: OSError: image file is truncated"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    if options:  # the process that read the image says so, the launcher names it
        assert re.fullmatch(r"error \(rank [01]\): .*", errors[0]) and message in errors[0], proc.stderr
        assert re.fullmatch(r"error: training process [01] exited with code 1 \(its error is printed above\)",
                            errors[-1]), proc.stderr
    else:
        assert errors == [f"error: {message}"], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    directory = records.run_dir("demo", "def_r18", tmp_path / "results")
    assert records.status(directory) == "failed"
    assert message in (directory / "FAILED").read_text()


# ------------------------------------------------------------------------------------------------
# damaged records, a full disk, a killed process, a rerun after a data error

def test_resume_with_a_log_cut_short_rewrites_it_from_the_checkpoint_exactly(tmp_path, data_root, monkeypatch,
                                                                              capsys):
    interrupt_during_second_evaluation(monkeypatch, "def_r18", data_root, tmp_path / "cut")
    directory = records.run_dir("demo", "def_r18", tmp_path / "cut")
    log = directory / "log.jsonl"
    log.write_text(log.read_text() + '{"epoch": 2, "lr": 4e-05, "tra')  # a crash during the append
    with pytest.raises(RunError, match=re.escape(f"def_r18: {log}, line 2 (the last line, cut short): not valid "
                                                 f"JSON (") + r".*pass --resume to continue the run from its "
                                                              r"checkpoint, which rewrites the log"):
        train_row("demo", "def_r18", overrides(data_root), results=tmp_path / "cut")
    capsys.readouterr()
    train_row("demo", "def_r18", overrides(data_root), resume=True, results=tmp_path / "cut")
    err = capsys.readouterr().err
    assert f"warning: {log}, line 2 (the last line, cut short): not valid JSON" in err
    assert "the log is rewritten from the checkpoint's history" in err
    whole = train_row("demo", "def_r18", overrides(data_root), results=tmp_path / "whole")
    a = torch.load(directory / "checkpoint.pth", weights_only=False)
    b = torch.load(whole / "checkpoint.pth", weights_only=False)
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=0, atol=0, msg=k)
    without_time = [{k: v for k, v in r.items() if k != "time_s"} for r in records.read_log(whole / "log.jsonl")]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in records.read_log(log)] == without_time
    assert json.loads((directory / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())


def _done_row(results, data_root, change=None):
    """A finished record of demo/def_r18 (DONE and the resolved config.yaml, no training), with
    `change` applied to the recorded configuration."""
    from experiments.config import Manifest

    directory = records.run_dir("demo", "def_r18", results)
    cfg = Manifest("demo").resolve("def_r18", overrides(data_root, *ONE_EPOCH))
    if change:
        change(cfg)
    records.write_yaml(directory / "config.yaml", cfg)
    records.write_json(directory / "DONE", {})
    return directory


def test_a_done_row_rerun_prints_only_the_error_of_another_configuration(tmp_path, data_root, capsys):
    run = ["--results", str(tmp_path), "run", "demo", "--row", "def_r18", *overrides(data_root, *ONE_EPOCH)]
    directory = _done_row(tmp_path, data_root, lambda cfg: cfg["train"].update(lr=1e-3))
    with pytest.raises(SystemExit, match=r"^error: def_r18: this row is done .* with another configuration: "
                                         r"train.lr: 0.001 -> 0.0004"):
        main(run)
    assert "already done" not in capsys.readouterr().out
    _done_row(tmp_path, data_root)  # the same configuration: skipped, saying so
    main(run)
    assert f"def_r18: already done ({directory}); pass --force" in capsys.readouterr().out


def test_a_damaged_config_of_a_done_row_is_one_error_line(tmp_path, data_root, capsys):
    directory = _done_row(tmp_path, data_root)
    (directory / "config.yaml").write_text("model: {variant: deformable_detr\ntrain: [")
    with pytest.raises(SystemExit) as e:
        main(["--results", str(tmp_path), "run", "demo", "--row", "def_r18", *overrides(data_root, *ONE_EPOCH)])
    assert re.fullmatch(re.escape(f"error: {directory / 'config.yaml'} is not valid YAML (") + r".* at line 2, "
                        r"column \d+\); the run record is damaged; --force starts the row over \(moving the record "
                        r"aside\)", str(e.value.code)), e.value.code
    out, err = capsys.readouterr()
    assert "already done" not in out and "Traceback" not in err


class _DiskFullAfter(io.FileIO):
    """A file whose disk is full after `limit` bytes (torch.save then raises its zip writer's RuntimeError)."""
    limit = 1000

    def write(self, data):
        room = self.limit - self.tell()
        if len(data) > room:
            super().write(bytes(data)[:max(room, 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.mark.parametrize("limit", [1000, 0])
def test_a_full_disk_during_a_checkpoint_save_is_one_error_naming_the_file_and_space(tmp_path, monkeypatch, limit):
    path, previous = tmp_path / "checkpoint.pth", tmp_path / checkpoints.PREVIOUS_CHECKPOINT
    model, opt, sched = saved_linear(path)
    checkpoints.save_checkpoint(path, model, opt, sched, 2, [], {})  # now checkpoint.pth and checkpoint.prev.pth
    before = {p: p.read_bytes() for p in (path, previous)}
    monkeypatch.setattr(_DiskFullAfter, "limit", limit)
    monkeypatch.setattr(checkpoints, "open", lambda file, mode: _DiskFullAfter(file, mode.replace("b", "")), raising=False)
    with pytest.raises(RunError) as e:
        checkpoints.save_checkpoint(path, model, opt, sched, 3, [], {})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    message = str(e.value)
    needed = checkpoints._size(len(before[path]))  # the checkpoint it replaces: more than its tensors' bytes
    assert re.fullmatch(re.escape(f"the disk is full (No space left on device): the checkpoint {path} cannot be "
                                  f"written; it needs about {needed}, and ") + r"[\d.]+ (bytes|kB|MB|GB) are free "
                        r"there\. The "
                        r"checkpoints already on disk are kept: free some space, then continue with "
                        r"`run \.\.\. --resume`", message), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]  # no temporary file
    for p, data in before.items():
        assert p.read_bytes() == data and torch.load(p, weights_only=False)["epoch"] == (2 if p == path else 1)


def test_the_space_a_checkpoint_needs_is_the_size_of_its_tensors():
    state = {"model": {"w": torch.zeros(1000, 250)}, "optimizer": {"state": [torch.zeros(10, dtype=torch.float64)]},
             "epoch": 3}
    assert checkpoints._state_bytes(state) == 1000 * 250 * 4 + 10 * 8
    assert [checkpoints._size(n) for n in (12, 2048, 1_000_080, 3_500_000_000)] == ["12 bytes", "2.0 kB", "1.0 MB", "3.5 GB"]


def test_a_training_process_killed_by_a_signal_is_named():
    from experiments.distributed import WorkerFailed, spawn

    with pytest.raises(WorkerFailed, match=r"^training process 0 was killed by SIGKILL \(often the out-of-memory "
                                           r"killer\)$"):
        spawn(1, signal.raise_signal, signal.SIGKILL)  # a process that prints nothing before it dies
    from experiments.distributed import exit_message

    assert exit_message(1, -signal.SIGSEGV) == "training process 1 was killed by SIGSEGV"
    assert exit_message(1, 1) == "training process 1 exited with code 1 (its error is printed above)"


def test_a_data_error_in_the_first_epoch_leaves_a_record_that_a_plain_rerun_replaces(tmp_path, data_root,
                                                                                      monkeypatch, capsys):
    from datasets import DataError

    args = overrides(data_root, *ONE_EPOCH)
    directory = records.run_dir("demo", "def_r18", tmp_path)
    bad = "image /data/000000000007.png (image id 7) cannot be read: OSError: image file is truncated"

    def unreadable(*a, **k):
        raise DataError(bad)

    monkeypatch.setattr(engine, "train_one_epoch", unreadable)
    with pytest.raises(DataError):
        train_row("demo", "def_r18", args, results=tmp_path)
    assert (directory / "FAILED").read_text() == f"DataError: {bad}\n" and not checkpoints.has_checkpoint(directory)
    monkeypatch.undo()
    capsys.readouterr()
    train_row("demo", "def_r18", args, results=tmp_path)  # the image fixed: a plain rerun
    assert (f"def_r18: note: replacing the failed record in {directory} (no epoch finished, no checkpoint; it failed "
            f"with DataError: {bad})") in capsys.readouterr().out
    assert records.status(directory) == "done" and not (directory / "FAILED").exists()

    # with a checkpoint, the refusal says to resume after fixing the data
    (directory / "DONE").unlink()
    records.atomic_write(directory / "FAILED", f"DataError: {bad}\n")
    with pytest.raises(RunError, match=re.escape(f"holds an unfinished run (failed: DataError: {bad}; last finished "
                                                 f"epoch 1); fix what failed, then pass --resume to continue it")):
        runs.prepare_run_dir(directory, "def_r18", resume=False, force=False)
    assert runs.prepare_run_dir(directory, "def_r18", resume=True, force=False) is True
