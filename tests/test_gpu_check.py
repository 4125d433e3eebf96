"""The one-command GPU check works before a GPU is lent: `--quick --device cpu` runs every stage at
toy sizes and writes what a GPU slot would commit. (The op's build stage is left out here: the
default suite builds the extension in tests/test_ms_deform_attn.py already.)"""
import json

from experiments import cost
from benchmarks import gpu_check


def test_quick_cpu_check_runs_every_stage(tmp_path, capsys):
    before = cost.STEP_TIMES.read_bytes() if cost.STEP_TIMES.exists() else None
    out = tmp_path / "check"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out), "--skip", "build"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["environment", "cuda_tests", "step_times", "profile", "ddp", "grid"]
    assert all(s["status"] == "ok" for s in summary.values()), summary
    assert summary["environment"]["device"] == "cpu" and summary["environment"]["torch"]
    assert summary["cuda_tests"]["skipped"] > 0 and not summary["cuda_tests"].get("failed")  # no GPU: skipped
    times = cost.load_step_times(out / "step_times.json")
    assert {(t["variant"], t["ks_mode"]) for t in times} == {("dab_detr", "none"), ("dab_detr", "triple")}
    assert all(t["seconds_per_step"] > 0 and t["gpu"] == "CPU" for t in times)
    # a CPU check never writes the step times that `list --cost` reads
    assert (cost.STEP_TIMES.read_bytes() if cost.STEP_TIMES.exists() else None) == before
    profile = summary["profile"]
    assert profile["images_per_s"] > 0 and 0 < profile["matcher_share_of_cpu"] < 1
    assert 0 <= profile["data_wait_share"] < 1 and profile["top_operations"]
    assert (out / "profile.txt").read_text().count("\n") > 10
    assert summary["ddp"]["backend"] == "gloo" and summary["ddp"]["processes"] == 2
    assert summary["grid"]["done"] == 1
    row = out / "results" / "runs" / "synthetic_table1" / "cond_seed0"
    assert (row / "DONE").is_file() and json.loads((row / "eval.json").read_text())["epoch"] == 1
    assert "| profile | ok |" in (out / "summary.md").read_text()
