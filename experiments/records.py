"""Run records under results/runs/<manifest>/<row>/ (the only files the analysis reads), and their one
reader (`read_run`).

Files: config.yaml, command.txt (one line per start or resume), env.json (rewritten per start),
log.jsonl (one line per finished epoch), eval.json (final metrics per branch, fractions in [0, 1]),
detections-<branch>.json, DONE (written last), FAILED (removed on resume; an interruption writes
none), checkpoint.pth and checkpoint.prev.pth, heartbeat.json (refreshed every HEARTBEAT_INTERVAL_S
while a process trains the row), slurm.json (its SLURM submissions: slurm/jobs.py), and
eval-<time>.json of `python -m experiments eval`.
Beside each row's folder, `.<row>.lock` is locked while a launch decides how the row starts. What
each file holds: docs/experiments.md, "Run records".

Status of a row (`status()`, STATES): "done" (DONE), "failed" (FAILED), "running" (a fresh
heartbeat), "interrupted" (started, not finished, nothing running: resume it), "not started". A
heartbeat older than HEARTBEAT_STALE_S, or one left by a process of this host that no longer exists,
is stale.

Every file is written atomically (temporary file, fsync, rename), so a reader never sees half a
record, with the permissions a plain open() gives (as checkpoints).
"""
import contextlib
import fcntl
import functools
import json
import os
import shlex
import socket
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from slurm import jobs as slurm_jobs

from .errors import RunError

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run_dir(manifest, row, results=RESULTS):
    return Path(results) / "runs" / manifest / row


def atomic_write(path, data):
    """Writes text or bytes to `path` via a temporary file in the same folder, fsync and a rename.
    The file gets the permissions a plain open() would give (mkstemp's are 0600), as checkpoints do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created like open() creates files (0666 less the umask; mkstemp's would be 0600)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path, obj):
    atomic_write(path, yaml.safe_dump(obj, sort_keys=False))


def write_log(path, records):
    """log.jsonl from the full list of epoch records (rewritten whole: it is small)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


class DamagedLog(RunError):
    """A log.jsonl line that is not an epoch record; the message names the file and the line."""


def scan_log(path):
    """(the epoch records of a log.jsonl, None) when every line is an epoch record, else (the records
    before the first bad line, a message naming the file, the line and what is wrong); ([], None)
    when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return [], None
    text = path.read_text(errors="replace")  # garbage bytes: a line that is not JSON, named below
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            # an append cut short (a crash, a full disk) leaves a last line without its newline
            cut = " (the last line, cut short)" if number == len(lines) and not text.endswith("\n") else ""
            return out, f"{path}, line {number}{cut}: not valid JSON ({e.msg}, column {e.colno})"
        if not isinstance(entry, dict) or not isinstance(entry.get("epoch"), int) or isinstance(entry["epoch"], bool):
            return out, (f"{path}, line {number}: expected an object with an integer 'epoch', "
                         f"got {line.strip()[:80]!r}")
        out.append(entry)
    return out, None


def read_log(path):
    """The epoch records of a log.jsonl ([] when the file is missing); DamagedLog (a RunError)
    naming the file and the line when one is not an epoch record."""
    entries, problem = scan_log(path)
    if problem:
        raise DamagedLog(f"{problem}; the run record is damaged (`run ... --resume` of an unfinished run rewrites "
                         f"the log from its checkpoint)")
    return entries


def read_config(path):
    """The configuration recorded in a run's config.yaml (a dict); a RunError naming the file when it
    is missing, not YAML or not a mapping."""
    path = Path(path)
    damaged = "the run record is damaged; --force starts the row over (moving the record aside)"
    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} is missing; {damaged}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}); {damaged}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RunError(f"{path} is not valid YAML ({problem}{where}); {damaged}") from None
    if not isinstance(cfg, dict):
        got = "nothing" if cfg is None else f"a {type(cfg).__name__}"
        raise RunError(f"{path}: expected a mapping of configuration keys, got {got}; {damaged}")
    return cfg


def run_command(manifest, row, overrides=(), resume=False, options=()):
    """The command line that (re)produces a run (`options`: e.g. ['--gpus', '8'])."""
    args = ["run", manifest, "--row", row] + (["--resume"] if resume else []) + list(options) + list(overrides)
    return f"python -m experiments {shlex.join(args)}"


def append_command(path, command):
    """Adds one time-stamped line per start or resume of the run."""
    old = Path(path).read_text() if Path(path).is_file() else ""
    atomic_write(path, old + f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n")


def git_sha():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


HEARTBEAT = "heartbeat.json"
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_STALE_S = 300
LOCK_TIMEOUT_S = 600  # a launch deciding how a row starts holds its lock for well under a second
STATES = ("not started", "running", "interrupted", "done", "failed")


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OSError):
        return True  # exists but not ours, or unknown: assume alive
    return True


def heartbeat_holder(directory, now=None):
    """The live heartbeat of a run (a dict), or None when there is none or it is stale."""
    beat = read_json(Path(directory) / HEARTBEAT)
    if not isinstance(beat, dict) or not isinstance(beat.get("time"), (int, float)):
        return None
    if (now or time.time()) - beat["time"] > HEARTBEAT_STALE_S:
        return None
    if beat.get("host") == socket.gethostname() and not _pid_alive(beat.get("pid")):
        return None
    return beat


_deciding = threading.local()  # .notes: the messages held back while row_lock() is held


def print_when_decided(message):
    """Prints `message` (about how a row starts) once the launch has decided: when the row_lock()
    around the decision is released without an error; at once outside a row_lock(). So a note such
    as "already done" never comes before an error that refuses the launch after all."""
    notes = getattr(_deciding, "notes", None)
    if notes is None:
        print(message, flush=True)
    else:
        notes.append(message)


@contextlib.contextmanager
def row_lock(directory, timeout_s=LOCK_TIMEOUT_S):
    """Holds an exclusive lock for one run directory (a `.<row>.lock` file beside it, which --force
    never moves), so that two launches of the same row on this machine, or on machines sharing a file
    system with coherent locks, decide how it starts one after the other: the first claims it
    (heartbeat) inside the lock and the second then sees that claim. Where the file cannot be
    locked, a note says so and only the heartbeat guards the row. Messages of print_when_decided()
    are printed when the lock is released, unless the block raised."""
    directory = Path(directory)
    path = directory.parent / f".{directory.name}.lock"
    f, locked = None, False
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
        start, said = time.monotonic(), False
        while not locked:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout_s:
                    raise TimeoutError(f"{path} has been locked by another launch of this row for "
                                       f"{int(waited)} s; is it stuck?") from None
                if not said and waited > 5:
                    print(f"waiting for {path} (another launch of this row is deciding how it starts)",
                          flush=True)
                    said = True
                time.sleep(0.2)
    except TimeoutError:
        f.close()
        raise
    except OSError as e:  # no flock (Lustre mounted without it), a read-only or foreign lock file
        if f is not None:
            f.close()
            f = None
        print(f"note: cannot lock {path} ({e.strerror or e}); only the heartbeat guards against a second "
              f"launch of this row", flush=True)
    outer, _deciding.notes = getattr(_deciding, "notes", None), []
    try:
        yield
        notes = _deciding.notes
    finally:
        _deciding.notes = outer  # an error drops the held notes
        if f is not None:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
    for message in notes:
        print_when_decided(message)


class Heartbeat:
    """Keeps results/runs/<manifest>/<row>/heartbeat.json fresh while a run trains: a daemon thread
    rewrites it every `interval` seconds with the time and the progress set by `update()`; `stop()`
    removes it. Only the process that writes the records (rank 0) runs one."""

    def __init__(self, directory, interval=HEARTBEAT_INTERVAL_S):
        self.path = Path(directory) / HEARTBEAT
        self.interval = interval
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_jobs.job_id(),
                     "slurm_restart": slurm_jobs.restart_count(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": None, "iteration": None,
                     "phase": "starting"}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def update(self, **progress):
        """Sets the progress; a new phase (train, eval) is written at once, the rest with the next beat."""
        with self._lock:
            new_phase = "phase" in progress and progress["phase"] != self.info.get("phase")
            self.info.update(progress)
        if new_phase and self._thread is not None:
            self.beat()

    def beat(self):
        with self._lock:
            info = dict(self.info, time=time.time())
        try:
            write_json(self.path, info)
        except OSError:
            pass  # a full or unreachable disk must not kill the training; the heartbeat goes stale

    def start(self):
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        beat = read_json(self.path)
        if isinstance(beat, dict) and beat.get("pid") == self.info["pid"] and beat.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)


def status(directory, now=None):
    """'done', 'failed', 'running' (a live heartbeat), 'interrupted' (started: a config.yaml or a
    log.jsonl; not finished, not running) or 'not started'."""
    d = Path(directory)
    if (d / "DONE").is_file():
        return "done"
    if (d / "FAILED").is_file():
        return "failed"
    if heartbeat_holder(d, now) is not None:
        return "running"
    if (d / "config.yaml").is_file() or (d / "log.jsonl").is_file():
        return "interrupted"
    return "not started"


def last_epoch(directory):
    return read_run(directory).last_epoch


@dataclass
class RunRecord:
    """What the records of one row say (`read_run`): its state (STATES), its epoch records (log.jsonl)
    and, read when first asked for, the final metrics of a done run (eval.json; None otherwise)."""
    directory: Path
    state: str
    log: list

    @property
    def last_epoch(self):
        return self.log[-1]["epoch"] if self.log else None

    @property
    def label(self):
        """The state, with the last finished epoch of a run that has not finished."""
        if self.state in ("interrupted", "running"):
            return f"{self.state} (epoch {self.last_epoch})" if self.log else f"{self.state} (no epoch finished)"
        return self.state

    @functools.cached_property
    def eval(self):
        """eval.json of a done run; a RunError naming the file when it is missing or not JSON, and a
        DamagedRecord (a RunError) when its content is not the metrics of its branches (`eval_problem`)."""
        if self.state != "done":
            return None
        path = self.directory / "eval.json"
        if not path.is_file():
            raise RunError(f"{self.directory}: DONE exists but eval.json is missing (broken record)")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise DamagedRecord(path, f"not UTF-8 text (byte {e.start}); expected JSON") from None
        problem = eval_problem(doc)
        if problem:
            raise DamagedRecord(path, problem)
        return doc

    def check(self):
        """Reads and checks what the analysis takes from the record: eval.json of a done run (`eval`)
        and the metrics of every evaluation in log.jsonl (`log_problem`); a RunError (DamagedRecord)
        naming the file and what is wrong."""
        self.eval  # noqa: B018 - reads and checks eval.json
        problem = log_problem(self.log)
        if problem:
            raise DamagedRecord(self.directory / "log.jsonl", problem)
        return self


class DamagedRecord(RunError):
    """A record file whose content is not what it should hold; `path` is the file."""

    def __init__(self, path, problem):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


NO_VALUE = -1  # COCOeval's value of a metric that has nothing to measure (e.g. no small objects)
EXPECTED_METRIC = "expected a number in [0, 1], or -1 (COCO: nothing to measure)"


def metric_problem(value):
    """None when `value` is a metric as the records hold them: a number in [0, 1], -1 (COCO: nothing
    to measure) or NaN (undefined, e.g. the moved-detections score with fewer than two images);
    otherwise what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{json.dumps(value)[:40]} is not a number; {EXPECTED_METRIC}"
    if value != value or value == NO_VALUE or 0 <= value <= 1:
        return None
    return f"{value!r} is {'not finite' if abs(value) == float('inf') else 'out of range'}; {EXPECTED_METRIC}"


def _branches_problem(branches, where):
    """What is wrong with {branch: {metric: value}} (a problem message starting with `where`), or None."""
    for branch, metrics in branches.items():
        if not isinstance(metrics, dict):
            return f"{where}{branch}: expected an object of metrics, got {json.dumps(metrics)[:40]}"
        for m in METRICS:
            if m in metrics:
                problem = metric_problem(metrics[m])
                if problem:
                    return f"{where}{branch} {m}: {problem}"
    return None


def eval_problem(doc):
    """None when `doc` (eval.json's content) is an object with the student's metrics (`attn1`, with
    its AP at least) and every branch's metrics valid (`metric_problem`); otherwise what is wrong."""
    if not isinstance(doc, dict):
        got = "null" if doc is None else f"a {type(doc).__name__}" if isinstance(doc, (list, str)) else json.dumps(doc)
        return f"expected an object of branches (attn1, ...) holding their metrics, got {got}"
    epoch = doc.get("epoch")
    if "epoch" in doc and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        return f"'epoch' is {json.dumps(epoch)[:40]}; expected an integer"
    branches = {k: v for k, v in doc.items() if k != "epoch"}
    if not isinstance(branches.get("attn1"), dict) or "AP" not in branches["attn1"]:
        return "no student AP ('attn1': {'AP': ...}); expected the final metrics of each branch"
    return _branches_problem(branches, "")


def log_problem(entries):
    """None when every evaluation in the epoch records (log.jsonl's `eval`) holds valid metrics;
    otherwise what is wrong, naming the epoch."""
    for entry in entries:
        ev = entry.get("eval")
        if ev is None:
            continue
        where = f"epoch {entry['epoch']}: eval "
        if not isinstance(ev, dict):
            return f"{where}is {json.dumps(ev)[:40]}; expected an object of branches"
        problem = _branches_problem(ev, where)
        if problem:
            return problem
    return None


def read_run(directory, now=None):
    """The RunRecord of a run directory; DamagedLog when a log.jsonl line is not an epoch record."""
    d = Path(directory)
    return RunRecord(d, status(d, now), read_log(d / "log.jsonl"))
