"""The Table 1/2 manifests against the paper's tables and the authors' settings
(docs/authors_code.md, "Family settings")."""
import pandas as pd
import pytest

from experiments.config import Manifest, PAPER_DIR, diff

BACKBONES = {"R50": "resnet50", "R101": "resnet101", "Swin-T": "swin_t"}
LR_DROP = {50: [40], 24: [20], 12: [11]}  # 375k/300k, 180k/150k, 90k/82.5k iterations at 7.5k per epoch
CITED = {1: {3, 7, 9, 19, 23}, 2: {5}}
# family -> expected model settings (docs/authors_code.md, "Family settings")
FAMILY = {
    "conditional_detr": {"pos_temperature": 10000, "pos_offset": 0.0, "dim_feedforward": 2048, "activation": "relu",
                         "dropout": 0.1, "loss.class_weight": 2.0},
    "dab_detr": {"pos_temperature": 20, "pos_offset": 0.0, "dim_feedforward": 2048, "activation": "prelu",
                 "dropout": 0.0, "loss.class_weight": 1.0, "dab.modulate_hw_attn": True},
    "dn_detr": {"pos_temperature": 20, "pos_offset": 0.0, "dim_feedforward": 2048, "activation": "prelu",
                "dropout": 0.0, "loss.class_weight": 1.0, "dab.modulate_hw_attn": True, "dab.freeze_anchor_xy": False,
                "dab.random_anchor_xy": False, "dn.groups": 5, "dn.label_noise": 0.2, "dn.box_noise": 0.4},
    "deformable_detr": {"pos_temperature": 10000, "pos_offset": -0.5, "dim_feedforward": 1024, "activation": "relu",
                        "dropout": 0.1, "loss.class_weight": 1.0, "deformable.num_levels": 4,
                        "deformable.n_points": 4, "deformable.box_refine": False},
    "dn_deformable_detr": {"pos_temperature": 10000, "pos_offset": -0.5, "dim_feedforward": 2048,
                           "activation": "relu", "dropout": 0.0, "loss.class_weight": 1.0,
                           "deformable.num_levels": 4, "deformable.n_points": 4, "deformable.box_refine": True,
                           "dn.groups": 5, "dn.label_noise": 0.2, "dn.box_noise": 0.4},
}
KS_MODE = {"baseline": "none", "ks": "triple", "dual_attention_share_v": "dual_share_v",
           "dual_attention_share_a": "dual_share_a", "triple_attention": "triple"}


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.fixture(scope="module", params=[1, 2])
def table(request):
    n = request.param
    return n, Manifest(f"table{n}"), pd.read_csv(PAPER_DIR / f"table{n}.csv")


def test_every_paper_row_has_a_manifest_row(table):
    n, manifest, paper = table
    assert manifest.paper_table == n
    covered = {row["paper"]["row"] for row in manifest.rows.values()}
    assert covered == set(range(1, len(paper) + 1))
    assert len(manifest.rows) == len(paper) + (1 if n == 1 else 0)  # + dab_swint_in1k (the cited Swin-T baseline)
    cited = {row["paper"]["row"] for row in manifest.rows.values() if row["paper"]["source"] == "cited"}
    assert cited == CITED[n]


def test_rows_match_the_paper_and_the_reference_settings(table):
    n, manifest, paper = table
    for name, row in manifest.rows.items():
        cfg = manifest.resolve(name)
        p = paper.iloc[row["paper"]["row"] - 1]
        m, t, d = cfg["model"], cfg["train"], cfg["data"]
        assert m["variant"] == p["variant"] == row["family"], name
        assert m["backbone"]["name"] == BACKBONES[p["backbone"]], name
        assert m["ks"]["mode"] == KS_MODE[p["method"] if n == 1 else p["experiment"]], name
        assert t["epochs"] == p["epochs"] and t["lr_drop"] == LR_DROP[t["epochs"]], name
        for key, value in FAMILY[row["family"]].items():
            assert get(m, key) == value, (name, key)
        # common settings
        assert (t["lr"], t["lr_backbone"], t["weight_decay"], t["clip_max_norm"]) == (1e-4, 1e-5, 1e-4, 0.1), name
        assert (t["batch_size"], t["total_batch_size"], t["eval_batch_size"]) == (2, 16, 1), name
        assert (m["num_queries"], m["eval_topk"], m["hidden_dim"], m["nheads"]) == (300, 300, 256, 8), name
        assert (m["enc_layers"], m["dec_layers"], m["ks"]["teacher_layers"]) == (6, 6, "last"), name
        assert m["loss"] | {"class_weight": 0} == {"class_weight": 0, "bbox_weight": 5.0, "giou_weight": 2.0,
                                                   "alpha": 0.25, "gamma": 2.0}, name
        assert m["matcher"] == {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "alpha": 0.25, "gamma": 2.0}
        assert (d["dataset"], d["root"], d["train_split"], d["val_split"]) == ("coco", None, "train2017", "val2017")
        assert d["train_scales"] == list(range(480, 801, 32)) and d["train_max_size"] == 1333, name
        assert (d["crop_resize_scales"], d["crop_size"]) == ([400, 500, 600], [384, 600]), name
        assert (d["test_size"], d["test_max_size"]) == (800, 1333), name
        # the authors' code's evaluation and decoders (docs/authors_code.md; tests/test_authors_checkpoints.py)
        assert (m["eval_padding"], m["eval_clip_boxes"], m["inverse_sigmoid_eps"]) == ("off_by_one", True, 1e-3), name
        assert m["decoder_padding_mask"] == (m["variant"] in ("deformable_detr", "dn_deformable_detr")), name
        bb = m["backbone"]
        assert bb["weights"] == "imagenet", name
        if bb["name"].startswith("resnet"):
            assert (bb["freeze_at"], bb["norm"], bb["weights_path"], bb["drop_path"]) == (1, "frozen_bn", None, 0.0)
        else:  # Swin-T: detectron2's SwinTransformer freezes nothing, stochastic depth 0.1, explicit weights
            assert (bb["freeze_at"], bb["drop_path"]) == (0, 0.1) and bb["weights_path"].endswith(".pth"), name
            assert bb["pad_to_patch"], name  # detectron2's PatchEmbed pads to a multiple of 4


def test_baselines_pair_ks_rows_with_the_same_setting_without_ks(table):
    n, manifest, _ = table
    for name, row in manifest.rows.items():
        cfg = manifest.resolve(name)
        if cfg["model"]["ks"]["mode"] == "none":
            assert "baseline" not in row, name
            continue
        base = row["baseline"]
        changed = diff(manifest.resolve(base), cfg)
        assert changed == ["model.ks.mode"], (name, base, changed)


def test_swin_rows_record_their_initialisation():
    m = Manifest("table1")
    ks, base, in1k = (m.resolve(r)["model"]["backbone"]["weights_path"] for r in
                      ("dab_swint_ks", "dab_swint", "dab_swint_in1k"))
    assert ks == base and "22kto1k" in ks and "22kto1k" not in in1k
    assert "22k" in m.rows["dab_swint_ks"]["note"] and "1k" in m.rows["dab_swint_in1k"]["note"]


def test_table2_rows_shared_with_table1_are_the_same_runs():
    t1, t2 = Manifest("table1"), Manifest("table2")
    for name in ("dab_r50", "dab_r50_ks", "dab_r101", "dab_r101_ks"):
        assert diff(t1.resolve(name), t2.resolve(name)) == [], name
