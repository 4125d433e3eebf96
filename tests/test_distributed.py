"""DDP: launch environments, batch plans, sharding, and equivalence of 2 gloo processes (and gradient
accumulation) with one process on the same total batch."""
import json

import pytest
import torch

from experiments import distributed, training
from experiments.config import Manifest
from experiments.distributed import first_host, from_environment, slurm_port
from experiments.errors import RunError
from experiments.training import TrainSampler, batch_plan

from .helpers import TINY_RUN


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_host("node7") == "node7"
    assert first_host("a-b-[1-2]") == "a-b-1"
    assert first_host("n[07-09]-ib,x") == "n07-ib"
    assert first_host("rack[2-3]-n[01-04,07]") == "rack2-n01"
    assert first_host("localhost,other") == "localhost"
    assert first_host(None) == "127.0.0.1"


def test_launch_from_torchrun_and_slurm_environments():
    assert from_environment({}) is None
    t = from_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.source) == (3, 8, 1, "h", 1234, "torchrun")
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[12-13]", "SLURM_NTASKS": "16"}
    s = from_environment(env)
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.source) == (5, 16, 5, "gpu12", "slurm")
    assert s.master_port == slurm_port("4242") and 15000 <= s.master_port < 35000
    # the batch script of a job (no srun step) is a single process, whatever the allocation
    assert from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) is None
    # torchrun wins inside a SLURM step (e.g. `srun torchrun ...` or `run --nproc N` in an allocation)
    assert from_environment({**env, "RANK": "0", "WORLD_SIZE": "2"}).source == "torchrun"


def test_single_process_context_is_a_no_op():
    ctx = distributed.setup("cpu", environ={})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.broadcast({"a": 1}) == {"a": 1} and ctx.gather(5) == [5]
    ctx.close()


@pytest.mark.parametrize("batch,total,world,expected", [
    (2, 16, 8, (2, 1, 16)), (2, 16, 1, (2, 8, 16)), (2, 16, 2, (2, 4, 16)), (1, 16, 4, (1, 4, 16)),
    (2, None, 3, (2, 1, 6)),
])
def test_batch_plan_keeps_the_total_batch_by_accumulation(batch, total, world, expected):
    assert batch_plan({"batch_size": batch, "total_batch_size": total}, world) == expected


@pytest.mark.parametrize("batch,total,world", [(2, 16, 16), (2, 16, 3), (4, 16, 3)])
def test_batch_plan_rejects_totals_it_cannot_keep(batch, total, world):
    with pytest.raises(RunError, match="total_batch_size=16"):
        batch_plan({"batch_size": batch, "total_batch_size": total}, world)


def test_shards_of_a_step_are_the_single_process_batch():
    """World 2 x batch 2 x accumulation 2: the 8 samples of step k on both ranks are the 8 of step k of
    one process with batch 8, whatever the epoch."""
    n = 37
    for epoch in (1, 2):
        single = TrainSampler(n, 1, 0, seed=3)
        single.set_epoch(epoch)
        whole = [i for _, i in single]
        ranks = []
        for rank in range(2):
            s = TrainSampler(n, 2, rank, seed=3)
            s.set_epoch(epoch)
            ranks.append([i for _, i in s])
        for step in range(n // 8):
            mine = sorted(ranks[0][step * 4:(step + 1) * 4] + ranks[1][step * 4:(step + 1) * 4])
            assert mine == sorted(whole[step * 8:(step + 1) * 8])
        skipped = TrainSampler(n, 2, 1, seed=3)
        skipped.set_epoch(epoch, skip=4)
        assert [i for _, i in skipped] == ranks[1][4:] and len(skipped) == len(ranks[1]) - 4
    first, second = TrainSampler(n, 1, 0, seed=3), TrainSampler(n, 1, 0, seed=3)
    second.set_epoch(2)
    assert [i for _, i in first] != [i for _, i in second]  # a new order every epoch


# --------------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process

class SameSizeImages(torch.utils.data.Dataset):
    """Images of one size (no padding differences between batch layouts), with a random flip drawn
    from the torch RNG (SeededDataset makes it a function of the sample, not of the process)."""

    def __init__(self, n=16, size=64):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.boxes, self.labels = [], []
        for _ in range(n):
            k = int(torch.randint(1, 4, (), generator=g))
            xy = torch.rand(k, 2, generator=g) * size * 0.6
            wh = 8 + torch.rand(k, 2, generator=g) * size * 0.3
            self.boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
            self.labels.append(torch.randint(0, 3, (k,), generator=g))
        self.num_classes = 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, boxes = self.images[i], self.boxes[i].clone()
        if torch.rand(()) < 0.5:
            w = image.shape[-1]
            image = image.flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        h, w = image.shape[-2:]
        return image, {"boxes": boxes, "labels": self.labels[i], "image_id": i,
                       "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}


def tiny_model_config():
    cfg = Manifest("demo").resolve("ks_def_r18", [o for o in TINY_RUN if o.startswith("model.")]
                                   + ["model.backbone.norm=frozen_bn", "model.dropout=0.0",
                                      # float32: bfloat16 rounding differs with the batch layout
                                      "model.backbone.autocast=null"])
    return cfg


def train_tiny(out, batch, accumulation, steps=2, epochs=2):
    """Trains the tiny KS-DAB model; rank 0 saves the losses and the final weights to `out`."""
    from models import build_model

    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    try:
        cfg = tiny_model_config()
        data = SameSizeImages()
        torch.manual_seed(0)
        model, criterion = build_model(cfg["model"], data.num_classes)
        # SGD: the weights then differ between layouts by lr x (float rounding of the gradients). Adam
        # would turn rounding noise on near-zero gradients into steps of size lr and hide nothing else.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        net = torch.nn.parallel.DistributedDataParallel(model) if ctx.distributed else model
        loader = training.make_train_loader(data, batch, 0, seed=7, ctx=ctx)
        losses = []
        for epoch in range(1, epochs + 1):
            loader.batch_sampler.sampler.set_epoch(epoch)
            losses.append(training.train_one_epoch(net, criterion, loader, optimizer, ctx.device, 0.1, f"{epoch}",
                                                 steps, accumulation=accumulation, ctx=ctx, seed_key=(7, epoch)))
        if ctx.is_main:
            torch.save({"losses": losses, "model": model.state_dict()}, out)
    finally:
        ctx.close()


def test_two_gloo_processes_match_one_process(tmp_path):
    """Total batch 4 per step: 1 process x 4 images, 2 processes x 2 images, 1 process x 2 images x 2
    accumulation steps, 2 processes x 1 image x 2 accumulation steps."""
    runs = {"single": (1, 4, 1), "ddp": (2, 2, 1), "accumulate": (1, 2, 2), "ddp_accumulate": (2, 1, 2)}
    results = {}
    for name, (procs, batch, acc) in runs.items():
        out = tmp_path / f"{name}.pt"
        if procs == 1:
            train_tiny(out, batch, acc)
        else:
            distributed.spawn(procs, train_tiny, out, batch, acc)
        results[name] = torch.load(out, weights_only=False)
    ref = results["single"]
    assert len(ref["losses"]) == 2 and ref["losses"][0]["loss"] > 0
    for name, res in results.items():
        for a, b in zip(res["losses"], ref["losses"]):
            assert set(a) == set(b)
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (name, k)
        for k, v in ref["model"].items():
            torch.testing.assert_close(res["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}, {k}: {m}")
    # the weights moved by ~1e-2, 10^4 x the tolerance: the comparison is not trivially true
    init = build_initial_weights()
    moved = max((ref["model"][k].float() - init[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3


def build_initial_weights():
    from models import build_model

    torch.manual_seed(0)
    model, _ = build_model(tiny_model_config()["model"], 3)
    return model.state_dict()


def test_run_with_two_cpu_processes_records_the_layout(tmp_path):
    """`run --nproc 2`: DDP with gloo through the CLI; env.json records world size, per-process batch
    and accumulation; only rank 0 writes the record."""
    from experiments.__main__ import main

    data = tmp_path / "data"
    overrides = [o for o in TINY_RUN if not o.startswith(("train.batch_size", "train.epochs", "train.lr_drop"))]
    main(["--results", str(tmp_path), "run", "demo", "--row", "def_r18", "--nproc", "2", *overrides,
          f"data.root={data}", "train.batch_size=1", "train.total_batch_size=4", "train.epochs=1", "train.lr_drop=[]"])
    directory = tmp_path / "runs" / "demo" / "def_r18"
    env = json.loads((directory / "env.json").read_text())
    assert (env["world_size"], env["batch_size_per_process"], env["accumulation_steps"], env["total_batch_size"]) \
        == (2, 1, 2, 4)
    assert env["backend"] == "gloo" and env["launcher"] == "local"
    assert (directory / "DONE").is_file()
    log = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and set(log[0]["eval"]["attn1"]) == {"AP", "AP50", "AP75", "APs", "APm",
                                                                                 "APl"}
    command = (directory / "command.txt").read_text()
    assert "run demo --row def_r18 --nproc 2 model.hidden_dim=32" in command and "# 2 processes" in command
