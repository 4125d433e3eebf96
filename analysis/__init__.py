"""Regenerate the paper's tables, Fig. 4 and training curves from the run records in results/.

    python -m analysis tables [--manifest NAME|PATH]
    python -m analysis fig4 --manifest NAME --row ROW
    python -m analysis curves --manifest NAME [--row ROW]

The analysis reads only run records, with their reader and states (experiments/records.py:
read_run, STATES): log.jsonl, eval.json, DONE, FAILED, config.yaml and heartbeat.json under
results/runs/<manifest>/<row>/. A run without DONE is never shown as a result.
"""
import math

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


def number(value):
    """A metric value as a float; NaN when it is missing, null or not a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def load_run(manifest, row, results=records.RESULTS):
    """The records of a manifest row (records.read_run: state, label, log, last_epoch, eval); a done
    run's eval.json is read here, so that a broken record is a RunError before anything is drawn."""
    run = records.read_run(records.run_dir(manifest, row, results))
    run.eval  # noqa: B018 - reads and checks eval.json of a done run
    return run
