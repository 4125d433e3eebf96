"""The results page of the mask experiment (experiments/synthetic_mask.yaml):

    python -m analysis mask-page [--manifest synthetic_mask] [--results results] [--out docs/mask_experiment.md]

writes the Markdown page and, beside it, images/<page>_forest.png (each comparison's mean and 95% CI
per trunk) and images/<page>_curves.png (the student's AP per epoch of the three arms, per trunk).

The manifest's rows are three arms (the baseline, KS with the GT mask, KS with the teachers told
nothing: `model.ks.mask: none`) x trunks (the manifest's families) x training seeds. Every number on
the page comes from the run records through analysis.comparisons (the paired differences, their
statistics and the marks of pairs across commits or CPU kinds) and analysis.statistics (Holm, the
Welch test); the prose that is not generated holds none. The pre-registered tests (the manifest's
description):

- P1, per trunk: the mask's effect, AP(KS with the GT mask) - AP(KS told nothing) of the same seed,
  paired t, 95% CI, Holm's adjustment over the trunks;
- P2: the trunk x mask interaction, the per-seed mask effects of INTERACTION[0] against those of
  INTERACTION[1], Welch's t-test and the 95% CI of the difference of means;
- where a CI includes 0 the answer is "no effect larger than <its farther bound> AP".

Secondary: the student's AP per arm, the KS gain of each KS arm (paired with the baseline, Holm over
the trunks), teacher minus student, the memory distance of the last epoch, and P1 on the mean of the
last two epochs' AP. Only finished runs (DONE) count; the page renders with none, some or all of
them and says how many pairs each comparison has. It is a pure function of the manifest and the
records (no dates, everything in manifest order), so tests/test_mask_page.py can check the committed
page against a fresh one.
"""
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments import records

from . import AnalysisError, load_manifest, run_minutes
from .comparisons import (KS_GAIN, MARK, MASK_GAIN, ci_text, comparison_specs, comparisons, marks_note, mean_sd,
                          p_text, per_pair, row_results, signed)
from .statistics import CONFIDENCE, holm, mean_and_sd, welch_summary
from .tables import _last_epoch_values

ALPHA = 0.05
INTERACTION = ("random_trained", "seg_frozen")  # P2: the mask's effects on the first trunk against the second's
ARMS = {"base": "baseline", "ks": "KS, GT mask", "ks_no_mask": "KS, told nothing"}
# (comparison of analysis.comparisons, arm whose seed group it is on) -> (key, label on the page)
KINDS = {(MASK_GAIN, "ks_no_mask"): ("mask", "mask effect (KS, GT mask − KS, told nothing)"),
         (KS_GAIN, "ks"): ("ks_gain", "KS gain, GT mask (KS, GT mask − baseline)"),
         (KS_GAIN, "ks_no_mask"): ("ks_gain_no_mask", "KS gain, told nothing (KS, told nothing − baseline)"),
         ("Attn3 − Attn1", "ks"): ("attn3_ks", "Attn3 − Attn1, KS with the GT mask"),
         ("Attn2 − Attn1", "ks"): ("attn2_ks", "Attn2 − Attn1, KS with the GT mask"),
         ("Attn3 − Attn1", "ks_no_mask"): ("attn3_ks_no_mask", "Attn3 − Attn1, KS told nothing"),
         ("Attn2 − Attn1", "ks_no_mask"): ("attn2_ks_no_mask", "Attn2 − Attn1, KS told nothing")}
FOREST = ("mask", "ks_gain", "ks_gain_no_mask", "attn3_ks", "attn2_ks")  # the forest plot's lines per trunk
FOREST_LABELS = {"mask": "mask effect", "ks_gain": "KS gain, GT mask", "ks_gain_no_mask": "KS gain, told nothing",
                 "attn3_ks": "Attn3 − Attn1 (GT mask)", "attn2_ks": "Attn2 − Attn1 (GT mask)"}
ARM_STYLE = {"base": ("k", "--"), "ks": ("tab:blue", "-"), "ks_no_mask": ("tab:red", "-")}
CONF = f"{100 * CONFIDENCE:g}%"


def arm_of(cfg):
    """'base', 'ks' or 'ks_no_mask' of a resolved row configuration."""
    ks = cfg["model"]["ks"]
    if ks["mode"] == "none":
        return "base"
    return "ks" if ks["mask"] == "gt" else "ks_no_mask"


@dataclass
class MaskResults:
    """Everything the page shows, unrounded: `design` (the trunks' settings and seeds), `progress` (rows
    done per trunk and arm, the student's AP over them), `tests` (one line per trunk, comparison kind
    and metric: the paired statistics of analysis.comparisons with `planned` pairs and Holm's p over
    the trunks), `interaction` (the Welch summary of P2 and the effects it compares), `distance`
    (memory distance of the last epoch per trunk and KS arm), `runs` ({(trunk, arm): [RowResult]})."""
    manifest: object
    trunks: list
    design: list
    progress: pd.DataFrame
    tests: pd.DataFrame
    interaction: dict
    distance: pd.DataFrame
    runs: dict = field(default_factory=dict)
    damaged: list = field(default_factory=list)


def _seeds_text(seeds):
    """'0-9' / '0-3, 5': sorted seeds as ranges."""
    seeds, parts = sorted(set(seeds)), []
    for s in seeds:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _stats(values):
    """(n, mean, sample sd) of the values that are numbers (analysis.tables' mean and sd)."""
    return sum(not math.isnan(v) for v in values), *mean_and_sd(values)


def mask_results(manifest, results=records.RESULTS):
    """MaskResults of a manifest (a Manifest, its name or path) from the records under `results`."""
    if not hasattr(manifest, "rows"):
        manifest = load_manifest(manifest)
    trunks = list(manifest.families)
    if not trunks:
        raise AnalysisError(f"manifest {manifest.path}: no families; the mask page needs one family per trunk")
    configs = {name: manifest.resolve(name) for name in manifest.rows}
    where = {name: (manifest.rows[name]["family"], arm_of(cfg)) for name, cfg in configs.items()}
    rows = row_results(manifest, results)
    runs = {(t, a): [rows[n] for n in manifest.rows if where[n] == (t, a)] for t in trunks for a in ARMS}

    design = []  # plain dicts: a DataFrame would turn the None of a setting into NaN
    for t in trunks:
        names = [n for n in manifest.rows if where[n][0] == t]
        cfg = configs[names[0]]
        bb, train = cfg["model"]["backbone"], cfg["train"]
        weights_file = (bb["weights_path"] or ("models/weights/resnet18_synthetic.pth (the default)"
                                               if bb["weights"] == "synthetic" else None))
        design.append({"trunk": t, "weights": bb["weights"], "weights_path": weights_file,
                       "freeze_at": bb["freeze_at"], "lr_backbone": train["lr_backbone"], "epochs": train["epochs"],
                       "lr_drop": train["lr_drop"], "seeds": _seeds_text(configs[n]["train"]["seed"] for n in names),
                       "rows": len(names)})

    progress = []
    for t in trunks:
        for a in ARMS:
            done = [r for r in runs[(t, a)] if r.done]
            line = {"trunk": t, "arm": a, "done": len(done), "of": len(runs[(t, a)]),
                    "minutes": [run_minutes(r.run) for r in done]}
            for m in ("AP", "AP_last2"):
                line[f"{m}_n"], line[f"{m}_mean"], line[f"{m}_sd"] = _stats([r.value("attn1", m) for r in done])
            progress.append(line)

    cdf = comparisons(manifest, results, rows)
    specs = {(info["group"], name): (len(pairs), {"gt": "ks", "none": "ks_no_mask"}.get(info["teacher_mask"]))
             for _, info, name, pairs in comparison_specs(manifest)}  # pairs planned, arm of the seed group
    lines = []
    for _, r in cdf.iterrows():
        planned, arm = specs[(r["group"], r["comparison"])]
        kind = KINDS.get((r["comparison"], arm))
        if kind is None or r["family"] not in trunks:
            continue
        lines.append({"kind": kind[0], "label": kind[1], "trunk": r["family"], "metric": r["metric"],
                      "planned": planned,
                      **{c: r[c] for c in ("n", "mean", "sd", "ci_low", "ci_high", "p", "positive", "differences",
                                           "pairs", "marked", "pairs_marked", "pairs_commit_differs",
                                           "pairs_cpu_differs")}})
    tests = pd.DataFrame(lines, columns=["kind", "label", "trunk", "metric", "planned", "n", "mean", "sd", "ci_low",
                                         "ci_high", "p", "positive", "differences", "pairs", "marked", "pairs_marked",
                                         "pairs_commit_differs", "pairs_cpu_differs"])
    order = {k: i for i, k in enumerate(key for key, _ in KINDS.values())}
    tests["_k"], tests["_t"] = tests["kind"].map(order), tests["trunk"].map(trunks.index)
    tests = tests.sort_values(["_k", "metric", "_t"], kind="stable").drop(columns=["_k", "_t"]).reset_index(drop=True)
    tests["p_holm"] = math.nan  # Holm over every trunk, for each comparison and metric: the pre-registered
    for _, sel in tests.groupby(["kind", "metric"]).groups.items():  # family, unmeasured trunks as p = 1
        p = tests.loc[sel, "p"].tolist()
        adjusted = holm([1.0 if math.isnan(v) else v for v in p])
        tests.loc[sel, "p_holm"] = [math.nan if math.isnan(v) else a for v, a in zip(p, adjusted)]

    effects = {}
    for t in INTERACTION:
        sel = tests[(tests["kind"] == "mask") & (tests["trunk"] == t) & (tests["metric"] == "AP")]
        effects[t] = list(sel.iloc[0]["differences"]) if len(sel) else []
    interaction = {"trunks": INTERACTION, "present": all(t in trunks for t in INTERACTION),
                   "effects": effects, "summary": welch_summary(effects[INTERACTION[0]], effects[INTERACTION[1]]),
                   "planned": {t: int(tests[(tests["kind"] == "mask") & (tests["trunk"] == t)]["planned"].max())
                               if t in trunks and len(tests) else 0 for t in INTERACTION}}

    distance = []
    for t in trunks:
        for a in ("ks", "ks_no_mask"):
            done = [r for r in runs[(t, a)] if r.done]
            line = {"trunk": t, "arm": a, "done": len(done)}
            for b in ("attn3", "attn2"):
                line[f"{b}_n"], line[f"{b}_mean"], line[f"{b}_sd"] = _stats(
                    [_last_epoch_values(r.run, "memory_distance").get(b, math.nan) for r in done])
            distance.append(line)
    damaged = sorted(n for n, r in rows.items() if r.run.state == "damaged")
    return MaskResults(manifest, trunks, design, pd.DataFrame(progress), tests, interaction,
                       pd.DataFrame(distance), runs, damaged)


# ------------------------------------------------------------------------------------------------
# the generated sentences

def _ap(v):
    return f"{v:.2f}"


def _p(p):
    text = p_text(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def farther_bound(low, high):
    """The bound of a CI farther from 0, as a size (AP points)."""
    return max(abs(low), abs(high))


def p1_sentence(r, alpha=ALPHA):
    """The answer of P1 for one trunk (a line of MaskResults.tests, kind 'mask')."""
    trunk, n, planned = r["trunk"], int(r["n"]), int(r["planned"])
    over = f"{n} of {planned} pairs"
    if n < 2 or math.isnan(r["ci_low"]):
        return f"On the {trunk} trunk, the mask's effect is not yet measured ({over} done)."
    tests = f"{_p(r['p'])}, Holm {_p(r['p_holm'])}"
    if r["ci_low"] > 0 or r["ci_high"] < 0:
        verdict = "significant" if r["p_holm"] < alpha else "not significant"
        return (f"On the {trunk} trunk, the GT mask changes student AP by {signed(r['mean'])} AP "
                f"({CONF} CI {ci_text(r['ci_low'], r['ci_high'])}; {tests}: {verdict} at alpha {alpha:g} after "
                f"Holm's adjustment over the trunks; {over}).")
    return (f"On the {trunk} trunk, the GT mask has no effect on student AP larger than "
            f"{_ap(farther_bound(r['ci_low'], r['ci_high']))} AP ({CONF} CI {ci_text(r['ci_low'], r['ci_high'])}; "
            f"mean {signed(r['mean'])}, {tests}; {over}).")


def p2_sentence(interaction):
    """The answer of P2 from MaskResults.interaction."""
    a, b = interaction["trunks"]
    s = interaction["summary"]
    if not interaction["present"]:
        return f"The interaction is not measured: this manifest lacks the {a} or the {b} trunk."
    counts = f"{s.n_a} of {interaction['planned'][a]} and {s.n_b} of {interaction['planned'][b]} pairs"
    if s.n_a < 2 or s.n_b < 2 or math.isnan(s.ci_low):
        return f"The trunk x mask interaction ({a} against {b}) is not yet measured ({counts} done)."
    ci = f"{CONF} CI {ci_text(s.ci_low, s.ci_high)}"
    if s.ci_low > 0 or s.ci_high < 0:
        return (f"The mask's effect on the {a} trunk differs from its effect on the {b} trunk by "
                f"{signed(s.diff)} AP ({ci}; Welch {_p(s.p)}; {counts}).")
    return (f"The mask's effect on the {a} trunk differs from its effect on the {b} trunk by no more than "
            f"{_ap(farther_bound(s.ci_low, s.ci_high))} AP ({ci}; difference {signed(s.diff)}, Welch {_p(s.p)}; "
            f"{counts}).")


# ------------------------------------------------------------------------------------------------
# Markdown

def _table(header, lines, right_from=1):
    rows = [header, ["---" if i < right_from else "---:" for i in range(len(header))]] + lines
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |" for cells in rows)


def _question(description):
    """The manifest description's opening question(s): the text up to its first '?' or, without one,
    its first sentence."""
    text = " ".join(description.split())
    end = text.find("?")
    if end < 0:
        end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def _setting(v):
    if v is None:
        return "none"
    return ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _shown_path(path):
    """The manifest's path from the repository root when it lies inside it, else as given."""
    root = Path(__file__).resolve().parents[1]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sel(tests, kind, metric="AP"):
    return tests[(tests["kind"] == kind) & (tests["metric"] == metric)]


def _stat_cells(r, holm_column=True):
    cells = [f"{int(r['n'])}/{int(r['planned'])}", mean_sd(r["mean"], r["sd"]) + (MARK if r["pairs_marked"] else ""),
             ci_text(r["ci_low"], r["ci_high"]), p_text(r["p"])]
    if holm_column:
        cells.append(p_text(r["p_holm"]))
    return cells + [f"{int(r['positive'])}/{int(r['n'])}", per_pair(r)]


def _tests_table(sel, holm_column=True):
    """One line per trunk of a comparison (`sel`: lines of MaskResults.tests of one kind and metric),
    with the count of marked pairs under it."""
    header = ["Trunk", "pairs done", "mean ± sd", f"{CONF} CI", "p"] + (["Holm p"] if holm_column else []) + \
        ["positive", "per seed"]
    lines = [[r["trunk"]] + _stat_cells(r, holm_column) for _, r in sel.iterrows()]
    note = marks_note(sel.assign(metric="AP"))  # marks_note counts the pairs of its 'AP' lines
    return _table(header, lines) + (f"\n\n{note}" if note else "")


def _pm(n, mean, sd, digits, sign=False):
    """'mean ± sd (n=N)', '–' without values."""
    if not n:
        return "–"
    return mean_sd(mean, sd, digits, sign=sign) + f" (n={n})"


def _time_text(progress):
    """The finished rows' training time (log.jsonl `time_s`: training and evaluation, as measured, so on a
    busy machine more than the CPU needs) and the rest's at each trunk and arm's mean so far."""
    timed = [m for ms in progress["minutes"] for m in ms if not math.isnan(m)]  # a log without time_s: NaN
    untimed = sum(len(ms) for ms in progress["minutes"]) - len(timed)
    spent = sum(timed)
    todo = [(line["of"] - line["done"], mean_and_sd(line["minutes"])[0]) for _, line in progress.iterrows()]
    unknown = sum(n for n, mean in todo if n and math.isnan(mean))
    rest = sum(n * mean for n, mean in todo if n and not math.isnan(mean))
    text = f"Their training took {spent / 60:.1f} hours (log.jsonl `time_s`, as measured on the machines of env.json"
    text += f"; {untimed} without times left out)" if untimed else ")"
    if not any(n for n, _ in todo):
        return text + "."
    text += f"; the other rows, at the mean of their trunk and arm so far, about {rest / 60:.1f} hours more"
    return text + (f", and {unknown} rows of a trunk and arm without a timed row yet." if unknown else ".")


def page_markdown(res, images=None):
    """The page's Markdown from MaskResults; `images`: {'forest': link, 'curves': link}."""
    m, tests = res.manifest, res.tests
    total_rows = int(res.progress["of"].sum())
    done_rows = int(res.progress["done"].sum())
    out = [f"# The mask experiment ({m.name})",
           f"Generated by `python -m analysis mask-page --manifest {m.name}` from `{_shown_path(m.path)}` "
           "and the run records of its rows; do not edit by hand. Only finished runs (DONE) count.",
           "## The experiment", "> " + _question(m.description),
           "Three arms per trunk and training seed: the baseline (`model.ks.mode: none`), KS triple attention "
           "with the GT mask, and KS triple attention with the teachers told nothing (`model.ks.mask: none`). "
           "The trunks are the manifest's families:",
           _table(["Trunk", "model.backbone.weights", "weights file", "freeze_at", "train.lr_backbone", "epochs",
                   "lr_drop", "seeds", "rows"],
                  [[d["trunk"]] + [_setting(d[k]) for k in ("weights", "weights_path", "freeze_at", "lr_backbone",
                                                            "epochs", "lr_drop", "seeds", "rows")]
                   for d in res.design], right_from=3),
           "<details><summary>The manifest's description (pre-registered)</summary>\n\n"
           + " ".join(m.description.split()) + "\n\n</details>"]

    out.append("## Progress")
    cells = []
    for t in res.trunks:
        p = res.progress[res.progress["trunk"] == t].set_index("arm")
        mask = _sel(tests, "mask")
        mask = mask[mask["trunk"] == t]
        pairs = f"{int(mask.iloc[0]['n'])}/{int(mask.iloc[0]['planned'])}" if len(mask) else "–"
        cells.append([t, *[f"{p.loc[a, 'done']}/{p.loc[a, 'of']}" for a in ARMS], pairs])
    out.append(_table(["Trunk", *ARMS.values(), "mask-effect pairs done"], cells))
    summary = f"{done_rows} of {total_rows} rows done."
    if done_rows:
        summary += " " + _time_text(res.progress)
    else:
        summary = "No row has finished yet: nothing is measured yet. " + summary
    if res.damaged:
        summary += " Damaged records, shown as not done: " + ", ".join(f"`{n}`" for n in res.damaged) + "."
    out.append(summary)

    out.append("## Primary tests")
    out.append("### Answers")
    if done_rows < total_rows:
        out.append(f"**Interim: {done_rows} of {total_rows} rows.** The pre-registered tests are of every planned "
                   "pair; below are the same tests on the pairs finished so far, computed again at each look. "
                   "Looking repeatedly at growing data raises the chance of a false positive, so a p-value or "
                   "interval here is not the experiment's answer until every row has finished.")
    out.append("\n".join(f"- P1: {p1_sentence(r)}" for _, r in _sel(tests, "mask").iterrows())
               + f"\n- P2: {p2_sentence(res.interaction)}")
    out.append("### P1: the mask's effect per trunk (AP points)")
    out.append(_tests_table(_sel(tests, "mask")))
    out.append(f"AP(KS with the GT mask) − AP(KS told nothing) of the student (Attn1) after the last epoch "
               f"(eval.json), per training seed; mean ± sample sd of these differences, their {CONF} confidence "
               "interval (t distribution), the two-sided paired t-test p, Holm's adjustment of p over every trunk of "
               "the manifest (a trunk without a p counting as the least significant), "
               "and the seeds where the difference is positive. Fewer than two pairs give no sd, interval or p "
               "(n/a).")
    s = res.interaction["summary"]
    a, b = res.interaction["trunks"]
    out.append(f"### P2: the trunk x mask interaction ({a} against {b}, AP points)")
    out.append(_table([f"mask effect, {a}", f"mask effect, {b}", "difference of means", f"{CONF} CI",
                       "Welch df", "Welch p"],
                      [[_pm(s.n_a, s.mean_a, s.sd_a, 2, sign=True), _pm(s.n_b, s.mean_b, s.sd_b, 2, sign=True),
                        signed(s.diff), ci_text(s.ci_low, s.ci_high),
                        "n/a" if math.isnan(s.dof) else f"{s.dof:.1f}", p_text(s.p)]]))
    out.append("The per-seed mask effects of P1 on the two trunks as two independent samples: mean ± sample sd "
               "(n pairs), the difference of their means, its confidence interval and the two-sided Welch t-test "
               "(unequal variances, Welch–Satterthwaite degrees of freedom). Fewer than two pairs on either trunk "
               "give no interval or p (n/a).")

    out.append("## Secondary results")
    out.append("Without multiplicity claims (the manifest's description).")
    out.append("### Student AP per arm")
    lines = []
    for _, p in res.progress.iterrows():
        lines.append([p["trunk"], ARMS[p["arm"]], f"{p['done']}/{p['of']}", _pm(p["AP_n"], p["AP_mean"], p["AP_sd"], 2),
                      _pm(p["AP_last2_n"], p["AP_last2_mean"], p["AP_last2_sd"], 2)])
    out.append(_table(["Trunk", "Arm", "done", "AP", "AP, mean of the last two epochs"], lines, right_from=2))
    out.append("COCO box AP in percent of the student (Attn1), mean ± sample sd over the finished seeds (n).")
    out.append("### KS gain per trunk (AP points)")
    for kind in ("ks_gain", "ks_gain_no_mask"):
        sel = _sel(tests, kind)
        if len(sel):
            out.append(f"**{sel.iloc[0]['label']}**\n\n" + _tests_table(sel))
    out.append("Each KS row minus its baseline row of the same seed, paired as in P1; Holm's adjustment over the "
               "trunks, as in P1, for each of the two comparisons.")
    out.append("### Teachers minus the student (AP points)")
    sel = tests[tests["kind"].str.startswith("attn") & (tests["metric"] == "AP")]
    lines = [[r["trunk"], r["label"]] + _stat_cells(r, holm_column=False) for _, r in sel.iterrows()]
    out.append(_table(["Trunk", "Comparison", "pairs done", "mean ± sd", f"{CONF} CI", "p", "positive", "per seed"],
                      lines, right_from=2))
    out.append("The teacher's AP minus the student's of the same run, each teacher evaluated with the mask it "
               "was trained with (the GT mask, or the all-background mask of the rows told nothing); paired "
               "t-test per line, no adjustment.")
    out.append("### Memory distance of the last epoch")
    lines = [[d["trunk"], ARMS[d["arm"]], _pm(d["attn3_n"], d["attn3_mean"], d["attn3_sd"], 3),
              _pm(d["attn2_n"], d["attn2_mean"], d["attn2_sd"], 3)] for _, d in res.distance.iterrows()]
    out.append(_table(["Trunk", "Arm", "Attn3", "Attn2"], lines, right_from=2))
    out.append("||Z_t − Z_s|| / ||Z_s||: each teacher's encoder memory against the student's over the validation "
               "images' tokens, from the last epoch of log.jsonl; mean ± sample sd over the finished seeds (n).")
    out.append("### P1 on the mean of the last two epochs' AP (AP points)")
    out.append(_tests_table(_sel(tests, "mask", "AP_last2")))
    out.append("As P1, with each run's student AP averaged over its last two epochs (log.jsonl); Holm over the "
               "trunks as in P1.")

    out.append("## Figures")
    if images:
        out.append(f'<img src="{images["forest"]}" alt="Forest plot: mean and {CONF} CI of each comparison per '
                   f'trunk" width="49%"> <img src="{images["curves"]}" alt="Student AP per epoch of the three '
                   f'arms, per trunk" width="49%">')
    out.append(f"Left: each comparison's mean with its {CONF} confidence interval per trunk (AP points; n: pairs "
               "done; a line without an interval has fewer than two pairs). Right: the student's AP per epoch, "
               "mean over the finished seeds of each arm with their range shaded.")
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# figures

def forest_figure(res):
    """(figure, series): one line per (trunk, comparison of FOREST) with its mean and CI (AP metric);
    series maps each line's label to (mean, ci_low, ci_high, n) as drawn."""
    from .figures import plt  # pyplot on the Agg backend

    sel = res.tests[res.tests["metric"] == "AP"].set_index(["trunk", "kind"])
    colors = dict(zip(FOREST, ("tab:purple", "tab:blue", "tab:red", "tab:green", "tab:orange")))
    entries = [(t, k) for t in res.trunks for k in FOREST if (t, k) in sel.index]
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * max(len(entries), 6) + 1.4))
    series, labels = {}, []
    for y, (t, k) in enumerate(entries):
        r = sel.loc[(t, k)]
        n, planned = int(r["n"]), int(r["planned"])
        label = f"{t}: {FOREST_LABELS[k]} (n={n}/{planned})"
        labels.append(label)
        series[label] = (r["mean"], r["ci_low"], r["ci_high"], n)
        if n and not math.isnan(r["ci_low"]):
            ax.errorbar([r["mean"]], [y], xerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]], fmt="o",
                        color=colors[k], capsize=3, markersize=4)
        elif n:
            ax.plot([r["mean"]], [y], "o", color=colors[k], markersize=4, markerfacecolor="none")
    for y in range(1, len(entries)):  # a rule between the trunks
        if entries[y][0] != entries[y - 1][0]:
            ax.axhline(y - 0.5, color="0.75", linewidth=0.6)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(entries)), labels, fontsize=7)
    ax.set_ylim(len(entries) - 0.5, -0.5)
    ax.set_xlabel(f"AP points (mean, {CONF} CI)")
    ax.grid(axis="x", alpha=0.3)
    if not any(s[3] for s in series.values()):
        ax.set_xlim(-1, 1)
        ax.text(0.5, 0.5, "No finished pairs yet: nothing measured", transform=ax.transAxes, ha="center",
                va="center", fontsize=10, bbox={"facecolor": "white", "edgecolor": "0.6"})
    ax.set_title(f"{res.manifest.name}: paired comparisons per trunk", fontsize=9)
    fig.tight_layout()
    return fig, series


def curves_figure(res):
    """(figure, series): one panel per trunk, the student's AP per epoch of each arm, mean over its
    finished runs (range shaded; analysis.figures._seed_band); series maps '<trunk> / <arm>' to
    (epochs, mean, min, max)."""
    from matplotlib.ticker import MaxNLocator

    from .figures import _seed_band, plt

    n = len(res.trunks)  # one panel per trunk, stacked, to stand beside the forest plot
    fig, axes = plt.subplots(n, 1, figsize=(4.6, 2.3 * n + 0.6), squeeze=False, sharex=False)
    series = {}
    for ax, t in zip(axes.flat, res.trunks):
        for a, name in ARMS.items():
            all_runs = res.runs[(t, a)]
            done = [r.run for r in all_runs if r.done]
            band = _seed_band(done, "attn1") if done else None
            if band is None or not band[0]:
                continue
            xs, mean, lo, hi = band
            color, style = ARM_STYLE[a]
            ax.plot(xs, mean, style, color=color, marker="o", markersize=2.5,
                    label=f"{name} ({len(done)}/{len(all_runs)})")
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            series[f"{t} / {a}"] = band
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished run yet", transform=ax.transAxes, ha="center", va="center", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("student AP")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res.manifest.name}: student (Attn1) AP per epoch,\nmean over finished seeds (done/rows), "
                 "range shaded", fontsize=9)
    fig.tight_layout()
    return fig, series


def _save_png(fig, path):
    from .figures import plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    records.atomic_write(path, buf.getvalue())
    return path


def write_mask_page(name_or_path="synthetic_mask", results=records.RESULTS, out="docs/mask_experiment.md"):
    """Writes the page `out` and images/<out stem>_{forest,curves}.png beside it; returns the paths."""
    out = Path(out)
    res = mask_results(name_or_path, results)
    images = {k: f"images/{out.stem}_{k}.png" for k in ("forest", "curves")}
    paths = [_save_png(forest_figure(res)[0], out.parent / images["forest"]),
             _save_png(curves_figure(res)[0], out.parent / images["curves"])]
    records.atomic_write(out, page_markdown(res, images))
    return [out] + paths
