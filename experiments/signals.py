"""Signals while a row runs: SIGTERM (what SLURM sends at a time limit or preemption) and SIGINT stop a
run with a checkpoint (StopRequest, Stopped); DataLoader workers leave both to the training process
and are stopped at exit (ignore_stop_signals, stop_workers_at_exit)."""
import multiprocessing
import multiprocessing.util
import signal
import threading
import time

import torch


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM, SIGINT). Like Ctrl-C it is an interruption, not a
    failure: the record stays resumable. `signum`: the signal (0 when another process got it);
    `saved`: whether a checkpoint was written for it (else the latest saved one is where it resumes)."""

    def __init__(self, message, signum, saved=False):
        super().__init__(message)
        self.signum, self.saved = signum, saved


class StopRequest:
    """SIGTERM (what SLURM sends at a time limit or preemption, before SIGKILL) and SIGINT while a
    row trains. While `in_steps` (the epochs, including their evaluations) the first signal is noted:
    the loop writes a checkpoint after the current optimizer step (or after the evaluation and the
    epoch's checkpoint) and raises Stopped. Outside (start-up, the final records), or on a second
    signal, Stopped (SIGTERM) or KeyboardInterrupt (SIGINT) is raised at once.

    Where the launcher handles SIGTERM itself (submitit ignores it and requeues on its own signal),
    SIGTERM only triggers that checkpoint: the launcher decides when the job ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    # The same signal again within this time is one signal delivered twice (to the process group
    # and forwarded by a launcher, experiments/distributed.spawn), not a second request.
    DUPLICATE_S = 2.0

    def __init__(self):
        self.signum = None  # the signal waiting for the end of the current step (negative: checkpoint only)
        self.in_steps = False
        self._previous = {}
        self._first = None  # (signal, time) of the first signal

    def install(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _launcher_handles(self, signum):
        previous = self._previous.get(signum)
        return callable(previous) and previous is not signal.default_int_handler

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self._first and self._first[0] == signum and now - self._first[1] < self.DUPLICATE_S:
            return
        self._first = (signum, now)
        if self._launcher_handles(signum):
            self._previous[signum](signum, frame)
            if self.in_steps and self.signum is None:
                self.signum = -signum  # negative: checkpoint, then go on
            return
        if self.in_steps and (self.signum is None or self.signum < 0):
            self.signum = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)

    @property
    def name(self):
        """The name of the signal that stops the run ('a signal' when another process got it)."""
        return signal.Signals(self.signum).name if self.signum and self.signum > 0 else "a signal"

    def poll(self, ctx):
        """After an optimizer step (or an epoch's checkpoint), on every process together: None,
        "checkpoint" (write one and go on) or "stop" (write one and stop)."""
        mine = self.signum or 0
        flags = torch.tensor([float(mine > 0), float(mine < 0)], dtype=torch.float64, device=ctx.device)
        if ctx.distributed:
            ctx.all_reduce_sum(flags)
        if flags[0] > 0:
            return "stop"
        if flags[1] > 0:
            self.signum = None
            return "checkpoint"
        return None


def ignore_stop_signals(_worker_id=None):
    """DataLoader worker_init_fn: SIGINT and SIGTERM are for the training process (StopRequest), which
    stops its workers itself; a worker killed by the terminal's Ctrl-C would break the last step.
    Such a worker is killed at exit by `stop_workers_at_exit`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


WORKER_EXIT_GRACE_S = 1.0


def stop_workers_at_exit():
    """At exit, multiprocessing stops the daemonic children still running (DataLoader workers) with
    SIGTERM and then waits for them without a time limit. Workers that ignore SIGTERM
    (ignore_stop_signals) would make that wait endless: this happens when an error (a data error in a
    worker, say) ends the process while a loader iterator is still referenced by the traceback. So
    do the same first, and SIGKILL those still alive after a grace period. Run by multiprocessing's
    exit function before its own wait (below), at the exit of a main process and of a spawned one
    (`run --nproc`), whose exit skips atexit."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would raise "DataLoader worker ... is killed by signal" here
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.terminate()
    deadline = time.monotonic() + WORKER_EXIT_GRACE_S
    for p in children:
        p.join(max(deadline - time.monotonic(), 0.0))
        if p.is_alive():
            p.kill()
            p.join(1.0)


# exit finalizers (exitpriority >= 0) run before multiprocessing terminates and joins the children
# (after those of higher priority, such as multiprocessing.Pool's own, which stops its workers)
multiprocessing.util.Finalize(None, stop_workers_at_exit, exitpriority=1)
