"""Run records under results/runs/<manifest>/<row>/ (the only files the analysis reads).

    config.yaml     the resolved configuration
    command.txt     the command line(s) that produced the run (one line per start or resume)
    env.json        git SHA, versions, device, world size, batch sizes, backbone initialisation
    log.jsonl       one JSON line per finished epoch: {"epoch", "lr", "train": {...},
                    "eval": {"attn1": {AP...}, "attn2": {...}, "attn3": {...}}, "time_s"}
    eval.json       final COCO metrics per branch (fractions in [0, 1])
    DONE            written last and atomically, after the final evaluation
    checkpoint.pth  the latest epoch (git-ignored)

Every file is written atomically (temporary file + rename), so a reader never sees half a record.
"""
import json
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run_dir(manifest, row, results=RESULTS):
    return Path(results) / "runs" / manifest / row


def atomic_write(path, data):
    """Writes text or bytes to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
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


def read_log(path):
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_command(manifest, row, overrides=(), resume=False):
    """The command line that (re)produces a run."""
    args = ["run", manifest, "--row", row] + (["--resume"] if resume else []) + list(overrides)
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


def status(directory):
    """'done', 'failed', 'interrupted' (started, not finished), or 'not started'."""
    d = Path(directory)
    if (d / "DONE").is_file():
        return "done"
    if (d / "FAILED").is_file():
        return "failed"
    if (d / "config.yaml").is_file():
        return "interrupted"
    return "not started"
