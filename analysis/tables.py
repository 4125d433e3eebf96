"""Tables from run records: the paper's Tables 1 and 2 next to the reproduced numbers, or (for a
manifest whose rows point at no paper row, such as demo) the manifest's own results.

Numbers are COCO box AP in percent, rounded to 0.1 like the paper (records hold fractions). Differences
(reproduced - paper) and KS gains (KS row - its baseline) are computed from the rounded numbers, so
the table's arithmetic checks out; the gains the paper prints are ignored (some are wrong, e.g.
KS-DN-Deformable-DETR-R50: printed +2.1, 46.5 - 43.4 = 3.1).

Writes results/tables/<manifest>.md, .csv (plain numbers, empty when missing, plus a status column)
and .tex (a booktabs tabular).
"""
import copy
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pandas as pd

from experiments import records

from . import BRANCHES, VARIANT_NAMES, AnalysisError, load_manifest, load_run, number

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


def percent(branch):
    """One eval.json branch in percent, rounded to 0.1 (NaN where missing or undefined)."""
    branch = branch if isinstance(branch, dict) else {}
    return {m: round(100 * number(branch.get(m)), 1) for m in METRICS}


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
            student = percent(run.eval.get("attn1"))
            line.update(student)
            if base and runs[base].state == "done":
                baseline = percent(runs[base].eval.get("attn1"))
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


SEED_SUFFIX = re.compile(r"_seed\d+$")


def config_key_without(cfg, *path):
    """A resolved configuration as a comparable string, leaving out the value at `path` (e.g. "train",
    "seed"): rows with equal keys differ at most there. `cfg` itself is not changed."""
    cfg = copy.deepcopy(cfg)
    parent = cfg
    for k in path[:-1]:
        parent = parent[k]
    parent.pop(path[-1], None)
    return json.dumps(cfg, sort_keys=True, default=str)


def seed_groups(manifest, smallest=2):
    """{group name: [rows]} for rows whose configurations differ only in train.seed (groups of at
    least `smallest` rows); a group is named after its rows without their `_seed<N>` suffix when they
    share one."""
    groups = {}
    for name in manifest.rows:
        groups.setdefault(config_key_without(manifest.resolve(name), "train", "seed"), []).append(name)
    out = {}
    for rows in groups.values():
        if len(rows) >= smallest:
            stems = {SEED_SUFFIX.sub("", r) for r in rows}
            out[stems.pop() if len(stems) == 1 else f"{rows[0]} (+{len(rows) - 1} seeds)"] = rows
    return out


def _mean_sd(values):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def seeds_report(manifest, df):
    """Mean and sample standard deviation over the seed rows of each group (finished rows only), per
    branch, with the KS gain in AP over the rows' baselines (paired row by row)."""
    lines = []
    for group, rows in seed_groups(manifest).items():
        for branch in dict.fromkeys(df.loc[df["manifest_row"].isin(rows), "branch"]):
            sel = df[df["manifest_row"].isin(rows) & (df["branch"] == branch) & (df["status"] == "done")]
            line = {"group": group, "branch": branch, "rows": " ".join(rows), "done": len(sel), "of": len(rows)}
            for m in METRICS:
                line[f"{m}_mean"], line[f"{m}_sd"] = _mean_sd(sel[m].tolist())
            gains = sel["gain_AP"].tolist() if branch == "attn1" else []
            line["gain_AP_mean"], line["gain_AP_sd"] = _mean_sd(gains)
            line["gains_AP"] = " ".join(f"{g:+.1f}" for g in gains if not math.isnan(g))
            lines.append(line)
    return pd.DataFrame(lines)


def _pm(mean, sd):
    if math.isnan(mean):
        return ""
    return f"{mean:.1f}" + ("" if math.isnan(sd) else f" ± {sd:.1f}")


def seeds_markdown(sdf):
    header = ["Rows over seeds", "Branch", "Done", *METRICS, "KS gain AP", "per seed"]
    rows = [header, ["---", "---", "---:"] + ["---:"] * (len(METRICS) + 2)]
    for _, r in sdf.iterrows():
        gain = "" if math.isnan(r["gain_AP_mean"]) else (f"{r['gain_AP_mean']:+.1f}" + (
            "" if math.isnan(r["gain_AP_sd"]) else f" ± {r['gain_AP_sd']:.1f}"))
        rows.append([r["group"], r["branch"], f"{r['done']}/{r['of']}",
                     *[_pm(r[f"{m}_mean"], r[f"{m}_sd"]) for m in METRICS], gain, r["gains_AP"]])
    table = "\n".join("| " + " | ".join(cells) + " |" for cells in rows)
    return ("## Over training seeds\n\n" + table + "\n\nMean ± sample standard deviation over the finished "
            "rows of each group (rows whose configurations differ only in train.seed); KS gain: each row minus "
            "its baseline row, then mean ± standard deviation of those differences.\n")


# ------------------------------------------------------------------------------------------------
# the paper's shape for manifests with families (the synthetic tables): one block per variant

KS_METHODS = {"none": ("baseline", False, False), "dual_share_v": ("dual attention", True, False),
              "dual_share_a": ("dual attention", False, True), "triple": ("triple attention", True, True)}
LAST_LAYER = "loss_last_layer_"


def _last_epoch_values(run, section, prefix=""):
    """{branch: value} of the run's last logged epoch: its `section` (e.g. 'memory_distance', or
    'train' with keys `prefix` + branch)."""
    entry = run.log[-1].get(section) if run.log else None
    if not isinstance(entry, dict):
        return {}
    return {k[len(prefix):]: number(v) for k, v in entry.items() if k.startswith(prefix)}


def mask_twins(manifest):
    """{row whose teachers get no mask (model.ks.mask: none): the row whose configuration differs from
    it only in getting the GT mask}, for the rows that have such a twin."""
    keys = {}
    for name in manifest.rows:
        cfg = manifest.resolve(name)
        if cfg["model"]["ks"]["mode"] != "none":
            keys[name] = (cfg["model"]["ks"]["mask"], config_key_without(cfg, "model", "ks", "mask"))
    with_gt = {key: name for name, (mask, key) in keys.items() if mask == "gt"}
    return {name: with_gt[key] for name, (mask, key) in keys.items() if mask == "none" and key in with_gt}


def _paired_cells(line, prefix, gains):
    """Mean ± sd, positive count and per-seed list of paired differences `gains` (e.g. "gain_AP" ->
    gain_AP_mean, _sd, _positive, _n and gains_AP)."""
    line[f"{prefix}_mean"], line[f"{prefix}_sd"] = _mean_sd(gains)
    line[f"{prefix}_positive"], line[f"{prefix}_n"] = sum(g > 0 for g in gains), len(gains)
    name, metric = prefix.rsplit("_", 1)
    line[f"{name}s_{metric}"] = " ".join(f"{g:+.1f}" for g in gains)


def blocks_report(manifest, df, results=records.RESULTS):
    """One line per group of seed rows (groups of one row too), in manifest order, blocks by family:
    the student's metrics as mean and sample standard deviation over the finished rows, the KS gain in
    AP as mean ± sd of the paired per-seed differences (each row minus its `baseline` row) and the
    number of seeds where it is positive; for rows whose teachers get no mask, the same for the gain
    from the GT mask (the row's GT-mask twin minus the row); the teachers' AP (GT mask) and, from each
    row's last epoch, each branch's last-decoder-layer training loss and the teachers' memory
    distance, as means."""
    lines = []
    twins = mask_twins(manifest)
    finished = df[(df["branch"] == "attn1") & (df["status"] == "done")]
    done_ap = dict(zip(finished["manifest_row"], finished["AP"]))
    for group, rows in seed_groups(manifest, smallest=1).items():
        cfg = manifest.resolve(rows[0])
        mode, mask = cfg["model"]["ks"]["mode"], cfg["model"]["ks"]["mask"]
        method, shares_v, shares_a = KS_METHODS[mode]
        family = manifest.rows[rows[0]].get("family") or cfg["model"]["variant"]
        sel = df[df["manifest_row"].isin(rows) & (df["status"] == "done")]
        student = sel[sel["branch"] == "attn1"]
        line = {"family": family, "variant": VARIANT_NAMES.get(cfg["model"]["variant"], cfg["model"]["variant"]),
                "group": group, "ks_mode": mode,
                "method": method + ("" if mask == "gt" or mode == "none" else ", no mask"),
                "shares_v": shares_v, "shares_a": shares_a, "teacher_mask": None if mode == "none" else mask,
                "rows": " ".join(rows), "done": len(student), "of": len(rows)}
        for m in METRICS:
            line[f"{m}_mean"], line[f"{m}_sd"] = _mean_sd(student[m].tolist())
        _paired_cells(line, "gain_AP", [g for g in student["gain_AP"].tolist() if not math.isnan(g)])
        _paired_cells(line, "mask_gain_AP", [minus(done_ap[twins[r]], done_ap[r]) for r in rows
                                             if r in twins and r in done_ap and twins[r] in done_ap])
        line["AP50_moved_mean"] = _mean_sd(sel.loc[sel["branch"] == MOVED, "AP50"].tolist())[0]
        done = [load_run(*manifest.record_of(r), results) for r in student["manifest_row"]]
        for branch in BRANCHES:
            if branch != "attn1":
                line[f"AP_{branch}_mean"] = _mean_sd(sel.loc[sel["branch"] == branch, "AP"].tolist())[0]
                line[f"distance_{branch}_mean"] = _mean_sd(
                    [_last_epoch_values(run, "memory_distance").get(branch, math.nan) for run in done])[0]
            line[f"last_layer_loss_{branch}_mean"] = _mean_sd(
                [_last_epoch_values(run, "train", LAST_LAYER).get(branch, math.nan) for run in done])[0]
        lines.append(line)
    return pd.DataFrame(lines)


def _gain_cells(r, prefix="gain_AP"):
    if math.isnan(r[f"{prefix}_mean"]):
        return ["", ""]
    return [f"{r[f'{prefix}_mean']:+.1f}" + ("" if math.isnan(r[f"{prefix}_sd"]) else f" ± {r[f'{prefix}_sd']:.1f}"),
            f"{r[f'{prefix}_positive']}/{r[f'{prefix}_n']}"]


def _per_branch(r, key, branches):
    """'a / b / c': the line's `<key>_<branch>_mean` values to 3 decimals, '-' where missing."""
    values = (r[f"{key}_{b}_mean"] for b in branches)
    return " / ".join("-" if math.isnan(v) else f"{v:.3f}" for v in values)


def _has_mask_gain(bdf):
    return "mask_gain_AP_mean" in bdf and bdf["mask_gain_AP_mean"].notna().any()


def _blocks(bdf):
    """(header, [(variant, cells)]) of the paper-shaped table, and the same for the teacher table."""
    header = ["Method", "Sharing V", "Sharing A", "Done", *METRICS, "AP50 on other images", "KS gain AP",
              "positive gains"]
    teacher_header = ["Method", "Done", "AP Attn1", "AP Attn3", "AP Attn2", "last-layer loss Attn1 / Attn3 / Attn2",
                      "memory distance Attn3 / Attn2"]
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
                                    "" if math.isnan(r["AP50_moved_mean"]) else _value(r["AP50_moved_mean"]),
                                    *_gain_cells(r)] + (_gain_cells(r, "mask_gain_AP") if with_mask_gain else [])))
        if r["ks_mode"] != "none" and r["done"]:
            teachers.append((r["variant"], [name, done, _value(r["AP_mean"]), _value(r["AP_attn3_mean"]),
                                            _value(r["AP_attn2_mean"]),
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


def blocks_markdown(bdf):
    (header, main), (theader, teachers) = _blocks(bdf)
    out = ["## By variant, over training seeds", _markdown_blocks(header, main, 3),
           "COCO box AP in percent of the student (Attn1), mean ± sample standard deviation over the finished "
           "seed rows; KS gain: each seed's KS row minus its baseline row, mean ± standard deviation of these "
           "paired differences, and in how many seeds it is positive. AP50 on other images: the student's "
           "detections scored on the next validation image (train.eval_moved), the level of a detector that "
           "ignores its input. Sharing V: the teacher attention "
           "Attn3 (Q^t, K^t, V); Sharing A: the teacher values Attn2 (Q, K, V^t); \"no mask\": the teachers "
           "are given an all-background mask (model.ks.mask: none)."
           + (" Gain from the GT mask: each seed's KS row with the GT mask minus the same row with no mask, "
              "paired the same way." if _has_mask_gain(bdf) else "")]
    if teachers:
        out += ["## Teachers against the student", _markdown_blocks(theader, teachers, 1),
                "Means over the finished seed rows. AP: the student and each teacher evaluated with the GT "
                "Fg-Bg mask (the teachers' last decoder layer; for \"no mask\" rows with the all-background "
                "mask they were trained with). Last-layer loss: each branch's weighted "
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
                out.append(" & ".join(_tex(c).replace("✓", r"\checkmark").replace("±", r"$\pm$") for c in cells)
                           + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def open_manifest(name_or_path):
    """The manifest, or None for table1/table2 while their manifest does not exist yet."""
    from experiments.config import MANIFEST_DIR

    if name_or_path in PAPER_MANIFESTS and not (MANIFEST_DIR / f"{name_or_path}.yaml").is_file():
        return None
    return load_manifest(name_or_path)


def report(name_or_path, results=records.RESULTS):
    """(manifest name, kind 'paper' or 'runs', DataFrame) for a manifest name or path."""
    manifest = open_manifest(name_or_path)
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
                     "its `baseline` row. Only finished runs (DONE) show numbers.")
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
    name, kind, df = report(name_or_path, results)
    folder = Path(results) / "tables"
    markdown = to_markdown(name, kind, df)
    latex = to_latex(name, kind, df)
    if kind == "runs":
        manifest = open_manifest(name_or_path)
        if manifest.families:  # the paper's shape first, the row-by-row table after it
            bdf = blocks_report(manifest, df, results)
            markdown = f"# {name}: results\n\n" + blocks_markdown(bdf) + "\n## Row by row\n\n" + \
                markdown.split("\n\n", 1)[1]
            records.atomic_write(folder / f"{name}_blocks.csv", bdf.to_csv(index=False))
            latex = blocks_latex(name, bdf)
        else:
            sdf = seeds_report(manifest, df)
            if len(sdf):
                markdown += "\n" + seeds_markdown(sdf)
                records.atomic_write(folder / f"{name}_seeds.csv", sdf.to_csv(index=False))
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
