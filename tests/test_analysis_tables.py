"""analysis.tables on hand-made run records: paper tables, demo-style tables, statuses, CLI errors."""
import json
import math

import pandas as pd
import pytest
import yaml

from analysis.__main__ import main
from analysis.tables import load_paper, paper_report, report, write_tables
from experiments import records

from .helpers import metrics, write_manifest, write_run


@pytest.fixture
def table1(tmp_path):
    """A Table-1 manifest covering done, interrupted, failed, not started, NaN and a row outside the paper."""
    manifest = write_manifest(tmp_path / "t1.yaml", [
        {"name": "dab_r50", "paper": {"table": 1, "row": 5, "source": "rerun"}},
        {"name": "ks_dab_r50", "baseline": "dab_r50", "paper": {"table": 1, "row": 6, "source": "rerun"}},
        {"name": "dab_r101", "paper": {"table": 1, "row": 7, "source": "cited"}},
        {"name": "ks_dab_r101", "baseline": "dab_r101", "paper": {"table": 1, "row": 8, "source": "rerun"}},
        {"name": "dndef_r50", "paper": {"table": 1, "row": 19, "source": "cited"}},
        {"name": "ks_dndef_r50", "baseline": "dndef_r50", "paper": {"table": 1, "row": 20, "source": "rerun"}},
        {"name": "cond_r50", "paper": {"table": 1, "row": 1, "source": "rerun"}},
        {"name": "extra", "baseline": "dab_r50"},
    ])
    results = tmp_path / "results"
    write_run(results, "t1", "dab_r50", "done", [(0, None), (1, {"attn1": metrics(0.421)})],
              {"attn1": metrics(0.421)})
    write_run(results, "t1", "ks_dab_r50", "done", [(0, None), (1, {"attn1": metrics(0.437)})],
              {"attn1": metrics(0.437, APs=float("nan")), "attn2": metrics(0.55), "attn3": metrics(0.53)})
    write_run(results, "t1", "dab_r101", "done", [(0, {"attn1": metrics(0.44)})], {"attn1": metrics(0.44)})
    write_run(results, "t1", "ks_dab_r101", "interrupted",
              [(e, {"attn1": metrics(0.777)}) for e in range(8)])  # must never show 77.7
    write_run(results, "t1", "ks_dndef_r50", "done", [(0, {"attn1": metrics(0.3)})],
              {"attn1": metrics(float("nan"))})
    write_run(results, "t1", "cond_r50", "failed", [(0, {"attn1": metrics(0.666)})])
    write_run(results, "t1", "extra", "done", [(0, {"attn1": metrics(0.4)})], {"attn1": metrics(0.4)})
    return manifest, results


def line(df, model=None, row=None):
    sel = df[df["manifest_row"] == row] if row else df[(df["model"] == model) & df["manifest_row"].isna()]
    assert len(sel) == 1
    return sel.iloc[0]


def test_paper_csv_matches_row_numbers():
    for table, n in ((1, 26), (2, 8)):
        df = load_paper(table)
        assert list(df["paper_row"]) == list(range(1, n + 1))
    assert load_paper(1).loc[19, ["AP", "APl"]].tolist() == [46.5, 61.5]


def test_paper_gains_computed_from_numbers():
    df = paper_report(None, [1, 2])
    t1, t2 = df[df["paper_table"] == 1], df[df["paper_table"] == 2]
    gain = dict(zip(t1["model"], t1["gain_paper_AP"]))
    assert gain["KS-DN-Deformable-DETR-R50"] == 3.1  # the paper prints +2.1
    assert gain["KS-DAB-DETR-R50"] == 0.9  # the text says 0.6
    assert gain["KS-DAB-DETR-Swin-T"] == 1.9
    assert math.isnan(gain["DAB-DETR-R50"])
    # 24-epoch and 50-epoch Deformable rows compare with the baseline of their own schedule
    assert t1["gain_paper_AP"].tolist()[21] == 1.4 and t1["gain_paper_AP"].tolist()[23] == 0.7
    assert t1.iloc[19]["gain_paper_APs"] == 4.0
    assert t2["gain_paper_AP"].tolist()[1:4] == [0.4, 0.6, 0.9]
    assert t2["gain_paper_AP"].tolist()[5:8] == [1.0, 1.2, 1.3]
    assert set(df["status"]) == {"no manifest row"}


def test_table_numbers_and_flags(table1):
    manifest, results = table1
    name, kind, df = report(str(manifest), results)
    assert (name, kind) == ("t1", "paper")
    assert len(df) == 26 + 1

    ks = line(df, row="ks_dab_r50")
    assert (ks["paper_row"], ks["status"], ks["paper_source"]) == (6, "done", "rerun")
    assert (ks["paper_AP"], ks["repro_AP"], ks["diff_AP"]) == (43.9, 43.7, -0.2)
    assert (ks["gain_paper_AP"], ks["gain_repro_AP"]) == (0.9, 1.6)  # 43.7 - 42.1
    assert ks["repro_AP50"] == 63.7 and ks["diff_AP50"] == -0.5
    assert math.isnan(ks["repro_APs"]) and math.isnan(ks["diff_APs"]) and math.isnan(ks["gain_repro_APs"])

    base = line(df, row="dab_r50")
    assert (base["repro_AP"], base["diff_AP"], base["paper_source"]) == (42.1, -0.9, "rerun")
    assert math.isnan(base["gain_paper_AP"]) and math.isnan(base["gain_repro_AP"])
    assert line(df, row="dab_r101")["paper_source"] == "cited"

    inc = line(df, row="ks_dab_r101")
    assert (inc["status"], inc["last_epoch"]) == ("interrupted (epoch 7)", 7)
    assert all(math.isnan(inc[f"{k}_{m}"]) for k in ("repro", "diff", "gain_repro") for m in records.METRICS)
    assert inc["gain_paper_AP"] == 1.3

    nan = line(df, row="ks_dndef_r50")
    assert nan["status"] == "done" and math.isnan(nan["repro_AP"]) and nan["gain_paper_AP"] == 3.1
    assert math.isnan(nan["gain_repro_AP"])  # its baseline was never run
    assert nan["baseline_status"] == "not started"
    assert line(df, row="dndef_r50")["status"] == "not started"
    assert line(df, row="cond_r50")["status"] == "failed"
    assert math.isnan(line(df, row="cond_r50")["repro_AP"])
    assert line(df, model="KS-Conditional-DETR-R50")["status"] == "no manifest row"

    extra = line(df, row="extra")
    assert (extra["section"], extra["repro_AP"], extra["gain_repro_AP"]) == ("Rows not in the paper", 40.0, -2.1)
    assert pd.isna(extra["paper_row"]) and math.isnan(extra["paper_AP"])


def test_written_files(table1):
    manifest, results = table1
    markdown = write_tables(str(manifest), results)
    folder = results / "tables"
    assert (folder / "t1.md").read_text() == markdown
    lines = {ln.split(" | ")[1]: ln for ln in markdown.splitlines() if ln.startswith("| ")}
    assert "43.9 → 43.7 (-0.2)" in lines["KS-DAB-DETR-R50"]
    assert "23.9 → n/a (n/a)" in lines["KS-DAB-DETR-R50"]
    assert lines["KS-DAB-DETR-R50"].endswith("| +0.9 | +1.6 |")
    assert "interrupted (epoch 7)" in lines["KS-DAB-DETR-R101"]
    assert "77.7" not in markdown and "66.6" not in markdown  # interrupted and failed runs show no numbers
    assert "| cited | not started |" in lines["DN-Deformable-DETR-R50"]
    assert "46.5 → n/a (n/a)" in lines["KS-DN-Deformable-DETR-R50"]
    assert lines["KS-DN-Deformable-DETR-R50"].endswith("| +3.1 |  |")
    assert "| failed |" in lines["Conditional-DETR-R50"]

    csv = pd.read_csv(folder / "t1.csv")
    ks = csv[csv["manifest_row"] == "ks_dab_r50"].iloc[0]
    assert (ks["repro_AP"], ks["diff_AP"], ks["status"]) == (43.7, -0.2, "done")
    assert pd.isna(ks["repro_APs"])
    raw = (folder / "t1.csv").read_text()
    assert "nan" not in raw.lower().replace("manifest", "")

    tex = (folder / "t1.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\begin{tabular}" in tex
    assert r"ks\_dab\_r50" in tex and r"43.9 $\to$ 43.7 (-0.2)" in tex
    assert tex.count(r"\\") == 1 + 27 + 2  # header, lines, two section rows


def test_no_runs_renders_paper(tmp_path):
    manifest = write_manifest(tmp_path / "table1.yaml", [
        {"name": "dab_r50", "paper": {"table": 1, "row": 5, "source": "rerun"}},
        {"name": "ks_dab_r50", "baseline": "dab_r50", "paper": {"table": 1, "row": 6, "source": "rerun"}}])
    markdown = write_tables(str(manifest), tmp_path / "results")
    df = pd.read_csv(tmp_path / "results" / "tables" / "table1.csv")
    assert len(df) == 26 and df["paper_AP"].tolist() == load_paper(1)["AP"].tolist()
    assert df["repro_AP"].isna().all()
    assert df.loc[5, "status"] == "not started" and df.loc[0, "status"] == "no manifest row"
    assert "| 43.9 | 64.2 | 46.8 | 23.9 | 48.0 | 62.2 | +0.9 |  |" in markdown
    assert not any("→" in ln for ln in markdown.splitlines() if ln.startswith("| "))


def test_missing_paper_manifest_renders_paper(tmp_path, monkeypatch):
    import experiments.config

    monkeypatch.setattr(experiments.config, "MANIFEST_DIR", tmp_path)  # no table2.yaml here
    name, kind, df = report("table2", tmp_path)
    assert (name, kind, len(df)) == ("table2", "paper", 8)
    assert set(df["status"]) == {"no manifest row"} and df["gain_paper_AP"].tolist()[7] == 1.3


def test_runs_table_with_teachers(tmp_path):
    manifest = write_manifest(tmp_path / "toy.yaml", [{"name": "base"}, {"name": "ks", "baseline": "base"},
                                                      {"name": "later"}])
    results = tmp_path / "results"
    write_run(results, "toy", "base", "done", [(0, {"attn1": metrics(0.301)})], {"attn1": metrics(0.301)})
    write_run(results, "toy", "ks", "done", [(0, None)],
              {"attn1": metrics(0.312), "attn2": metrics(0.405), "attn3": metrics(float("nan")),
               "attn1_moved": metrics(0.021)})
    name, kind, df = report(str(manifest), results)
    assert kind == "runs"
    assert df["label"].tolist() == ["base", "ks", "ks / attn2 (teacher, GT mask)",
                                    "ks / attn3 (teacher, GT mask)", "ks / attn1 on other images",
                                    "later"]
    assert df.loc[4, "branch"] == "attn1_moved" and df.loc[4, "AP"] == 2.1 and math.isnan(df.loc[4, "gain_AP"])
    assert df.loc[1, "AP"] == 31.2 and df.loc[1, "gain_AP"] == 1.1 and math.isnan(df.loc[0, "gain_AP"])
    assert df.loc[2, "AP"] == 40.5 and math.isnan(df.loc[2, "gain_AP"])
    assert df.loc[5, "status"] == "not started" and math.isnan(df.loc[5, "AP"])
    markdown = write_tables(str(manifest), results)
    assert "| ks / attn2 (teacher, GT mask) |  | done | 40.5 |" in markdown
    assert "| ks / attn3 (teacher, GT mask) |  | done | n/a |" in markdown
    assert "| ks | base | done | 31.2 | 51.2 | 34.2 | 11.2 | 35.2 | 49.2 | +1.1 |" in markdown


def test_cli_tables_prints_markdown(table1, capsys):
    manifest, results = table1
    assert main(["tables", "--manifest", str(manifest), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert out == (results / "tables" / "t1.md").read_text()


def test_cli_unknown_manifest(tmp_path, capsys):
    assert main(["tables", "--manifest", "no_such_manifest", "--results", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no_such_manifest" in err and "available" in err and "demo" in err and "Traceback" not in err


def test_malformed_log_line(table1, capsys):
    """A damaged log.jsonl makes its row 'damaged (log.jsonl)', named on stderr; the other rows render."""
    manifest, results = table1
    log = records.run_dir("t1", "ks_dab_r101", results) / "log.jsonl"
    log.write_text(log.read_text().replace('{"epoch": 3', '{"epoch": 3,,', 1))
    with pytest.raises(records.DamagedLog, match=r"log\.jsonl, line 4"):
        records.read_log(log)
    assert main(["tables", "--manifest", str(manifest), "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert str(log) in captured.err and "line 4" in captured.err and "Traceback" not in captured.err
    lines = {ln.split(" | ")[1]: ln for ln in captured.out.splitlines() if ln.startswith("| ")}
    assert "| damaged (log.jsonl) |" in lines["KS-DAB-DETR-R101"]
    assert "43.9 → 43.7 (-0.2)" in lines["KS-DAB-DETR-R50"]


def test_nan_in_log_is_read(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"epoch": 0, "eval": {"attn1": {"AP": float("nan")}}}) + "\n")
    assert math.isnan(records.read_log(path)[0]["eval"]["attn1"]["AP"])


def test_learning_report_from_records(tmp_path):
    """analysis learning: AP50 against AP50 on other images, their ratio from the unrounded values,
    the class loss of the first and last epoch, minutes; rows not started or not finished stay empty."""
    from analysis.learning import learning_report, write_learning

    manifest = write_manifest(tmp_path / "ladder.yaml", [{"name": "a", "note": "first | setting"},
                                                         {"name": "b", "baseline": "a"}, {"name": "c"}])
    results = tmp_path / "results"
    final = {"attn1": metrics(0.1234, AP50=0.6543), "attn1_moved": metrics(0.001, AP50=0.00449),
             "attn3": metrics(0.2, AP50=0.7)}
    write_run(results, "ladder", "a", "done", [(1, None), (2, final)], final)
    d = records.run_dir("ladder", "a", results)
    lines = records.read_log(d / "log.jsonl")
    for line, loss in zip(lines, (0.4812, 0.3071)):
        line["train"]["loss_class"] = loss
        line["time_s"] = 90.0
    records.write_log(d / "log.jsonl", lines)
    write_run(results, "ladder", "b", "interrupted", [(1, None)])
    name, df = learning_report(str(manifest), results)
    a, b, c = (df.iloc[i] for i in range(3))
    assert (a["AP50"], a["AP50_moved"], a["AP50_attn3"], a["AP"]) == (65.4, 0.4, 70.0, 12.3)
    assert a["ratio"] == round(0.6543 / 0.00449, 1) == 145.7  # not 65.4 / 0.4
    assert (a["loss_class_first"], a["loss_class_last"], a["minutes"]) == (0.481, 0.307, 3.0)
    assert math.isnan(a["AP50_attn2"]) and a["setting"] == "first | setting"
    assert b["status"] == "interrupted (epoch 1)" and math.isnan(b["AP50"]) and b["epochs"] == 1
    assert c["status"] == "not started" and math.isnan(c["AP50"]) and math.isnan(c["minutes"])
    markdown = write_learning(str(manifest), results)
    assert "| a | first \\| setting | done | 2 | 65.4 | 0.4 | 145.7 |  | 70.0 | 12.3 | 0.481 → 0.307 | 3.0 |" in markdown
    assert (results / "tables" / "ladder_learning.csv").is_file()


def test_seed_rows_get_mean_and_spread(tmp_path):
    """Rows that differ only in train.seed form a group: mean ± sample standard deviation per branch,
    and the KS gain paired row by row with each row's baseline."""
    rows = []
    for seed in (0, 1, 2):
        rows.append({"name": f"base_seed{seed}", "config": {"train": {"seed": seed}}})
        rows.append({"name": f"ks_seed{seed}", "baseline": f"base_seed{seed}",
                     "config": {"model": {"ks": {"mode": "triple"}}, "train": {"seed": seed}}})
    rows.append({"name": "other", "config": {"train": {"seed": 7, "lr": 1.0e-3}}})  # alone: no group
    manifest = write_manifest(tmp_path / "seeds.yaml", rows)
    results = tmp_path / "results"
    base_ap, ks_ap = (0.30, 0.32, 0.31), (0.33, 0.34, 0.36)
    for seed in (0, 1, 2):
        b = {"attn1": metrics(base_ap[seed])}
        k = {"attn1": metrics(ks_ap[seed]), "attn3": metrics(0.5)}
        write_run(results, "seeds", f"base_seed{seed}", "done", [(1, b)], b)
        if seed < 2:
            write_run(results, "seeds", f"ks_seed{seed}", "done", [(1, k)], k)
    write_run(results, "seeds", "ks_seed2", "interrupted", [(1, None)])
    markdown = write_tables(str(manifest), results)
    assert "## Over training seeds" in markdown
    sdf = pd.read_csv(results / "tables" / "seeds_seeds.csv")
    assert sdf["group"].tolist() == ["base", "ks", "ks"] and sdf["branch"].tolist() == ["attn1", "attn1", "attn3"]
    base, ks, teacher = (sdf.iloc[i] for i in range(3))
    assert (base["done"], base["of"]) == (3, 3) and (ks["done"], ks["of"]) == (2, 3)
    assert base["AP_mean"] == pytest.approx(31.0) and base["AP_sd"] == pytest.approx(1.0)
    assert ks["AP_mean"] == pytest.approx(33.5) and ks["AP_sd"] == pytest.approx(0.7071, abs=1e-4)
    assert ks["gain_AP_mean"] == pytest.approx(2.5) and ks["gain_AP_sd"] == pytest.approx(0.7071, abs=1e-4)
    assert ks["gains_AP"] == "+3.00 +2.00" and math.isnan(base["gain_AP_mean"])
    assert teacher["AP_mean"] == pytest.approx(50.0) and math.isnan(teacher["gain_AP_mean"])
    assert "| ks | attn1 | 2/3 | 33.5 ± 0.7 | 53.5 ± 0.7 |" in markdown
    assert "| +2.50 ± 0.71 | 2/2 | +3.00 +2.00 |" in markdown


def test_a_manifest_with_families_gets_blocks_in_the_papers_shape(tmp_path):
    """One block per variant; per seed group the student's mean ± sd, the paired KS gain with the
    count of positive seeds, the teachers' AP, last-layer losses and memory distances; LaTeX too."""
    families = {"dab": {"model": {"variant": "dab_detr"}},
                "def": {"model": {"variant": "deformable_detr", "deformable": {"num_levels": 2}}}}
    rows = []
    for fam in families:
        for seed in (0, 1, 2):
            rows.append({"name": f"{fam}_seed{seed}", "family": fam, "config": {"train": {"seed": seed}}})
            for mode in ("triple", "dual_share_a"):
                rows.append({"name": f"{fam}_{mode}_seed{seed}", "family": fam, "baseline": f"{fam}_seed{seed}",
                             "config": {"model": {"ks": {"mode": mode}}, "train": {"seed": seed}}})
        rows.append({"name": f"{fam}_no_mask_seed0", "family": fam, "baseline": f"{fam}_seed0",
                     "config": {"model": {"ks": {"mode": "triple", "mask": "none"}}, "train": {"seed": 0}}})
    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump({"families": families, "rows": rows}, sort_keys=False))
    results = tmp_path / "results"
    base, triple = (0.30, 0.32, 0.31), (0.33, 0.31, 0.35)  # gains +3, -1, +4
    for fam in families:
        for seed in (0, 1, 2):
            b = {"attn1": metrics(base[seed]), "attn1_moved": metrics(0.001)}
            write_run(results, "fam", f"{fam}_seed{seed}", "done", [(1, b)], b)
            k = {"attn1": metrics(triple[seed]), "attn3": metrics(0.40), "attn2": metrics(0.36)}
            write_run(results, "fam", f"{fam}_triple_seed{seed}", "done", [(1, k)], k)
            log = records.run_dir("fam", f"{fam}_triple_seed{seed}", results) / "log.jsonl"
            entries = records.read_log(log)
            entries[-1]["train"].update(loss_last_layer_attn1=2.0 + seed, loss_last_layer_attn3=1.0,
                                        loss_last_layer_attn2=1.5)
            entries[-1]["memory_distance"] = {"attn3": 0.1 * (seed + 1), "attn2": 0.5}
            records.write_log(log, entries)
    no_mask = {"attn1": metrics(0.315), "attn3": metrics(0.30), "attn2": metrics(0.30)}
    write_run(results, "fam", "dab_no_mask_seed0", "done", [(1, no_mask)], no_mask)
    markdown = write_tables(str(path), results)
    bdf = pd.read_csv(results / "tables" / "fam_blocks.csv", dtype={"gains_AP": str, "mask_gains_AP": str})
    assert bdf["group"].tolist() == ["dab", "dab_triple", "dab_dual_share_a", "dab_no_mask",
                                     "def", "def_triple", "def_dual_share_a", "def_no_mask"]
    dab, triple_line, share_a, no_mask = (bdf.iloc[i] for i in range(4))
    assert dab["variant"] == "DAB-DETR" and dab["method"] == "baseline" and (dab["done"], dab["of"]) == (3, 3)
    assert dab["AP_mean"] == pytest.approx(31.0) and dab["AP_sd"] == pytest.approx(1.0)
    assert dab["AP50_moved_mean"] == pytest.approx(20.1)
    assert triple_line["gain_AP_mean"] == pytest.approx(2.0) and triple_line["gain_AP_sd"] == pytest.approx(2.6458, abs=1e-4)
    assert (triple_line["gain_AP_positive"], triple_line["gain_AP_n"], triple_line["gains_AP"]) == (2, 3, "+3.00 -1.00 +4.00")
    assert (triple_line["shares_v"], triple_line["shares_a"]) == (True, True)
    assert (share_a["method"], share_a["shares_v"], share_a["shares_a"], share_a["done"]) == ("dual attention", False,
                                                                                              True, 0)
    assert no_mask["method"] == "triple attention, no mask" and no_mask["teacher_mask"] == "none"
    # the gain from the GT mask: dab_triple_seed0 (33.0) minus dab_no_mask_seed0 (31.5), its twin
    assert no_mask["gain_AP_mean"] == pytest.approx(1.5) and no_mask["mask_gain_AP_mean"] == pytest.approx(1.5)
    assert (no_mask["mask_gain_AP_positive"], no_mask["mask_gain_AP_n"], no_mask["mask_gains_AP"]) == (1, 1, "+1.50")
    assert triple_line["mask_gain_AP_n"] == 0 and math.isnan(triple_line["mask_gain_AP_mean"])
    assert "| gain from the GT mask | positive |" in markdown and "| +1.50 | 1/1 | +1.50 | 1/1 |" in markdown
    assert triple_line["AP_attn3_mean"] == pytest.approx(40.0) and triple_line["AP_attn2_mean"] == pytest.approx(36.0)
    assert triple_line["last_layer_loss_attn1_mean"] == pytest.approx(3.0)
    assert triple_line["distance_attn3_mean"] == pytest.approx(0.2)
    assert "### DAB-DETR" in markdown and "### Deformable-DETR" in markdown and "## Row by row" in markdown
    assert ("| triple attention | ✓ | ✓ | 3/3 | 33.0 ± 2.0 | 53.0 ± 2.0 |" in markdown
            and "| +2.00 ± 2.65 | 2/3 |" in markdown)
    assert ("| triple attention | 3/3 | 33.0 | 40.0 | 36.0 | +7.00 ± 2.00 | +3.00 ± 2.00 | 3.000 / 1.000 / 1.500 "
            "| 0.200 / 0.500 |") in markdown
    teachers = markdown.split("## Teachers against the student")[1].split("## Row by row")[0]
    assert "| baseline |" not in teachers  # a baseline has no teachers
    tex = (results / "tables" / "fam.tex").read_text()
    assert r"\emph{DAB-DETR}" in tex and r"\checkmark & \checkmark" in tex and r"$\pm$" in tex
