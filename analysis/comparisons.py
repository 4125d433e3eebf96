"""The seed comparisons of a manifest, from the records' full precision: which rows are seeds of one
setting (`seed_groups`), which rows pair with which (the KS gain: each row minus its `baseline` row;
the gain from the GT mask: the row's GT-mask twin minus the row with `model.ks.mask: none`; teacher
minus student: Attn3 / Attn2 minus Attn1 of the same run), and their paired statistics
(analysis/statistics.py) as one tidy DataFrame, one line per comparison and metric:

    comparisons(manifest, results) -> DataFrame[manifest, table, family, variant, group, method,
        comparison, metric, n, mean, sd, p, p_holm, ci_low, ci_high, positive, differences, pairs,
        marked, pairs_marked, pairs_commit_differs, pairs_cpu_differs]

AP in percent (100 x the records' fractions), never rounded here. Two metrics: "AP" (eval.json, the
final evaluation) and "AP_last2" (the mean of the last two epochs' AP in log.jsonl, which damps the
noise of one evaluation). Holm's adjustment runs over the comparisons of one table ("gains": KS gains
and gains from the mask; "teachers": teacher minus student) and one metric.

A pair of two runs is marked when they may not have run the same code on the same kind of machine:
different commits (env.json `git_shas`, the commits that trained the run, else `git_sha`; a missing
one or a "-dirty" tree counts as unknown, so as different) or different CPU kinds (env.json `cpu`;
a record without it is unknown, so marked too). The two branches of one run are never marked.
"""
import copy
import json
import math
import re
from dataclasses import dataclass, field

import pandas as pd

from experiments import records

from . import VARIANT_NAMES, load_manifest, load_run, metric
from .statistics import holm, paired_summary

METRIC_NAMES = {"AP": "AP", "AP_last2": "AP, mean of the last two epochs"}
GAINS, TEACHERS = "gains", "teachers"
KS_GAIN, MASK_GAIN = "KS gain", "gain from the GT mask"
KS_METHODS = {"none": ("baseline", False, False), "dual_share_v": ("dual attention", True, False),
              "dual_share_a": ("dual attention", False, True), "triple": ("triple attention", True, True)}
TEACHER_OF = {"attn3": "shares_v", "attn2": "shares_a"}  # Attn3 shares V (Q^t, K^t, V), Attn2 shares A
MARK = "†"
COLUMNS = ["manifest", "table", "family", "variant", "group", "method", "comparison", "metric", "n", "mean", "sd",
           "p", "p_holm", "ci_low", "ci_high", "positive", "differences", "pairs", "marked", "pairs_marked",
           "pairs_commit_differs", "pairs_cpu_differs"]


# ------------------------------------------------------------------------------------------------
# which rows go together

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


def group_info(manifest, group, rows):
    """What a seed group is: family, variant name, KS mode and mask, method ('triple attention, no
    mask'), which teachers it has (shares_v: Attn3, shares_a: Attn2)."""
    cfg = manifest.resolve(rows[0])
    mode, mask = cfg["model"]["ks"]["mode"], cfg["model"]["ks"]["mask"]
    method, shares_v, shares_a = KS_METHODS[mode]
    return {"family": manifest.rows[rows[0]].get("family") or cfg["model"]["variant"],
            "variant": VARIANT_NAMES.get(cfg["model"]["variant"], cfg["model"]["variant"]), "group": group,
            "ks_mode": mode, "method": method + ("" if mask == "gt" or mode == "none" else ", no mask"),
            "shares_v": shares_v, "shares_a": shares_a, "teacher_mask": None if mode == "none" else mask}


# ------------------------------------------------------------------------------------------------
# the numbers of each row, unrounded

@dataclass
class RowResult:
    """One row's numbers for the seed statistics: `final` {branch: {metric: percent}} from eval.json and
    `last2` {branch: AP percent, the mean of the last two epochs of log.jsonl}, both empty unless the
    run is done (NaN where a value is missing, undefined or -1); `commit` (a tuple of commits, None when
    unknown) and `cpu` (None when unknown) from env.json."""
    name: str
    run: records.RunRecord
    done: bool
    final: dict = field(default_factory=dict)
    last2: dict = field(default_factory=dict)
    commit: tuple = None
    cpu: str = None

    def value(self, branch, metric_name="AP"):
        if metric_name == "AP_last2":
            return self.last2.get(branch, math.nan)
        return self.final.get(branch, {}).get(metric_name, math.nan)


def _last_two(log, branch):
    """The mean AP (percent) of the last two epochs of `log`, NaN unless both evaluated the branch."""
    values = [100 * metric(((e.get("eval") or {}).get(branch) or {}).get("AP")) for e in log[-2:]]
    return math.fsum(values) / 2 if len(values) == 2 else math.nan


def _commit(env):
    shas = env.get("git_shas") or ([env["git_sha"]] if env.get("git_sha") else [])
    if not shas or not all(isinstance(s, str) and s and not s.endswith("-dirty") for s in shas):
        return None
    return tuple(shas)


def row_result(manifest, name, results=records.RESULTS):
    run = load_run(*manifest.record_of(name), results)
    out = RowResult(name, run, run.state == "done")
    if out.done:
        for branch, metrics in run.eval.items():
            if isinstance(metrics, dict):
                out.final[branch] = {m: 100 * metric(metrics.get(m)) for m in records.METRICS}
                out.last2[branch] = _last_two(run.log, branch)
    env = records.read_json(run.directory / "env.json", {})
    env = env if isinstance(env, dict) else {}
    out.commit = _commit(env)
    out.cpu = env.get("cpu") if isinstance(env.get("cpu"), str) and env.get("cpu") else None
    return out


def row_results(manifest, results=records.RESULTS):
    """{row: RowResult} of every manifest row, in manifest order."""
    return {name: row_result(manifest, name, results) for name in manifest.rows}


# ------------------------------------------------------------------------------------------------
# the comparisons

def comparison_specs(manifest, smallest=1):
    """[(table, group info, comparison, [(row a, branch a, row b, branch b), ...])]: what a - b is
    compared, seed by seed, in manifest order of the seed groups (of `smallest` rows or more)."""
    twins = mask_twins(manifest)
    specs = []
    for group, rows in seed_groups(manifest, smallest).items():
        info = group_info(manifest, group, rows)
        based = [(r, manifest.rows[r]["baseline"]) for r in rows if manifest.rows[r].get("baseline")]
        if based:
            specs.append((GAINS, info, KS_GAIN, [(a, "attn1", b, "attn1") for a, b in based]))
        masked = [(twins[r], r) for r in rows if r in twins]
        if masked:
            specs.append((GAINS, info, MASK_GAIN, [(a, "attn1", b, "attn1") for a, b in masked]))
        for branch in ("attn3", "attn2"):
            if info["ks_mode"] != "none" and info[TEACHER_OF[branch]]:
                specs.append((TEACHERS, info, f"Attn{branch[-1]} − Attn1", [(r, branch, r, "attn1") for r in rows]))
    return specs


def pair_marks(a, b):
    """(commits differ or unknown, CPU kinds differ or unknown) of two RowResults; (False, False) for
    one run with itself."""
    if a is b:
        return False, False
    return (a.commit is None or a.commit != b.commit), (a.cpu is None or a.cpu != b.cpu)


def comparisons(manifest, results=records.RESULTS, rows=None, smallest=1):
    """The tidy DataFrame of the seed comparisons (module docstring) of a manifest (a Manifest, its
    name or path), over its seed groups of `smallest` rows or more; `rows`: its row_results when
    already read."""
    if not hasattr(manifest, "rows"):
        manifest = load_manifest(manifest)
    rows = row_results(manifest, results) if rows is None else rows
    lines = []
    for table, info, name, pairs in comparison_specs(manifest, smallest):
        for metric_name in METRIC_NAMES:
            a = [rows[ra].value(ba, metric_name) for ra, ba, rb, bb in pairs]
            b = [rows[rb].value(bb, metric_name) for ra, ba, rb, bb in pairs]
            used = [(ra, rb) for (ra, _, rb, _), x, y in zip(pairs, a, b) if not (math.isnan(x) or math.isnan(y))]
            marks = [pair_marks(rows[ra], rows[rb]) for ra, rb in used]
            s = paired_summary(a, b)
            lines.append({"manifest": manifest.name, "table": table,
                          **{k: info[k] for k in ("family", "variant", "group", "method")},
                          "comparison": name, "metric": metric_name, "n": s.n, "mean": s.mean, "sd": s.sd, "p": s.p,
                          "ci_low": s.ci_low, "ci_high": s.ci_high, "positive": s.positive,
                          "differences": s.differences,
                          "pairs": tuple(ra if ra == rb else f"{ra} − {rb}" for ra, rb in used),
                          "marked": tuple(c or u for c, u in marks), "pairs_marked": sum(c or u for c, u in marks),
                          "pairs_commit_differs": sum(c for c, _ in marks),
                          "pairs_cpu_differs": sum(u for _, u in marks)})
    df = pd.DataFrame(lines, columns=[c for c in COLUMNS if c != "p_holm"])
    df.insert(COLUMNS.index("p_holm"), "p_holm", math.nan)
    for _, sel in df.groupby(["table", "metric"]).groups.items():
        df.loc[sel, "p_holm"] = holm(df.loc[sel, "p"].tolist())
    return df


def to_csv(cdf):
    """The comparisons as CSV: tuples as space-separated text (differences to 6 decimals)."""
    out = cdf.copy()
    out["differences"] = [" ".join(f"{d:.6f}" for d in ds) for ds in cdf["differences"]]
    out["pairs"] = [" ; ".join(ps) for ps in cdf["pairs"]]
    out["marked"] = [" ".join("1" if m else "0" for m in ms) for ms in cdf["marked"]]
    return out.to_csv(index=False)


# ------------------------------------------------------------------------------------------------
# printing (the only rounding)

def signed(v, digits=2):
    return "n/a" if math.isnan(v) else f"{v:+.{digits}f}"


def mean_sd(mean, sd, digits=2, sign=True):
    if math.isnan(mean):
        return ""
    head = signed(mean, digits) if sign else f"{mean:.{digits}f}"
    return head + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def p_text(p):
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def ci_text(low, high):
    return "n/a" if math.isnan(low) else f"[{signed(low)}, {signed(high)}]"


def per_pair(r):
    """'+4.54 +4.68†': each pair's difference, † where the pair is marked."""
    return " ".join(signed(d) + (MARK if m else "") for d, m in zip(r["differences"], r["marked"]))


def cell(r):
    """'mean ± sd' of a comparison, † when any of its pairs is marked; '' without pairs."""
    return "" if not r["n"] else mean_sd(r["mean"], r["sd"]) + (MARK if r["pairs_marked"] else "")


def marks_note(cdf, short=False):
    """The sentence under a table: how many of its pairs are marked, and why (`short`: for the tables
    above the paired comparisons, which say why)."""
    ap = cdf[cdf["metric"] == "AP"]
    between = sum(1 for ps in ap["pairs"] for p in ps if " − " in p)
    marked, commits, cpus = (int(ap[c].sum()) for c in ("pairs_marked", "pairs_commit_differs", "pairs_cpu_differs"))
    if not between:
        return ""
    if short:
        return (f"{MARK}: the comparison includes pairs of runs that may differ in code or machine ({marked} of the "
                f"{between} pairs here: different or unknown commits or CPU kinds; the paired comparisons below "
                f"mark each pair).")
    return (f"{MARK} marks a pair whose two runs may differ in code or machine: {marked} of the {between} pairs of "
            f"two runs here ({commits} from different or unknown commits, {cpus} from different or unknown CPU "
            f"kinds; env.json `git_sha`/`git_shas` and `cpu`, where a record without `cpu` or a \"-dirty\" tree "
            f"counts as unknown). Pairs within one run (teacher minus student) are never marked.")


def comparisons_markdown(cdf):
    """'## Paired comparisons over seeds': one table per kind (gains, teachers), one line per
    comparison with both metrics."""
    if not len(cdf):
        return ""
    header = ["Variant", "Rows", "Comparison", "n", "mean ± sd", "95% CI", "p", "Holm p", "positive", "per seed",
              "last 2 epochs: mean ± sd", "95% CI", "p", "Holm p", "positive"]
    parts = ["## Paired comparisons over seeds"]
    titles = {GAINS: "### Gains (AP points)", TEACHERS: "### Teachers against the student (AP points)"}
    for table in (GAINS, TEACHERS):
        sel = cdf[cdf["table"] == table]
        if not len(sel):
            continue
        rows = [header, ["---", "---", "---"] + ["---:"] * (len(header) - 3)]
        final, last2 = sel[sel["metric"] == "AP"], sel[sel["metric"] == "AP_last2"]
        for (_, r), (_, q) in zip(final.iterrows(), last2.iterrows()):
            rows.append([r["variant"], f"{r['method']} ({r['group']})", r["comparison"], str(r["n"]), cell(r),
                         ci_text(r["ci_low"], r["ci_high"]), p_text(r["p"]), p_text(r["p_holm"]),
                         f"{r['positive']}/{r['n']}", per_pair(r), cell(q), ci_text(q["ci_low"], q["ci_high"]),
                         p_text(q["p"]), p_text(q["p_holm"]), f"{q['positive']}/{q['n']}"])
        parts.append(titles[table])
        parts.append("\n".join("| " + " | ".join(cells) + " |" for cells in rows))
        note = marks_note(sel)
        if note:
            parts.append(note)
    parts.append("Paired over seeds, from the records' unrounded AP (percent): KS gain, each seed's row minus its "
                 "`baseline` row; gain from the GT mask, each seed's KS row with the GT mask minus the same row "
                 "with `model.ks.mask: none`; teacher minus student, the teacher's AP (evaluated with the mask it "
                 "was trained with) minus the student's of the same run. mean ± sample sd of the differences, "
                 "their 95% confidence interval (t distribution), the two-sided paired t-test p, Holm's adjustment "
                 "of p across the comparisons of one table and metric, and the seeds where the difference is "
                 "positive. Last 2 epochs: the same with each run's AP averaged over its last two epochs "
                 "(log.jsonl). One pair gives no sd, interval or p (n/a).")
    return "\n\n".join(parts) + "\n"
