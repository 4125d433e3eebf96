"""Damaged run records in the analysis (issue 36, items 8 and 9): a record is checked where it is read
(analysis.load_run -> RunRecord.check); a damaged row is shown as damaged, named on stderr, and the
other rows still render, in tables, learning, fig4 and curves alike. fig4 without anything to draw is
an error with and without --row."""
import json

import pytest
import yaml

from analysis.__main__ import main
from experiments import records

from .helpers import metrics, write_run

DAMAGE = {  # eval.json text -> what the stderr line must say
    "a list": ("[]", "expected an object of branches (attn1, ...) holding their metrics, got a list"),
    "no metrics": ("{}", "no student AP ('attn1': {'AP': ...})"),
    "a word": ('{"epoch": 1, "attn1": {"AP": "high"}}', 'attn1 AP: "high" is not a number'),
    "inf and negative": ('{"epoch": 1, "attn1": {"AP": 1e309, "AP50": -5}}', "attn1 AP: inf is not finite"),
}


@pytest.fixture
def toy(tmp_path):
    """Manifest 'toy': base (baseline), ks (KS, baseline base) and ks_lr (KS at another lr, baseline
    base), all done with two evaluated epochs."""
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"rows": [
        {"name": "base", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "ks", "baseline": "base", "config": {"model": {"ks": {"mode": "triple"}}}},
        {"name": "ks_lr", "baseline": "base", "config": {"model": {"ks": {"mode": "triple"}}, "train": {"lr": 1e-3}}},
    ]}))
    results = tmp_path / "results"
    for row, ap in (("base", 0.30), ("ks", 0.32), ("ks_lr", 0.3333)):
        final = {"attn1": metrics(ap)}
        if row != "base":
            final["attn3"] = metrics(ap + 0.01)
        write_run(results, "toy", row, "done", [(1, final), (2, final)], final)
    return path, results


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def table_lines(markdown):
    return {ln.split(" | ")[0][2:]: ln for ln in markdown.splitlines() if ln.startswith("| ")}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_eval_json_is_shown_as_damaged_everywhere(toy, capsys, kind):
    path, results = toy
    text, problem = DAMAGE[kind]
    damaged = records.run_dir("toy", "ks", results) / "eval.json"
    damaged.write_text(text)
    common = ["--manifest", str(path), "--results", str(results)]

    rc, out, err = run_cli(capsys, "tables", *common)
    assert rc == 0
    assert f"{damaged}: {problem}" in err and err.count("\n") == 1  # one line, the file and what is wrong
    lines = table_lines(out)
    assert lines["ks"] == "| ks | base | damaged (eval.json) |  |  |  |  |  |  |  |"
    assert lines["ks_lr"].startswith("| ks_lr | base | done | 33.3 | 53.3 |") and lines["ks_lr"].endswith("| +3.3 |")
    assert "inf" not in out and "-500" not in out
    csv = (results / "tables" / "toy.csv").read_text()
    assert "damaged (eval.json)" in csv

    rc, out, err = run_cli(capsys, "learning", *common)
    assert rc == 0 and f"{damaged}: {problem}" in err
    lines = table_lines(out)
    assert "| damaged (eval.json) |" in lines["ks"] and "| 53.3 |" in lines["ks_lr"]

    rc, out, err = run_cli(capsys, "fig4", *common, "--row", "ks")
    assert rc == 2 and err.startswith("error: toy / ks: nothing drawn, the record is damaged: ") and problem in err
    assert run_cli(capsys, "fig4", *common, "--row", "ks_lr")[0] == 0
    rc, out, err = run_cli(capsys, "fig4", *common)  # over seeds: the damaged row's group has no panel
    assert rc == 0 and f"{damaged}: {problem}" in err and "toy / ks: no KS row of the group" in err
    assert (results / "figures" / "toy_fig4.png").is_file()

    rc, out, err = run_cli(capsys, "curves", *common)
    assert rc == 0 and f"{damaged}: {problem}" in err and "toy / ks: no finished epoch (damaged (eval.json)); left out" in err
    assert (results / "figures" / "toy_curves.png").is_file()


def test_metrics_out_of_range_in_the_log_damage_the_row(toy, capsys):
    path, results = toy
    log = records.run_dir("toy", "ks_lr", results) / "log.jsonl"
    entries = records.read_log(log)
    entries[0]["eval"]["attn1"]["AP"] = 7.5  # a percentage where a fraction belongs
    records.write_log(log, entries)
    rc, out, err = run_cli(capsys, "tables", "--manifest", str(path), "--results", str(results))
    assert rc == 0 and f"{log}: epoch 1: eval attn1 AP: 7.5 is out of range; expected a number in [0, 1]" in err
    lines = table_lines(out)
    assert "| damaged (log.jsonl) |" in lines["ks_lr"] and "| 32.0 |" in lines["ks"]


def test_valid_metrics_pass_the_check():
    assert records.metric_problem(0) is None and records.metric_problem(1.0) is None
    assert records.metric_problem(-1) is None and records.metric_problem(float("nan")) is None
    assert "not a number" in records.metric_problem(True) and "not a number" in records.metric_problem(None)
    assert "out of range" in records.metric_problem(1.0001) and "not finite" in records.metric_problem(float("-inf"))
    assert records.eval_problem({"epoch": 3, "attn1": {"AP": 0.3}, "attn1_moved": metrics(float("nan"))}) is None
    assert "'epoch'" in records.eval_problem({"epoch": "3", "attn1": {"AP": 0.3}})
    assert "attn2: expected an object of metrics" in records.eval_problem({"attn1": {"AP": 0.3}, "attn2": 0.4})


def test_eval_json_that_is_not_utf8_is_named(toy, capsys):
    path, results = toy
    damaged = records.run_dir("toy", "ks", results) / "eval.json"
    damaged.write_bytes(b'{"attn1": {"AP": 0.3\xff}}')
    rc, out, err = run_cli(capsys, "tables", "--manifest", str(path), "--results", str(results))
    assert rc == 0 and f"{damaged}: not UTF-8 text" in err and "| damaged (eval.json) |" in table_lines(out)["ks"]


# ------------------------------------------------------------------------------------------------
# issue 36, item 9: fig4 with nothing to draw

def test_fig4_without_finished_runs_is_an_error_with_and_without_row(toy, capsys):
    path, _ = toy
    empty = path.parent / "empty_results"  # no records: every row not started
    common = ["--manifest", str(path), "--results", str(empty)]
    rc, out, err = run_cli(capsys, "fig4", *common)
    assert rc == 2 and err.startswith("error: toy: no finished runs to draw") and err.count("\n") == 1
    rc, out, err = run_cli(capsys, "fig4", *common, "--row", "ks")
    assert rc == 2 and err.startswith("error: toy / ks: no finished runs to draw") and err.count("\n") == 1
    assert not (empty / "figures").exists()


def test_fig4_of_a_run_with_epochs_but_no_evaluation_is_an_error(toy, capsys):
    path, results = toy
    directory = records.run_dir("toy", "ks", results)
    (directory / "DONE").unlink()
    (directory / "eval.json").unlink()
    records.write_log(directory / "log.jsonl", [{"epoch": 1, "train": {"loss": 1.0}}])  # trained, not evaluated
    for extra in ([], ["--row", "ks"]):
        rc, out, err = run_cli(capsys, "fig4", "--manifest", str(path), "--results", str(results), *extra)
        if extra:
            assert rc == 2 and "toy / ks: no finished runs to draw: no evaluated epoch" in err
        else:  # the other group (ks_lr) still gets its panel
            assert rc == 0 and "toy / ks: no KS row of the group has an evaluated epoch" in err
    assert json.loads((records.run_dir("toy", "ks_lr", results) / "eval.json").read_text())["attn1"]["AP"] == 0.3333
