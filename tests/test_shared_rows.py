"""Rows shared between manifests (`same_as`): the configurations must agree, the run is trained once
into the other row's records, and every reader of records (tables, figures) follows the link."""
import pytest
import yaml

from analysis.tables import runs_report
from experiments import records
from experiments.config import ConfigError, Manifest
from experiments.engine import train_row
from experiments.errors import RunError

from .helpers import TINY_RUN


def write_manifest(tmp_path, rows, name="shared"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"defaults_from": "demo", "rows": rows}))
    return path


def test_same_as_points_at_the_row_that_holds_the_records(tmp_path):
    m = Manifest(write_manifest(tmp_path, [
        {"name": "base", "same_as": "demo/def_r18", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "own", "config": {"model": {"ks": {"mode": "triple"}}}}]))
    assert m.record_of("base") == ("demo", "def_r18")
    assert m.record_of("own") == ("shared", "own")


def test_two_rows_cannot_be_the_same_run(tmp_path):
    path = write_manifest(tmp_path, [
        {"name": "a", "same_as": "demo/def_r18", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "b", "same_as": "demo/def_r18", "config": {"model": {"ks": {"mode": "none"}}}}])
    with pytest.raises(ConfigError, match=r"row 'b': key 'same_as' is 'demo/def_r18', as for row 'a'"):
        Manifest(path)


def test_submit_force_of_shared_rows_is_refused_before_anything(tmp_path):
    from types import SimpleNamespace

    from slurm.launcher import submit

    path = write_manifest(tmp_path, [
        {"name": "base", "same_as": "demo/def_r18", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "own", "config": {"model": {"ks": {"mode": "triple"}}}}])
    opts = SimpleNamespace(nodes=1, tasks_per_node=None, gpus_per_node=0)
    with pytest.raises(RunError, match=r"not submitting anything: --force .*same_as\): base;"):
        submit(Manifest(path), ["base", "own"], [], opts, results=tmp_path / "results", dry_run=True, force=True)


@pytest.mark.parametrize("same_as,message", [
    ("demo/ks_def_r18", "the two configurations differ in model.ks.mode"),
    ("demo", "key 'same_as' must be 'manifest/row', got 'demo'"),
    ("demo/nothing", "no row 'nothing'"),
    ("nowhere/def_r18", "manifest 'nowhere' not found"),
])
def test_a_same_as_that_is_not_the_same_run_is_refused(tmp_path, same_as, message):
    path = write_manifest(tmp_path, [{"name": "base", "same_as": same_as, "config": {"model": {"ks": {"mode": "none"}}}}])
    with pytest.raises(ConfigError, match="row 'base'") as e:
        Manifest(path)
    assert message in str(e.value)


def test_the_synthetic_deformable_rows_are_the_demo_seed_rows():
    m = Manifest("synthetic_table1")
    for seed in range(3):
        for mine, theirs in ((f"def_seed{seed}", f"def_r18_seed{seed}"), (f"def_ks_seed{seed}", f"ks_def_r18_seed{seed}")):
            assert m.record_of(mine) == ("demo_seeds", theirs)
            assert m.resolve(mine) == Manifest("demo_seeds").resolve(theirs)


def test_a_shared_row_trains_once_into_the_other_rows_records(tmp_path):
    data = [f"data.root={tmp_path / 'data'}"]
    path = write_manifest(tmp_path, [
        {"name": "base", "same_as": "demo/def_r18", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "ks", "baseline": "base", "same_as": "demo/ks_def_r18", "config": {"model": {"ks": {"mode": "triple"}}}}])
    results = tmp_path / "results"
    directory = train_row(str(path), "base", TINY_RUN + data, results=results)
    assert directory == records.run_dir("demo", "def_r18", results)
    assert records.status(directory) == "done"
    assert not records.run_dir("shared", "base", results).exists()
    # the other manifest's row is now done too: it is not trained again
    stamp = (directory / "DONE").read_text()
    assert train_row("demo", "def_r18", TINY_RUN + data, results=results) == directory
    assert (directory / "DONE").read_text() == stamp
    # the tables of the sharing manifest read the shared records, and so do eval and the pictures
    df = runs_report(Manifest(path), results)
    student = df[df["branch"] == "attn1"].set_index("manifest_row")
    assert student.loc["base", "status"] == "done" and student.loc["ks", "status"] == "not started"
    from experiments.checkpoints import load_checkpoint

    assert load_checkpoint(str(path), "base", results=results).path == directory / "checkpoint.pth"
    # --force would replace the other manifest's record: refused, pointing at it
    with pytest.raises(RunError, match=r"base: this row is the same run as demo/def_r18 .*`run demo --row "
                                       r"def_r18 --force`"):
        train_row(str(path), "base", TINY_RUN + data, force=True, results=results)
    assert (directory / "DONE").read_text() == stamp


def test_families_from_takes_another_manifests_families_once(tmp_path):
    source = tmp_path / "src.yaml"
    source.write_text(yaml.safe_dump({"defaults_from": "demo", "families": {"dab": {"model": {"variant": "dab_detr"}}},
                                      "rows": [{"name": "a", "family": "dab"}]}))
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"defaults_from": "demo", "families_from": str(source),
                                    "families": {"own": {"model": {"hidden_dim": 64}}},
                                    "rows": [{"name": "b", "family": "dab"}, {"name": "c", "family": "own"}]}))
    m = Manifest(user)
    assert sorted(m.families) == ["dab", "own"]
    assert m.resolve("b") == Manifest(source).resolve("a")
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"families_from": str(source), "families": {"dab": {}},
                                     "rows": [{"name": "b", "family": "dab"}]}))
    with pytest.raises(ConfigError, match=r"families \['dab'\] are defined here and in 'families_from'"):
        Manifest(twice)
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"families_from": str(loop), "rows": [{"name": "b"}]}))
    with pytest.raises(ConfigError, match="'families_from' makes a cycle"):
        Manifest(loop)


def test_the_synthetic_manifests_share_their_families_and_runs():
    t1, t2, controls = (Manifest(n) for n in ("synthetic_table1", "synthetic_table2", "synthetic_controls"))
    assert t2.families == {k: t1.families[k] for k in t2.families} and controls.families == t1.families
    assert t2.record_of("dab_triple_seed1") == ("synthetic_table1", "dab_ks_seed1")
    assert controls.record_of("dn_ks_seed2") == ("synthetic_table1", "dn_ks_seed2")
    assert controls.record_of("dn_ks_no_mask_seed2") == ("synthetic_controls", "dn_ks_no_mask_seed2")
    assert controls.resolve("dn_ks_no_mask_seed2")["model"]["ks"] == {"mode": "triple", "teacher_layers": "last",
                                                                     "mask": "none"}


def test_list_shows_the_status_of_the_shared_records(tmp_path, capsys):
    from experiments.__main__ import main

    path = write_manifest(tmp_path, [
        {"name": "base", "same_as": "demo/def_r18", "config": {"model": {"ks": {"mode": "none"}}}},
        {"name": "own", "config": {"model": {"ks": {"mode": "triple"}}}}])
    results = tmp_path / "results"
    directory = records.run_dir("demo", "def_r18", results)
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("{}\n")  # started, not finished
    main(["--results", str(results), "list", str(path), "--json"])
    import json

    rows = {r["row"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["base"]["status"] == "interrupted" and rows["own"]["status"] == "not started"


def test_the_tables_of_every_manifest_with_shared_records_are_made_by_default(tmp_path):
    from analysis.tables import default_manifests

    records.run_dir("demo_seeds", "def_r18_seed0", tmp_path).mkdir(parents=True)
    names = default_manifests(tmp_path)
    assert names[:3] == ["table1", "table2", "demo_seeds"]
    assert {"synthetic_table1", "synthetic_table2", "synthetic_controls"} <= set(names)
    assert "synthetic_teachers" not in names and "demo_ladder" not in names  # none of their records exist
