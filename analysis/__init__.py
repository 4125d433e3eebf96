"""Regenerate the paper's tables, Fig. 4 and training curves from the run records in results/.

    python -m analysis tables [--manifest NAME|PATH]
    python -m analysis fig4 --manifest NAME --row ROW
    python -m analysis curves --manifest NAME [--row ROW]

The analysis reads only run records (experiments/records.py): log.jsonl, eval.json, DONE, FAILED and
config.yaml under results/runs/<manifest>/<row>/. A run without DONE is never shown as a result.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from experiments import records

BRANCHES = ("attn1", "attn2", "attn3")
VARIANT_NAMES = {"conditional_detr": "Conditional-DETR", "dab_detr": "DAB-DETR", "dn_detr": "DN-DETR",
                 "deformable_detr": "Deformable-DETR", "dn_deformable_detr": "DN-Deformable-DETR"}


class AnalysisError(ValueError):
    """Bad input (unknown manifest or row, malformed record); the CLI prints it without a traceback."""


def load_manifest(name_or_path):
    """The experiments Manifest (imported here: experiments.config pulls in torch via models)."""
    from experiments.config import Manifest

    return Manifest(name_or_path)


def read_log(path):
    """The epoch records of a log.jsonl ([] when the file is missing); a line that is not an epoch
    record is an AnalysisError naming the file and the line (records.scan_log reads it)."""
    entries, problem = records.scan_log(path)
    if problem:
        raise AnalysisError(problem)
    return entries


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise AnalysisError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def number(value):
    """A metric value as a float; NaN when it is missing, null or not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


@dataclass
class Run:
    """What the records of one manifest row say.

    state: 'done' (DONE and eval.json), 'failed', 'incomplete' (started, not finished) or 'not run'."""
    directory: Path
    state: str
    log: list = field(default_factory=list)
    eval: dict = None

    @property
    def last_epoch(self):
        return self.log[-1]["epoch"] if self.log else None

    @property
    def label(self):
        if self.state == "incomplete":
            return f"incomplete (epoch {self.last_epoch})" if self.log else "incomplete (no epoch finished)"
        return self.state


def load_run(manifest, row, results=records.RESULTS):
    directory = records.run_dir(manifest, row, results)
    log = read_log(directory / "log.jsonl")
    if (directory / "DONE").is_file():
        if not (directory / "eval.json").is_file():
            raise AnalysisError(f"{directory}: DONE exists but eval.json is missing (broken record)")
        return Run(directory, "done", log, read_json(directory / "eval.json"))
    if (directory / "FAILED").is_file():
        return Run(directory, "failed", log)
    if log or (directory / "config.yaml").is_file():
        return Run(directory, "incomplete", log)
    return Run(directory, "not run")
