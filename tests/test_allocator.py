"""experiments.allocator: freed memory kept by glibc's malloc in CPU training (what it sets, when it
leaves the allocator alone, and that a freed block's pages are reused instead of faulted in anew)."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import allocator
from benchmarks import allocator as allocator_benchmark

REPO = Path(allocator.__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Twelve "steps", each mallocing blocks of 4 and 8 MiB, or one of 40 MiB (touching every page), that
# are alive together and then freed, as a training step's tensors are; prints the page faults of each
# step. By default glibc serves such blocks from fresh mappings (always above 32 MiB) or gives the
# freed top of its heap back (its trim threshold is twice the largest block it has unmapped), so
# every step faults its pages in anew; with freed memory kept, every step after the first reuses the
# first one's pages.
STEP_FAULTS = """
import ctypes, json, resource, sys
from experiments.allocator import keep_freed_memory
state = keep_freed_memory() if sys.argv[1] == "kept" else "default"
sizes = [int(mib) for mib in sys.argv[2].split(",")]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for step in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(mib << 20) for mib in sizes]
    for block, mib in zip(blocks, sizes):
        ctypes.memset(block, 1, mib << 20)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""


def step_faults(setting, sizes):
    ours = (*allocator.USER_SETTINGS, allocator.SWITCH)  # a child free of any allocator setting
    env = {**{k: v for k, v in os.environ.items() if k not in ours}, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, setting, ",".join(map(str, sizes))],
                         capture_output=True, text=True, check=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize("sizes", [(4, 8, 4, 8, 4, 8), (40,)])
def test_kept_memory_is_reused_where_the_default_faults_in_new_pages(sizes):
    default, kept = step_faults("default", sizes), step_faults("kept", sizes)
    assert default["state"] == "default" and kept["state"] == "kept"
    step_pages = (sum(sizes) << 20) // 4096
    assert min(default["faults"][1:]) > step_pages // 2, default  # every step faults its pages in anew
    assert max(kept["faults"][1:]) < step_pages // 100, kept  # the first step's pages again


@pytest.mark.parametrize("environ,expected", [
    ({"KS_KEEP_FREED_MEMORY": "0"}, "KS_KEEP_FREED_MEMORY=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "set by the environment (MALLOC_TRIM_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1", "MALLOC_MMAP_THRESHOLD_": "1"},
     "set by the environment (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES)"),
])
def test_the_users_own_choice_leaves_the_allocator_alone(environ, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: calls.append(a))
    assert allocator._apply(environ) == expected
    assert not calls


def test_other_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator._apply({}) == "not glibc"


def test_only_the_first_call_acts(monkeypatch):
    answers = iter(["kept", "other"])
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator, "_apply", lambda environ: next(answers))
    assert allocator.keep_freed_memory({}) == "kept"
    assert allocator.keep_freed_memory({}) == "kept"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_allocator_benchmark_times_both_settings_in_children(capsys):
    allocator_benchmark.main(["--manifest", "demo", "--rows", "ks_def_r18", "--size", "64", "--steps", "1",
                              "--rounds", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "  ks_def_r18: step " in out and "page faults per step" in out and "x; page faults" in out
    with pytest.raises(SystemExit):
        allocator_benchmark.main(["--manifest", "demo", "--rows", "no_such_row"])
