"""Constants and helpers shared by the test files (their fixtures are in conftest.py): the tiny
run overrides of the demo rows, hand-written run records, the seed statistics computed directly
from numpy and scipy (the references of the analysis tests)."""
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from experiments import engine, records
from experiments.engine import train_row

# Overrides that make a demo row train and evaluate in seconds on the CPU.
TINY_RUN = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=2",
            "model.dim_feedforward=64", "model.num_queries=10", "model.eval_topk=20",
            "data.synthetic.train=8", "data.synthetic.val=4", "data.synthetic.size=96", "data.num_workers=0",
            "data.train_scales=[64,80]", "data.train_max_size=112", "data.crop_resize_scales=[64]",
            "data.crop_size=[48,64]", "data.test_size=72", "data.test_max_size=112",
            "train.batch_size=2", "train.epochs=2", "train.lr_drop=[1]", "train.max_iters_per_epoch=2",
            "train.eval_every=1"]
ROW = "ks_def_r18"  # the demo's KS row (the `trained` fixture)


def overrides(data_root, *extra):
    return TINY_RUN + [f"data.root={data_root}", *extra]


def interrupt_during_second_evaluation(monkeypatch, row, data_root, results, *extra):
    """Trains `row` for 2 epochs (with the `extra` overrides) and lets the job die during the second
    epoch's evaluation; the real evaluate() is back in place afterwards."""
    real_evaluate = engine.evaluate
    calls = []

    def evaluate_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_row("demo", row, overrides(data_root, *extra), results=results)
    monkeypatch.setattr(engine, "evaluate", real_evaluate)


# ---------------------------------------------------------------- run records written by hand

def metrics(ap, **others):
    """An eval branch with AP = ap and the other metrics given or derived from ap (all in [0, 1])."""
    out = {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.03, "APs": abs(ap - 0.2), "APm": ap + 0.04, "APl": ap + 0.18}
    out.update(others)
    return out


ENV = {"git_sha": "0123456789abcdef0123456789abcdef01234567", "cpu": "Test CPU (avx512_bf16)"}


def write_run(results, manifest, row, state, log=(), final=None, env=ENV):
    """A run record: state 'done' (log, eval.json, DONE), 'interrupted' (log only), 'failed'; env.json
    as given (by default one commit and CPU for every run; None: no env.json)."""
    d = records.run_dir(manifest, row, results)
    d.mkdir(parents=True)
    if state != "interrupted":
        records.write_yaml(d / "config.yaml", {"row": row})
    if env is not None:
        records.write_json(d / "env.json", env)
    lines = [{"epoch": e, "lr": 1e-4, "train": {"loss": 10.0 - e}, **({"eval": ev} if ev else {}), "time_s": 1.0}
             for e, ev in log]
    records.write_log(d / "log.jsonl", lines)
    if state == "done":
        records.write_json(d / "eval.json", {"epoch": lines[-1]["epoch"] if lines else 0, **final})
        records.write_json(d / "DONE", {"epochs": len(lines)})
    elif state == "failed":
        records.atomic_write(d / "FAILED", "RunError: boom\n")


def write_manifest(path, rows):
    path.write_text(yaml.safe_dump({"description": "test", "rows": rows}, sort_keys=False))
    return path


def scipy_expected(a, b):
    """(mean, sd, p, ci_low, ci_high) of a - b from numpy and scipy.stats directly."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    n = len(d)
    p = stats.ttest_rel(a, b).pvalue
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return d.mean(), d.std(ddof=1), p, d.mean() - half, d.mean() + half


def holm_by_definition(ps):
    """Holm from its definition: p_i -> max over p_j <= p_i (ranked) of min(1, (m - rank_j) p_j)."""
    ranked = sorted(ps)
    m = len(ps)
    return [max(min(1.0, (m - k) * ranked[k]) for k in range(ranked.index(p) + 1)) for p in ps]
