"""Train + eval smoke runs of both demo rows, run records, resume, and clear errors."""
import json
import shlex

import pytest

from experiments import engine, records
from experiments.engine import RunError, train_row

TINY_RUN = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=2",
            "model.dim_feedforward=64", "model.num_queries=10", "model.eval_topk=20",
            "data.synthetic.train=8", "data.synthetic.val=4", "data.synthetic.size=96", "data.num_workers=0",
            "data.train_scales=[64,80]", "data.train_max_size=112", "data.crop_resize_scales=[64]",
            "data.crop_size=[48,64]", "data.test_size=72", "data.test_max_size=112",
            "train.batch_size=2", "train.epochs=2", "train.lr_drop=[1]", "train.max_iters_per_epoch=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "synthetic"


def overrides(data_root, *extra):
    return TINY_RUN + [f"data.root={data_root}", *extra]


@pytest.mark.parametrize("row,branches", [("dab_r18", ["attn1"]), ("ks_dab_r18", ["attn1", "attn3", "attn2"])])
def test_demo_row_trains_evaluates_and_records(tmp_path, data_root, row, branches):
    directory = train_row("demo", row, overrides(data_root), results=tmp_path)
    assert directory == tmp_path / "runs" / "demo" / row
    assert records.status(directory) == "done"
    for name in ("config.yaml", "command.txt", "env.json", "log.jsonl", "eval.json", "DONE", "checkpoint.pth"):
        assert (directory / name).is_file(), name
    log = records.read_log(directory / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[0]["lr"] == pytest.approx(2e-4) and log[1]["lr"] == pytest.approx(2e-5)  # lr drop after epoch 1
    for record in log:
        assert list(record["eval"]) == branches
        assert set(record["eval"]["attn1"]) == set(records.METRICS)
        assert record["train"]["loss"] > 0
    final = json.loads((directory / "eval.json").read_text())
    assert final["epoch"] == 2 and final["attn1"] == log[-1]["eval"]["attn1"]
    env = json.loads((directory / "env.json").read_text())
    assert env["backbone_init"] == "random" and (env["teacher_parameters"] > 0) == (row == "ks_dab_r18")

    # a finished row is skipped, not retrained or overwritten
    done = (directory / "DONE").read_text()
    assert train_row("demo", row, overrides(data_root), results=tmp_path) == directory
    assert (directory / "DONE").read_text() == done


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, data_root, monkeypatch):
    real_evaluate = engine.evaluate
    calls = []

    def evaluate_then_stop(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job dies during the second epoch's evaluation
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_row("demo", "ks_dab_r18", overrides(data_root), results=tmp_path)
    directory = records.run_dir("demo", "ks_dab_r18", tmp_path)
    assert records.status(directory) == "failed"
    assert [r["epoch"] for r in records.read_log(directory / "log.jsonl")] == [1]

    with pytest.raises(RunError, match="--resume"):
        train_row("demo", "ks_dab_r18", overrides(data_root), results=tmp_path)
    with pytest.raises(RunError, match="configuration differs.*train.epochs"):
        train_row("demo", "ks_dab_r18", overrides(data_root, "train.epochs=3"), resume=True, results=tmp_path)

    trained = []
    real_train = engine.train_one_epoch
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: trained.append(a[6]) or real_train(*a, **k))
    train_row("demo", "ks_dab_r18", overrides(data_root), resume=True, results=tmp_path)
    assert trained == ["2/2"]  # only the unfinished epoch
    assert records.status(directory) == "done"
    assert [r["epoch"] for r in records.read_log(directory / "log.jsonl")] == [1, 2]
    commands = (directory / "command.txt").read_text().splitlines()  # every start is recorded
    assert len(commands) == 2 and commands[1].endswith(
        "python -m experiments run demo --row ks_dab_r18 --resume " + shlex.join(overrides(data_root)))


def test_force_moves_the_old_record_aside(tmp_path, data_root):
    directory = train_row("demo", "dab_r18", overrides(data_root, "train.epochs=1", "train.lr_drop=[]"),
                          results=tmp_path)
    first = (directory / "DONE").read_text()
    train_row("demo", "dab_r18", overrides(data_root, "train.epochs=1", "train.lr_drop=[]"), force=True,
              results=tmp_path)
    aside = [p for p in directory.parent.iterdir() if p.name.startswith("dab_r18.replaced-")]
    assert len(aside) == 1 and (aside[0] / "DONE").read_text() == first
    assert records.status(directory) == "done"


def test_missing_data_set_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_coco_here"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train_row("demo", "dab_r18", [f"data.root={missing}", "data.dataset=coco"], results=tmp_path)
    assert records.status(records.run_dir("demo", "dab_r18", tmp_path)) == "failed"
