"""GPU-hour estimates from measured step times (experiments.cost, `list --cost`, `submit --dry-run`),
the step-time benchmark that writes them, and the KS overhead benchmark on tiny rows."""
import json
import math

import pytest

from experiments import cost
from experiments.__main__ import main
from benchmarks import ks_overhead, step_time
from experiments.config import Manifest


def entry(variant="dab_detr", backbone="resnet50", ks_mode="none", seconds=0.5, gpu="NVIDIA H100", date="2026-11-01"):
    return {"variant": variant, "backbone": backbone, "ks_mode": ks_mode, "batch_size": 2, "image_size": [800, 1216],
            "seconds_per_step": seconds, "gpu": gpu, "torch": "2.14.1", "date": date}


def test_row_cost_is_epochs_times_steps_times_the_measured_step():
    cfg = Manifest("table1").resolve("dab_r50")
    assert cfg["train"]["epochs"] == 50 and cfg["train"]["batch_size"] == 2
    c = cost.row_cost(cfg, [entry(seconds=0.4, date="2026-10-01"), entry(seconds=0.5), entry(ks_mode="triple")])
    assert c["steps"] == 50 * math.ceil(118287 / 2)
    assert c["seconds_per_step"] == 0.5  # the newest of the two matching measurements
    assert c["gpu_hours"] == pytest.approx(50 * 59144 * 0.5 / 3600)
    assert "NVIDIA H100, torch 2.14.1, 2026-11-01, 800x1216 px" == c["measured"]
    # only the named GPU's times; none of another variant is borrowed
    assert cost.row_cost(cfg, [entry()], gpu="NVIDIA A100")["gpu_hours"] is None
    missing = cost.row_cost(Manifest("table1").resolve("def_r50_12ep"), [entry()])
    assert missing["gpu_hours"] is None
    assert missing["reason"] == "no step time measured for deformable_detr resnet50 ks=none batch 2"
    unknown = cost.row_cost(Manifest("table1").resolve("dab_r50", ["data.train_split=mine"]), [entry()])
    assert unknown["gpu_hours"] is None and "coco/mine unknown" in unknown["reason"]


def test_step_time_file_keeps_one_time_per_key_and_gpu_and_names_bad_files(tmp_path):
    path = tmp_path / "step_times.json"
    assert cost.load_step_times(path) == []
    cost.add_step_time(entry(seconds=0.5), path)
    cost.add_step_time(entry(seconds=0.6, gpu="NVIDIA A100"), path)
    cost.add_step_time(entry(seconds=0.7), path)  # replaces the first
    times = sorted((e["gpu"], e["seconds_per_step"]) for e in cost.load_step_times(path))
    assert times == [("NVIDIA A100", 0.6), ("NVIDIA H100", 0.7)]
    path.write_text("{")
    with pytest.raises(ValueError, match="step_times.json: not valid JSON"):
        cost.load_step_times(path)
    path.write_text(json.dumps({"measurements": [{"variant": "dab_detr"}]}))
    with pytest.raises(ValueError, match=r"measurement 0 lacks \['backbone'"):
        cost.load_step_times(path)


def test_step_time_benchmark_writes_and_list_cost_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cost, "STEP_TIMES", tmp_path / "step_times.json")
    args = ["--manifest", "demo", "--rows", "def_r18", "ks_def_r18", "--size", "64", "80", "--repeats", "1",
            "--device", "cpu", "--write"]
    with pytest.raises(SystemExit):  # CPU times are not stored by accident
        step_time.main(args)
    assert "--allow-cpu" in capsys.readouterr().err
    step_time.main(args + ["--allow-cpu"])
    entries = cost.load_step_times()
    assert sorted(e["ks_mode"] for e in entries) == ["none", "triple"]
    assert all(e["gpu"] == "CPU" and e["image_size"] == [64, 80] and e["seconds_per_step"] > 0 for e in entries)
    capsys.readouterr()
    main(["list", "demo", "--cost", "--json"])
    rows = {r["row"]: r for r in json.loads(capsys.readouterr().out)}
    cfg = Manifest("demo").resolve("def_r18")
    steps = cfg["train"]["epochs"] * math.ceil(cfg["data"]["synthetic"]["train"] / cfg["train"]["batch_size"])
    by_mode = {e["ks_mode"]: e["seconds_per_step"] for e in entries}
    assert rows["def_r18"]["steps"] == steps
    assert rows["def_r18"]["gpu_hours"] == round(steps * by_mode["none"] / 3600, 1)
    main(["list", "demo", "--cost"])
    assert "estimated training cost:" in capsys.readouterr().out
    main(["list", "demo", "--cost", "--gpu", "NVIDIA H100"])
    out = capsys.readouterr().out
    assert "no estimate for 2 row(s)" in out and "on NVIDIA H100" in out
    cost.STEP_TIMES.write_text("{")
    with pytest.raises(SystemExit, match="step_times.json: not valid JSON"):
        main(["list", "demo", "--cost"])


def test_ks_overhead_benchmark_prints_ratios_floor_memory_and_parameters(capsys):
    ks_overhead.main(["--manifest", "demo", "--backbone", "resnet18", "--sizes", "64", "--repeats", "1",
                      "--device", "cpu"])
    out = capsys.readouterr().out
    assert "deformable_detr (def_r18 vs ks_def_r18), batch 8 x 64 px:" in out
    for label in ("train", "infer", "memory", "params"):
        assert f"\n  {label} " in out
    assert "floor 1 + 2 f_dec" in out and "NOT the baseline's" not in out  # inference parameters equal
    assert "\n  parts  decoder " in out and "(3 branches)" not in out and "; 3 branches), last encoder layer" in out
    assert "floor of these parts 1 + (their growth) / baseline step = " in out
    assert "FLOPs of the parts: decoder 3.00x, last encoder layer " in out
    with pytest.raises(SystemExit, match="no resnet50 baseline/KS pair"):
        ks_overhead.main(["--manifest", "demo", "--sizes", "64", "--device", "cpu"])


def test_ks_overhead_floor_of_the_parts_is_the_baseline_step_plus_their_growth():
    r = ks_overhead.measure_pair(Manifest("demo"), "deformable_detr", "def_r18", "ks_def_r18", 64, 1,
                                 ks_overhead.pick_device("cpu"))
    assert set(r["parts"]) == {"decoder", "last_layer"}
    assert all(b > 0 and k > 0 for b, k in r["parts"].values())
    growth = sum(k - b for b, k in r["parts"].values())
    assert r["floor_parts"] == pytest.approx(1 + growth / r["train_base"], rel=1e-12)
    assert r["f_dec"] == pytest.approx(r["parts"]["decoder"][0] / r["train_base"], rel=1e-12)
    assert r["floor"] == pytest.approx(1 + 2 * r["f_dec"], rel=1e-12)
    (dec_base, dec_ks), (last_base, last_ks) = r["part_flops"]["decoder"], r["part_flops"]["last_layer"]
    assert dec_ks == 3 * dec_base  # three branches of the same decoder, stacked on the batch axis
    assert last_ks > 2 * last_base  # the KS layer: the student's branch and two teacher branches
    expected = 1 + ((dec_ks / dec_base - 1) * r["parts"]["decoder"][0]
                    + (last_ks / last_base - 1) * r["parts"]["last_layer"][0]) / r["train_base"]
    assert r["floor_flops"] == pytest.approx(expected, rel=1e-12)
