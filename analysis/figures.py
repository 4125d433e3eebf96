"""Figures from log.jsonl: the paper's Fig. 4 (AP of the baseline, the student Attn1 and the teachers
Attn2/Attn3 against epoch) and training-loss curves. Epochs are plotted as log.jsonl numbers them.

Both functions return (figure, series): series maps each drawn line's label to its (epochs, values),
exactly the data handed to matplotlib. Files go to results/figures/ as PNG and PDF, written atomically.
"""
import io
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments import records  # noqa: E402

from . import VARIANT_NAMES, AnalysisError, DamagedRun, load_manifest, load_run, metric  # noqa: E402

LOSSES = {"loss": "total", "loss_attn1": "Attn1", "loss_attn2": "Attn2", "loss_attn3": "Attn3"}
STATE_MARK = {"done": "", "interrupted": " (interrupted)", "running": " (running)", "failed": " (failed)"}


def model_name(manifest, row):
    """e.g. 'KS-DAB-DETR-R18' from the row's resolved configuration."""
    model = manifest.resolve(row)["model"]
    backbone = model["backbone"]["name"].replace("resnet", "R")
    name = f"{VARIANT_NAMES.get(model['variant'], model['variant'])}-{backbone}"
    return name if model["ks"]["mode"] == "none" else "KS-" + name


def ap_series(log, branch):
    """(epochs, AP x100) of one branch over the epochs that evaluated it; NaN and -1 (COCO: nothing to
    measure) points left out."""
    xs, ys = [], []
    for entry in log:
        metrics = (entry.get("eval") or {}).get(branch) or {}
        ap = metric(metrics.get("AP"))
        if not math.isnan(ap):
            xs.append(entry["epoch"])
            ys.append(100 * ap)
    return xs, ys


def save_figure(fig, path_stem):
    """path_stem.png and path_stem.pdf, each rendered in memory and written atomically."""
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight",
                    metadata={"CreationDate": None} if ext == "pdf" else None)
        path = Path(f"{path_stem}.{ext}")
        records.atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def fig4(manifest, row, results=records.RESULTS):
    """AP against epoch for the row's baseline and the row's Attn1, Attn2 and Attn3 (paper Fig. 4)."""
    manifest.row(row)
    run = load_run(*manifest.record_of(row), results, warn=False)  # damaged: the error below says so
    if isinstance(run, DamagedRun):
        raise AnalysisError(f"{manifest.name} / {row}: nothing drawn, the record is damaged: {run.problem}")
    if not any(ap_series(run.log, b)[0] for b in ("attn1", "attn2", "attn3")):
        raise AnalysisError(f"{manifest.name} / {row}: no finished runs to draw: no evaluated epoch in "
                            f"{run.directory / 'log.jsonl'} ({run.label}); no figure written")
    lines = []
    base = manifest.rows[row].get("baseline")
    if base is None:
        _warn(f"{manifest.name} / {row} has no baseline row in {manifest.path}; no Baseline curve")
    else:
        base_run = load_run(*manifest.record_of(base), results)
        points = ap_series(base_run.log, "attn1")
        if points[0]:
            lines.append(("Baseline" + STATE_MARK.get(base_run.state, ""), points, "k", "--"))
        else:
            _warn(f"baseline row {base!r} has no evaluated epoch ({base_run.label}); no Baseline curve")
    mark = STATE_MARK.get(run.state, "")
    for branch, color in (("attn1", "tab:blue"), ("attn2", "tab:orange"), ("attn3", "tab:green")):
        xs, ys = ap_series(run.log, branch)
        if xs:
            lines.append((f"Attn{branch[-1]}{mark}", (xs, ys), color, "-"))
        elif branch != "attn1":
            _warn(f"{manifest.name} / {row}: no {branch} evaluation in log.jsonl (not a KS row, or teachers "
                  f"not evaluated)")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    series = {}
    for label, (xs, ys), color, style in lines:
        ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=label)
        series[label] = (xs, ys)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("AP")
    teachers = [label.split(" ")[0] for label in series if label.startswith(("Attn2", "Attn3"))]
    title = f"{model_name(manifest, row)} ({manifest.name} / {row})"
    if teachers:
        mask = ("GT Fg-Bg masks" if manifest.resolve(row)["model"]["ks"]["mask"] == "gt" else
                "all-background masks (model.ks.mask: none)")
        title += f"\n{', '.join(teachers)}: teacher{'s' if len(teachers) > 1 else ''} evaluated with {mask}"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    return fig, series


def _seed_band(runs, branch):
    """(epochs, mean, min, max) of one branch's AP over the runs, at the epochs every run evaluated."""
    per_run = [dict(zip(*ap_series(run.log, branch))) for run in runs]
    per_run = [points for points in per_run if points]
    if not per_run:
        return None
    epochs = sorted(set.intersection(*(set(points) for points in per_run)))
    values = [[points[e] for points in per_run] for e in epochs]
    return (epochs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def fig4_seeds(manifest, results=records.RESULTS):
    """Fig. 4 over training seeds: one panel per group of KS seed rows (rows that differ only in
    train.seed) with teachers, in manifest order: AP against epoch of the student Attn1, the teachers
    Attn2/Attn3 (GT masks) and the rows' baselines: the mean over the seeds with the range (min to
    max) shaded, at the epochs that every run of the group has evaluated (an unfinished run shortens
    the curves of its group)."""
    from .comparisons import seed_groups

    panels, empty = [], []
    for group, rows in seed_groups(manifest, smallest=1).items():
        cfg = manifest.resolve(rows[0])
        if cfg["model"]["ks"]["mode"] == "none":
            continue
        runs = [load_run(*manifest.record_of(r), results) for r in rows]
        if not any(ap_series(run.log, b)[0] for run in runs for b in ("attn1", "attn2", "attn3")):
            empty.append(group)
            continue
        bases = [manifest.rows[r].get("baseline") for r in rows]
        base_runs = [load_run(*manifest.record_of(b), results) for b in bases if b]
        panels.append((group, rows, runs, base_runs))
    if not panels:
        if not empty:
            raise AnalysisError(f"{manifest.path}: no KS rows to draw")
        raise AnalysisError(f"{manifest.name}: no finished runs to draw: no KS row ({', '.join(empty)}) has an "
                            f"evaluated epoch under {Path(results) / 'runs'}; no figure written")
    for group in empty:
        _warn(f"{manifest.name} / {group}: no KS row of the group has an evaluated epoch; no panel")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    series = {}
    for ax, (group, rows, runs, base_runs) in zip(axes.flat, panels):
        lines = [("Baseline", _seed_band(base_runs, "attn1"), "k", "--")]
        lines += [(f"Attn{b[-1]}", _seed_band(runs, b), c, "-")
                  for b, c in (("attn1", "tab:blue"), ("attn2", "tab:orange"), ("attn3", "tab:green"))]
        for label, band, color, style in lines:
            if band is None:
                continue
            xs, mean, lo, hi = band
            ax.plot(xs, mean, style, color=color, marker="o", markersize=2.5, label=label)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            series[f"{group} / {label}"] = band
        done = sum(run.state == "done" for run in runs)
        told = "" if manifest.resolve(rows[0])["model"]["ks"]["mask"] == "gt" else ", teachers without mask"
        ax.set_title(f"{model_name(manifest, rows[0])} ({group})\n{done}/{len(runs)} seeds done{told}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("AP")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{manifest.name}: mean over training seeds, range shaded; Attn2, Attn3: teachers evaluated "
                 f"with the mask they were trained with (GT Fg-Bg unless the panel says otherwise)", fontsize=10)
    fig.tight_layout()
    return fig, series


def write_fig4_seeds(name_or_path, results=records.RESULTS):
    """results/figures/<manifest>_fig4.{png,pdf}: fig4_seeds of the manifest."""
    manifest = load_manifest(name_or_path)
    fig, _ = fig4_seeds(manifest, results)
    paths = save_figure(fig, Path(results) / "figures" / f"{manifest.name}_fig4")
    plt.close(fig)
    return paths


def curves(manifest, rows=None, results=records.RESULTS):
    """Training losses (total and per branch) against epoch, one subplot per row that has a log."""
    rows = list(manifest.rows) if rows is None else rows
    runs = {}
    for row in rows:
        manifest.row(row)
        run = load_run(*manifest.record_of(row), results)
        if run.log:
            runs[row] = run
        else:
            _warn(f"{manifest.name} / {row}: no finished epoch ({run.label}); left out")
    if not runs:
        raise AnalysisError(f"manifest {manifest.name}: no run with a finished epoch among {rows} "
                            f"under {Path(results) / 'runs' / manifest.name}")
    ncols = min(len(runs), 3)
    nrows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.5 * nrows), squeeze=False)
    series = {}
    for ax, (row, run) in zip(axes.flat, runs.items()):
        series[row] = {}
        for key, label in LOSSES.items():
            points = [(e["epoch"], e["train"][key]) for e in run.log
                      if isinstance((e.get("train") or {}).get(key), (int, float))
                      and not math.isnan(e["train"][key])]
            if points:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                ax.plot(xs, ys, marker="o", markersize=2, label=label)
                series[row][label] = (xs, ys)
        ax.set_title(row + STATE_MARK.get(run.state, ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if series[row]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.suptitle(f"Training losses: {manifest.name}")
    fig.tight_layout()
    return fig, series


def write_fig4(name_or_path, row, results=records.RESULTS):
    manifest = load_manifest(name_or_path)
    fig, _ = fig4(manifest, row, results)
    paths = save_figure(fig, Path(results) / "figures" / f"{manifest.name}_{row}_fig4")
    plt.close(fig)
    return paths


def write_curves(name_or_path, row=None, results=records.RESULTS):
    """results/figures/<manifest>_curves.{png,pdf}, or <manifest>_<row>_curves for one row."""
    manifest = load_manifest(name_or_path)
    fig, _ = curves(manifest, None if row is None else [row], results)
    stem = f"{manifest.name}_curves" if row is None else f"{manifest.name}_{row}_curves"
    paths = save_figure(fig, Path(results) / "figures" / stem)
    plt.close(fig)
    return paths
