"""Training-step time of a manifest row with the backbone in float32 against bfloat16 autocast.

    python -m benchmarks.backbone_autocast [--manifest demo --row def_r18 --size 160 --repeats 5]

Builds the row's model twice (same weights), feeds both the same random batch of `train.batch_size`
images of --size x --size pixels with random boxes, and times forward + loss + backward + optimizer
step. Prints the time per step of each and their ratio, all measured in this one run. bfloat16 pays
off on CPUs with AVX512-BF16 or AMX and on GPUs from Ampere on; elsewhere it can be slower.
"""
import argparse

import torch

from benchmarks import mean_seconds, print_ratios, random_batch, train_step
from experiments.config import Manifest
from experiments.build import model_config, pick_device
from experiments.training import build_optimizer
from models import build_model


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backbone_autocast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="demo", help="manifest name or path (default: demo)")
    parser.add_argument("--row", default="def_r18", help="row whose model and batch size are timed (default: def_r18)")
    parser.add_argument("--size", type=int, default=160, help="square image side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting, after one warm-up step")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    times = {}
    for autocast in (None, "bfloat16"):
        cfg = Manifest(args.manifest).resolve(args.row, [f"model.backbone.autocast={autocast or 'null'}"])
        torch.manual_seed(0)
        model, criterion = build_model(model_config(cfg), num_classes=5)  # the class count barely matters here
        model.to(device)
        optimizer = build_optimizer(model, cfg["train"])
        batch = random_batch(cfg["train"]["batch_size"], args.size, 5, device, torch.Generator().manual_seed(0))
        times[autocast or "float32"] = mean_seconds(lambda: train_step(model, criterion, optimizer, batch),
                                                     args.repeats, device)
    print(f"{args.manifest}/{args.row} on {device}, batch {cfg['train']['batch_size']} x {args.size} px, "
          f"{args.repeats} steps each")
    print_ratios(times, "float32", "  backbone {name:9s} {ms:8.1f} ms/step   {ratio:5.2f}x float32")


if __name__ == "__main__":
    main()
