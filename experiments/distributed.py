"""Distributed data parallel training: process groups, rank-aware helpers, local spawning.

A process finds out whether it is one of several from its environment, in this order:

- torchrun (or `python -m experiments run --gpus N/--nproc N`, which spawns processes the same way):
  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- a SLURM job step (`srun`, as in the jobs of `python -m experiments submit`): SLURM_PROCID,
  SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the master address is the first host of the step's node list and
  the port is derived from the job id (the same for every task, different for concurrent jobs). The
  batch script itself (no srun) has no SLURM_STEP_NUM_TASKS and runs as a single process;
- otherwise: a single process.

With more than one process, `setup()` initialises torch.distributed: NCCL with one GPU per process
(cuda:LOCAL_RANK) when CUDA is available, gloo on CPU otherwise (or when `device="cpu"` is asked for).
"""
import datetime
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import RunError

TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 may evaluate (COCOeval) while the others wait
STOP_WAIT_S = 300  # after a signal, how long spawn() waits for its processes to checkpoint and stop


LOCAL_LAUNCH = "EXPERIMENTS_LOCAL_LAUNCH"  # set by spawn(): the option that started the processes


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "local" (spawn(), i.e. run --gpus/--nproc) or "slurm"


def first_host(nodelist):
    """The first host name of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003',
    'n[1-4]-ib' -> 'n1-ib', 'rack[1-2]-n[01-04]' -> 'rack1-n01'."""
    if not nodelist:
        return "127.0.0.1"
    text, host, i = nodelist.strip(), [], 0
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                break  # malformed: keep what was read
            host.append(text[i + 1:end].split(",")[0].split("-")[0])
            i = end + 1
        else:
            host.append(text[i])
            i += 1
    return "".join(host) or "127.0.0.1"


def slurm_port(job_id):
    """A port for the rendezvous of a SLURM job, derived from its id (requeued jobs keep it)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits) % 20000


def from_environment(environ=None):
    """The Launch described by torchrun's or a SLURM step's environment variables, or None."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "local" if LOCAL_LAUNCH in env else "torchrun"
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), source)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      first_host(nodes), slurm_port(env.get("SLURM_JOB_ID", 0)), "slurm")
    return None


@dataclass
class Context:
    """Where this process stands: rank, world size, its device; collective helpers that are no-ops
    for a single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    source: str = "single"
    owns_group: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """A list of every rank's `obj` (in rank order) on rank 0, None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_reduce_sum(self, tensor):
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


class DeviceError(RunError):
    """A --device that is not a device, or names one this machine does not have."""


DEVICES = "cpu, cuda or cuda:N (N: the GPU's index)"


def pick_device(name=None, local_rank=0):
    """The torch device of this process: `name` (a --device option) when given, else
    cuda:`local_rank` (modulo the GPUs visible) when CUDA is available, else the CPU. A DeviceError
    (one line) when `name` is not one of DEVICES (mps too, where available) or names a GPU this
    machine does not have; every command calls it before any data or model is built."""
    if name:
        return _named_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _named_device(name):
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # "gpu", "cdua", "cuda:x"
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: unknown device; expected {DEVICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is available on this machine (torch.cuda.is_available() "
                              f"is False); run without --device to use the CPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: no MPS device is available on this machine; run without --device to use "
                          f"the CPU")
    return device


def setup(device=None, environ=None):
    """The Context of this process; initialises the process group when it is one of several."""
    launch = from_environment(environ)
    if launch is None or launch.world_size <= 1:
        return Context(device=pick_device(device), source=launch.source if launch else "single")
    dev = pick_device(device, launch.local_rank)
    if dev.type == "cuda":
        # pick_device took local_rank modulo the visible GPUs: clusters that show each task only its
        # own GPU (CUDA_VISIBLE_DEVICES per task) give every process cuda:0
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():  # set up by the caller (a test, a wrapper)
        return Context(dist.get_rank(), dist.get_world_size(), launch.local_rank, dev, launch.source, False)
    dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                            rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT)
    return Context(launch.rank, launch.world_size, launch.local_rank, dev, launch.source, True)


# --------------------------------------------------------------------------------------------------
# several processes on this machine (`run --gpus N` / `--nproc N`)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerFailed(RuntimeError):
    pass


def _worker(local_rank, nprocs, port, launch_option, fn, args, kwargs):
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       LOCAL_LAUNCH: launch_option})
    for var in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):  # this launch, not an enclosing srun step
        os.environ.pop(var, None)
    if nprocs > 1 and torch.get_num_threads() > 1:  # N CPU processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        fn(*args, **kwargs)
    except KeyboardInterrupt as e:  # Ctrl-C or signals.Stopped: an exit code, not torch's silent 0
        sys.exit(128 + (getattr(e, "signum", 0) or signal.SIGINT))
    except Exception as e:
        from .errors import is_user_error

        if is_user_error(e):  # already a clear message: no traceback
            print(f"error (rank {local_rank}): {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        raise


def exit_message(index, code):
    """Why training process `index` ended with exit code `code`: its own error (printed by it), or,
    for a negative code, the signal that killed it (which leaves the process no time to print)."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"training process {index} was killed by {name}{hint}"
    return f"training process {index} exited with code {code} (its error is printed above)"


def spawn(nprocs, fn, *args, launch_option=None, **kwargs):
    """Runs fn(*args, **kwargs) in `nprocs` new processes that form one process group (ranks
    0..nprocs-1 on 127.0.0.1). `launch_option` (e.g. '--gpus 8') is how the command line asked for
    them (recorded with the run). Raises WorkerFailed when any of them fails."""
    import torch.multiprocessing as mp

    from .signals import Stopped

    port = free_port()
    option = launch_option or f"--nproc {nprocs}"
    context = mp.start_processes(_worker, args=(nprocs, port, option, fn, args, kwargs), nprocs=nprocs, join=False,
                                 start_method="spawn")
    received = []

    def forward(signum, frame):
        # SIGTERM or Ctrl-C for this launcher: every process writes its checkpoint and stops
        # (signals.Stopped); one that got the signal itself too counts the two as one
        received.append(signum)
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            if received:  # let every process finish its step and checkpoint before collecting them
                deadline = time.monotonic() + STOP_WAIT_S
                for p in context.processes:
                    p.join(max(0.0, deadline - time.monotonic()))
            try:
                if context.join(timeout=1):
                    break
            except mp.ProcessRaisedException as e:
                raise WorkerFailed(f"a training process raised an error:\n{e}") from None
            except mp.ProcessExitedException as e:
                if received:
                    raise Stopped(f"stopped by {signal.Signals(received[0]).name}", received[0]) from None
                raise WorkerFailed(exit_message(e.error_index, e.exit_code)) from None
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)

