"""Seed statistics from the records' unrounded numbers (analysis/statistics.py, analysis/comparisons.py):
paired summaries against scipy computed here on the raw values, Holm's adjustment against a
hand-worked example, and the tables' seed comparisons (KS gain, gain from the mask, teacher minus
student, the last two epochs) with their marks for pairs from different commits or CPUs."""
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from analysis.comparisons import COLUMNS, comparisons
from analysis.statistics import holm, paired_summary
from analysis.tables import write_tables
from experiments import records
from experiments.config import Manifest

from .helpers import ENV, holm_by_definition, metrics, scipy_expected, write_manifest, write_run


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_paired_summary_equals_scipy(n):
    rng = np.random.default_rng(n)
    a = rng.normal(30, 2, n)
    b = a - rng.normal(0.5, 1.0, n)
    s = paired_summary(a.tolist(), b.tolist())
    mean, sd, p, low, high = scipy_expected(a, b)
    assert s.n == n and s.positive == int(np.sum(a - b > 0))
    assert [s.mean, s.sd, s.p, s.ci_low, s.ci_high] == pytest.approx([mean, sd, p, low, high], rel=1e-9, abs=1e-12)
    assert s.differences == pytest.approx((a - b).tolist(), rel=0, abs=1e-12)


def test_paired_summary_of_one_pair_none_and_nan_pairs():
    one = paired_summary([31.2], [30.0])
    assert (one.n, one.positive) == (1, 1) and one.mean == pytest.approx(1.2)
    assert all(math.isnan(v) for v in (one.sd, one.p, one.ci_low, one.ci_high))
    none = paired_summary([], [])
    assert none.n == 0 and math.isnan(none.mean) and none.positive == 0
    # a pair with a NaN on either side is left out
    s = paired_summary([1.0, math.nan, 3.0, 4.0], [0.5, 2.0, math.nan, 3.0])
    assert s.n == 2 and s.differences == pytest.approx((0.5, 1.0))
    assert s.p == pytest.approx(stats.ttest_rel([1.0, 4.0], [0.5, 3.0]).pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="2 values against 3"):
        paired_summary([1, 2], [1, 2, 3])


def test_paired_summary_with_equal_differences():
    s = paired_summary([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every difference +1: no spread
    assert (s.mean, s.sd, s.p, s.ci_low, s.ci_high) == (1.0, 0.0, 0.0, 1.0, 1.0)
    z = paired_summary([1.0, 2.0], [1.0, 2.0])
    assert (z.mean, z.p, z.positive) == (0.0, 1.0, 0)


def test_holm_against_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> kept at 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and a NaN (no test: one pair) neither adjusted nor counted
    adjusted = holm([0.6, math.nan, 0.7])
    assert adjusted[0] == 1.0 and adjusted[2] == 1.0 and math.isnan(adjusted[1])
    assert holm([0.2, math.nan, 0.5]) == pytest.approx([0.4, math.nan, 0.5], nan_ok=True)
    assert holm([]) == [] and holm([0.3]) == [0.3]


# ------------------------------------------------------------------------------------------------
# the tables

BASE = (0.3000, 0.3100, 0.3200)
KS = (0.3454, 0.3504, 0.3400)       # KS gains +4.54, +4.04, +2.00
NO_MASK = (0.3480, 0.3500, 0.3450)  # gains from the mask -0.26, +0.04 (rounded APs: 35.0 - 35.0 = 0), -0.50
ATTN3 = (0.3500, 0.3490, 0.3430)
PREVIOUS = 0.0123  # each run's AP one epoch before the last: final - PREVIOUS * (seed + 1)


@pytest.fixture
def family_tree(tmp_path):
    """Manifest 'fam' (one family, seeds 0-2): baseline, KS triple and KS triple without mask. The KS row
    of seed 2 ran at another commit; the no-mask row of seed 0 has no `cpu` in its env.json."""
    rows = []
    for seed in (0, 1, 2):
        rows += [{"name": f"base_seed{seed}", "family": "dab", "config": {"train": {"seed": seed}}},
                 {"name": f"ks_seed{seed}", "family": "dab", "baseline": f"base_seed{seed}",
                  "config": {"model": {"ks": {"mode": "triple"}}, "train": {"seed": seed}}},
                 {"name": f"ks_no_mask_seed{seed}", "family": "dab", "baseline": f"base_seed{seed}",
                  "config": {"model": {"ks": {"mode": "triple", "mask": "none"}}, "train": {"seed": seed}}}]
    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump({"families": {"dab": {"model": {"variant": "dab_detr"}}}, "rows": rows},
                                   sort_keys=False))
    results = tmp_path / "results"
    for seed in (0, 1, 2):
        for row, ap, teacher, env in (
                (f"base_seed{seed}", BASE[seed], None, ENV),
                (f"ks_seed{seed}", KS[seed], ATTN3[seed], dict(ENV, git_sha="f" * 40) if seed == 2 else ENV),
                (f"ks_no_mask_seed{seed}", NO_MASK[seed], NO_MASK[seed] + 0.001,
                 {"git_sha": ENV["git_sha"]} if seed == 0 else ENV)):
            final = {"attn1": metrics(ap)}
            earlier = {"attn1": metrics(ap - PREVIOUS * (seed + 1))}
            if teacher is not None:
                final["attn3"] = metrics(teacher)
                earlier["attn3"] = metrics(teacher - 0.002)
            write_run(results, "fam", row, "done", [(1, earlier), (2, final)], final, env=env)
    return Manifest(path), results


def _line(cdf, group, comparison, metric="AP"):
    sel = cdf[(cdf["group"] == group) & (cdf["comparison"] == comparison) & (cdf["metric"] == metric)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_comparisons_come_from_the_unrounded_records(family_tree):
    manifest, results = family_tree
    cdf = comparisons(manifest, results)
    assert list(cdf.columns) == COLUMNS
    # (2 KS gains, the mask gain, Attn3 - Attn1 and Attn2 - Attn1 of both KS groups) x 2 metrics
    assert len(cdf) == 7 * 2 and _line(cdf, "ks", "Attn2 − Attn1")["n"] == 0  # no attn2 in these records
    pct = lambda values: [100 * v for v in values]  # noqa: E731
    cases = {("ks", "KS gain"): (KS, BASE), ("ks_no_mask", "KS gain"): (NO_MASK, BASE),
             ("ks_no_mask", "gain from the GT mask"): (KS, NO_MASK), ("ks", "Attn3 − Attn1"): (ATTN3, KS)}
    for (group, comparison), (a, b) in cases.items():
        r = _line(cdf, group, comparison)
        mean, sd, p, low, high = scipy_expected(pct(a), pct(b))
        assert r["n"] == 3 and r["positive"] == sum(x > y for x, y in zip(a, b))
        assert [r["mean"], r["sd"], r["p"], r["ci_low"], r["ci_high"]] == pytest.approx(
            [mean, sd, p, low, high], rel=1e-9, abs=1e-12), (group, comparison)
    mask = _line(cdf, "ks_no_mask", "gain from the GT mask")
    assert mask["positive"] == 1  # +0.04 at seed 1: 0/3 from the APs rounded to 0.1
    assert mask["differences"] == pytest.approx((-0.26, 0.04, -0.50), abs=1e-9)
    # Holm over the comparisons of one table and metric: the three gains; the teachers' one alone
    gains = cdf[(cdf["table"] == "gains") & (cdf["metric"] == "AP")]
    assert gains["p_holm"].tolist() == pytest.approx(holm_by_definition(gains["p"].tolist()), rel=1e-12)
    teacher = _line(cdf, "ks", "Attn3 − Attn1")
    assert teacher["p_holm"] == pytest.approx(teacher["p"])


def test_last_two_epochs_have_their_own_paired_gain(family_tree):
    manifest, results = family_tree
    cdf = comparisons(manifest, results)
    last2 = lambda values: [100 * (2 * v - PREVIOUS * (s + 1)) / 2 for s, v in enumerate(values)]  # noqa: E731
    r = _line(cdf, "ks", "KS gain", "AP_last2")
    mean, sd, p, low, high = scipy_expected(last2(KS), last2(BASE))
    assert [r["mean"], r["sd"], r["p"], r["ci_low"], r["ci_high"]] == pytest.approx([mean, sd, p, low, high],
                                                                                     rel=1e-9, abs=1e-12)
    gains = cdf[(cdf["table"] == "gains") & (cdf["metric"] == "AP_last2")]
    assert gains["p_holm"].tolist() == pytest.approx(holm_by_definition(gains["p"].tolist()), rel=1e-12)


def test_pairs_from_other_commits_or_cpus_are_marked(family_tree):
    manifest, results = family_tree
    cdf = comparisons(manifest, results)
    ks = _line(cdf, "ks", "KS gain")
    assert ks["marked"] == (False, False, True) and (ks["pairs_commit_differs"], ks["pairs_cpu_differs"]) == (1, 0)
    no_mask = _line(cdf, "ks_no_mask", "KS gain")  # seed 0: no cpu in env.json -> unknown -> marked
    assert no_mask["marked"] == (True, False, False) and no_mask["pairs_cpu_differs"] == 1
    mask = _line(cdf, "ks_no_mask", "gain from the GT mask")
    assert mask["marked"] == (True, False, True) and mask["pairs"][0] == "ks_seed0 − ks_no_mask_seed0"
    assert _line(cdf, "ks", "Attn3 − Attn1")["pairs_marked"] == 0  # one run with itself

    markdown = write_tables(str(manifest.path), results)
    assert "+4.54 +4.04 +2.00†" in markdown and "-0.26† +0.04 -0.50†" in markdown
    assert "| +3.53 ± 1.35† | 3/3 |" in markdown  # the blocks' KS gain cell: mean ± sd, marked
    assert "4 of the 9 pairs of two runs here (2 from different or unknown commits, 2 from different or " \
           "unknown CPU kinds" in markdown
    assert (results / "tables" / "fam_comparisons.csv").is_file()
    bdf_text = (results / "tables" / "fam_blocks.csv").read_text()
    assert "gain_AP_p_holm" in bdf_text and "gain_AP_last2_mean" in bdf_text


def test_one_seed_has_no_p_value_or_interval(tmp_path):
    manifest = write_manifest(tmp_path / "one.yaml", [
        {"name": "base_seed0"}, {"name": "ks_seed0", "baseline": "base_seed0",
                                 "config": {"model": {"ks": {"mode": "triple"}}}}])
    results = tmp_path / "results"
    for row, ap in (("base_seed0", 0.30051), ("ks_seed0", 0.31249)):
        write_run(results, "one", row, "done", [(1, {"attn1": metrics(ap)})], {"attn1": metrics(ap)})
    cdf = comparisons(str(manifest), results)
    r = _line(cdf, "ks", "KS gain")
    assert r["n"] == 1 and r["mean"] == pytest.approx(1.198) and math.isnan(r["p"]) and math.isnan(r["p_holm"])
    assert math.isnan(r["ci_low"]) and math.isnan(r["sd"])
    # without seed groups of two rows the table is the row-by-row one; its gain from the unrounded APs
    # (31.249 - 30.051 = +1.2, where the rounded 31.2 - 30.1 would give +1.1)
    markdown = write_tables(str(manifest), results)
    assert "| ks_seed0 | base_seed0 | done | 31.2 |" in markdown and "| +1.2 |" in markdown
    assert "Over training seeds" not in markdown and "Paired comparisons" not in markdown


def test_seed_table_of_a_manifest_without_families(tmp_path):
    """demo_seeds-shaped: KS gain with p and interval from the unrounded APs, marks when a record lacks cpu."""
    rows = []
    for seed in (0, 1, 2):
        rows += [{"name": f"base_seed{seed}", "config": {"train": {"seed": seed}}},
                 {"name": f"ks_seed{seed}", "baseline": f"base_seed{seed}",
                  "config": {"model": {"ks": {"mode": "triple"}}, "train": {"seed": seed}}}]
    manifest = write_manifest(tmp_path / "seeds.yaml", rows)
    results = tmp_path / "results"
    base, ks = (0.3012, 0.3149, 0.3086), (0.3251, 0.3346, 0.3348)
    for seed in (0, 1, 2):
        write_run(results, "seeds", f"base_seed{seed}", "done", [(1, {"attn1": metrics(base[seed])})],
                  {"attn1": metrics(base[seed])}, env={"git_sha": ENV["git_sha"]})
        write_run(results, "seeds", f"ks_seed{seed}", "done", [(1, {"attn1": metrics(ks[seed])})],
                  {"attn1": metrics(ks[seed])})
    markdown = write_tables(str(manifest), results)
    mean, sd, p, low, high = scipy_expected([100 * v for v in ks], [100 * v for v in base])
    r = _line(comparisons(str(manifest), results, smallest=2), "ks", "KS gain")
    assert [r["mean"], r["p"], r["ci_low"], r["ci_high"]] == pytest.approx([mean, p, low, high], rel=1e-9)
    assert f"| {mean:+.2f} ± {sd:.2f}† | 3/3 |" in markdown
    assert f"| [{low:+.2f}, {high:+.2f}] | {p:.3f} | {p:.3f} | 3/3 |" in markdown  # one comparison: Holm = p
    assert "3 of the 3 pairs of two runs here (0 from different or unknown commits, 3 from different or " \
           "unknown CPU kinds" in markdown
    sdf = (results / "tables" / "seeds_seeds.csv").read_text()
    assert "gain_AP_p" in sdf


def test_coco_minus_one_is_not_a_number(tmp_path):
    """-1 (COCOeval: nothing to measure, e.g. no small objects) is n/a, not -100.0."""
    manifest = write_manifest(tmp_path / "toy.yaml", [{"name": "a"}])
    results = tmp_path / "results"
    final = {"attn1": metrics(0.3, APs=-1)}
    write_run(results, "toy", "a", "done", [(1, final)], final)
    markdown = write_tables(str(manifest), results)
    assert "| a |  | done | 30.0 | 50.0 | 33.0 | n/a | 34.0 | 48.0 |" in markdown and "-100" not in markdown
    assert records.eval_problem(final) is None


@pytest.mark.parametrize("name", ["synthetic_table1", "synthetic_table2", "synthetic_controls", "synthetic_teachers",
                                  "demo_seeds"])
def test_committed_tables_are_what_the_records_give(tmp_path, name):
    """results/tables/<manifest>*.{md,csv,tex} as committed equal a fresh `python -m analysis tables`
    over the committed records (so the numbers quoted from them come from the command)."""
    (tmp_path / "runs").symlink_to(records.RESULTS / "runs")
    write_tables(name, tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "tables").iterdir())
    assert f"{name}_comparisons.csv" in fresh
    for file in fresh:
        assert (tmp_path / "tables" / file).read_text() == (records.RESULTS / "tables" / file).read_text(), file
