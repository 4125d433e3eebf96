"""--device on a machine without the device asked for, or a device that does not exist: one `error:`
line from every command, before a manifest, a checkpoint or data is read (distributed.pick_device)."""
import subprocess
import sys

import pytest
import torch

import experiments.__main__ as cli
from experiments import complexity, distributed
from experiments import predict as predict_module
from benchmarks import gpu_check
from experiments.records import REPO

NO_GPU = ("error: --device cuda: no CUDA GPU is available on this machine (torch.cuda.is_available() is False); "
          "run without --device to use the CPU")
UNKNOWN = "unknown device; expected cpu, cuda or cuda:N (N: the GPU's index)"


def no_work(*args, **kwargs):
    raise AssertionError("work began before --device was checked")


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA, and every command's first piece of work replaced by a failure."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "Manifest", no_work)
    monkeypatch.setattr(complexity, "Manifest", no_work)
    monkeypatch.setattr(predict_module, "load_checkpoint", no_work)
    monkeypatch.setattr(gpu_check, "Check", no_work)


def error_of(call, argv):
    with pytest.raises(SystemExit) as e:
        call(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


COMMANDS = {
    "run": (cli.main, ["run", "demo", "--row", "ks_def_r18"]),
    "eval": (cli.main, ["eval", "demo", "--row", "ks_def_r18"]),
    "predict": (cli.main, ["predict", "demo", "--row", "ks_def_r18", "photo.jpg"]),
    "complexity": (cli.main, ["complexity", "demo"]),
    "gpu_check": (gpu_check.main, []),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_device_this_machine_lacks_in_one_line(no_gpu, command, tmp_path, capsys):
    call, argv = COMMANDS[command]
    results = [] if command == "gpu_check" else ["--results", str(tmp_path / "results")]
    assert error_of(call, argv + results + ["--device", "cuda"]) == NO_GPU
    for name in ("cdua", "gpu"):
        assert error_of(call, argv + results + ["--device", name]) == f"error: --device {name}: {UNKNOWN}"
    assert capsys.readouterr().err == ""  # nothing else printed: no traceback, no progress
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_pick_device(monkeypatch):
    assert distributed.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.pick_device(None) == torch.device("cpu")
    with pytest.raises(distributed.DeviceError, match="no CUDA GPU is available"):
        distributed.pick_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.pick_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.pick_device(None, local_rank=3) == torch.device("cuda", 1)
    with pytest.raises(distributed.DeviceError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\): cuda:0 "
                                                      r"to cuda:1"):
        distributed.pick_device("cuda:2")
    for name in ("CPU", "cuda:x", "meta"):
        with pytest.raises(distributed.DeviceError, match=f"--device {name}: unknown device"):
            distributed.pick_device(name)


def test_the_exit_status_and_stderr_of_a_real_process():
    """As a user sees it: exit status 1, one line on stderr, within the time it takes to import torch."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "gpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: --device gpu: {UNKNOWN}\n"
