"""Tables from run records: the paper's Tables 1 and 2 next to the reproduced numbers, or (for a
manifest whose rows point at no paper row, such as demo) the manifest's own results.

Numbers are COCO box AP in percent, rounded to 0.1 like the paper (records hold fractions). In the
tables beside the paper, differences (reproduced - paper) and KS gains (KS row - its baseline) are
computed from the rounded numbers, so the table's arithmetic checks out; the gains the paper prints
are ignored (some are wrong, e.g. KS-DN-Deformable-DETR-R50: printed +2.1, 46.5 - 43.4 = 3.1).
Everything over training seeds (means, sds, KS gains, gains from the mask, teacher minus student, and
the row-by-row KS gain) comes from the records' unrounded numbers (analysis/comparisons.py,
analysis/statistics.py) and is rounded only when printed.

Writes results/tables/<manifest>.md, .csv (plain numbers, empty when missing, plus a status column)
and .tex (a booktabs tabular); with seed groups also <manifest>_blocks.csv or <manifest>_seeds.csv and
<manifest>_comparisons.csv (one line per comparison and metric: analysis.comparisons.comparisons).
"""
import math
import sys
from pathlib import Path

import pandas as pd

from experiments import records

from . import BRANCHES, VARIANT_NAMES, AnalysisError, load_manifest, load_run, metric, number
from .comparisons import (GAINS, KS_GAIN, MARK, MASK_GAIN, comparisons, comparisons_markdown, group_info, marks_note,
                          mean_sd, per_pair, row_results, seed_groups)
from .comparisons import to_csv as comparisons_csv
from .statistics import mean_and_sd

PAPER_DIR = records.RESULTS / "paper"
METRICS = records.METRICS
MOVED = "attn1_moved"  # the student's detections scored on other images (train.eval_moved, eval --moved)
PAPER_MANIFESTS = {"table1": 1, "table2": 2}  # rendered from the paper alone while they do not exist
EXPERIMENT_NAMES = {"baseline": "baseline", "dual_attention_share_v": "dual attention, share V",
                    "dual_attention_share_a": "dual attention, share A", "triple_attention": "triple attention"}

PAPER_COLUMNS = (["section", "paper_table", "paper_row", "model", "epochs", "manifest_row", "paper_source",
                  "status", "last_epoch", "baseline_row", "baseline_status"]
                 + [f"{kind}_{m}" for kind in ("paper", "repro", "diff", "gain_paper", "gain_repro")
                    for m in METRICS])
RUN_COLUMNS = (["manifest_row", "branch", "label", "status", "last_epoch", "baseline_row", "baseline_status"]
               + list(METRICS) + [f"gain_{m}" for m in METRICS])
INT_COLUMNS = ("paper_table", "paper_row", "epochs", "last_epoch")


# ------------------------------------------------------------------------------------------------
# numbers

def load_paper(table):
    """results/paper/table<N>.csv with a 1-based `paper_row` column."""
    df = pd.read_csv(PAPER_DIR / f"table{table}.csv")
    if "paper_row" not in df:
        df.insert(0, "paper_row", range(1, len(df) + 1))
    return df


def paper_model(row):
    """The paper's name for a row, e.g. 'KS-DN-Deformable-DETR-R50' or 'DAB-DETR-R50, triple attention'."""
    name = f"{VARIANT_NAMES.get(row['variant'], row['variant'])}-{row['backbone']}"
    if row.get("method") == "ks":
        name = "KS-" + name
    if "experiment" in row:
        name += ", " + EXPERIMENT_NAMES.get(row["experiment"], row["experiment"])
    return name


def _is_baseline(row):
    return row.get("method", row.get("experiment")) == "baseline"


def paper_baseline(df, i):
    """Position of the paper row that row i is compared with: the nearest baseline row above it with
    the same variant, backbone and epochs (Table 1: the row before; Table 2: the backbone's baseline).
    None for baseline rows."""
    row = df.iloc[i]
    if _is_baseline(row):
        return None
    for j in range(i - 1, -1, -1):
        other = df.iloc[j]
        if _is_baseline(other) and all(other[k] == row[k] for k in ("variant", "backbone", "epochs")):
            return j
    return None


def percent(branch, digits=1):
    """One eval.json branch in percent, rounded to `digits` (None: unrounded); NaN where missing,
    undefined or -1 (COCO: nothing to measure)."""
    branch = branch if isinstance(branch, dict) else {}
    values = {m: 100 * metric(branch.get(m)) for m in METRICS}
    return values if digits is None else {m: round(v, digits) for m, v in values.items()}


def minus(a, b):
    """a - b rounded to 0.1 (NaN if either is NaN; never -0.0)."""
    return round(a - b, 1) + 0.0


def _frame(lines, columns):
    df = pd.DataFrame(lines, columns=columns)
    for c in INT_COLUMNS:
        if c in df:
            df[c] = df[c].astype("Int64")
    return df


def paper_report(manifest, tables, results=records.RESULTS):
    """One line per paper row of each table (one per manifest row pointing at it, if several), then the
    manifest rows that point at no paper row. `manifest` may be None: the paper's table alone."""
    rows = manifest.rows if manifest else {}
    runs = {n: load_run(*manifest.record_of(n), results) for n in rows}
    repro = {n: percent(run.eval.get("attn1")) for n, run in runs.items() if run.state == "done"}

    def run_cells(name, paper):
        if name is None:
            return {"status": "no manifest row"}
        row, run = rows[name], runs[name]
        base = row.get("baseline")
        cells = {"manifest_row": name, "paper_source": (row.get("paper") or {}).get("source"),
                 "status": run.label, "last_epoch": run.last_epoch, "baseline_row": base,
                 "baseline_status": runs[base].label if base else None}
        if name in repro:
            for m in METRICS:
                cells[f"repro_{m}"] = repro[name][m]
                if paper:
                    cells[f"diff_{m}"] = minus(repro[name][m], paper[m])
                if base in repro:
                    cells[f"gain_repro_{m}"] = minus(repro[name][m], repro[base][m])
        return cells

    lines = []
    for table in tables:
        paper = load_paper(table)
        pointing = {}
        for name, row in rows.items():
            ref = row.get("paper")
            if ref and ref["table"] == table:
                if ref["row"] > len(paper):
                    raise AnalysisError(f"manifest {manifest.path}, row {name!r}: paper row {ref['row']} is beyond "
                                        f"the {len(paper)} rows of {PAPER_DIR / f'table{table}.csv'}")
                pointing.setdefault(ref["row"], []).append(name)
        for i in range(len(paper)):
            p = paper.iloc[i]
            b = paper_baseline(paper, i)
            values = {m: float(p[m]) for m in METRICS}
            line = {"section": f"Table {table}", "paper_table": table, "paper_row": i + 1,
                    "model": paper_model(p), "epochs": int(p["epochs"])}
            line.update({f"paper_{m}": values[m] for m in METRICS})
            if b is not None:
                line.update({f"gain_paper_{m}": minus(values[m], float(paper.iloc[b][m])) for m in METRICS})
            for name in pointing.get(i + 1, [None]):
                lines.append({**line, **run_cells(name, values)})
    for name, row in rows.items():
        if not row.get("paper"):
            lines.append({"section": "Rows not in the paper", "model": name, **run_cells(name, None)})
    return _frame(lines, PAPER_COLUMNS)


def runs_report(manifest, results=records.RESULTS):
    """One line per manifest row (student, attn1) with the KS gain over its baseline row, for rows
    whose eval.json has teacher branches one line per teacher (evaluated with GT masks), and for rows
    evaluated with train.eval_moved one line for the student's detections moved to other images."""
    runs = {n: load_run(*manifest.record_of(n), results) for n in manifest.rows}
    lines = []
    for name, row in manifest.rows.items():
        run, base = runs[name], row.get("baseline")
        common = {"manifest_row": name, "status": run.label, "last_epoch": run.last_epoch,
                  "baseline_row": base, "baseline_status": runs[base].label if base else None}
        line = {**common, "branch": "attn1", "label": name}
        teachers = []
        if run.state == "done":
            line.update(percent(run.eval.get("attn1")))
            if base and runs[base].state == "done":  # from the unrounded numbers, as the seed statistics
                student, baseline = percent(run.eval.get("attn1"), None), percent(runs[base].eval.get("attn1"), None)
                line.update({f"gain_{m}": minus(student[m], baseline[m]) for m in METRICS})
            teachers = [b for b in BRANCHES[1:] if b in run.eval]
        lines.append(line)
        mask = "GT mask" if manifest.resolve(name)["model"]["ks"]["mask"] == "gt" else "no mask"
        for branch in teachers:
            lines.append({**common, "branch": branch, "label": f"{name} / {branch} (teacher, {mask})",
                          "baseline_row": None, "baseline_status": None, **percent(run.eval[branch])})
        if run.state == "done" and MOVED in run.eval:
            lines.append({**common, "branch": MOVED, "label": f"{name} / attn1 on other images",
                          "baseline_row": None, "baseline_status": None, **percent(run.eval[MOVED])})
    return _frame(lines, RUN_COLUMNS)


def _comparison_cells(line, prefix, cdf, group, comparison):
    """The statistics of one comparison of `cdf` (analysis.comparisons) in a line of the seeds or blocks
    report: <prefix>_mean, _sd, _p, _p_holm, _ci_low, _ci_high, _positive, _n, _marked (pairs marked),
    the per-seed differences (e.g. gains_AP, printed to 0.01, † on marked pairs) and the same of the
    last two epochs' AP as <prefix>_last2_*. NaN and 0 where there is no such comparison."""
    name, metric_name = prefix.rsplit("_", 1)
    for suffix, which in (("", "AP"), ("_last2", "AP_last2")):
        sel = cdf[(cdf["group"] == group) & (cdf["comparison"] == comparison) & (cdf["metric"] == which)]
        r = sel.iloc[0] if len(sel) else None
        key = prefix + suffix
        for stat in ("mean", "sd", "p", "p_holm", "ci_low", "ci_high"):
            line[f"{key}_{stat}"] = math.nan if r is None else r[stat]
        for stat, column in (("positive", "positive"), ("n", "n"), ("marked", "pairs_marked")):
            line[f"{key}_{stat}"] = 0 if r is None else int(r[column])
        if not suffix:
            line[f"{name}s_{metric_name}"] = "" if r is None else per_pair(r)


def seeds_report(manifest, df, rows, cdf):
    """Mean and sample standard deviation over the seed rows of each group (finished rows only), per
    branch, from the records' unrounded numbers (`rows`: analysis.comparisons.row_results), with the
    KS gain in AP over the rows' baselines (paired row by row; `cdf`: the manifest's comparisons)."""
    lines = []
    for group, grows in seed_groups(manifest).items():
        done = [rows[r] for r in grows if rows[r].done]
        for branch in dict.fromkeys(df.loc[df["manifest_row"].isin(grows), "branch"]):
            have = [r for r in done if branch in r.final]
            line = {"group": group, "branch": branch, "rows": " ".join(grows), "done": len(have), "of": len(grows)}
            for m in METRICS:
                line[f"{m}_mean"], line[f"{m}_sd"] = mean_and_sd([r.value(branch, m) for r in have])
            line["AP_last2_mean"], line["AP_last2_sd"] = mean_and_sd([r.value(branch, "AP_last2") for r in have])
            _comparison_cells(line, "gain_AP", cdf if branch == "attn1" else cdf.iloc[:0], group, KS_GAIN)
            lines.append(line)
    return pd.DataFrame(lines)


def _pm(mean, sd, digits=1):
    return "" if math.isnan(mean) else mean_sd(mean, sd, digits, sign=False)


def _gain_cells(r, prefix="gain_AP"):
    """['+2.22 ± 0.22', '3/3'] of a report line's comparison (2 decimals, † when a pair is marked)."""
    if not r[f"{prefix}_n"]:
        return ["", ""]
    return [mean_sd(r[f"{prefix}_mean"], r[f"{prefix}_sd"]) + (MARK if r[f"{prefix}_marked"] else ""),
            f"{r[f'{prefix}_positive']}/{r[f'{prefix}_n']}"]


def seeds_markdown(sdf, cdf):
    header = ["Rows over seeds", "Branch", "Done", *METRICS, "AP, last 2 epochs", "KS gain AP", "positive",
              "per seed"]
    rows = [header, ["---", "---", "---:"] + ["---:"] * (len(header) - 3)]
    for _, r in sdf.iterrows():
        rows.append([r["group"], r["branch"], f"{r['done']}/{r['of']}",
                     *[_pm(r[f"{m}_mean"], r[f"{m}_sd"]) for m in METRICS], _pm(r["AP_last2_mean"], r["AP_last2_sd"]),
                     *_gain_cells(r), r["gains_AP"]])
    table = "\n".join("| " + " | ".join(cells) + " |" for cells in rows)
    note = marks_note(cdf[cdf["table"] == GAINS], short=True)
    return ("## Over training seeds\n\n" + table + "\n\nMean ± sample standard deviation over the finished "
            "rows of each group (rows whose configurations differ only in train.seed), from the records' unrounded "
            "numbers; AP, last 2 epochs: each run's AP averaged over its last two epochs (log.jsonl). KS gain: each "
            "row minus its baseline row, then mean ± standard deviation of those differences and the seeds where "
            "it is positive (p-values and intervals: the paired comparisons below)."
            + (f"\n\n{note}" if note else "") + "\n")


# ------------------------------------------------------------------------------------------------
# the paper's shape for manifests with families (the synthetic tables): one block per variant

LAST_LAYER = "loss_last_layer_"


def _last_epoch_values(run, section, prefix=""):
    """{branch: value} of the run's last logged epoch: its `section` (e.g. 'memory_distance', or
    'train' with keys `prefix` + branch)."""
    entry = run.log[-1].get(section) if run.log else None
    if not isinstance(entry, dict):
        return {}
    return {k[len(prefix):]: number(v) for k, v in entry.items() if k.startswith(prefix)}


TEACHER_COMPARISONS = {"attn3": "Attn3 − Attn1", "attn2": "Attn2 − Attn1"}


def blocks_report(manifest, df, results=records.RESULTS, rows=None, cdf=None):
    """One line per group of seed rows (groups of one row too), in manifest order, blocks by family,
    from the records' unrounded numbers (`rows`: analysis.comparisons.row_results; `cdf`: the
    manifest's comparisons, read when not given): the student's metrics and its AP averaged over the
    last two epochs as mean and sample standard deviation over the finished rows; the KS gain in AP
    (each row minus its `baseline` row) and, for rows whose teachers get no mask, the gain from the GT
    mask (the row's GT-mask twin minus the row), each with the statistics of its paired differences;
    the teachers' AP (GT mask) and their paired difference from the student; from each row's last
    epoch, each branch's last-decoder-layer training loss and the teachers' memory distance, as means."""
    rows = row_results(manifest, results) if rows is None else rows
    cdf = comparisons(manifest, results, rows) if cdf is None else cdf
    lines = []
    for group, grows in seed_groups(manifest, smallest=1).items():
        done = [rows[r] for r in grows if rows[r].done]
        line = {**group_info(manifest, group, grows), "rows": " ".join(grows), "done": len(done), "of": len(grows)}
        for m in METRICS:
            line[f"{m}_mean"], line[f"{m}_sd"] = mean_and_sd([r.value("attn1", m) for r in done])
        line["AP_last2_mean"], line["AP_last2_sd"] = mean_and_sd([r.value("attn1", "AP_last2") for r in done])
        _comparison_cells(line, "gain_AP", cdf, group, KS_GAIN)
        _comparison_cells(line, "mask_gain_AP", cdf, group, MASK_GAIN)
        line["AP50_moved_mean"] = mean_and_sd([r.value(MOVED, "AP50") for r in done])[0]
        for branch in BRANCHES:
            if branch != "attn1":
                line[f"AP_{branch}_mean"] = mean_and_sd([r.value(branch) for r in done])[0]
                _comparison_cells(line, f"{branch}_minus_student_AP", cdf, group, TEACHER_COMPARISONS[branch])
                line[f"distance_{branch}_mean"] = mean_and_sd(
                    [_last_epoch_values(r.run, "memory_distance").get(branch, math.nan) for r in done])[0]
            line[f"last_layer_loss_{branch}_mean"] = mean_and_sd(
                [_last_epoch_values(r.run, "train", LAST_LAYER).get(branch, math.nan) for r in done])[0]
        lines.append(line)
    return pd.DataFrame(lines)


def _per_branch(r, key, branches):
    """'a / b / c': the line's `<key>_<branch>_mean` values to 3 decimals, '-' where missing."""
    values = (r[f"{key}_{b}_mean"] for b in branches)
    return " / ".join("-" if math.isnan(v) else f"{v:.3f}" for v in values)


def _has_mask_gain(bdf):
    return "mask_gain_AP_mean" in bdf and bdf["mask_gain_AP_mean"].notna().any()


def _blocks(bdf):
    """(header, [(variant, cells)]) of the paper-shaped table, and the same for the teacher table."""
    header = ["Method", "Sharing V", "Sharing A", "Done", *METRICS, "AP, last 2 epochs", "AP50 on other images",
              "KS gain AP", "positive gains"]
    teacher_header = ["Method", "Done", "AP Attn1", "AP Attn3", "AP Attn2", "Attn3 − Attn1", "Attn2 − Attn1",
                      "last-layer loss Attn1 / Attn3 / Attn2", "memory distance Attn3 / Attn2"]
    with_mask_gain = _has_mask_gain(bdf)
    if with_mask_gain:
        header += ["gain from the GT mask", "positive"]
    main, teachers = [], []
    repeated = bdf.groupby(["variant", "method"])["group"].transform("count") > 1 if len(bdf) else []
    for (_, r), named in zip(bdf.iterrows(), repeated):
        name = f"{r['method']} ({r['group']})" if named else r["method"]  # the group tells same methods apart
        done = f"{r['done']}/{r['of']}"
        main.append((r["variant"], [name, "✓" if r["shares_v"] else "", "✓" if r["shares_a"] else "", done,
                                    *[_pm(r[f"{m}_mean"], r[f"{m}_sd"]) for m in METRICS],
                                    _pm(r["AP_last2_mean"], r["AP_last2_sd"]),
                                    "" if math.isnan(r["AP50_moved_mean"]) else _value(r["AP50_moved_mean"]),
                                    *_gain_cells(r)] + (_gain_cells(r, "mask_gain_AP") if with_mask_gain else [])))
        if r["ks_mode"] != "none" and r["done"]:
            teachers.append((r["variant"], [name, done, _value(r["AP_mean"]), _value(r["AP_attn3_mean"]),
                                            _value(r["AP_attn2_mean"]),
                                            _gain_cells(r, "attn3_minus_student_AP")[0],
                                            _gain_cells(r, "attn2_minus_student_AP")[0],
                                            _per_branch(r, "last_layer_loss", ("attn1", "attn3", "attn2")),
                                            _per_branch(r, "distance", ("attn3", "attn2"))]))
    return (header, main), (teacher_header, teachers)


def _markdown_blocks(header, lines, right_from):
    parts = []
    for variant in dict.fromkeys(v for v, _ in lines):
        rows = [header, ["---" if i < right_from else "---:" for i in range(len(header))]]
        rows += [cells for v, cells in lines if v == variant]
        parts.append(f"### {variant}\n\n" + "\n".join("| " + " | ".join(rows_cells) + " |" for rows_cells in rows))
    return "\n\n".join(parts)


def blocks_markdown(bdf, cdf):
    (header, main), (theader, teachers) = _blocks(bdf)
    note = marks_note(cdf[cdf["table"] == GAINS], short=True)
    out = ["## By variant, over training seeds", _markdown_blocks(header, main, 3),
           "COCO box AP in percent of the student (Attn1), mean ± sample standard deviation over the finished "
           "seed rows, from the records' unrounded numbers; AP, last 2 epochs: each run's AP averaged over its "
           "last two epochs (log.jsonl), which damps the noise of one evaluation. KS gain: each seed's KS row "
           "minus its baseline row, mean ± standard deviation of these paired differences (AP points), and in how "
           "many seeds it is positive; p-values, confidence intervals and the same for the last two epochs: the "
           "paired comparisons below. AP50 on other images: the student's "
           "detections scored on the next validation image (train.eval_moved), the level of a detector that "
           "ignores its input. Sharing V: the teacher attention "
           "Attn3 (Q^t, K^t, V); Sharing A: the teacher values Attn2 (Q, K, V^t); \"no mask\": the teachers "
           "are given an all-background mask (model.ks.mask: none)."
           + (" Gain from the GT mask: each seed's KS row with the GT mask minus the same row with no mask, "
              "paired the same way." if _has_mask_gain(bdf) else "") + (f"\n\n{note}" if note else "")]
    if teachers:
        out += ["## Teachers against the student", _markdown_blocks(theader, teachers, 1),
                "Means over the finished seed rows. AP: the student and each teacher evaluated with the GT "
                "Fg-Bg mask (the teachers' last decoder layer; for \"no mask\" rows with the all-background "
                "mask they were trained with); Attn3 − Attn1, Attn2 − Attn1: the teacher's AP minus the student's "
                "of the same run, mean ± sd over the seeds (AP points). Last-layer loss: each branch's weighted "
                "training loss of its last decoder layer (the same terms for every branch) in the last epoch. "
                "Memory distance: ||Z_t - Z_s|| / ||Z_s|| of each teacher's encoder memory from the student's "
                "over the validation images' tokens at the last evaluation."]
    return "\n\n".join(out) + "\n"


def blocks_latex(name, bdf):
    (header, main), _ = _blocks(bdf)
    spec = "lccc" + "r" * (len(header) - 4)
    out = [f"% python -m analysis tables --manifest {name}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex(h) for h in header) + r" \\"]
    for variant in dict.fromkeys(v for v, _ in main):
        out += [r"\midrule", rf"\multicolumn{{{len(header)}}}{{l}}{{\emph{{{_tex(variant)}}}}} \\"]
        for v, cells in main:
            if v == variant:
                out.append(" & ".join(_tex(c).replace("✓", r"\checkmark").replace("±", r"$\pm$")
                                      .replace(MARK, r"$^\dagger$") for c in cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def open_manifest(name_or_path):
    """The manifest, or None for table1/table2 while their manifest does not exist yet."""
    from experiments.config import MANIFEST_DIR

    if name_or_path in PAPER_MANIFESTS and not (MANIFEST_DIR / f"{name_or_path}.yaml").is_file():
        return None
    return load_manifest(name_or_path)


def report(name_or_path, results=records.RESULTS, manifest=False):
    """(manifest name, kind 'paper' or 'runs', DataFrame) for a manifest name or path (`manifest`: its
    open_manifest when already read)."""
    manifest = open_manifest(name_or_path) if manifest is False else manifest
    if manifest is None:
        return name_or_path, "paper", paper_report(None, [PAPER_MANIFESTS[name_or_path]], results)
    tables = {row["paper"]["table"] for row in manifest.rows.values() if row.get("paper")}
    if manifest.name in PAPER_MANIFESTS:
        tables.add(PAPER_MANIFESTS[manifest.name])
    if tables:
        return manifest.name, "paper", paper_report(manifest, sorted(tables), results)
    return manifest.name, "runs", runs_report(manifest, results)


# ------------------------------------------------------------------------------------------------
# rendering

def _value(v):
    return "n/a" if math.isnan(v) else f"{v:.1f}"


def _signed(v):
    return "n/a" if math.isnan(v) else f"{v:+.1f}"


def _text(v):
    return "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v)


def _display(kind, df, arrow):
    """(header, right-aligned flags, list of (section, cells)) for the markdown and LaTeX tables."""
    out = []
    if kind == "paper":
        header = ["#", "Model", "Epochs", "Manifest row", "Paper's number", "Status", *METRICS,
                  "KS gain AP (paper)", "KS gain AP (ours)"]
        for _, r in df.iterrows():
            done = r["status"] == "done"
            cells = [_text(r["paper_row"]), r["model"], _text(r["epochs"]), _text(r["manifest_row"]),
                     {"rerun": "re-run", "cited": "cited"}.get(_text(r["paper_source"]), ""), r["status"]]
            for m in METRICS:
                has_paper = not math.isnan(r[f"paper_{m}"])
                paper = _value(r[f"paper_{m}"]) if has_paper else ""
                if done and has_paper:
                    cells.append(f"{paper} {arrow} {_value(r[f'repro_{m}'])} ({_signed(r[f'diff_{m}'])})")
                else:
                    cells.append(_value(r[f"repro_{m}"]) if done else paper)
            gain = r["gain_paper_AP"]
            cells.append("" if math.isnan(gain) else _signed(gain))
            cells.append(_signed(r["gain_repro_AP"]) if done and r["baseline_status"] == "done" else "")
            out.append((r["section"], cells))
        right = [True, False, True, False, False, False] + [True] * 8
    else:
        header = ["Run", "Baseline", "Status", *METRICS, "KS gain AP"]
        for _, r in df.iterrows():
            done = r["status"] == "done"
            cells = [r["label"], _text(r["baseline_row"]), r["status"]]
            cells += [_value(r[m]) if done else "" for m in METRICS]
            cells.append(_signed(r["gain_AP"]) if done and r["baseline_status"] == "done" else "")
            out.append((None, cells))
        right = [False, False, False] + [True] * 7
    return header, right, out


def to_markdown(name, kind, df):
    header, right, lines = _display(kind, df, "→")
    title = f"# {name}: reproduced vs. paper" if kind == "paper" else f"# {name}: results"
    parts = [title]
    for section in dict.fromkeys(s for s, _ in lines):
        if section:
            parts.append(f"## {section}")
        rows = [header, ["---:" if r else "---" for r in right]]
        rows += [cells for s, cells in lines if s == section]
        parts.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows))
    if kind == "paper":
        parts.append("COCO box AP in percent. Cells: paper → reproduced (reproduced − paper). KS gain: KS row "
                     "minus its baseline, computed from the numbers (paper: the baseline row of the same "
                     "variant, backbone and epochs; ours: the manifest row's `baseline`). Paper's number: "
                     "re-run by the authors or cited from other work. Only finished runs (DONE) show numbers.")
    else:
        parts.append("COCO box AP in percent of the student (attn1) unless a line names a teacher branch "
                     "(evaluated with ground-truth masks, as in the paper's Fig. 4). KS gain: the row minus "
                     "its `baseline` row, from the unrounded APs (it may differ by 0.1 from the difference of the "
                     "rounded numbers shown). Only finished runs (DONE) show numbers.")
    return "\n\n".join(parts) + "\n"


def _tex(text):
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return text


def to_latex(name, kind, df):
    header, right, lines = _display(kind, df, "@ARROW@")
    spec = "".join("r" if r else "l" for r in right)
    out = [f"% python -m analysis tables --manifest {name}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    current = None
    for section, cells in lines:
        if section and section != current:
            if current is not None:
                out.append(r"\midrule")
            out.append(rf"\multicolumn{{{len(header)}}}{{l}}{{\emph{{{_tex(section)}}}}} \\")
            current = section
        out.append(" & ".join(_tex(c).replace("@ARROW@", r"$\to$") for c in cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def write_tables(name_or_path, results=records.RESULTS):
    """Writes results/tables/<manifest>.{md,csv,tex}; returns the markdown."""
    manifest = open_manifest(name_or_path)  # read once: a manifest with same_as rows reads several files
    name, kind, df = report(name_or_path, results, manifest)
    folder = Path(results) / "tables"
    markdown = to_markdown(name, kind, df)
    latex = to_latex(name, kind, df)
    if kind == "runs":
        rows = row_results(manifest, results)
        cdf = comparisons(manifest, results, rows, smallest=1 if manifest.families else 2)
        if manifest.families:  # the paper's shape first, the paired comparisons, the row-by-row table after them
            bdf = blocks_report(manifest, df, results, rows, cdf)
            markdown = (f"# {name}: results\n\n" + blocks_markdown(bdf, cdf) + "\n" + comparisons_markdown(cdf)
                        + "\n## Row by row\n\n" + markdown.split("\n\n", 1)[1])
            records.atomic_write(folder / f"{name}_blocks.csv", bdf.to_csv(index=False))
            latex = blocks_latex(name, bdf)
        else:
            sdf = seeds_report(manifest, df, rows, cdf)
            if len(sdf):
                markdown += "\n" + seeds_markdown(sdf, cdf) + "\n" + comparisons_markdown(cdf)
                records.atomic_write(folder / f"{name}_seeds.csv", sdf.to_csv(index=False))
        if len(cdf):
            records.atomic_write(folder / f"{name}_comparisons.csv", comparisons_csv(cdf))
    records.atomic_write(folder / f"{name}.md", markdown)
    records.atomic_write(folder / f"{name}.csv", df.to_csv(index=False))
    records.atomic_write(folder / f"{name}.tex", latex)
    return markdown


def default_manifests(results=records.RESULTS):
    """table1, table2 (from the paper alone while their manifests do not exist), then every other
    manifest with records under results/runs/, its own or those of its `same_as` rows (run folders
    without a manifest are skipped, with a warning)."""
    from experiments.config import MANIFEST_DIR

    names = list(PAPER_MANIFESTS)
    runs = Path(results) / "runs"
    folders = {p.name for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else set()
    for name in sorted(folders):
        if name not in names and not (MANIFEST_DIR / f"{name}.yaml").is_file():
            print(f"warning: {runs / name} has no manifest experiments/{name}.yaml; skipped", file=sys.stderr)
    for path in sorted(MANIFEST_DIR.glob("*.yaml")):
        if path.stem in names:
            continue
        if path.stem in folders:
            names.append(path.stem)
            continue
        manifest = load_manifest(path.stem)
        if any(records.run_dir(*manifest.record_of(row), results).is_dir() for row in manifest.rows):
            names.append(path.stem)
    return names
