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
    assert list(m.rows) == ["dab_r18", "ks_dab_r18"]
    base, ks = m.resolve("dab_r18"), m.resolve("ks_dab_r18")
    assert base["model"]["ks"]["mode"] == "none" and ks["model"]["ks"]["mode"] == "triple"
    assert diff(base, ks) == ["model.ks.mode"]
    assert m.rows["ks_dab_r18"]["baseline"] == "dab_r18"


def test_overrides_parse_yaml_values_and_apply():
    assert parse_override("train.lr_drop=[3, 5]") == {"train": {"lr_drop": [3, 5]}}
    cfg = Manifest("demo").resolve("dab_r18", ["train.epochs=2", "train.lr=5e-4", "model.backbone.weights=null"])
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
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match="dab_r18") as e:
        Manifest("demo").resolve("dab_r18", [override])
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
