"""Manifest schema and overrides: bad input is rejected with the manifest, row and key named."""
import pytest
import yaml

from experiments.config import ConfigError, Manifest, diff, parse_override


def write_manifest(tmp_path, doc, name="m"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_demo_manifest_resolves_both_rows():
    m = Manifest("demo")
    assert list(m.rows) == ["def_r18", "ks_def_r18"]
    base, ks = m.resolve("def_r18"), m.resolve("ks_def_r18")
    assert base["model"]["ks"]["mode"] == "none" and ks["model"]["ks"]["mode"] == "triple"
    assert diff(base, ks) == ["model.ks.mode"]
    assert m.rows["ks_def_r18"]["baseline"] == "def_r18"


def test_overrides_parse_yaml_values_and_apply():
    assert parse_override("train.lr_drop=[3, 5]") == {"train": {"lr_drop": [3, 5]}}
    cfg = Manifest("demo").resolve("def_r18", ["train.epochs=2", "train.lr=5e-4", "model.backbone.weights=null"])
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["lr"] == 5e-4 and cfg["model"]["backbone"]["weights"] is None


@pytest.mark.parametrize("override,message", [
    ("train.epoch=2", "unknown key 'train.epoch'"),
    ("train.epochs=two", "'train.epochs' must be an integer"),
    ("train.epochs=2.5", "'train.epochs' must be an integer"),
    ("train.epochs=0", "'train.epochs' must be at least 1"),
    ("model.ks.mode=quadruple", "'model.ks.mode' must be one of"),
    ("model.variant=yolo", "'model.variant' must be one of"),
    ("model.backbone.name=vgg16", "'model.backbone.name' must be one of"),
    ("data.train_scales=[1.5]", "must be a list of int values"),
    ("model.ks=triple", "must be a mapping"),
    ("train.epochs", "key.sub=value"),
    # NaN is never below a minimum and inf passes it: non-finite numbers are rejected by name
    ("train.lr=nan", "key 'train.lr' must be a finite number, got nan"),
    ("train.lr=.nan", "key 'train.lr' must be a finite number, got nan"),
    ("train.lr_backbone=.inf", "key 'train.lr_backbone' must be a finite number, got inf"),
    ("train.clip_max_norm=-.inf", "key 'train.clip_max_norm' must be a finite number, got -inf"),
    ("model.dropout=NaN", "key 'model.dropout' must be a finite number"),
    # a value that is not valid YAML is a one-line ConfigError, not a YAML traceback
    ("train.seed=[1", "override 'train.seed=[1': the value '[1' is not valid YAML"),
    ("data.train_scales={a", "is not valid YAML"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match="def_r18") as e:
        Manifest("demo").resolve("def_r18", [override])
    assert message in str(e.value)


def test_schema_errors_name_manifest_row_and_key(tmp_path):
    ok_row = {"name": "a", "config": {"model": {"ks": {"mode": "triple"}}}}
    cases = [
        ({"rows": [{"name": "a", "config": {"model": {"hidden": 3}}}]}, "row 'a': unknown key 'model.hidden'"),
        ({"rows": [{"name": "a", "config": {"train": {"lr": "fast"}}}]}, "'train.lr' must be a number"),
        ({"rows": [ok_row, ok_row]}, "duplicate row name 'a'"),
        ({"rows": [{"name": "a b"}]}, "name 'a b'"),
        ({"rows": [{"name": "a", "baseline": "zz"}]}, "baseline 'zz' is not a row"),
        ({"rows": [{"name": "a", "paper": {"table": 3, "row": 1, "source": "rerun"}}]}, "key 'paper'"),
        ({"rows": [{"name": "a", "colour": 1}]}, "row 'a': unknown keys ['colour']"),
        ({"rows": []}, "'rows' must be a non-empty list"),
        ({"defaults": {"train": {"epochs": -1}}, "rows": [ok_row]}, "defaults: key 'train.epochs'"),
        ({"rows": [ok_row], "extra": 1}, "unknown top-level keys ['extra']"),
    ]
    for doc, message in cases:
        path = write_manifest(tmp_path, doc)
        with pytest.raises(ConfigError) as e:
            Manifest(str(path))
        assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_unknown_manifest_and_row():
    with pytest.raises(ConfigError, match="available"):
        Manifest("no_such_manifest")
    with pytest.raises(ConfigError, match="no row 'nope'"):
        Manifest("demo").resolve("nope")


def test_families_and_resolution_order(tmp_path):
    """DEFAULTS -> defaults -> families[family] -> row config -> overrides."""
    path = write_manifest(tmp_path, {
        "defaults": {"train": {"epochs": 5, "lr": 1e-3}, "model": {"dropout": 0.2}},
        "families": {"fam": {"train": {"epochs": 7}, "model": {"dropout": 0.3, "activation": "relu"}}},
        "rows": [{"name": "a", "family": "fam", "config": {"model": {"dropout": 0.4}}, "note": "x"}],
    })
    m = Manifest(str(path))
    assert list(m.families) == ["fam"] and m.rows["a"]["note"] == "x"
    cfg = m.resolve("a")
    assert (cfg["train"]["epochs"], cfg["train"]["lr"], cfg["model"]["dropout"], cfg["model"]["activation"]) == \
        (7, 1e-3, 0.4, "relu")
    assert cfg["train"]["batch_size"] == 2  # DEFAULTS
    assert m.resolve("a", ["model.dropout=0.5", "train.epochs=1"])["model"]["dropout"] == 0.5


def test_family_and_paper_errors_name_manifest_row_and_key(tmp_path):
    fam = {"f": {"model": {"variant": "dab_detr"}}}
    cases = [
        ({"families": fam, "rows": [{"name": "a"}]}, "row 'a': missing required key 'family'"),
        ({"families": fam, "rows": [{"name": "a", "family": "g"}]}, "row 'a': key 'family' is 'g', not one of"),
        ({"rows": [{"name": "a", "family": "f"}]}, "row 'a': key 'family' is 'f' but the manifest defines no"),
        ({"families": {"f": {"model": {"nope": 1}}}, "rows": [{"name": "a", "family": "f"}]},
         "family 'f': unknown key 'model.nope'"),
        ({"families": {"f": {"model": {"variant": "yolo"}}}, "rows": [{"name": "a", "family": "f"}]},
         "family 'f': key 'model.variant' must be one of"),
        ({"families": [], "rows": [{"name": "a"}]}, "key 'families' must be a non-empty mapping"),
        ({"paper_table": 1, "rows": [{"name": "a"}]}, "row 'a': missing required key 'paper'"),
        ({"paper_table": 1, "rows": [{"name": "a", "paper": {"table": 2, "row": 1, "source": "rerun"}}]},
         "row 'a': key 'paper.table' must be 1"),
        ({"paper_table": 3, "rows": [{"name": "a"}]}, "key 'paper_table' must be 1 or 2"),
        ({"rows": [{"name": "a", "paper": {"table": 2, "row": 9, "source": "rerun"}}]},
         "row 'a': key 'paper.row' is 9, but"),
        ({"rows": [{"name": "a", "paper": {"table": 1, "row": 2, "source": "guessed"}}]}, "row 'a': key 'paper'"),
        ({"rows": [{"name": "a", "note": 5}]}, "row 'a': key 'note' must be a string"),
        ({"rows": [{"name": "a", "config": {"train": {"total_batch_size": 15}}}]},
         "row 'a': key 'train.total_batch_size' (15) must be a multiple of train.batch_size (2)"),
        ({"rows": [{"name": "a", "config": {"train": {"lr_drop": [0]}}}]}, "row 'a': key 'train.lr_drop'"),
        ({"rows": [{"name": "a", "config": {"model": {"backbone": {"name": "vgg"}}}}]},
         "row 'a': key 'model.backbone.name' must be one of"),
        ({"rows": [{"name": "a", "config": {"model": {"ks": {"mode": "quad"}}}}]},
         "row 'a': key 'model.ks.mode' must be one of"),
        ({"rows": [{"name": "a", "baseline": "a"}]}, "row 'a': a row cannot be its own baseline"),
    ]
    for doc, message in cases:
        path = write_manifest(tmp_path, doc)
        with pytest.raises(ConfigError) as e:
            Manifest(str(path))
        assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_override_checks_cross_key_consistency():
    with pytest.raises(ConfigError, match="def_r18.*train.total_batch_size' \\(6\\) must be a multiple"):
        Manifest("demo").resolve("def_r18", ["train.total_batch_size=6", "train.batch_size=4"])
    cfg = Manifest("demo").resolve("def_r18", ["train.total_batch_size=16"])
    assert cfg["train"]["total_batch_size"] == 16


def test_keys_added_to_the_defaults_do_not_block_a_resume():
    from experiments.config import new_default_keys

    cfg = Manifest("demo").resolve("def_r18")
    old = yaml.safe_load(yaml.safe_dump(cfg))
    del old["train"]["total_batch_size"], old["model"]["backbone"]["drop_path"]
    assert new_default_keys(old, cfg) == ["model.backbone.drop_path", "train.total_batch_size"]
    assert new_default_keys(old, Manifest("demo").resolve("def_r18", ["train.total_batch_size=16"])) == \
        ["model.backbone.drop_path"]


def test_a_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("rows:\n  - name: a\n    config: {train: {epochs: 2}}\n    config: {train: {epochs: 3}}\n")
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml: not valid YAML.*duplicate key 'config'.*line 4"):
        Manifest(str(path))


def test_defaults_from_starts_from_another_manifests_defaults(tmp_path):
    child = Manifest(write_manifest(tmp_path, {"defaults_from": "demo", "defaults": {"train": {"epochs": 2}},
                                               "rows": [{"name": "r", "config": {"train": {"seed": 3}}}]}))
    demo = Manifest("demo").resolve("def_r18")
    assert diff(demo, child.resolve("r")) == ["train.epochs", "train.seed"]
    with pytest.raises(ConfigError, match="defaults_from' must be a manifest name"):
        Manifest(write_manifest(tmp_path, {"defaults_from": 3, "rows": [{"name": "r"}]}))
    with pytest.raises(ConfigError, match="manifest 'nowhere' not found"):
        Manifest(write_manifest(tmp_path, {"defaults_from": "nowhere", "rows": [{"name": "r"}]}))
    a = write_manifest(tmp_path, {"defaults_from": str(tmp_path / "b.yaml"), "rows": [{"name": "r"}]}, "a")
    write_manifest(tmp_path, {"defaults_from": str(a), "rows": [{"name": "r"}]}, "b")
    with pytest.raises(ConfigError, match="makes a cycle"):
        Manifest(a)


def test_the_seed_rows_are_the_demo_rows_with_other_seeds():
    demo, seeds = Manifest("demo"), Manifest("demo_seeds")
    for seed in (0, 1, 2):
        for row in ("def_r18", "ks_def_r18"):
            name = f"{row}_seed{seed}"
            assert seeds.resolve(name) == demo.resolve(row, [f"train.seed={seed}"]), name
        assert seeds.rows[f"ks_def_r18_seed{seed}"]["baseline"] == f"def_r18_seed{seed}"
