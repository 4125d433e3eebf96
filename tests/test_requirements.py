"""Dependencies: requirements.txt is what the code needs (installed by `make setup`/`make demo` and
by environment.yml on clusters); the tests' own packages (pytest, transformers for the parity tests)
and the linter `make test` runs first (ruff) are pinned in requirements-test.txt, which only `make
test` and `make test-slow` install. The Makefile is run for real in a temporary copy with a stand-in
.venv/bin/python that records its arguments, so its install stamps are checked without pip."""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = {"pytest", "ruff", "transformers"}


def requirement_lines(path):
    """The non-comment, non-blank lines of a pip requirements file."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def pins(path):
    """{name: version} of the `name==version` lines (names normalised as pip does)."""
    found = {}
    for line in requirement_lines(path):
        if line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def test_requirements_txt_has_no_test_only_packages():
    main = pins(REPO / "requirements.txt")
    assert not TEST_ONLY & set(main), f"requirements.txt names {sorted(TEST_ONLY & set(main))}"
    assert {"torch", "torchvision", "numpy"} <= set(main)


def test_requirements_test_txt_pins_the_test_packages_on_top_of_requirements_txt():
    path = REPO / "requirements-test.txt"
    assert path.is_file(), "requirements-test.txt is missing"
    test = pins(path)
    assert set(test) == TEST_ONLY, sorted(test)
    assert test["transformers"] == "5.23.0"
    # included, so that pip resolves both sets together and cannot move a pin of the main set
    assert "-r requirements.txt" in requirement_lines(path)


def test_environment_yml_installs_requirements_txt_only():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_sections == [["-r requirements.txt"]]


@pytest.fixture
def make_copy(tmp_path):
    """The Makefile and requirement files in a temporary folder whose .venv/bin/python records
    every call in calls.log; returns run(target) -> the python calls of that make run."""
    if shutil.which("make") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs make and sha256sum")
    for name in ("Makefile", "requirements.txt", "requirements-test.txt"):
        assert (REPO / name).is_file(), f"{name} is missing"
        shutil.copy(REPO / name, tmp_path / name)
    log = tmp_path / "calls.log"
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$*" >> "$CALLS_LOG"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)

    def run(target):
        log.write_text("")
        proc = subprocess.run(["make", "--no-print-directory", target], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "CALLS_LOG": str(log)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return log.read_text().splitlines()

    return tmp_path, run


INSTALL = "-m pip install --quiet --disable-pip-version-check -r "
LINT = "-m ruff check ."  # `make test` lints before it tests


def test_make_test_installs_both_files_once_and_again_when_one_changes(make_copy):
    folder, run = make_copy
    assert run("test") == [INSTALL + "requirements.txt", INSTALL + "requirements-test.txt", LINT, "-m pytest -q"]
    assert run("test") == [LINT, "-m pytest -q"]  # stamps: a second run installs nothing
    assert run("test-slow") == ["-m pytest -q -m slow"]
    with (folder / "requirements-test.txt").open("a") as f:
        f.write("# changed\n")
    assert run("test") == [INSTALL + "requirements-test.txt", LINT, "-m pytest -q"]
    with (folder / "requirements.txt").open("a") as f:
        f.write("# changed\n")  # requirements-test.txt includes it: both reinstall
    assert run("test") == [INSTALL + "requirements.txt", INSTALL + "requirements-test.txt", LINT, "-m pytest -q"]


def test_make_setup_demo_and_op_do_not_install_the_test_requirements(make_copy):
    _, run = make_copy
    assert run("setup") == [INSTALL + "requirements.txt"]
    assert run("setup") == []
    demo = run("demo")
    assert demo and demo[0] == "-m experiments run demo --resume"
    assert run("op") == ["-m models.ops.ms_deform_attn.build"]
    assert run("test-slow")[0] == INSTALL + "requirements-test.txt"


def test_make_help_names_the_test_requirements():
    text = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60).stdout if shutil.which("make") else (REPO / "Makefile").read_text()
    test_lines = [line for line in text.splitlines() if re.match(r".*make test\b", line)]
    assert test_lines and all("requirements-test.txt" in line for line in test_lines), text
