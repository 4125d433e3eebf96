"""`python -m experiments complexity`: what a row costs at inference. The FLOP formulas it adds to
torch's counter equal hand counts, the parameters it finds read are the model's minus its teacher
parameters, and every KS row of Table 1 costs exactly its baseline at inference."""
import csv

import pytest
import torch
import torch.nn.functional as F

from experiments import complexity
from experiments.config import Manifest
from models import is_teacher_parameter
from models.ops.ms_deform_attn import ms_deform_attn_pytorch


class Sampling(torch.nn.Module):
    def forward(self, value, shapes, starts, locations, weights):
        return ms_deform_attn_pytorch(value, shapes, starts, locations, weights)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, q, k, v):
        return self.proj(F.scaled_dot_product_attention(q, k, v))


def test_the_added_formulas_are_hand_counts():
    N, M, D, Lq, P = 2, 3, 4, 5, 2
    shapes = torch.tensor([[6, 7], [3, 4]])
    starts = torch.tensor([0, 42])
    L = len(shapes)
    inputs = (torch.randn(N, 54, M, D), shapes, starts, torch.rand(N, Lq, M, L, P, 2),
              torch.rand(N, Lq, M, L, P).softmax(-1))
    _, _, flops, skipped = complexity.count(Sampling(), *inputs)
    # per sampled value and channel: 4 bilinear multiply-adds and 1 weighting multiply-add, 2 FLOPs each
    assert flops == 10 * N * M * D * Lq * L * P
    assert "grid_sampler_2d" not in skipped

    B, H, Lk, E = 2, 2, 9, 8
    q, k, v = torch.randn(B, H, 6, E), torch.randn(B, H, Lk, E), torch.randn(B, H, Lk, E)
    n_train, n_infer, flops, _ = complexity.count(Attention(), q, k, v)
    attention = 2 * B * H * 6 * Lk * E * 2  # q k^T and the weighted sum of v
    projection = 2 * B * H * 6 * 8 * 8
    assert flops == attention + projection
    assert n_train == n_infer == 8 * 8 + 8


def test_parameters_read_at_inference_are_those_without_the_teachers():
    manifest = Manifest("demo")
    counts = {}
    for row in ("def_r18", "ks_def_r18"):
        cfg = manifest.resolve(row, ["model.enc_layers=1", "model.dec_layers=2", "model.num_queries=20"])
        model = complexity.build(cfg)
        counts[row] = complexity.count(model, *complexity.image((64, 96), "cpu"))
        teachers = sum(p.numel() for n, p in model.named_parameters() if is_teacher_parameter(n))
        n_train, n_infer, _, _ = counts[row]
        assert n_infer == n_train - teachers
        assert (teachers > 0) == (row == "ks_def_r18")
    assert counts["ks_def_r18"][1:3] == counts["def_r18"][1:3]  # the same parameters read, the same FLOPs
    assert counts["ks_def_r18"][0] > counts["def_r18"][0]


def test_every_ks_row_of_table1_costs_its_baseline_at_inference(tmp_path, capsys):
    manifest = Manifest("table1")
    rows = [r for r, row in manifest.rows.items() if row.get("baseline")]
    pairs = sorted({r for r in rows} | {manifest.rows[r]["baseline"] for r in rows}, key=list(manifest.rows).index)
    complexity.main(["table1", "--rows", *pairs, "--size", "64", "64", "--repeats", "1", "--device", "cpu",
                     "--results", str(tmp_path)])
    with open(tmp_path / "tables" / "complexity_table1.csv") as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    assert set(table) == set(pairs)
    for row in rows:
        ks, base = table[row], table[manifest.rows[row]["baseline"]]
        assert ks["params_infer"] == base["params_infer"] and ks["flops"] == base["flops"], row
        assert int(ks["params_train"]) > int(ks["params_infer"]), row  # the teachers train, then go
        assert float(ks["params_infer_ratio"]) == float(ks["flops_ratio"]) == 1.0
    md = (tmp_path / "tables" / "complexity_table1.md").read_text()
    assert md == capsys.readouterr().out
    assert "| dab_r50_ks | dab_r50 | triple |" in md
    assert float(table["dab_r50"]["gflops"]) > 0


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        complexity.main(["demo", "--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: .*no_such_row"):
        complexity.main(["demo", "--rows", "no_such_row", "--no-write"])
