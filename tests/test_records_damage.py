"""Damaged run records (a log.jsonl cut short, a config.yaml that is not YAML) and a results path that
is a file: one `error:` line naming the file, never a traceback."""
import json
import re

import pytest

from experiments import records
from experiments.__main__ import main
from experiments.errors import RunError

EPOCH_1 = {"epoch": 1, "lr": 4e-4, "train": {"loss": 1.0}}


def unfinished_row(results, log_text):
    """results/runs/demo/def_r18 as an unfinished run with the given log.jsonl."""
    directory = records.run_dir("demo", "def_r18", results)
    directory.mkdir(parents=True)
    records.write_yaml(directory / "config.yaml", {"train": {"epochs": 2}})
    (directory / "log.jsonl").write_text(log_text)
    return directory


def test_status_and_list_name_the_damaged_line_of_a_log(tmp_path, capsys):
    # an append cut short by a crash or a full disk
    directory = unfinished_row(tmp_path, json.dumps(EPOCH_1) + '\n{"epoch": 2, "lr": 4e-05, "tra')
    log = directory / "log.jsonl"
    for command in (["status", "demo"], ["list", "demo"]):
        with pytest.raises(SystemExit) as e:
            main(["--results", str(tmp_path), *command])
        message = str(e.value.code)
        assert message.startswith(f"error: {log}, line 2 (the last line, cut short): not valid JSON ("), message
        assert "\n" not in message and "--resume" in message
    assert "Traceback" not in capsys.readouterr().err
    entries, problem = records.scan_log(log)
    assert entries == [EPOCH_1] and problem.startswith(f"{log}, line 2")


def test_a_log_line_that_is_not_an_epoch_record_is_named(tmp_path):
    directory = unfinished_row(tmp_path, json.dumps(EPOCH_1) + "\n[1, 2]\n")
    with pytest.raises(records.DamagedLog, match=r"log\.jsonl, line 2: expected an object with an integer 'epoch', "
                                                 r"got '\[1, 2\]'"):
        records.last_epoch(directory)


@pytest.mark.parametrize("text,problem", [
    ("train: {epochs: 2\n", r" is not valid YAML \(.* at line 2, column 1\)"),
    ("", r": expected a mapping of configuration keys, got nothing"),
    ("- 1\n- 2\n", r": expected a mapping of configuration keys, got a list"),
    (None, r" is missing"),
])
def test_read_config_names_a_damaged_file(tmp_path, text, problem):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    message = f"^{re.escape(str(path))}{problem}; the run record is damaged; --force starts the row over"
    with pytest.raises(RunError, match=message):
        records.read_config(path)


def test_analysis_with_a_results_path_that_is_a_file_is_one_error_line(tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    assert analysis_main(["tables", "--results", str(a_file)]) == 2
    assert capsys.readouterr().err == (f"error: --results {a_file} is a file; expected the results folder holding "
                                       f"runs/<manifest>/<row>/\n")
    # a file in the way of an output folder below it
    assert analysis_main(["tables", "--manifest", "demo", "--results", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot use {a_file / 'sub'}") and "Not a directory" in err, err
    assert "Traceback" not in err
