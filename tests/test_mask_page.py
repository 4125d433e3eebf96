"""python -m analysis mask-page (analysis/mask_page.py): the pre-registered tests of the mask experiment
against scipy on hand-made records (P1 with Holm over the three trunks, P2 with Welch's test), the
answer sentences in both cases (CI excludes 0, CI includes 0), the page with no finished row, and the
committed docs/mask_experiment.md against a fresh one from the committed records and manifest."""
import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from analysis.__main__ import main
from analysis.mask_page import curves_figure, forest_figure, mask_results, p1_sentence, p2_sentence, page_markdown
from analysis.statistics import welch_summary
from experiments import records
from experiments.config import Manifest

from .helpers import holm_by_definition, scipy_expected

REPO = records.RESULTS.parent
ENV = {"git_sha": "0123456789abcdef0123456789abcdef01234567", "cpu": "Test CPU"}


# ------------------------------------------------------------------------------------------------
# Welch's two-sample test

def welch_expected(a, b):
    """(difference of means, p, ci_low, ci_high, dof): scipy's p, the interval from the Welch-Satterthwaite
    degrees of freedom computed here."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = a.mean() - b.mean()
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return diff, stats.ttest_ind(a, b, equal_var=False).pvalue, diff - half, diff + half, dof


@pytest.mark.parametrize("na,nb", [(2, 2), (3, 7), (10, 10), (6, 3)])
def test_welch_summary_equals_scipy(na, nb):
    rng = np.random.default_rng(na * 10 + nb)
    a, b = rng.normal(1.0, 0.5, na), rng.normal(0.2, 1.5, nb)
    s = welch_summary(a.tolist(), b.tolist())
    diff, p, low, high, dof = welch_expected(a, b)
    assert (s.n_a, s.n_b) == (na, nb)
    assert [s.diff, s.p, s.ci_low, s.ci_high, s.dof] == pytest.approx([diff, p, low, high, dof], rel=1e-9)
    assert [s.mean_a, s.sd_a, s.sd_b] == pytest.approx([a.mean(), a.std(ddof=1), b.std(ddof=1)], rel=1e-12)


def test_welch_summary_small_and_flat_samples():
    one = welch_summary([1.0], [0.5, 0.7, math.nan])  # NaN left out; one value: no spread, no test
    assert (one.n_a, one.n_b) == (1, 2) and one.diff == pytest.approx(0.4)
    assert all(math.isnan(v) for v in (one.p, one.ci_low, one.ci_high, one.dof))
    flat = welch_summary([2.0, 2.0], [1.0, 1.0])
    assert (flat.diff, flat.p, flat.ci_low, flat.ci_high) == (1.0, 0.0, 1.0, 1.0)
    assert welch_summary([], [1.0, 2.0]).n_a == 0


# ------------------------------------------------------------------------------------------------
# hand-made records of a small manifest of the experiment's shape

# student AP (fractions) per trunk and seed: KS told nothing; the GT-mask row adds MASK/100, the baseline
# subtracts GAIN/100 from the told-nothing row
NO_MASK = {"seg_frozen": (0.3010, 0.3120, 0.2980, 0.3055),
           "crops_frozen": (0.2870, 0.2911, 0.2799, 0.2850),
           "random_trained": (0.1502, 0.1611, 0.1444, 0.1580)}
MASK = {"seg_frozen": (1.10, 0.85, 1.32, 0.97),          # CI excludes 0
        "crops_frozen": (0.30, -0.42, 0.11, -0.20),      # CI includes 0
        "random_trained": (-0.35, 0.52, 0.18, -0.61)}
GAIN = {"seg_frozen": (0.6, 0.4, 0.9, 0.2), "crops_frozen": (0.1, 0.3, -0.2, 0.5),
        "random_trained": (1.0, -0.4, 0.3, 0.8)}
PREFIX = {"seg_frozen": "seg", "crops_frozen": "crops", "random_trained": "random"}
SEEDS = 4


def aps(trunk, seed):
    """{arm: student AP fraction} of one trunk and seed."""
    no_mask = NO_MASK[trunk][seed]
    return {"base": no_mask - GAIN[trunk][seed] / 100, "ks": no_mask + MASK[trunk][seed] / 100, "ks_no_mask": no_mask}


def branch(ap):
    return {"AP": ap, "AP50": ap + 0.3, "AP75": ap + 0.02, "APs": ap / 2, "APm": ap + 0.05, "APl": ap + 0.2}


def write_row(results, manifest, row, ap, epochs, teachers, distance, env=ENV, time_s=1.0):
    """A finished run: log.jsonl with `epochs` evaluated epochs of `time_s` seconds (the student's AP rising
    to `ap`, teachers +0.02 / +0.01 above it, memory distance per epoch), eval.json of the last, env.json
    and DONE."""
    d = records.run_dir(manifest, row, results)
    d.mkdir(parents=True)
    lines = []
    for e in range(epochs):
        a = ap - 0.01 * (epochs - 1 - e)
        ev = {"attn1": branch(a)}
        extra = {}
        if teachers:
            ev.update({"attn3": branch(a + 0.02), "attn2": branch(a + 0.01)})
            extra = {"memory_distance": {"attn3": distance + e, "attn2": 2 * distance + e}}
        lines.append({"epoch": e, "lr": 1e-4, "train": {"loss": 10.0 - e}, "eval": ev, **extra, "time_s": time_s})
    records.write_log(d / "log.jsonl", lines)
    records.write_json(d / "env.json", env)
    records.write_json(d / "eval.json", {"epoch": epochs - 1, **lines[-1]["eval"]})
    records.write_json(d / "DONE", {"epochs": epochs})


EPOCHS = {"seg_frozen": 2, "crops_frozen": 2, "random_trained": 3}


def write_small_manifest(path, seeds=SEEDS):
    families = {"seg_frozen": {"train": {"epochs": 2, "lr_drop": [1]}},
                "crops_frozen": {"model": {"backbone": {"weights_path": "models/weights/resnet18_synthetic_crops.pth"}},
                                 "train": {"epochs": 2, "lr_drop": [1]}},
                "random_trained": {"model": {"backbone": {"weights": None, "freeze_at": 0}},
                                   "train": {"epochs": 3, "lr_drop": [2]}}}
    rows = []
    for seed in range(seeds):
        for trunk, prefix in PREFIX.items():
            train = {"seed": seed}
            rows += [{"name": f"{prefix}_base_seed{seed}", "family": trunk,
                      "config": {"model": {"ks": {"mode": "none"}}, "train": train}},
                     {"name": f"{prefix}_ks_seed{seed}", "family": trunk, "baseline": f"{prefix}_base_seed{seed}",
                      "config": {"model": {"ks": {"mode": "triple"}}, "train": train}},
                     {"name": f"{prefix}_ks_no_mask_seed{seed}", "family": trunk,
                      "baseline": f"{prefix}_base_seed{seed}",
                      "config": {"model": {"ks": {"mode": "triple", "mask": "none"}}, "train": train}}]
    path.write_text(yaml.safe_dump({"description": "Does the mask matter? A test manifest.", "defaults_from": "demo",
                                    "families": families, "rows": rows}, sort_keys=False))
    return Manifest(path)


@pytest.fixture
def mask_tree(tmp_path):
    """Manifest 'mask' (three trunks x three arms x four seeds), every row done, one commit and CPU except
    the told-nothing row of crops seed 3, trained at another commit (its pairs are marked)."""
    manifest = write_small_manifest(tmp_path / "mask.yaml")
    results = tmp_path / "results"
    for trunk, prefix in PREFIX.items():
        for seed in range(SEEDS):
            for arm, ap in aps(trunk, seed).items():
                env = dict(ENV, git_sha="f" * 40) if (trunk, arm, seed) == ("crops_frozen", "ks_no_mask", 3) else ENV
                write_row(results, "mask", f"{prefix}_{arm}_seed{seed}", ap, EPOCHS[trunk], arm != "base",
                          0.1 * (seed + 1), env)
    return manifest, results


def pct(trunk, arm):
    return [100 * aps(trunk, s)[arm] for s in range(SEEDS)]


def last2(trunk, arm):
    """Each run's student AP averaged over its last two epochs (percent), as write_row logs them."""
    return [100 * (2 * aps(trunk, s)[arm] - 0.01) / 2 for s in range(SEEDS)]


def line(res, kind, trunk, metric="AP"):
    t = res.tests
    sel = t[(t["kind"] == kind) & (t["trunk"] == trunk) & (t["metric"] == metric)]
    assert len(sel) == 1
    return sel.iloc[0]


def check(r, expected):
    mean, sd, p, low, high = expected
    assert [r["mean"], r["sd"], r["p"], r["ci_low"], r["ci_high"]] == pytest.approx([mean, sd, p, low, high],
                                                                                     rel=1e-9, abs=1e-12)


def test_primary_and_secondary_statistics_against_scipy(mask_tree):
    manifest, results = mask_tree
    res = mask_results(manifest, results)
    trunks = list(PREFIX)
    assert res.trunks == trunks
    # P1: the mask's effect per trunk, paired; Holm over the three trunks (not over every gain of the table)
    for metric, values in (("AP", pct), ("AP_last2", last2)):
        ps = []
        for trunk in trunks:
            r = line(res, "mask", trunk, metric)
            expected = scipy_expected(values(trunk, "ks"), values(trunk, "ks_no_mask"))
            check(r, expected)
            assert (r["n"], r["planned"]) == (SEEDS, SEEDS)
            ps.append(expected[2])
        holms = [line(res, "mask", t, metric)["p_holm"] for t in trunks]
        assert holms == pytest.approx(holm_by_definition(ps), rel=1e-12)
    assert list(line(res, "mask", "seg_frozen")["differences"]) == pytest.approx(MASK["seg_frozen"], abs=1e-9)
    # secondary: KS gains with their own Holm over the trunks, teacher minus student (+2 and +1 points)
    for kind, arm in (("ks_gain", "ks"), ("ks_gain_no_mask", "ks_no_mask")):
        ps = []
        for trunk in trunks:
            expected = scipy_expected(pct(trunk, arm), pct(trunk, "base"))
            check(line(res, kind, trunk), expected)
            ps.append(expected[2])
        assert [line(res, kind, t)["p_holm"] for t in trunks] == pytest.approx(holm_by_definition(ps), rel=1e-12)
    teacher = line(res, "attn3_ks", "random_trained")
    assert (teacher["mean"], teacher["n"], teacher["pairs_marked"]) == (pytest.approx(2.0), SEEDS, 0)
    assert line(res, "attn2_ks_no_mask", "seg_frozen")["mean"] == pytest.approx(1.0)
    # P2: Welch on the per-seed mask effects, random_trained against seg_frozen
    s = res.interaction["summary"]
    diff, p, low, high, dof = welch_expected(MASK["random_trained"], MASK["seg_frozen"])
    assert [s.diff, s.p, s.ci_low, s.ci_high, s.dof] == pytest.approx([diff, p, low, high, dof], rel=1e-8)
    # progress, student AP per arm, memory distance of the last epoch (0.1 (seed + 1) + last epoch index)
    progress = res.progress.set_index(["trunk", "arm"])
    assert progress.loc[("crops_frozen", "ks"), ["done", "of"]].tolist() == [SEEDS, SEEDS]
    assert progress.loc[("seg_frozen", "base"), "AP_mean"] == pytest.approx(np.mean(pct("seg_frozen", "base")))
    assert progress.loc[("seg_frozen", "base"), "AP_sd"] == pytest.approx(np.std(pct("seg_frozen", "base"), ddof=1))
    distance = res.distance.set_index(["trunk", "arm"])
    assert distance.loc[("random_trained", "ks"), "attn3_mean"] == pytest.approx(0.25 + 2)
    assert distance.loc[("seg_frozen", "ks_no_mask"), "attn2_mean"] == pytest.approx(0.5 + 1)
    # the told-nothing row of crops seed 3 ran at another commit: its pairs are marked
    crops = line(res, "mask", "crops_frozen")
    assert crops["marked"] == (False, False, False, True) and crops["pairs_commit_differs"] == 1


def test_answer_sentences_follow_the_interval(mask_tree):
    manifest, results = mask_tree
    res = mask_results(manifest, results)
    markdown = page_markdown(res, {"forest": "images/f.png", "curves": "images/c.png"})
    ps = [scipy_expected(pct(t, "ks"), pct(t, "ks_no_mask"))[2] for t in PREFIX]
    holms = holm_by_definition(ps)

    # seg_frozen: the interval excludes 0 -> "changes student AP by"
    mean, sd, p, low, high = scipy_expected(pct("seg_frozen", "ks"), pct("seg_frozen", "ks_no_mask"))
    assert low > 0
    verdict = "significant" if holms[0] < 0.05 else "not significant"
    seg = (f"On the seg_frozen trunk, the GT mask changes student AP by {mean:+.2f} AP (95% CI [{low:+.2f}, "
           f"{high:+.2f}]; p = {p:.3f}, Holm p = {holms[0]:.3f}: {verdict} at alpha 0.05 after Holm's adjustment "
           f"over the trunks; {SEEDS} of {SEEDS} pairs).")
    assert p1_sentence(line(res, "mask", "seg_frozen")) == seg and f"- P1: {seg}" in markdown

    # crops_frozen: the interval includes 0 -> "no effect larger than <farther bound>"
    mean, sd, p, low, high = scipy_expected(pct("crops_frozen", "ks"), pct("crops_frozen", "ks_no_mask"))
    assert low < 0 < high
    crops = (f"On the crops_frozen trunk, the GT mask has no effect on student AP larger than "
             f"{max(-low, high):.2f} AP (95% CI [{low:+.2f}, {high:+.2f}]; mean {mean:+.2f}, p = {p:.3f}, "
             f"Holm p = {holms[1]:.3f}; {SEEDS} of {SEEDS} pairs).")
    assert p1_sentence(line(res, "mask", "crops_frozen")) == crops and crops in markdown

    # P2: the interval excludes 0 here (the interval that includes it: the next test)
    diff, p, low, high, _ = welch_expected(MASK["random_trained"], MASK["seg_frozen"])
    assert high < 0
    p2 = (f"The mask's effect on the random_trained trunk differs from its effect on the seg_frozen trunk by "
          f"{diff:+.2f} AP (95% CI [{low:+.2f}, {high:+.2f}]; Welch p = {p:.3f}; {SEEDS} of {SEEDS} and {SEEDS} of "
          f"{SEEDS} pairs).")
    assert p2_sentence(res.interaction) == p2 and p2 in markdown
    # the tables print the same numbers, † on the marked pair, with the count under the table
    assert "| crops_frozen | 4/4 | " in markdown and "+0.30 -0.42 +0.11 -0.20†" in markdown
    assert "1 of the 12 pairs of two runs here (1 from different or unknown commits" in markdown
    assert "12 of 12 rows done" not in markdown and "36 of 36 rows done. Their training took 0.0 hours" in markdown
    assert "Interim" not in markdown  # every row finished: the answers are the experiment's


def test_sentences_of_hand_made_lines():
    """P1 with the interval off 0 but Holm above alpha, a negative effect, one pair; P2 including 0."""
    base = {"trunk": "crops_frozen", "n": 3, "planned": 10, "sd": 0.1, "positive": 3}
    r = dict(base, mean=0.5, ci_low=0.2, ci_high=0.8, p=0.03, p_holm=0.09)
    assert p1_sentence(r) == ("On the crops_frozen trunk, the GT mask changes student AP by +0.50 AP (95% CI "
                              "[+0.20, +0.80]; p = 0.030, Holm p = 0.090: not significant at alpha 0.05 after "
                              "Holm's adjustment over the trunks; 3 of 10 pairs).")
    r = dict(base, mean=-0.5, ci_low=-0.9, ci_high=-0.1, p=0.0004, p_holm=0.0012)
    assert "changes student AP by -0.50 AP (95% CI [-0.90, -0.10]; p <0.001, Holm p = 0.001: significant" \
           in p1_sentence(r)
    one = dict(base, n=1, mean=0.5, ci_low=math.nan, ci_high=math.nan, p=math.nan, p_holm=math.nan)
    assert p1_sentence(one) == "On the crops_frozen trunk, the mask's effect is not yet measured (1 of 10 pairs done)."
    interaction = {"trunks": ("random_trained", "seg_frozen"), "present": True,
                   "planned": {"random_trained": 6, "seg_frozen": 10},
                   "summary": welch_summary([0.2, -0.5, 0.9], [0.1, 0.3, -0.2, 0.4])}
    s = interaction["summary"]
    assert s.ci_low < 0 < s.ci_high
    assert p2_sentence(interaction) == (
        f"The mask's effect on the random_trained trunk differs from its effect on the seg_frozen trunk by no "
        f"more than {max(-s.ci_low, s.ci_high):.2f} AP (95% CI [{s.ci_low:+.2f}, {s.ci_high:+.2f}]; difference "
        f"{s.diff:+.2f}, Welch p = {s.p:.3f}; 3 of 6 and 4 of 10 pairs).")


def test_partial_records_and_figures(tmp_path):
    """Two seeds of seg_frozen done, one pair of crops_frozen, nothing on random_trained: counts per
    comparison, 'not yet measured' where fewer than two pairs, Holm over all three trunks, the figures'
    data equal the table's."""
    manifest = write_small_manifest(tmp_path / "mask.yaml")
    results = tmp_path / "results"
    for seed in (0, 1):
        for arm, ap in aps("seg_frozen", seed).items():
            write_row(results, "mask", f"seg_{arm}_seed{seed}", ap, 2, arm != "base", 0.2, time_s=90)  # 3 min
    for arm in ("ks", "ks_no_mask"):
        write_row(results, "mask", f"crops_{arm}_seed0", aps("crops_frozen", 0)[arm], 2, True, 0.2, time_s=180)
    write_row(results, "mask", "crops_ks_seed1", 0.3, 2, True, 0.2)
    write_row(results, "mask", "random_base_seed0", aps("random_trained", 0)["base"], 3, False, 0.2)
    log = records.run_dir("mask", "random_base_seed0", results) / "log.jsonl"  # a log without times
    records.write_log(log, [{k: v for k, v in json.loads(e).items() if k != "time_s"} for e in log.read_text().splitlines()])
    records.atomic_write(records.run_dir("mask", "crops_ks_seed1", results) / "eval.json", "{not json")
    res = mask_results(manifest, results)
    assert res.damaged == ["crops_ks_seed1"]
    seg = line(res, "mask", "seg_frozen")
    p = scipy_expected(pct("seg_frozen", "ks")[:2], pct("seg_frozen", "ks_no_mask")[:2])[2]
    assert (seg["n"], seg["planned"]) == (2, SEEDS) and seg["p_holm"] == pytest.approx(min(1.0, 3 * p))
    assert math.isnan(line(res, "mask", "crops_frozen")["p"]) and line(res, "ks_gain", "crops_frozen")["n"] == 0
    markdown = page_markdown(res)
    assert "On the crops_frozen trunk, the mask's effect is not yet measured (1 of 4 pairs done)." in markdown
    assert "On the random_trained trunk, the mask's effect is not yet measured (0 of 4 pairs done)." in markdown
    assert "(random_trained against seg_frozen) is not yet measured (0 of 4 and 2 of 4 pairs done)." in markdown
    assert "| seg_frozen | 2/4 | 2/4 | 2/4 | 2/4 |" in markdown
    answers = markdown.split("### Answers")[1].split("- P1:")[0]
    assert "**Interim: 9 of 36 rows.**" in answers and "not the experiment's answer until every row" in answers
    # 6 seg rows of 3 min and 2 crops rows of 6 min (and a baseline without times); left: 6 seg rows at 3 min,
    # 6 crops KS rows at 6 min, and 15 rows (crops baselines, random_trained) of an arm with no time known
    assert ("9 of 36 rows done. Their training took 0.5 hours (log.jsonl `time_s`, as measured on the machines of "
            "env.json; 1 without times left out); the other rows, at the mean of their trunk and arm so far, about "
            "0.9 hours more, and 15 rows of a trunk and arm without a timed row yet. Damaged records, shown as not done: "
            "`crops_ks_seed1`.") in markdown

    fig, series = forest_figure(res)
    label = f"seg_frozen: mask effect (n=2/{SEEDS})"
    assert series[label] == pytest.approx((seg["mean"], seg["ci_low"], seg["ci_high"], 2))
    assert series[f"random_trained: KS gain, GT mask (n=0/{SEEDS})"][3] == 0
    fig, series = curves_figure(res)
    epochs, mean, lo, hi = series["seg_frozen / ks"]
    assert epochs == [0, 1] and mean[-1] == pytest.approx(np.mean(pct("seg_frozen", "ks")[:2]))
    assert "crops_frozen / base" not in series and "random_trained / ks" not in series


# ------------------------------------------------------------------------------------------------
# the command

def test_command_without_finished_rows(tmp_path, capsys):
    """The real manifest over an empty results folder: a page that says nothing is measured yet, exit 0."""
    out = tmp_path / "docs" / "mask_experiment.md"
    assert main(["mask-page", "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "No row has finished yet: nothing is measured yet." in page
    assert page.count("is not yet measured (0 of") == 4  # P1 on each trunk and P2
    assert (out.parent / "images" / "mask_experiment_forest.png").stat().st_size > 0
    assert (out.parent / "images" / "mask_experiment_curves.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_committed_page_is_what_the_records_give(tmp_path):
    """docs/mask_experiment.md as committed equals a fresh `python -m analysis mask-page` over the committed
    records and manifest (so its prose and numbers cannot drift from them)."""
    out = tmp_path / "mask_experiment.md"
    assert main(["mask-page", "--out", str(out)]) == 0
    assert out.read_text() == (REPO / "docs" / "mask_experiment.md").read_text()
    for name in ("forest", "curves"):
        assert (REPO / "docs" / "images" / f"mask_experiment_{name}.png").is_file()
