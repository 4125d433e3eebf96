"""Every GPU check of this repository in one command, sized for a short GPU slot.

    python -m benchmarks.gpu_check [--out DIR] [--budget-min 9] [--device cuda|cpu] [--quick]
    make gpu-check

Stages, in order, each with its own log under --out and a line in summary.json / summary.md:

1. environment: GPU, driver, torch and CUDA versions, CPU, date;
2. build: the MSDeformAttn extension (`python -m models.ops.ms_deform_attn.build`) and its build time;
3. cuda_tests: the op's `cuda`-marked tests (passed / failed / skipped);
4. step_times: the training step of every distinct table1 row at the table settings (800 x 1216,
   the row's per-GPU batch and autocast), as `benchmarks.step_time --write` measures it,
   into --out/step_times.json (on CUDA also results/step_times.json, read by `list table1 --cost`);
5. profile: the demo's KS row on the synthetic set with its real loader (torch.profiler): images/s,
   the step's shares of data waiting, the Hungarian matcher and host synchronisations, the top ops;
6. ddp: one DDP step of two processes on the one device (NCCL on CUDA, gloo on CPU), or one process
   when two cannot share it, saying which;
7. grid: the synthetic_table1 rows as several processes sharing the device for the minutes left
   (`run ... --resume`, records under --out/results, so that a later slot continues them).

A stage that fails is recorded with its error and the next one runs. --quick shrinks every stage to
toy sizes; with --device cpu it is a test of the default suite (about 25 s on two cores), so the command
is known to work before a GPU is lent. Everything needed to commit the results is under --out
(default results/gpu_check/<date>-<device name>/).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments import records

REPO = records.REPO
PYTHON = sys.executable
GRID_MANIFEST = "synthetic_table1"
# toy settings of --quick: small images, a tiny transformer, a few steps
QUICK_MODEL = ["model.hidden_dim=32", "model.nheads=4", "model.dec_layers=2", "model.dim_feedforward=64",
               "model.num_queries=10", "model.eval_topk=20"]
QUICK_DATA = ["data.synthetic.train=8", "data.synthetic.val=4", "data.synthetic.size=96", "data.num_workers=0",
              "data.train_scales=[64,80]", "data.train_max_size=112", "data.crop_resize_scales=[64]",
              "data.crop_size=[48,64]", "data.test_size=72", "data.test_max_size=112"]
QUICK_TRAIN = ["train.batch_size=2", "train.epochs=1", "train.lr_drop=[]", "train.max_iters_per_epoch=2",
               "train.eval_every=1"]


class Check:
    """The stages' results, written to summary.json and summary.md after every stage."""

    def __init__(self, out, deadline):
        self.out, self.deadline, self.stages = Path(out), deadline, {}
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, name, function, *args):
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            result = function(self, *args)
            status = "ok" if not (isinstance(result, dict) and result.get("status")) else result.pop("status")
        except Exception as e:  # noqa: BLE001 - recorded, and the next stage runs
            result, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
        self.stages[name] = {"status": status, "seconds": round(time.monotonic() - t0, 1), **(result or {})}
        print(f"   {status} in {self.stages[name]['seconds']} s: "
              f"{json.dumps({k: v for k, v in self.stages[name].items() if k not in ('status', 'seconds')})[:400]}",
              flush=True)
        self.write()

    def write(self):
        records.write_json(self.out / "summary.json", self.stages)
        lines = ["| stage | status | seconds | result |", "| --- | --- | ---: | --- |"]
        for name, s in self.stages.items():
            detail = {k: v for k, v in s.items() if k not in ("status", "seconds", "top_operations", "rows")}
            lines.append(f"| {name} | {s['status']} | {s['seconds']} | {json.dumps(detail)[:300]} |")
        records.atomic_write(self.out / "summary.md", "\n".join(lines) + "\n")

    def command(self, name, argv, timeout, env=None):
        """Runs argv (logged to <out>/<name>.log); (return code, output). Killed at `timeout` seconds."""
        timeout = max(5, min(timeout, self.left()))
        with open(self.out / f"{name}.log", "w") as log:
            try:
                done = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                      env={**os.environ, **(env or {})})
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        return code, (self.out / f"{name}.log").read_text(errors="replace")


# ------------------------------------------------------------------------------------------ stages

def environment(check, device):
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": socket.gethostname(), "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    from experiments.runs import cpu_name

    info["cpu"] = cpu_name()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False)
            info["driver"] = smi.stdout.strip()
    return info


def build(check, quick):
    out_dir = check.out / "op_build" if quick else None  # --quick: leave the package's own build alone
    argv = [PYTHON, "-m", "models.ops.ms_deform_attn.build"] + (["--out-dir", str(out_dir)] if out_dir else [])
    if not shutil.which("nvcc") and not os.environ.get("CUDA_HOME"):
        return {"status": "skipped", "reason": "no nvcc on PATH and no CUDA_HOME"}
    code, log = check.command("build", argv, 300)
    return {"status": "ok" if code == 0 else "failed", "return_code": code, "log_tail": log[-300:] if code else ""}


def cuda_tests(check):
    code, log = check.command("cuda_tests", [PYTHON, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                             "tests/test_ms_deform_attn.py"], 240)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", log)}
    return {"status": "ok" if code in (0, 5) and not counts.get("failed") else "failed", "return_code": code,
            **counts}


def step_times(check, device, quick):
    from experiments import cost
    from benchmarks import step_time
    from experiments.config import Manifest

    manifest = Manifest("table1")
    rows = ["dab_r50", "dab_r50_ks"] if quick else list(manifest.rows)
    size, repeats = ((64, 96), 1) if quick else ((800, 1216), 5)
    measured = step_time.measure(manifest, rows, size, repeats, device)
    for _, entry in measured:
        cost.add_step_time(entry, check.out / "step_times.json")
        if device.type == "cuda":
            cost.add_step_time(entry)
    return {"size": list(size), "rows": {row: entry["seconds_per_step"] for row, entry in measured}}


def profile(check, device, quick):
    """Training steps of the demo's KS row on its own data loader: images/s and where the step goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from experiments import distributed
    from experiments.build import build_data, model_config
    from experiments.config import Manifest
    from experiments.training import build_optimizer, make_train_loader, to_device
    from models import build_model

    data_root = check.out / "data" / "synthetic"
    overrides = [f"data.root={data_root}"] + (QUICK_MODEL + QUICK_DATA + QUICK_TRAIN if quick else [])
    cfg = Manifest("demo").resolve("ks_def_r18", overrides)
    ctx = distributed.Context(device=device)
    train_set, _ = build_data(cfg, ctx)
    torch.manual_seed(0)
    model, criterion = build_model(model_config(cfg), train_set.num_classes)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg["train"])
    batch_size = cfg["train"]["batch_size"]
    loader = make_train_loader(train_set, batch_size, cfg["data"]["num_workers"], 0, ctx)
    steps = 3 if quick else 40

    def batches():
        while True:
            loader.batch_sampler.sampler.set_epoch(len(seen), 0)
            yield from loader

    seen, waits = [], []
    source = batches()

    def step():
        t0 = time.perf_counter()
        batch = next(source)
        images, mask, targets = to_device(batch, device)
        waits.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images, mask, targets), targets)["loss"].backward()
        optimizer.step()
        seen.append(len(targets))

    for _ in range(2):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    waits.clear()
    seen.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(min(steps, 5)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    by_name = {e.key: e for e in events}
    syncs = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
             "Memcpy DtoH (Device -> Pageable)", "Memcpy DtoH (Device -> Pinned)")
    matcher = by_name.get("matcher")
    time_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, time_key, 0), reverse=True)[:15]
    records.atomic_write(check.out / "profile.txt", events.table(sort_by=time_key, row_limit=40))
    return {"images_per_s": round(sum(seen) / wall, 1), "steps": steps, "batch_size": batch_size,
            "data_wait_share": round(sum(waits) / wall, 4),
            "matcher_share_of_cpu": round(matcher.cpu_time_total / total, 4) if matcher else None,
            "host_sync_share_of_cpu": round(sum(by_name[k].self_cpu_time_total for k in syncs if k in by_name)
                                            / total, 4),
            "top_operations": [(e.key, round(getattr(e, time_key, 0) / 1e3, 2)) for e in top]}


DDP_CHILD = r"""
import os, sys, torch, torch.distributed as dist
rank, world, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
dist.init_process_group(backend, rank=rank, world_size=world)
device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
torch.manual_seed(rank)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 8).to(device),
                                                  device_ids=[0] if backend == "nccl" else None)
model(torch.randn(16, 64, device=device)).square().mean().backward()
grads = [p.grad.clone() for p in model.parameters()]
for g in grads:
    other = g.clone(); dist.broadcast(other, 0)
    assert torch.equal(g, other), "ranks disagree after all-reduce"
dist.destroy_process_group()
print("ok", rank, flush=True)
os._exit(0)  # gloo's threads can abort the interpreter's own teardown ("terminate called ...") after a good step
"""


def ddp(check, device):
    backend = "nccl" if device.type == "cuda" else "gloo"
    for world in (2, 1):
        port = str(29500 + os.getpid() % 1000 + world)
        procs = [subprocess.Popen([PYTHON, "-c", DDP_CHILD, str(r), str(world), backend, port], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=max(10, min(120, check.left())))[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outputs.append(p.communicate()[0] + "\n(timed out)")
        (check.out / f"ddp_{world}.log").write_text("\n".join(outputs))
        if all(p.returncode == 0 and f"ok {r}" in out for r, (p, out) in enumerate(zip(procs, outputs))):
            return {"backend": backend, "processes": world,
                    "note": "two ranks shared the device" if world == 2 else
                            "two ranks could not share the device (see ddp_2.log); one rank ran"}
    return {"status": "failed", "backend": backend, "error": "neither two ranks nor one ran (ddp_*.log)"}


def grid(check, device, quick, processes):
    """The synthetic grid's rows, `processes` at a time, until the budget is spent (then SIGTERM: each
    run checkpoints and stops; `run --resume` continues it later)."""
    from experiments.config import Manifest

    manifest = Manifest(GRID_MANIFEST)
    results = check.out / "results"
    rows = [r for r, row in manifest.rows.items() if "same_as" not in row]
    extra = [f"data.root={check.out / 'data' / 'grid'}"]
    if quick:
        rows, extra = rows[:1], extra + QUICK_MODEL + QUICK_DATA + QUICK_TRAIN
    device_option = ["--device", device.type]
    # the data set first, once (each process would otherwise generate it)
    subprocess.run([PYTHON, "-c", "import sys; from experiments.build import build_data; "
                    "from experiments.config import Manifest; "
                    f"build_data(Manifest({GRID_MANIFEST!r}).resolve({rows[0]!r}, sys.argv[1:]))", *extra],
                   cwd=REPO, check=True, capture_output=True)
    pending, running, finished = list(rows), {}, {}
    logs = check.out / "grid_logs"
    logs.mkdir(exist_ok=True)
    while (pending or running) and check.left() > 20:
        while pending and len(running) < processes:
            row = pending.pop(0)
            log = open(logs / f"{row}.log", "w")
            running[row] = (subprocess.Popen([PYTHON, "-m", "experiments", "--results", str(results), "run",
                                              GRID_MANIFEST, "--row", row, "--resume", *device_option, *extra],
                                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(2)
        for row, (p, log) in list(running.items()):
            if p.poll() is not None:
                finished[row] = p.returncode
                log.close()
                del running[row]
    for row, (p, log) in running.items():  # out of time: checkpoint and stop
        p.send_signal(signal.SIGTERM)
    for row, (p, log) in running.items():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        finished[row] = "stopped at the deadline"
        log.close()
    return {"processes": processes, "rows": finished, "not_started": pending,
            "done": sum(1 for v in finished.values() if v == 0)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder of the results (default: results/gpu_check/<date>-<device>)")
    parser.add_argument("--budget-min", type=float, default=9.0,
                        help="minutes for all stages; the grid gets what is left (default: %(default)s)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="toy sizes in every stage (a test of the command)")
    parser.add_argument("--grid-processes", type=int, default=4,
                        help="training processes sharing the device in the grid stage (default: %(default)s)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help="stages to leave out")
    args = parser.parse_args(argv)
    from experiments.distributed import DeviceError, pick_device

    try:
        device = pick_device(args.device)
    except DeviceError as e:
        sys.exit(f"error: {e}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out or records.RESULTS / "gpu_check" /
               f"{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}")
    check = Check(out, time.monotonic() + 60 * args.budget_min)
    stages = [("environment", environment, device), ("build", build, args.quick), ("cuda_tests", cuda_tests),
              ("step_times", step_times, device, args.quick), ("profile", profile, device, args.quick),
              ("ddp", ddp, device), ("grid", grid, device, args.quick, 1 if args.quick else args.grid_processes)]
    for stage in stages:
        if stage[0] in args.skip:
            continue
        if check.left() < 10:
            check.stages[stage[0]] = {"status": "skipped", "seconds": 0, "reason": "out of time"}
            continue
        check.run(*stage)
    check.write()
    print(f"results in {out}/ (summary.md, summary.json)")
    failed = [n for n, s in check.stages.items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
