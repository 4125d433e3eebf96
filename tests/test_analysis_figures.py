"""analysis.figures: Fig. 4 and training curves drawn from hand-made log.jsonl records."""

import pytest
import yaml

from analysis import AnalysisError
from analysis.__main__ import main
from analysis.figures import curves, fig4
from experiments import records
from experiments.config import Manifest

NAN = float("nan")


def entry(epoch, train, evals=None):
    out = {"epoch": epoch, "lr": 1e-4, "train": train, "time_s": 1.0}
    if evals is not None:
        out["eval"] = {b: {"AP": ap, "AP50": 0.5} for b, ap in evals.items()}
    return out


@pytest.fixture
def toy(tmp_path):
    """Manifest 'toy': base (done), ks (interrupted, baseline base), lonely (no baseline, not started)."""
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"rows": [
        {"name": "base", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "ks", "baseline": "base", "config": {"model": {"ks": {"mode": "triple"}}}},
        {"name": "lonely"}]}))
    results = tmp_path / "results"
    base = records.run_dir("toy", "base", results)
    records.write_log(base / "log.jsonl", [
        entry(0, {"loss": 20.0}, {"attn1": 0.10}),
        entry(1, {"loss": 18.0}),  # no evaluation this epoch
        entry(2, {"loss": 15.0}, {"attn1": 0.151})])
    records.write_json(base / "eval.json", {"epoch": 2, "attn1": {"AP": 0.151}})
    records.write_json(base / "DONE", {})
    ks = records.run_dir("toy", "ks", results)
    records.write_log(ks / "log.jsonl", [
        entry(0, {"loss": 30.0, "loss_attn1": 10.0, "loss_attn2": 9.0, "loss_attn3": 11.0},
              {"attn1": 0.12, "attn2": 0.30, "attn3": 0.25}),
        entry(1, {"loss": 27.0, "loss_attn1": NAN, "loss_attn2": 8.0, "loss_attn3": 10.0},
              {"attn1": NAN, "attn2": 0.35, "attn3": 0.28}),
        entry(2, {"loss": 24.0, "loss_attn1": 8.0, "loss_attn2": 7.0, "loss_attn3": 9.0},
              {"attn1": 0.17, "attn2": 0.41, "attn3": 0.33})])
    return Manifest(path), results


def test_fig4_data_equal_records(toy):
    manifest, results = toy
    fig, series = fig4(manifest, "ks", results)
    expected = {"Baseline": ([0, 2], [10.0, 15.1]),
                "Attn1 (interrupted)": ([0, 2], [12.0, 17.0]),  # epoch 1 is NaN: left out
                "Attn2 (interrupted)": ([0, 1, 2], [30.0, 35.0, 41.0]),
                "Attn3 (interrupted)": ([0, 1, 2], [25.0, 28.0, 33.0])}
    assert list(series) == list(expected)
    ax = fig.axes[0]
    drawn = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert list(drawn) == list(expected)
    for label, (xs, ys) in expected.items():
        assert drawn[label][0] == xs and drawn[label][1] == pytest.approx(ys)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(expected)
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "AP"
    assert "KS-DAB-DETR-R50" in ax.get_title()
    assert ax.get_title().endswith("Attn2, Attn3: teachers evaluated with GT Fg-Bg masks")


def test_fig4_without_baseline_warns(toy, capsys):
    manifest, results = toy
    fig, series = fig4(manifest, "base", results)
    assert list(series) == ["Attn1"]
    assert "no baseline" in capsys.readouterr().err
    # a baseline row has no teachers: the title does not speak of them
    assert fig.axes[0].get_title() == "DAB-DETR-R50 (toy / base)"


def test_fig4_cli_writes_png_and_pdf(toy, capsys):
    manifest, results = toy
    assert main(["fig4", "--manifest", str(manifest.path), "--row", "ks", "--results", str(results)]) == 0
    for ext in ("png", "pdf"):
        path = results / "figures" / f"toy_ks_fig4.{ext}"
        assert path.stat().st_size > 1000
    assert (results / "figures" / "toy_ks_fig4.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "figures" / "toy_ks_fig4.pdf").read_bytes()[:4] == b"%PDF"
    assert not [p for p in (results / "figures").iterdir() if p.name.startswith(".")]  # no temp files left


def test_curves_data_equal_records(toy, capsys):
    manifest, results = toy
    fig, series = curves(manifest, None, results)
    assert list(series) == ["base", "ks"]  # 'lonely' has no log
    assert "lonely" in capsys.readouterr().err
    assert series["base"] == {"total": ([0, 1, 2], [20.0, 18.0, 15.0])}
    assert series["ks"]["Attn1"] == ([0, 2], [10.0, 8.0])
    assert series["ks"]["Attn3"] == ([0, 1, 2], [11.0, 10.0, 9.0])
    ax = [a for a in fig.axes if a.get_visible()][1]
    assert ax.get_title() == "ks (interrupted)"
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert lines == {"total": [30.0, 27.0, 24.0], "Attn1": [10.0, 8.0], "Attn2": [9.0, 8.0, 7.0],
                     "Attn3": [11.0, 10.0, 9.0]}
    assert main(["curves", "--manifest", str(manifest.path), "--results", str(results)]) == 0
    assert (results / "figures" / "toy_curves.png").is_file() and (results / "figures" / "toy_curves.pdf").is_file()


def test_unknown_row_is_a_clear_error(toy, capsys):
    manifest, results = toy
    for command in ("fig4", "curves"):
        assert main([command, "--manifest", str(manifest.path), "--row", "nope", "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert "'nope'" in err and "['base', 'ks', 'lonely']" in err and "Traceback" not in err


def test_row_without_log_is_an_error(toy):
    manifest, results = toy
    with pytest.raises(AnalysisError, match="lonely"):
        fig4(manifest, "lonely", results)


def test_malformed_log_line_in_figure(toy, capsys):
    manifest, results = toy
    log = records.run_dir("toy", "ks", results) / "log.jsonl"
    log.write_text(log.read_text() + "{not json\n")
    assert main(["fig4", "--manifest", str(manifest.path), "--row", "ks", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"{log}, line 4" in err and "Traceback" not in err


def test_fig4_over_seeds_draws_the_mean_and_range_of_each_ks_group(tmp_path):
    from analysis.figures import fig4_seeds

    rows = []
    for seed in (0, 1):
        rows += [{"name": f"base_seed{seed}", "family": "dab", "config": {"train": {"seed": seed}}},
                 {"name": f"ks_seed{seed}", "family": "dab", "baseline": f"base_seed{seed}",
                  "config": {"model": {"ks": {"mode": "triple"}}, "train": {"seed": seed}}}]
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump({"families": {"dab": {}}, "rows": rows}))
    results = tmp_path / "results"
    aps = {0: (0.10, 0.20, 0.30, 0.25), 1: (0.14, 0.22, 0.40, 0.35)}  # base, attn1, attn2, attn3 at epoch 2
    for seed, (base, s, a2, a3) in aps.items():
        records.write_log(records.run_dir("seeds", f"base_seed{seed}", results) / "log.jsonl",
                          [entry(1, {"loss": 1.0}, {"attn1": base / 2}), entry(2, {"loss": 1.0}, {"attn1": base})])
        ks = [entry(1, {"loss": 1.0}, {"attn1": s / 2, "attn2": a2 / 2, "attn3": a3 / 2})]
        if seed == 0:  # seed 1 stopped after epoch 1: the KS curves end there
            ks.append(entry(2, {"loss": 1.0}, {"attn1": s, "attn2": a2, "attn3": a3}))
        records.write_log(records.run_dir("seeds", f"ks_seed{seed}", results) / "log.jsonl", ks)
    fig, series = fig4_seeds(Manifest(path), results)
    assert list(series) == ["ks / Baseline", "ks / Attn1", "ks / Attn2", "ks / Attn3"]
    epochs, mean, lo, hi = series["ks / Baseline"]
    assert epochs == [1, 2] and mean == pytest.approx([6.0, 12.0]) and (lo, hi) == (pytest.approx([5.0, 10.0]),
                                                                                   pytest.approx([7.0, 14.0]))
    epochs, mean, lo, hi = series["ks / Attn2"]
    assert epochs == [1] and mean == pytest.approx([17.5]) and lo == pytest.approx([15.0]) and hi == pytest.approx([20.0])
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["Baseline", "Attn1", "Attn2", "Attn3"]
    assert "0/2 seeds done" in ax.get_title()
    assert main(["fig4", "--manifest", str(path), "--results", str(results)]) in (None, 0)
    assert (results / "figures" / "seeds_fig4.png").is_file() and (results / "figures" / "seeds_fig4.pdf").is_file()
