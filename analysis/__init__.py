"""Regenerate the paper's tables, Fig. 4 and training curves from the run records in results/.

    python -m analysis tables [--manifest NAME|PATH]
    python -m analysis fig4 --manifest NAME --row ROW
    python -m analysis curves --manifest NAME [--row ROW]

The analysis reads only run records, with their reader and states (experiments/records.py:
read_run, STATES): log.jsonl, eval.json, DONE, FAILED, config.yaml and heartbeat.json under
results/runs/<manifest>/<row>/. A run without DONE is never shown as a result. Records are read and
checked in one place (`load_run`): a damaged one (a log line that is not an epoch record, an eval.json
that is missing, not JSON or holds metrics outside [0, 1]) is shown as "damaged (<file>)" with a line
on stderr, and the other rows still render.
"""
import math
import sys
from dataclasses import dataclass

from experiments import records
from experiments.errors import RunError

BRANCHES = ("attn1", "attn2", "attn3")
VARIANT_NAMES = {"conditional_detr": "Conditional-DETR", "dab_detr": "DAB-DETR", "dn_detr": "DN-DETR",
                 "deformable_detr": "Deformable-DETR", "dn_deformable_detr": "DN-Deformable-DETR"}


class AnalysisError(ValueError):
    """Bad input (unknown manifest or row, malformed record); the CLI prints it without a traceback."""


def load_manifest(name_or_path):
    """The experiments Manifest (imported here: experiments.config pulls in torch via models)."""
    from experiments.config import Manifest

    return Manifest(name_or_path)


def number(value):
    """A value as a float; NaN when it is missing, null or not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def run_minutes(run):
    """The minutes a run's logged epochs took (log.jsonl `time_s`, training and evaluation); NaN when an
    epoch has no time."""
    return sum(number(e.get("time_s")) for e in run.log) / 60


def metric(value):
    """A metric of a (checked) record as a float; NaN when it is missing, undefined or -1 (COCO:
    nothing to measure)."""
    value = number(value)
    return math.nan if value == records.NO_VALUE else value


@dataclass
class DamagedRun(records.RunRecord):
    """A row whose records cannot be used (`load_run`): no log, no metrics; `problem` says why."""
    problem: str = ""
    file: str = ""

    @property
    def label(self):
        return f"damaged ({self.file})"


_reported = set()  # the damaged records already named on stderr by this process (once each)


def load_run(manifest, row, results=records.RESULTS, warn=True):
    """The records of a manifest row (records.read_run: state, label, log, last_epoch, eval), read and
    checked here, the one place where the analysis reads them (RunRecord.check: eval.json of a done run,
    the metrics of log.jsonl). A damaged record (a log line that is not an epoch record, eval.json
    missing, not JSON or not valid metrics) gives a DamagedRun, state "damaged", with no log and no
    metrics, so that the other rows still render; a line on stderr names the file and what is wrong
    (`warn=False`: not, for a caller that makes it an error)."""
    directory = records.run_dir(manifest, row, results)
    try:
        return records.read_run(directory).check()
    except RunError as e:
        path = getattr(e, "path", None)
        file = path.name if path else "log.jsonl" if isinstance(e, records.DamagedLog) else "eval.json"
        message = f"warning: {manifest} / {row}: damaged record, shown as damaged: {e}"
        if warn and message not in _reported:
            _reported.add(message)
            print(message, file=sys.stderr)
        return DamagedRun(directory, "damaged", [], problem=str(e), file=file)
