"""Reading a checkpoint runs no code, a damaged one is never trusted, and one that does not describe
the row's model is refused with one line: every command that reads checkpoints (run --resume, eval,
predict, analysis show) goes through experiments/checkpoints.py."""
import functools
import json
import os
import shutil
import sys
from collections import Counter

import pytest
import torch

from analysis.__main__ import main as analysis_main
from experiments import checkpoints, records
from experiments.__main__ import main
from experiments.errors import RunError

from .helpers import ROW, TINY_RUN


class Payload:
    """Pickled as a call of os.system: unpickling it with weights_only=False runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def code_running_checkpoint(path, marker, like):
    """A checkpoint shaped like the state `like` (a real one) whose config, when unpickled, touches
    `marker`."""
    state = dict(like)
    state["config"] = Payload(f"touch {marker}")
    state.pop(checkpoints.CHECKSUM, None)
    torch.save(state, path)
    return path


@pytest.fixture
def copied(trained, tmp_path):
    """(results, data root, the row's directory) of a private copy of the trained row."""
    results, data_root = trained
    shutil.copytree(results, tmp_path / "results")
    return tmp_path / "results", data_root, records.run_dir("demo", ROW, tmp_path / "results")


def one_error_line(err, *parts):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_the_payload_would_run_if_unpickled_unsafely(copied, tmp_path):
    """The fixture is armed: the same file read without weights_only runs its command."""
    _, _, directory = copied
    marker = tmp_path / "ran"
    path = code_running_checkpoint(tmp_path / "evil.pth", marker, torch.load(directory / "checkpoint.pth",
                                                                             weights_only=True))
    torch.load(path, weights_only=False)
    assert marker.exists()


class EvalPayload:
    """Pickled as a call of builtins.eval, a global torch's loader names rather than blocks by module."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload,needed", [("eval", "eval"), ("partial", "functools.partial")])
def test_the_refusal_names_the_global_the_pickle_needs(copied, tmp_path, payload, needed):
    """Globals that torch's loader names rather than blocks by their module (os, sys): the error
    still names them, and nothing runs."""
    _, _, directory = copied
    marker = tmp_path / "ran"
    state = dict(torch.load(directory / "checkpoint.pth", weights_only=True))
    state["config"] = EvalPayload(marker) if payload == "eval" else functools.partial(print, "ran")
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    with pytest.raises(RunError) as e:
        checkpoints.read_checkpoint(path, fallback=False)
    assert str(e.value).startswith(f"{path} is refused: its pickle needs {needed}, ")
    assert not marker.exists()


def test_a_checkpoint_without_a_checksum_but_with_unknown_keys_is_damaged(copied, tmp_path):
    """A checkpoint whose 'checksum' key name was damaged is not read unchecked."""
    _, _, directory = copied
    state = torch.load(directory / "checkpoint.pth", weights_only=True)
    state["checksul"] = state.pop(checkpoints.CHECKSUM)
    path = tmp_path / "renamed.pth"
    path.write_bytes(checkpoint_bytes(state))
    with pytest.raises(RunError, match=f"{path} is damaged: it has no checksum, and keys no checkpoint of this "
                                       f"project has \\(checksul\\)"):
        checkpoints.read_checkpoint(path, fallback=False)


def test_no_command_runs_the_code_of_a_checkpoint(copied, tmp_path, capsys):
    results, data_root, directory = copied
    marker = tmp_path / "ran"
    real = torch.load(directory / "checkpoint.pth", weights_only=True)
    evil = code_running_checkpoint(tmp_path / "evil.pth", marker, real)
    refused = "is refused: its pickle needs posix.system"

    def expect_refusal(run, path):
        capsys.readouterr()
        code = run()
        assert code == 2 or code is None
        one_error_line(capsys.readouterr().err, str(path), refused)
        assert not marker.exists()

    def cli(*argv):
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        print(e.value.code, file=sys.stderr)  # sys.exit("error: ...") carries the line
        return 2

    expect_refusal(lambda: cli("predict", "demo", "--row", ROW, str(data_root / "val"), "--checkpoint", str(evil),
                               "--out", str(tmp_path / "pred"), "--results", str(results)), evil)
    expect_refusal(lambda: cli("eval", "demo", "--row", ROW, "--checkpoint", str(evil), "--results", str(results)),
                   evil)
    expect_refusal(lambda: analysis_main(["show", "--manifest", "demo", "--row", ROW, "--checkpoint", str(evil),
                                          "--results", str(results)]), evil)
    # the file in the place of the row's own checkpoint (and no previous one to fall back on)
    (directory / "checkpoint.prev.pth").unlink(missing_ok=True)
    shutil.copy(evil, directory / "checkpoint.pth")
    expect_refusal(lambda: cli("eval", "demo", "--row", ROW, "--results", str(results)), directory / "checkpoint.pth")
    for name in ("DONE", "eval.json"):  # an unfinished row: --resume reads its checkpoint
        (directory / name).unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", "demo", "--row", ROW, "--resume", "--results", str(results), f"data.root={data_root}",
              *TINY_RUN, "train.epochs=1", "train.lr_drop=[]"])
    assert str(directory / "checkpoint.pth") in str(e.value.code) and refused in str(e.value.code)
    assert not marker.exists()
    expect_refusal(lambda: analysis_main(["attention", "--manifest", "demo", "--row", ROW, "--checkpoint", str(evil),
                                          "--results", str(results)]), evil)
    # the authors' checkpoints (import-weights) and backbone weights are read the same way
    expect_refusal(lambda: cli("import-weights", "--from", "ks-detr", str(evil), "table1", "--row", "dab_r50_ks",
                               "--out", str(tmp_path / "imported.pth")), evil)
    assert not (tmp_path / "imported.pth").exists()
    expect_refusal(lambda: cli("--results", str(tmp_path / "other"), "run", "demo", "--row", "def_r18",
                               f"model.backbone.weights_path={evil}", *TINY_RUN, f"data.root={data_root}"), evil)


def test_a_checkpoint_holds_a_checksum_of_its_contents_and_a_changed_byte_is_damage(copied, capsys):
    results, _, directory = copied
    latest = directory / "checkpoint.pth"
    state = torch.load(latest, weights_only=True)
    assert state[checkpoints.CHECKSUM] == checkpoints.content_checksum(state)
    # four bytes inside a weight's data: the zip reader does not check its CRCs, so the file still loads
    weight = state["model"]["class_embed.weight"] if "class_embed.weight" in state["model"] else next(
        v for v in state["model"].values() if v.is_floating_point() and v.numel() >= 64)
    data = bytearray(latest.read_bytes())
    at = bytes(data).find(weight.contiguous().view(-1).numpy().tobytes()[:64])
    assert at > 0
    data[at + 8:at + 12] = b"\x00\x00\x80\x7f"
    latest.write_bytes(bytes(data))
    changed = torch.load(latest, weights_only=True)
    assert changed["model"].keys() == state["model"].keys()  # it unpickles ...
    with pytest.raises(RunError, match=f"{latest} is damaged: its contents do not match the checksum"):
        checkpoints.read_checkpoint(latest, fallback=False)  # ... and is refused
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", "demo", "--row", ROW, "--checkpoint", str(latest), "--results", str(results)])
    assert str(e.value.code).startswith(f"error: {latest} is damaged")
    # the run's own checkpoint: the previous one is used instead, as for a truncated file
    (directory / "checkpoint.prev.pth").write_bytes(checkpoint_bytes(state))
    read, used = checkpoints.read_checkpoint(latest)
    assert used == directory / "checkpoint.prev.pth"
    assert "is damaged" in capsys.readouterr().err
    torch.testing.assert_close(read["model"], state["model"], rtol=0, atol=0)


def checkpoint_bytes(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_the_checksum_covers_values_as_well_as_tensors():
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "history": [{"AP": 0.25}], "betas": (0.9, 0.999)}
    digest = checkpoints.content_checksum(state)
    assert digest == checkpoints.content_checksum({**state, checkpoints.CHECKSUM: "sha256:0"})
    for changed in ({**state, "epoch": 4}, {**state, "history": [{"AP": 0.26}]}, {**state, "betas": [0.9, 0.999]},
                    {**state, "model": {"w": torch.tensor([0.0, 1.0, 2.0, 3.5])}},
                    {**state, "model": {"w": torch.arange(4.0).double()}},
                    {**state, "model": {"w": torch.arange(4.0).reshape(2, 2)}}):
        assert checkpoints.content_checksum(changed) != digest


def test_a_checkpoint_written_before_checksums_still_loads_and_evaluates(copied, capsys):
    """Earlier commits wrote the same dict without the checksum."""
    results, _, directory = copied
    state = torch.load(directory / "checkpoint.pth", weights_only=True)
    del state[checkpoints.CHECKSUM]
    old = directory.parent / "old.pth"
    old.write_bytes(checkpoint_bytes(state))
    read, used = checkpoints.read_checkpoint(old, fallback=False)
    assert used == old and checkpoints.CHECKSUM not in read
    main(["eval", "demo", "--row", ROW, "--checkpoint", str(old), "--results", str(results)])
    assert "AP" in capsys.readouterr().out


def test_a_checkpoint_of_another_model_is_one_line_naming_the_file_row_and_difference(copied, tmp_path, capsys):
    results, data_root, directory = copied
    state = torch.load(directory / "checkpoint.pth", weights_only=True)
    # another variant and KS mode, as given by its configuration
    other = {**state, "config": {**state["config"], "model": {**state["config"]["model"], "variant": "dab_detr",
                                                               "ks": {"mode": "dual_share_v"}}}}
    other[checkpoints.CHECKSUM] = checkpoints.content_checksum(other)
    path = tmp_path / "dab.pth"
    path.write_bytes(checkpoint_bytes(other))
    for argv in (["eval", "demo", "--row", ROW, "--checkpoint", str(path), "--results", str(results)],
                 ["predict", "demo", "--row", ROW, str(data_root / "val"), "--checkpoint", str(path), "--out",
                  str(tmp_path / "pred"), "--results", str(results)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        message = str(e.value.code)
        assert message.startswith(f"error: {path} is not a checkpoint of row {ROW!r}") and "\n" not in message
        assert "model.variant ('dab_detr' in the checkpoint, 'deformable_detr' in the row)" in message
        assert "model.ks.mode ('dual_share_v' in the checkpoint, 'triple' in the row)" in message
    assert not (tmp_path / "pred").exists()  # predict wrote nothing

    # a checkpoint without a configuration whose weights are of another size: what differs, named
    bare = {k: v for k, v in state.items() if k not in ("config", checkpoints.CHECKSUM)}
    path = tmp_path / "bare.pth"
    path.write_bytes(checkpoint_bytes(bare))
    with pytest.raises(SystemExit) as e:
        main(["eval", "demo", "--row", ROW, "--checkpoint", str(path), "--results", str(results), "model.hidden_dim=64",
              *[o for o in TINY_RUN if not o.startswith("model.hidden_dim")], f"data.root={data_root}"])
    message = str(e.value.code)
    assert message.startswith(f"error: {path} does not fit the model of row {ROW!r} (deformable_detr, KS mode triple, "
                              f"hidden_dim 64") and "of another shape" in message and "\n" not in message


def test_evaluation_settings_of_a_checkpoint_are_followed_with_a_note(copied, tmp_path, capsys):
    results, _, directory = copied
    state = torch.load(directory / "checkpoint.pth", weights_only=True)
    topk = state["config"]["model"]["eval_topk"]
    changed = {**state, "config": {**state["config"], "model": {**state["config"]["model"], "eval_topk": topk - 5}}}
    changed[checkpoints.CHECKSUM] = checkpoints.content_checksum(changed)
    path = tmp_path / "topk.pth"
    path.write_bytes(checkpoint_bytes(changed))
    main(["eval", "demo", "--row", ROW, "--checkpoint", str(path), "--results", str(results)])
    note = next(line for line in capsys.readouterr().err.splitlines() if "differs from the row's at" in line)
    assert "model.eval_topk" in note and note.endswith("using the checkpoint's")
    written = max(directory.glob("eval-*.json"), key=lambda f: f.stat().st_mtime_ns)  # this evaluation's record
    detections = json.loads((directory / json.loads(written.read_text())["detections"]["attn1"]).read_text())
    per_image = Counter(d["image_id"] for d in detections)
    assert set(per_image.values()) == {topk - 5}  # the checkpoint's eval_topk was used
