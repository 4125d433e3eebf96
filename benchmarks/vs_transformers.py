"""This repository's Deformable-DETR training step against Hugging Face transformers' DeformableDetr,
same architecture and weights, in one run.

    python -m benchmarks.vs_transformers [--size 384] [--batch 2] [--repeats 5]
                                                     [--device cpu|cuda] [--profile] [--threads N]
                                                     [--pytorch-path]

transformers' DeformableDetrForObjectDetection is built from a local config (nothing is downloaded):
an R18-style ResNet backbone (transformers' own ResNet, frozen as transformers builds it, so this side's
backbone is frozen too), d 256, 6 encoder + 6 decoder layers, 8 heads, FFN 1024, 4 levels, 4 points,
300 queries, dropout 0.1 with `activation_dropout=0.1` (--dropout), the Hungarian loss on every decoder layer
(`auxiliary_loss=True`) with this repository's matching costs and loss weights. Its weights are
converted into this repository's model (models.convert_hf); each side keeps its own dropout
placements (docs/transformers_parity.md lists them).

Printed: the largest difference of the two sides' inference outputs (the same model: about 1e-5
in float32), the training step (forward, loss, backward, AdamW step) and the inference forward of both,
the medians of --repeats interleaved steps after one warm-up each, and the ratio ours / transformers.
--pytorch-path also times this repository's model with MSDeformAttn on its PyTorch path
(grid_sample) instead of the compiled kernels, interleaved with the other two.
--profile adds the top CPU operations of one training forward and of one whole training step of
each side (torch.profiler), with dropout's (`aten::bernoulli_`, `aten::rand_like`) share. Needs
transformers (a test requirement): without it the benchmark says so and exits.
"""
import argparse
import os
from functools import partial

import torch

from benchmarks import infer_step, interleaved_medians, random_batch, synchronize, train_step
from experiments.config import DEFAULTS, merge
from models import build_model
from models.ops.ms_deform_attn import pytorch_path

NUM_CLASSES = 10
PYTORCH_PATH = "ours on MSDeformAttn's PyTorch path"


def on_pytorch_path(step):
    with pytorch_path():
        return step()


def whole(value, key):
    if float(value) != int(value):
        raise ValueError(f"{key}={value}: transformers' DeformableDetrConfig takes whole numbers here")
    return int(value)


def hf_model(transformers, size_cfg, dropout=0.1):
    m = DEFAULTS["model"]
    # transformers fixes these; this repository's defaults must equal them for the losses to match
    fixed = {"loss.class_weight": (m["loss"]["class_weight"], 1.0), "loss.gamma": (m["loss"]["gamma"], 2.0),
             "matcher.alpha": (m["matcher"]["alpha"], 0.25), "matcher.gamma": (m["matcher"]["gamma"], 2.0)}
    for key, (ours, theirs) in fixed.items():
        if ours != theirs:
            raise ValueError(f"model.{key} is {ours}; transformers' DeformableDetr uses {theirs}")
    backbone = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    values = dict(
        backbone_config=backbone, d_model=256, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_queries=300,
        num_labels=NUM_CLASSES, num_feature_levels=4, encoder_n_points=4, decoder_n_points=4,
        dropout=dropout, activation_dropout=dropout, auxiliary_loss=True,
        class_cost=whole(m["matcher"]["cost_class"], "matcher.cost_class"),
        bbox_cost=whole(m["matcher"]["cost_bbox"], "matcher.cost_bbox"),
        giou_cost=whole(m["matcher"]["cost_giou"], "matcher.cost_giou"),
        bbox_loss_coefficient=whole(m["loss"]["bbox_weight"], "loss.bbox_weight"),
        giou_loss_coefficient=whole(m["loss"]["giou_weight"], "loss.giou_weight"), focal_alpha=m["loss"]["alpha"])
    config = transformers.DeformableDetrConfig(**{**values, **size_cfg})
    torch.manual_seed(0)
    return transformers.DeformableDetrForObjectDetection(config)


def our_model(hf):
    """This repository's Deformable-DETR with `hf`'s architecture and weights; backbone frozen as hf's."""
    from models.convert_hf import load_from_hf, model_config_from_hf
    model_cfg = model_config_from_hf(hf.config, "deformable_detr")
    model_cfg["backbone"].update(weights=None, freeze_at=0)
    cfg = merge(DEFAULTS, {"model": model_cfg}, "vs_transformers")
    model, criterion = build_model(cfg["model"], NUM_CLASSES)
    load_from_hf(model, hf)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    return model, criterion


def hf_labels(targets):
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)


def hf_train(model, opt, batch, labels):
    images, padding, _ = batch
    model.train()
    opt.zero_grad(set_to_none=True)
    model(pixel_values=images, pixel_mask=(~padding).long(), labels=labels).loss.backward()
    opt.step()


@torch.no_grad()
def hf_infer(model, batch):
    model.eval()
    return model(pixel_values=batch[0], pixel_mask=(~batch[1]).long())


@torch.no_grad()
def output_difference(ours, hf, batch):
    """Largest absolute difference of the last layer's logits and boxes at inference: the two sides
    are the same model."""
    ours.eval()
    mine, theirs = ours(batch[0], batch[1]), hf_infer(hf, batch)
    return max((mine["pred_logits"] - theirs.logits).abs().max().item(),
               (mine["pred_boxes"] - theirs.pred_boxes).abs().max().item())


def profile(step, device, rows=12):
    """The top CPU operations of one call of `step` and dropout's share of the CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dropout = [e for e in events if e.key in ("aten::bernoulli_", "aten::rand_like", "aten::uniform_")]
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    for e in dropout:
        print(f"  {e.key}: {e.self_cpu_time_total / 1e3:.0f} ms in {e.count} calls "
              f"({100 * e.self_cpu_time_total / total:.0f}% of the self CPU time)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_transformers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384, help="square image side in pixels (default 384)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved steps per side (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout of both sides (default 0.1; 0 compares the steps without dropout, whose "
                             "placements differ: the decoder self-attention drops its weights here, its output there)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operations of a training forward and of a whole training step")
    parser.add_argument("--small", action="store_true", help="d 32, 2+2 layers, 12 queries (to try the command)")
    parser.add_argument("--pytorch-path", action="store_true",
                        help="also time this repository's model on MSDeformAttn's PyTorch path")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install -r requirements-test.txt): nothing to compare")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    small = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 num_queries=12) if args.small else {}
    hf = hf_model(transformers, small, args.dropout)
    ours, criterion = our_model(hf)
    hf.to(device)
    ours.to(device)
    batch = random_batch(args.batch, args.size, NUM_CLASSES, device, torch.Generator().manual_seed(0))
    labels = hf_labels(batch[2])
    ours_opt, hf_opt = optimizer(ours), optimizer(hf)
    print(f"Deformable-DETR, {args.batch} x {args.size}x{args.size} px, dropout {args.dropout}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"same model: inference logits and boxes differ by at most {output_difference(ours, hf, batch):.1e}")
    train = {"ours": partial(train_step, ours, criterion, ours_opt, batch),
             "transformers": partial(hf_train, hf, hf_opt, batch, labels)}
    infer = {"ours": partial(infer_step, ours, batch), "transformers": partial(hf_infer, hf, batch)}
    if args.pytorch_path:
        for sides in (train, infer):
            sides[PYTORCH_PATH] = partial(on_pytorch_path, sides["ours"])
    train, infer = (interleaved_medians(sides, args.repeats, device) for sides in (train, infer))
    for what, t in (("train step", train), ("inference", infer)):
        print(f"{what:10s}  ours {t['ours'] * 1e3:9.1f} ms   transformers {t['transformers'] * 1e3:9.1f} ms   "
              f"ours / transformers {t['ours'] / t['transformers']:.2f}x")
        if PYTORCH_PATH in t:
            print(f"{'':10s}  {PYTORCH_PATH} {t[PYTORCH_PATH] * 1e3:9.1f} ms   "
                  f"/ transformers {t[PYTORCH_PATH] / t['transformers']:.2f}x   "
                  f"ours / it {t['ours'] / t[PYTORCH_PATH]:.2f}x")
    if args.profile:
        def forward(model, call):
            model.train()
            with torch.no_grad():
                call()
        print("\nours, one training forward (model + loss):")
        profile(partial(forward, ours, lambda: criterion(ours(*batch[:2], batch[2]), batch[2])), device)
        print("\ntransformers, one training forward (model + loss):")
        profile(partial(forward, hf, lambda: hf(pixel_values=batch[0], pixel_mask=(~batch[1]).long(),
                                                labels=labels)), device)
        print("\nours, one whole training step (forward, loss, backward, AdamW step):")
        profile(partial(train_step, ours, criterion, ours_opt, batch), device)
        print("\ntransformers, one whole training step:")
        profile(partial(hf_train, hf, hf_opt, batch, labels), device)


if __name__ == "__main__":
    main()
