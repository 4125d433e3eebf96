"""Pretrain a ResNet backbone on a task made with the synthetic generator: this repository's
stand-in for ImageNet weights on machines where those cannot be downloaded.

    python -m experiments pretrain --task segmentation --out models/weights/resnet18_synthetic.pth

A detector started from a random backbone learns the data set's box statistics long before it
learns to read images; the generator (datasets/synthetic.py) makes as many labelled images as
wanted, so a backbone can learn to see its shapes first. Tasks (`--task`):

- `segmentation`: every pixel's class (background or a shape; crowd pixels ignored), predicted from
  the last stage by a small head and compared at stride 4. Dense, like detection.
- `crops`: square crops around objects (with random context) and background crops classified into
  background or a shape, ImageNet-like.

A pool of `--images` images is drawn once (in parallel processes) from the generator's *train*
stream of `--seed` (default 1, not the demo's 0; no validation image of any seed is seen) and
augmented on the fly (random scale and crop, horizontal flip).

The output holds the trunk up to `--last-stage` in half precision (torchvision's ResNet keys,
BatchNorm statistics included) and a `meta` dict (task, command, final training metrics).
`model.backbone.weights: synthetic` loads it; the run records its name and sha256 in env.json.
"""
import argparse
import math
import multiprocessing
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datasets.synthetic import CATEGORIES, render_image
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbone import RESNETS, STAGES, SYNTHETIC_WEIGHTS, Backbone, file_sha256
from models.serialization import CHECKSUM, content_checksum

TASKS = ("segmentation", "crops")
IGNORE = 255  # label of crowd pixels (no loss)
# Segmentation crops are shown at these scales of the generated images: the demo resizes its 144-192 px
# images to a shorter side of 128-160 px (scales 0.67-1.11).
SCALES = (0.65, 1.15)
LABEL_OF = {c["id"]: i + 1 for i, c in enumerate(CATEGORIES)}  # 0 = background


# ----------------------------------------------------------------------------------- the image pool

def _render(args):
    """(image uint8 (H, W, 3), label map uint8 (H, W), boxes [(x0, y0, x1, y1, label)]) of one image."""
    seed, index, size = args
    img, objects = render_image(seed, "train", index, size)
    labels = np.zeros(img.shape[:2], np.uint8)
    boxes = []
    for obj in objects:  # later objects were drawn over earlier ones; visible masks are disjoint
        if obj["crowd"]:
            labels[obj["visible"]] = IGNORE
            continue
        label = LABEL_OF[obj["category"]["id"]]
        labels[obj["visible"]] = label
        ys, xs = np.nonzero(obj["visible"])
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, label))
    return img, labels, boxes


def make_pool(n_images, seed, size, workers=2, start=0):
    """The images start..start+n_images-1 of the generator's train stream `seed`, with label maps and boxes."""
    jobs = [(seed, i, size) for i in range(start, start + n_images)]
    bar = dict(total=n_images, desc=f"pool (train stream, seed {seed})", unit="img", leave=False)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return list(tqdm(pool.imap(_render, jobs, chunksize=16), **bar))
    return [_render(j) for j in tqdm(jobs, **bar)]


def _normalise(images):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised as the detection transforms do."""
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def segmentation_batch(pool, batch_size, out_size, scale_range, rng):
    """A batch of random crops of pool images resized to out_size x out_size: images (B, 3, S, S),
    labels (B, S, S) int64. The crop side is out_size / scale, scale drawn from scale_range (see
    SCALES)."""
    images, labels = [], []
    for _ in range(batch_size):
        img, lab, _ = pool[int(rng.integers(len(pool)))]
        h, w = lab.shape
        side = int(min(h, w, round(out_size / rng.uniform(*scale_range))))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        im = torch.from_numpy(np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side]))
        lb = torch.from_numpy(np.ascontiguousarray(lab[y0:y0 + side, x0:x0 + side]))
        if rng.random() < 0.5:
            im, lb = im.flip(1), lb.flip(1)
        images.append(F.interpolate(_normalise(im[None]), size=(out_size, out_size), mode="bilinear",
                                    align_corners=False, antialias=True)[0])
        labels.append(F.interpolate(lb[None, None].float(), size=(out_size, out_size), mode="nearest")[0, 0].long())
    return torch.stack(images), torch.stack(labels)


def crop_batch(pool, objects, batch_size, out_size, background_fraction, rng):
    """Square crops resized to out_size: around a random object (side 1.2-2.5x its larger side, centre
    jittered by up to 15% of the side) labelled with its class, or (background_fraction of them) a
    random square with less than 5% object pixels, labelled 0."""
    images, labels = [], []
    while len(images) < batch_size:
        if rng.random() < background_fraction:
            img, lab, _ = pool[int(rng.integers(len(pool)))]
            h, w = lab.shape
            side = int(rng.integers(16, min(h, w, 96) + 1))
            y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            window = lab[y0:y0 + side, x0:x0 + side]
            if ((window > 0) & (window != IGNORE)).mean() >= 0.05:
                continue
            label = 0
        else:
            i, (bx0, by0, bx1, by1, label) = objects[int(rng.integers(len(objects)))]
            img, lab, _ = pool[i]
            h, w = lab.shape
            side = int(min(h, w, max(8, round(max(bx1 - bx0, by1 - by0) * rng.uniform(1.2, 2.5)))))
            cx = (bx0 + bx1) / 2 + rng.uniform(-0.15, 0.15) * side
            cy = (by0 + by1) / 2 + rng.uniform(-0.15, 0.15) * side
            x0 = int(np.clip(round(cx - side / 2), 0, w - side))
            y0 = int(np.clip(round(cy - side / 2), 0, h - side))
        im = torch.from_numpy(np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side]))
        if rng.random() < 0.5:
            im = im.flip(1)
        images.append(F.interpolate(_normalise(im[None]), size=(out_size, out_size), mode="bilinear",
                                    align_corners=False, antialias=True)[0])
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


# ----------------------------------------------------------------------------------- the network

class PretrainNet(nn.Module):
    """The detection backbone's trunk (models.backbone.Backbone, trainable BatchNorm) with a head for
    the task: a 3x3 conv + ReLU + 1x1 conv to class logits (segmentation, upsampled 4x: stride 4 for
    a stride-16 stage), or global average pooling + a linear layer (crops)."""

    def __init__(self, name, last_stage, task, num_classes):
        super().__init__()
        self.backbone = Backbone(name, weights=None, freeze_at=0, out_stages=(last_stage,), norm="batch_norm")
        self.task = task
        c = self.backbone.num_channels[-1]
        if task == "segmentation":
            self.head = nn.Sequential(nn.Conv2d(c, 128, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(128, num_classes, 1))
        else:
            self.head = nn.Linear(c, num_classes)

    def forward(self, images):
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        (feature, _), = self.backbone.stage_outputs(images, mask)
        if self.task == "segmentation":
            logits = self.head(feature)
            return F.interpolate(logits, size=[s // 4 for s in images.shape[-2:]], mode="bilinear",
                                 align_corners=False)
        return self.head(feature.mean((2, 3)))


def _loss_and_accuracy(task, logits, labels):
    if task == "segmentation":
        labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
        valid = labels != IGNORE
        fg = valid & (labels > 0)
        pred = logits.argmax(1)
        # accuracy on object pixels (background is most of every image)
        return loss, ((pred == labels) & fg).sum().item() / max(fg.sum().item(), 1)
    loss = F.cross_entropy(logits.float(), labels)
    return loss, (logits.argmax(1) == labels).float().mean().item()


def trunk_state_dict(backbone):
    """The trunk's weights in half precision (floating tensors), under torchvision's ResNet names."""
    return {k: (v.half() if v.is_floating_point() else v).clone() for k, v in backbone.body.state_dict().items()}


def pretrain(task="segmentation", out=SYNTHETIC_WEIGHTS, backbone="resnet18", last_stage="layer3", steps=3000,
             batch_size=32, image_size=160, crop_size=64, images=4000, pool_size=192, seed=1, lr=2e-3,
             weight_decay=1e-4, autocast=True, workers=2, command=None, log_every=100, held_out=200):
    """Trains and writes the weights file `out`; returns its `meta` dict."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    out = Path(out)
    t_start = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 12345])
    pool = make_pool(images, seed, pool_size, workers)
    objects = [(i, b) for i, (_, _, boxes) in enumerate(pool) for b in boxes]
    num_classes = len(CATEGORIES) + 1

    def draw(pool, objects, rng):
        if task == "segmentation":
            return segmentation_batch(pool, batch_size, image_size, SCALES, rng)
        return crop_batch(pool, objects, batch_size, crop_size, 1 / num_classes, rng)

    # held out: the next images of the same stream, never trained on; fixed batches
    held_pool = make_pool(held_out, seed, pool_size, workers, start=images)
    held_objects = [(i, b) for i, (_, _, boxes) in enumerate(held_pool) for b in boxes]
    held_rng = np.random.default_rng([seed, 54321])
    held_batches = [draw(held_pool, held_objects, held_rng) for _ in range(max(1, held_out // batch_size))]

    def held_out_accuracy():
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            accs = [_loss_and_accuracy(task, net(x), y)[1] for x, y in held_batches]
        net.train()
        return round(sum(accs) / len(accs), 4)

    net = PretrainNet(backbone, last_stage, task, num_classes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(200, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                      max(steps - warmup, 1))))
    net.train()
    history, run_loss, run_acc = [], 0.0, 0.0
    bar = tqdm(range(1, steps + 1), desc=f"pretrain {task}", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for step in bar:
        x, y = draw(pool, objects, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(x)
        loss, acc = _loss_and_accuracy(task, logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"pretraining diverged at step {step} (loss {loss.item()}); lower --lr")
        run_loss += loss.item()
        run_acc += acc
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            entry = {"step": step, "loss": round(run_loss / n, 4), "accuracy": round(run_acc / n, 4),
                     "minutes": round((time.time() - t_start) / 60, 2)}
            if step % (10 * log_every) == 0 or step == steps:
                entry["held_out_accuracy"] = held_out_accuracy()
            history.append(entry)
            bar.set_postfix(loss=f"{run_loss / n:.3f}", acc=f"{run_acc / n:.3f}", refresh=False)
            run_loss, run_acc = 0.0, 0.0
    meta = {"task": task, "backbone": backbone, "last_stage": last_stage, "steps": steps, "batch_size": batch_size,
            "image_size": image_size if task == "segmentation" else crop_size, "pool_images": images,
            "held_out_images": held_out,
            "pool_image_size": pool_size, "generator_seed": seed, "generator_split": "train", "lr": lr,
            "autocast": "bfloat16" if autocast else None, "torch": str(torch.__version__),
            "final": history[-1], "history": history, "minutes": round((time.time() - t_start) / 60, 2),
            "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    state = {"state_dict": trunk_state_dict(net.backbone), "meta": meta}
    state[CHECKSUM] = content_checksum(state)
    torch.save(state, tmp)
    tmp.replace(out)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="segmentation", help="pretraining task (default: %(default)s)")
    parser.add_argument("--out", default=str(SYNTHETIC_WEIGHTS),
                        help="weights file to write (default: %(default)s, what model.backbone.weights: synthetic "
                             "loads); an existing file is only replaced with --force")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--backbone", default="resnet18", choices=sorted(RESNETS),
                        help="torchvision ResNet (default: %(default)s)")
    parser.add_argument("--last-stage", default="layer3", choices=STAGES,
                        help="last trunk stage kept (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=160, help="segmentation input side in px (default: %(default)s)")
    parser.add_argument("--crop-size", type=int, default=64, help="crops task input side in px (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4000, help="generated images in the pool (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=200,
                        help="images after the pool in the same stream, for the held-out accuracy (default: %(default)s)")
    parser.add_argument("--pool-image-size", type=int, default=192,
                        help="longest side of the generated images, as the demo data set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1,
                        help="generator seed of the pool (its train stream) and of the training (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine decay (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--no-autocast", action="store_true", help="train in float32 instead of bfloat16 autocast")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the pool (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        parser.exit(2, f"error: {out} exists; pass --force to replace it\n")
    for name in ("steps", "batch_size", "images", "image_size", "crop_size", "workers", "held_out"):
        if getattr(args, name) < 1:
            parser.exit(2, f"error: --{name.replace('_', '-')} must be at least 1\n")
    command = "python -m experiments pretrain " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                        else sys.argv[1:]))
    meta = pretrain(args.task, out, args.backbone, args.last_stage, args.steps, args.batch_size, args.image_size,
                    args.crop_size, args.images, args.pool_image_size, args.seed, args.lr, args.weight_decay,
                    not args.no_autocast, args.workers, command, held_out=args.held_out)
    final = meta["final"]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 {file_sha256(out)}): {args.task}, "
          f"{args.steps} steps in {meta['minutes']} min; last steps: loss {final['loss']:.3f}, accuracy "
          f"{final['accuracy']:.3f}; held out: accuracy {final['held_out_accuracy']:.3f}")


if __name__ == "__main__":
    main()
