"""Training learns: a small Deformable-DETR (the demo's row) trained through the real engine (data, augmentation, matching,
losses, optimizer, post-processing, COCO evaluation) on a few synthetic images must detect them
afterwards (AP50 on its training images) far above what it scores with its detections moved to other
images, which is all a model that has only learnt the box statistics can reach.

The slow tests break learning on purpose (random labels, every image trained with another image's
boxes, no training) and check that the same threshold then fails, so it is not one that any run
passes. Freezing the class head alone is not such a breakage: the decoder can learn to feed the
fixed head.
"""
import json

import pytest
import torch

from experiments import records, training
from experiments.engine import train_row
from models.backbone import SYNTHETIC_WEIGHTS

# 16 training images of up to 128 px, evaluated on themselves (data.val_split=train, test transform),
# 300 steps of 8 images on the demo's frozen synthetic-pretrained backbone: about 25 s on two cores.
LEARNING_RUN = [
    "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
    "model.dim_feedforward=128", "model.num_queries=16", "model.eval_topk=50",
    "model.backbone.weights=synthetic",
    "data.synthetic.train=16", "data.synthetic.val=1", "data.synthetic.size=128", "data.val_split=train",
    "data.num_workers=0", "data.train_scales=[128]", "data.train_max_size=160", "data.crop_resize_scales=[128]",
    "data.crop_size=[112,128]", "data.test_size=128", "data.test_max_size=160",
    "train.batch_size=8", "train.epochs=150", "train.lr_drop=[130]", "train.eval_every=150", "train.lr=1e-3",
]
AP50_MIN = 0.5      # on the training images
MOVED_RATIO = 3.0   # own AP50 at least this many times the AP50 on other images


def train_and_score(tmp_path, *extra):
    """(AP50, AP50 with the detections moved to other images) of the trained run, and its log."""
    directory = train_row("demo", "def_r18", LEARNING_RUN + [f"data.root={tmp_path / 'data'}",
                                                             "train.eval_moved=true", *extra], results=tmp_path)
    final = json.loads((directory / "eval.json").read_text())
    return final["attn1"]["AP50"], final["attn1_moved"]["AP50"], records.read_log(directory / "log.jsonl")


def learnt(ap50, moved):
    return ap50 >= AP50_MIN and ap50 >= MOVED_RATIO * moved


@pytest.mark.skipif(not SYNTHETIC_WEIGHTS.is_file(), reason="the committed synthetic backbone is missing")
def test_training_learns_to_detect_its_training_images(tmp_path):
    ap50, moved, log = train_and_score(tmp_path)
    print(f"AP50 {ap50:.3f} on the training images, {moved:.3f} on other images")  # shown by pytest -rP
    assert learnt(ap50, moved), f"AP50 {ap50:.3f} on the training images, {moved:.3f} on other images"
    assert log[-1]["train"]["loss_class"] < 0.7 * log[0]["train"]["loss_class"]


def break_training_targets(monkeypatch, change):
    """The training steps get `change(targets)` instead of their targets; evaluation keeps the real ones
    (experiments.evaluation holds its own reference to to_device)."""
    real = training.to_device

    def broken(batch, device):
        images, mask, targets = real(batch, device)
        return images, mask, change(targets)

    monkeypatch.setattr(training, "to_device", broken)


def random_labels(targets):  # a random class for every box, every step: nothing to learn
    return [dict(t, labels=torch.randint(5, t["labels"].shape)) for t in targets]


def misaligned(targets):  # every image gets the next image's boxes and labels
    return targets[1:] + targets[:1]


@pytest.mark.slow
@pytest.mark.skipif(not SYNTHETIC_WEIGHTS.is_file(), reason="the committed synthetic backbone is missing")
@pytest.mark.parametrize("breakage", ["shuffled_labels", "misaligned_targets", "no_training"])
def test_the_threshold_fails_when_learning_is_broken(tmp_path, monkeypatch, breakage):
    extra = []
    if breakage == "shuffled_labels":
        break_training_targets(monkeypatch, random_labels)
    elif breakage == "misaligned_targets":
        break_training_targets(monkeypatch, misaligned)
    else:
        extra = ["train.lr=0", "train.lr_backbone=0"]
    ap50, moved, _ = train_and_score(tmp_path, *extra)
    print(f"{breakage}: AP50 {ap50:.3f}, on other images {moved:.3f}")  # shown by pytest -rP
    assert not learnt(ap50, moved), f"{breakage}: AP50 {ap50:.3f}, on other images {moved:.3f}"
