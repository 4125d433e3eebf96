"""Did training learn? One line per manifest row from its records: the student's AP50, the AP50 of
the same detections moved to other images (`train.eval_moved`), their ratio, the teachers' AP50, the
class loss of the first and last epoch, and the wall time of the run.

A detector that has only learnt the data set's box statistics scores the same AP50 on other images
as on its own; one that reads the images scores several times more on its own. A class loss that
stays at its second-epoch value means the classes are not being learnt. The demo's ladder
(experiments/demo_ladder.yaml) is read with this table.

    python -m analysis learning --manifest demo_ladder    # results/tables/demo_ladder_learning.{md,csv}
"""
import math
from pathlib import Path

import pandas as pd

from experiments import records

from . import load_manifest, load_run, metric, number, run_minutes
from .tables import MOVED, percent

COLUMNS = ["manifest_row", "setting", "status", "epochs", "AP50", "AP50_moved", "ratio", "AP50_attn2", "AP50_attn3",
           "AP", "loss_class_first", "loss_class_last", "minutes"]


def learning_report(manifest_name, results=records.RESULTS):
    manifest = load_manifest(manifest_name)
    lines = []
    for name, row in manifest.rows.items():
        run = load_run(*manifest.record_of(name), results)
        setting = " ".join(str(row.get("note") or "").split())
        line = dict.fromkeys(COLUMNS, math.nan)
        line.update(manifest_row=name, setting=setting, status=run.label, epochs=run.last_epoch)
        if run.log:
            losses = [number((e.get("train") or {}).get("loss_class")) for e in run.log]
            line.update(loss_class_first=round(losses[0], 3), loss_class_last=round(losses[-1], 3),
                        minutes=round(run_minutes(run), 1))
        if run.state == "done":
            ev = run.eval
            student = percent(ev.get("attn1"))
            line.update(AP50=student["AP50"], AP=student["AP"], AP50_moved=percent(ev.get(MOVED))["AP50"],
                        AP50_attn2=percent(ev.get("attn2"))["AP50"], AP50_attn3=percent(ev.get("attn3"))["AP50"])
            moved = metric(ev.get(MOVED, {}).get("AP50"))
            if moved > 0:  # from the unrounded AP50s: a rounded 0.4 may be 0.35 or 0.44
                line["ratio"] = round(metric(ev.get("attn1", {}).get("AP50")) / moved, 1)
        lines.append(line)
    return manifest.name, pd.DataFrame(lines, columns=COLUMNS)


def _cell(v, fmt="{:.1f}"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def to_markdown(name, df):
    header = ["Row", "Setting", "Status", "Epochs", "AP50", "AP50 on other images", "ratio", "AP50 Attn2 (GT)",
              "AP50 Attn3 (GT)", "AP", "loss_class first → last", "minutes"]
    rows = [header, ["---", "---", "---"] + ["---:"] * (len(header) - 3)]
    for _, r in df.iterrows():
        loss = (f"{r['loss_class_first']:.3f} → {r['loss_class_last']:.3f}"
                if not math.isnan(r["loss_class_last"]) else "")
        rows.append([r["manifest_row"], r["setting"].replace("|", "\\|"), r["status"], _cell(r["epochs"], "{:.0f}"),
                     _cell(r["AP50"]), _cell(r["AP50_moved"]), _cell(r["ratio"]), _cell(r["AP50_attn2"]),
                     _cell(r["AP50_attn3"]), _cell(r["AP"]), loss, _cell(r["minutes"])])
    table = "\n".join("| " + " | ".join(cells) + " |" for cells in rows)
    return (f"# {name}: does it learn?\n\n{table}\n\nCOCO AP50 in percent of the student (attn1) on the validation "
            f"images; 'on other images': the same detections given to the next image (a detector that ignores its "
            f"input scores its own AP50 there); teachers with ground-truth masks; loss_class: the focal class loss "
            f"(mean of the first and of the last epoch); minutes: the wall time of the epochs (training and "
            f"evaluation) as recorded. Only finished runs show AP.\n")


def write_learning(manifest_name, results=records.RESULTS):
    """Writes results/tables/<manifest>_learning.{md,csv}; returns the markdown."""
    name, df = learning_report(manifest_name, results)
    folder = Path(results) / "tables"
    markdown = to_markdown(name, df)
    records.atomic_write(folder / f"{name}_learning.md", markdown)
    records.atomic_write(folder / f"{name}_learning.csv", df.to_csv(index=False))
    return markdown
