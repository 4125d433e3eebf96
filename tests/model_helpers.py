"""Tiny model configurations and inputs shared by the model tests."""
import copy

import torch

from experiments.config import DEFAULTS, merge
from models import model_targets

TINY = {
    "hidden_dim": 32, "nheads": 4, "enc_layers": 2, "dec_layers": 3, "dim_feedforward": 64,
    "num_queries": 12, "eval_topk": 20,
    "backbone": {"name": "resnet18", "weights": None, "freeze_at": 0},
}


def tiny_config(variant="dab_detr", ks_mode="none", **model):
    """A validated `model` configuration section, tiny enough for CPU tests."""
    cfg = merge(DEFAULTS, {"model": {**copy.deepcopy(TINY), "variant": variant, **model}}, "test config")
    cfg["model"]["ks"]["mode"] = ks_mode
    return cfg["model"]


def tiny_batch(seed=0):
    """Two images of different sizes, zero-padded; image 0 has three boxes, image 1 none."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=g)
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, 80:, :] = True
    padding[1, :, 100:] = True
    images[padding[:, None].expand_as(images)] = 0
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 60.0, 50.0], [70.5, 10.2, 120.0, 90.0], [30.0, 40.0, 34.0, 45.0]]),
         "labels": torch.tensor([0, 2, 1]), "size": torch.tensor([96, 128]), "orig_size": torch.tensor([96, 128]),
         "image_id": 1},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": torch.tensor([80, 100]),
         "orig_size": torch.tensor([80, 100]), "image_id": 2},
    ]
    return images, padding, model_targets(targets)
