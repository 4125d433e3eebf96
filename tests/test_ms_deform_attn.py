"""MSDeformAttn: the PyTorch path against an explicit loop, gradients, dtypes, dispatch, the CPU
kernels, the CUDA kernels (emulated on the host, and on a GPU when there is one) and the extension
build.

Channel counts D and the backward kernel's lane groups (G = min(32, next power of two >= D);
the forward kernel has a single code path):
    1 -> G = 1, no shuffles          2 -> G = 2, one shuffle step
    3 -> G = 4, one idle lane        16 -> G = 16, half-warp groups
    30 -> G = 32, two idle lanes     32 -> one channel per lane
    64 -> two channels per lane      71 -> three rounds, the last one partly idle
    1025, 2048 (slow) -> long channel loops
Every launch also has threads past the last group (whole idle warps; for G <= 4 also idle lanes
in a warp that shuffles), which must take part in the shuffles without writing anything.
"""
import ctypes
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import models.ops.ms_deform_attn.build as build
import models.ops.ms_deform_attn.cpu_kernels as cpu_kernels
import models.ops.ms_deform_attn.extension as extension
import models.ops.ms_deform_attn.function as function
from models.ops.ms_deform_attn import (BUILD_COMMAND, load_extension_from, ms_deform_attn,
                                       ms_deform_attn_pytorch)

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "models" / "ops" / "ms_deform_attn" / "src"
HARNESS = REPO / "tests" / "harness"  # the host emulation of the CUDA kernels
CHANNELS = [1, 2, 3, 16, 30, 32, 64, 71]
LARGE_CHANNELS = [1025, 2048]
SHAPES = ((6, 4), (3, 2), (1, 1))


def make_inputs(N=2, Lq=5, M=3, D=4, shapes=SHAPES, P=2, dtype=torch.float64, device="cpu",
                seed=0, lo=-0.2, hi=1.2):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    locations uniform in [lo, hi], so some fall outside the map."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    L = len(shapes)
    value = torch.randn(N, int(sizes.sum()), M, D, generator=g, dtype=torch.float64)
    locations = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64) + 1e-5
    weights = weights / weights.sum((-2, -1), keepdim=True)
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device, dtype), weights.to(device, dtype))


def put_border_locations(locations, shapes):
    """Overwrite samples of each level with locations on the map's edges, on pixel centres and
    exactly where sampling starts and stops (pixel coordinates -1 and H or W), pairing every
    special x with several special y. Returns `locations`, changed in place."""
    for l, (H, W) in enumerate(shapes):
        def special(size):
            return [0.0, 1.0, 0.5 / size, 1 - 0.5 / size, -0.5 / size, 1 + 0.5 / size,
                    -0.25 / size, 1 + 0.25 / size, 1.0 / size, 0.5]
        xs, ys = special(W), special(H)
        level = locations[:, :, :, l].reshape(-1, 2)  # (samples, 2), a copy
        n = len(xs)
        for k in range(level.shape[0]):
            level[k, 0], level[k, 1] = xs[k % n], ys[(3 * k + k // n) % n]
        locations[:, :, :, l] = level.view_as(locations[:, :, :, l])
    return locations


def loop_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Bilinear sampling written out sample by sample, in float64."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value = value.double()
    out = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l in range(L):
                    H, W = (int(s) for s in spatial_shapes[l])
                    start = int(level_start_index[l])
                    for p in range(P):
                        x, y = (float(c) for c in sampling_locations[n, q, m, l, p])
                        w, h = x * W - 0.5, y * H - 0.5  # pixel coordinates, align_corners=False
                        if not (-1 < h < H and -1 < w < W):
                            continue
                        h0, w0 = math.floor(h), math.floor(w)
                        lh, lw = h - h0, w - w0
                        corners = [(h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                                   (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)]
                        a = float(attention_weights[n, q, m, l, p])
                        for hc, wc, bw in corners:
                            if 0 <= hc < H and 0 <= wc < W:  # zero padding
                                out[n, q, m] += a * bw * value[n, start + hc * W + wc, m]
    return out.view(N, Lq, M * D)


def grads(op, inputs, grad_output):
    """(output, grad_value, grad_sampling_locations, grad_attention_weights) of op."""
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = op(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(grad_output.to(out.device, out.dtype))
    return (out.detach(),) + tuple(t.grad for t in leaves)


def representable_grad_output(*shape):
    """Multiples of 1/8 in [-1, 1]: exact in float16 and bfloat16, so a half run and a float32
    run see the same output gradient."""
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(1)).double() / 8


def float64_cpu(inputs):
    return [t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in inputs]


NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def check_against_pytorch_path(run, inputs, out_tol, grad_tol):
    """Compare run(inputs, grad_output) -> (output, grad_value, grad_sampling_locations,
    grad_attention_weights) with the float64 PyTorch path, first with random locations, then
    with border locations (put_border_locations). The location gradient is left out of the
    second comparison: it jumps where a sample crosses a pixel centre or leaves the sampling
    range, and which side a path lands on there depends on rounding."""
    N, Lq, M = inputs[3].shape[:3]
    D = inputs[0].shape[-1]
    grad_output = torch.randn(N, Lq, M * D, dtype=torch.float64)
    border = list(inputs)
    border[3] = put_border_locations(inputs[3].detach().cpu().clone(), inputs[1].tolist()).to(
        inputs[3].device)
    for case, compared in ((inputs, range(4)), (border, (0, 1, 3))):
        expected = grads(ms_deform_attn_pytorch, float64_cpu(case), grad_output)
        actual = run(case, grad_output)
        for i in compared:
            assert actual[i].dtype == inputs[0].dtype and actual[i].device == inputs[0].device
            torch.testing.assert_close(actual[i].cpu().double(), expected[i], msg=NAMES[i],
                                       **(out_tol if i == 0 else grad_tol))


F64_TOL = dict(rtol=1e-10, atol=1e-12)
F32_TOL = dict(rtol=1e-4, atol=1e-5)
F32_GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def check_host_kernels_against_pytorch_path(run, D, dtype):
    """check_against_pytorch_path for kernels run on the host (the CPU kernels, the emulated CUDA
    kernels), on the inputs and with the tolerances of their dtype."""
    tol = (F64_TOL, F64_TOL) if dtype == torch.float64 else (F32_TOL, F32_GRAD_TOL)
    check_against_pytorch_path(run, make_inputs(N=2, Lq=3, M=3, D=D, dtype=dtype), *tol)


@pytest.fixture
def restore_extension_state(monkeypatch):
    """Undo any change the test makes to the loaded extension and CPU kernels; the test starts
    with no fallback notice shown yet, and the process's record of shown notices is put back
    after it."""
    for module in (extension, cpu_kernels):
        for name in ("_load_error", "_tried"):
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(extension, "_extension", extension._extension)
    monkeypatch.setattr(cpu_kernels, "_kernels", cpu_kernels._kernels)
    monkeypatch.setattr(function, "_notices_shown", set())


# ---------------------------------------------------------------------------------------------
# PyTorch path


@pytest.mark.parametrize("borders", [False, True], ids=["random", "borders"])
@pytest.mark.parametrize("D", [1, 3])
def test_pytorch_path_matches_loop_reference(D, borders):
    inputs = make_inputs(D=D)
    if borders:
        put_border_locations(inputs[3], SHAPES)
    expected = loop_reference(*inputs)
    assert (expected != 0).float().mean() > 0.5  # most samples do read the map
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_pytorch_path_zero_outside_and_edge_values():
    """A constant map: a sample well inside reads the constant, one on the outer edge (0 or 1)
    half of it, one in a corner a quarter, and one beyond the sampling range nothing."""
    value, shapes, starts, locations, weights = make_inputs(N=1, Lq=4, M=1, D=2, shapes=((4, 5),),
                                                            P=1)
    value = torch.full_like(value, 2.0)
    locations[0, :, 0, 0, 0] = torch.tensor([[0.5, 0.5], [0.0, 0.5], [1.0, 1.0], [1.2, 0.5]],
                                            dtype=torch.float64)
    weights = torch.ones_like(weights)
    out = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("N", [1, 2])
def test_pytorch_path_backward_gives_grid_sample_contiguous_gradients(N, monkeypatch):
    """grid_sample's CPU backward and the weighted sum's products are slow on channel-strided
    gradients, which a batch of one image would hand them (its reshapes are strided views)."""
    contiguous = []
    grid_sample = function.F.grid_sample

    def recording(*args, **kwargs):
        out = grid_sample(*args, **kwargs)
        out.register_hook(lambda grad: contiguous.append(grad.is_contiguous()))
        return out

    monkeypatch.setattr(function.F, "grid_sample", recording)
    value, shapes, starts, locations, weights = make_inputs(N=N, M=2, D=3)
    for t in (value, locations, weights):
        t.requires_grad_()
    out = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    out.backward(torch.randn_like(out))
    assert contiguous == [True] * len(SHAPES)


def test_pytorch_path_gradcheck():
    value, shapes, starts, locations, weights = make_inputs(N=1, Lq=2, M=2, D=3,
                                                            shapes=((3, 4), (2, 2)), lo=-0.1, hi=1.1)
    args = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_pytorch(v, shapes, starts, loc, w), args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_run_in_float32(dtype):
    inputs = make_inputs(dtype=dtype)
    grad_output = representable_grad_output(2, 5, 12)
    actual = grads(ms_deform_attn, inputs, grad_output)
    as_float = [t.float() if t.is_floating_point() else t for t in inputs]
    expected = grads(ms_deform_attn, as_float, grad_output)
    assert [t.dtype for t in actual] == [dtype] * 4
    for a, e in zip(actual, expected):  # float32 results rounded once to the input dtype
        torch.testing.assert_close(a, e.to(dtype), rtol=0, atol=0)


def test_cpu_autocast_bfloat16():
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    proj = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = proj(value)
        out = ms_deform_attn(projected, shapes, starts, locations.requires_grad_(), weights)
    assert projected.dtype == out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert proj.weight.grad is not None and locations.grad.dtype == torch.float32


def test_mixed_dtypes_compute_in_float64_and_return_value_dtype():
    value, shapes, starts, locations, weights = make_inputs()
    out = ms_deform_attn_pytorch(value.float(), shapes, starts, locations, weights)
    assert out.dtype == torch.float32
    expected = ms_deform_attn_pytorch(value.float().double(), shapes, starts, locations, weights)
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=0)


def test_bad_inputs_are_named():
    value, shapes, starts, locations, weights = make_inputs()
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(ValueError, match="sampling_locations must be"):
        ms_deform_attn(value, shapes, starts, locations[:, :, :, :2], weights)
    with pytest.raises(ValueError, match="cover 31 positions but value has S=30"):
        ms_deform_attn(value[:, :30], shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts + 1, locations, weights)
    with pytest.raises(TypeError, match="spatial_shapes must be an integer tensor"):
        ms_deform_attn(value, shapes.double(), starts, locations, weights)


# ---------------------------------------------------------------------------------------------
# Dispatch and loading


def _failing_extension():
    def fail(*args):
        raise AssertionError("the CUDA extension must not be called")
    return types.SimpleNamespace(forward=fail, backward=fail)


def test_cpu_tensors_never_reach_the_cuda_extension(monkeypatch, restore_extension_state, capfd):
    monkeypatch.setattr(function, "get_extension", _failing_extension)
    inputs = make_inputs()
    out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs), rtol=1e-12, atol=1e-12)
    assert "extension" not in capfd.readouterr().err  # nothing to say about it for CPU tensors


def test_fallback_notice_is_printed_once(monkeypatch, restore_extension_state, capfd):
    monkeypatch.setattr(function, "get_cpu_kernels", lambda: None)
    monkeypatch.setattr(function, "cpu_kernels_load_error", lambda: "OSError: no\ncompiler")
    inputs = make_inputs()
    for _ in range(3):
        ms_deform_attn(*inputs)
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert "CPU tensors run on the slower PyTorch path" in err
    assert "(OSError: no compiler)" in err  # the reason, on one line
    assert "C++17 compiler" in err and "MSDA_CPU_KERNELS=0" in err


FALLBACK_SCRIPT = """\
import torch
from models.ops.ms_deform_attn import ms_deform_attn
v = torch.ones(1, 4, 1, 2); loc = torch.full((1, 3, 1, 1, 1, 2), 0.5)
for _ in range(2):
    ms_deform_attn(v, torch.tensor([[2, 2]]), torch.tensor([0]), loc, torch.ones(1, 3, 1, 1, 1))
"""


def test_fallback_notice_shows_once_in_a_fresh_process():
    """Without any logging set up (a plain script, a training process), the notice reaches
    stderr, once for two calls; here the CPU kernels are switched off by the environment."""
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MSDA_CPU_KERNELS": "0"})
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if line.startswith("MSDeformAttn:")]
    assert len(notices) == 1, proc.stderr
    assert notices[0].endswith("PyTorch path (grid_sample): the CPU kernels are switched off by "
                               "MSDA_CPU_KERNELS=0"), notices[0]
    assert proc.stdout == ""


def test_import_without_extension():
    """In a fresh process where `_C` cannot be imported, the package imports and the op works."""
    code = (
        "import sys; sys.modules['models.ops.ms_deform_attn._C'] = None\n"
        "import torch\n"
        "from models.ops.ms_deform_attn import (extension_available, extension_load_error,\n"
        "                                       ms_deform_attn)\n"
        "assert not extension_available(), 'extension unexpectedly loaded'\n"
        "assert '_C' in extension_load_error(), extension_load_error()\n"
        "v = torch.ones(1, 4, 1, 2); loc = torch.full((1, 3, 1, 1, 1, 2), 0.5)\n"
        "out = ms_deform_attn(v, torch.tensor([[2, 2]]), torch.tensor([0]), loc,\n"
        "                     torch.ones(1, 3, 1, 1, 1))\n"
        "assert out.shape == (1, 3, 2) and torch.allclose(out, torch.ones(1, 3, 2))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_broken_extension_is_recorded_not_raised(monkeypatch, restore_extension_state):
    def broken(name):
        raise OSError(f"{name}: undefined symbol: _ZN3c104cuda9SomethingE")
    monkeypatch.setattr(extension.importlib, "import_module", broken)
    monkeypatch.setattr(extension, "_tried", False)
    monkeypatch.setattr(extension, "_extension", None)
    assert not extension.extension_available()
    assert "undefined symbol" in extension.extension_load_error()


def test_wrong_arch_error_names_the_fix():
    def no_kernel_image(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    ext = types.SimpleNamespace(forward=no_kernel_image, backward=no_kernel_image)
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST=.*" + BUILD_COMMAND):
        function._ms_deform_attn_compiled(ext, *make_inputs())


# ---------------------------------------------------------------------------------------------
# The CPU kernels (src/ms_deform_attn_cpu.cpp, compiled on first use by cpu_kernels.py)


@pytest.fixture
def compiler():
    try:
        return cpu_kernels._compiler()
    except OSError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cpu_lib():
    kernels = cpu_kernels.get_cpu_kernels()
    if kernels is None:
        pytest.skip(f"CPU kernels not loaded: {cpu_kernels.cpu_kernels_load_error()}")
    return kernels


def cpu_kernel_grads(kernels, inputs, grad_output):
    return grads(lambda *args: function._ms_deform_attn_compiled(kernels, *args), inputs,
                 grad_output)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("D", CHANNELS)
def test_cpu_kernels_match_pytorch_path(cpu_lib, D, dtype):
    check_host_kernels_against_pytorch_path(
        lambda inputs, g: cpu_kernel_grads(cpu_lib, inputs, g), D, dtype)


@pytest.mark.parametrize("borders", [False, True], ids=["random", "borders"])
def test_cpu_kernels_match_loop_reference(cpu_lib, borders):
    inputs = make_inputs(D=3)
    if borders:
        put_border_locations(inputs[3], SHAPES)
    out = function._ms_deform_attn_compiled(cpu_lib, *inputs)
    torch.testing.assert_close(out, loop_reference(*inputs), rtol=1e-12, atol=1e-12)


def test_cpu_kernels_gradcheck(cpu_lib):
    value, shapes, starts, locations, weights = make_inputs(N=2, Lq=3, M=2, D=5,
                                                            shapes=((3, 4), (2, 2)), lo=-0.1, hi=1.1)
    args = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: function._ms_deform_attn_compiled(cpu_lib, v, shapes, starts, loc, w),
        args)


def test_cpu_kernels_do_not_depend_on_the_thread_count(cpu_lib):
    """Work is split by head (and, forward, by blocks of 256 queries): every thread count gives
    the same bits, also with more threads than heads and queries spanning several blocks."""
    inputs = make_inputs(N=2, Lq=600, M=3, D=8, dtype=torch.float32, shapes=((9, 7), (4, 3)))
    grad_output = torch.randn(2, 600, 24, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            results.append(cpu_kernel_grads(cpu_lib, inputs, grad_output))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for name, a, b in zip(NAMES, results[0], result):
            assert torch.equal(a, b), name


def test_cpu_kernels_empty_and_non_contiguous_inputs(cpu_lib):
    value, shapes, starts, locations, weights = make_inputs(D=8)
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not strided.is_contiguous()
    torch.testing.assert_close(function._ms_deform_attn_compiled(cpu_lib, strided, shapes, starts,
                                                                 locations, weights),
                               ms_deform_attn_pytorch(value, shapes, starts, locations, weights),
                               rtol=1e-12, atol=1e-12)
    empty = function._ms_deform_attn_compiled(cpu_lib, value, shapes, starts, locations[:, :0],
                                              weights[:, :0])
    assert empty.shape == (2, 0, 24)


def test_cpu_tensors_take_the_cpu_kernels_unless_told_otherwise(monkeypatch,
                                                                 restore_extension_state, capfd):
    calls = []

    class Recording:
        def forward(self, *args):
            calls.append("forward")
            return cpu_kernels.get_cpu_kernels().forward(*args)

    if cpu_kernels.get_cpu_kernels() is None:
        pytest.skip(f"CPU kernels not loaded: {cpu_kernels.cpu_kernels_load_error()}")
    capfd.readouterr()  # the line of a first compile, when this test is the first to load them
    monkeypatch.setattr(function, "get_cpu_kernels", Recording)
    inputs = make_inputs()
    ms_deform_attn(*inputs)
    assert calls == ["forward"] and function.path_taken("cpu") == "CPU kernels"
    with function.pytorch_path():
        out = ms_deform_attn(*inputs)
        assert function.path_taken("cpu") == "PyTorch path"
    assert calls == ["forward"]  # not called again
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs), rtol=0, atol=0)
    assert capfd.readouterr().err == ""  # a chosen path is not a fallback: no notice


def test_cpu_kernels_compile_once_per_source_and_flags(tmp_path, monkeypatch, compiler):
    path = cpu_kernels.compile_library(tmp_path, compiler)
    assert path.parent == tmp_path and path.name == cpu_kernels.library_name(compiler)
    mtime = path.stat().st_mtime_ns
    assert cpu_kernels.compile_library(tmp_path, compiler) == path  # found, not rebuilt
    assert path.stat().st_mtime_ns == mtime
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ["-DMSDA_UNUSED"])
    assert cpu_kernels.library_name(compiler) != path.name  # other flags: another library


def test_cpu_kernels_are_built_for_the_cpu_kind(monkeypatch, compiler):
    """-march=native only where the CPU's features are known, and they name the library, so that
    nodes of other CPU kinds sharing one checkout never load each other's."""
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: "fpu sse2 avx2")
    assert "-march=native" in cpu_kernels.compile_flags()
    avx2 = cpu_kernels.library_name(compiler)
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: "fpu sse2")
    assert cpu_kernels.library_name(compiler) != avx2
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: "")
    assert cpu_kernels.compile_flags() == cpu_kernels.FLAGS


def test_cpu_kernels_compile_errors_are_recorded_not_raised(tmp_path, monkeypatch,
                                                            restore_extension_state):
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'fatal error: something is missing' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    monkeypatch.setattr(cpu_kernels, "_cache_dirs", lambda: iter([tmp_path / "cache"]))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_kernels", None)
    assert cpu_kernels.get_cpu_kernels() is None
    error = cpu_kernels.cpu_kernels_load_error()
    assert "failing-c++ failed on ms_deform_attn_cpu.cpp" in error and "something is missing" in error
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary output was removed

    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    assert cpu_kernels.get_cpu_kernels() is None
    assert "'no-such-compiler' (from CXX) not found" in cpu_kernels.cpu_kernels_load_error()

    monkeypatch.delenv("CXX")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)  # none on PATH
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    assert cpu_kernels.get_cpu_kernels() is None
    assert "no C++ compiler found" in cpu_kernels.cpu_kernels_load_error()


def test_cpu_kernels_go_elsewhere_when_the_package_is_read_only(tmp_path, monkeypatch, compiler,
                                                                 restore_extension_state):
    compile_library = cpu_kernels.compile_library
    read_only, writable = tmp_path / "read-only", tmp_path / "writable"

    def compile_where_allowed(out_dir, compiler=None):
        if out_dir == read_only:
            raise PermissionError(f"[Errno 13] Permission denied: '{out_dir}'")
        return compile_library(out_dir, compiler)

    monkeypatch.setattr(cpu_kernels, "compile_library", compile_where_allowed)
    monkeypatch.setattr(cpu_kernels, "_cache_dirs", lambda: iter([read_only, writable]))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_kernels", None)
    kernels = cpu_kernels.get_cpu_kernels()
    assert kernels is not None and kernels.path.parent == writable


def test_cpu_kernels_switched_off_by_the_environment(monkeypatch, restore_extension_state):
    monkeypatch.setenv("MSDA_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_kernels", None)
    assert cpu_kernels.get_cpu_kernels() is None
    assert cpu_kernels.cpu_kernels_load_error() == "switched off by MSDA_CPU_KERNELS=0"


# ---------------------------------------------------------------------------------------------
# The CUDA kernels compiled for the host (tests/harness/host_emulation.cpp): index arithmetic, warp
# reductions and the chain rule, checked without a GPU.


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the host emulation of the kernels")
    lib = tmp_path_factory.mktemp("host_emulation") / "host_emulation.so"
    proc = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                           "-Wno-unknown-pragmas", "-I", str(SRC), str(HARNESS / "host_emulation.cpp"), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def host_kernel_grads(lib, inputs, grad_output):
    value, shapes, starts, locations, weights = inputs
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    suffix = {torch.float32: "f32", torch.float64: "f64"}[value.dtype]
    dims = [ctypes.c_int64(d) for d in (N, S, M, D, Lq, L, P)]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    out = torch.empty(N, Lq, M * D, dtype=value.dtype)
    grad_output = grad_output.to(value.dtype).contiguous()
    grad_value, grad_locations, grad_weights = (torch.zeros_like(t) for t in (value, locations, weights))
    pointers = [ptr(t) for t in (value, shapes, starts, locations, weights)]
    assert getattr(lib, f"msda_forward_{suffix}")(*pointers, ptr(out), *dims) == 0
    assert getattr(lib, f"msda_backward_{suffix}")(
        *pointers, ptr(grad_output), ptr(grad_value), ptr(grad_locations), ptr(grad_weights),
        *dims) == 0, "a lane read a shuffle from a lane that had left the kernel"
    return out, grad_value, grad_locations, grad_weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("D", CHANNELS)
def test_host_emulated_kernels_match_pytorch_path(host_kernels, D, dtype):
    check_host_kernels_against_pytorch_path(
        lambda inputs, g: host_kernel_grads(host_kernels, inputs, g), D, dtype)


# ---------------------------------------------------------------------------------------------
# Building the extension (needs nvcc, no GPU), and the compiled op on a GPU


def test_build_finds_toolkit_behind_nvcc_wrapper(tmp_path, monkeypatch):
    """An `nvcc` on PATH that is a wrapper script (not a symlink) still leads to the toolkit."""
    root = tmp_path / "cuda-13.0"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").touch()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    wrapper = tmp_path / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho '#$ TOP={root}/bin/..'\n")
    for script in (wrapper, root / "bin" / "nvcc"):
        script.chmod(0o755)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert build.find_cuda_home() == str(root)


def test_build_errors_name_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(build.BuildError, match="CUDA_HOME=.* is not a CUDA toolkit root"):
        build.find_cuda_home()
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "_is_toolkit_root", lambda path: False)
    with pytest.raises(build.BuildError, match="nvcc not found"):
        build.find_cuda_home()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build.resolve_arch_list() == build.DEFAULT_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    with pytest.raises(build.BuildError, match="no GPU is visible"):
        build.resolve_arch_list()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert build.resolve_arch_list() == "8.0;9.0"


def _nvcc_available():
    return bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))


@pytest.fixture(scope="module")
def built_extension(tmp_path_factory):
    """Path of the extension built from the current sources into a temporary directory."""
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    if not _nvcc_available():
        pytest.skip("nvcc not found (and CUDA_HOME unset)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not env.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        env["TORCH_CUDA_ARCH_LIST"] = "8.0"  # one arch keeps the build short
    out = tmp_path_factory.mktemp("ms_deform_attn_ext")
    proc = subprocess.run([sys.executable, "-m", "models.ops.ms_deform_attn.build",
                           "--out-dir", str(out), "--build-dir", str(out / "build")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    [path] = out.glob("_C*.so")
    return path


def test_extension_builds_and_loads(built_extension):
    """Compiles here without a GPU; the library loads and rejects CPU tensors with a clear error."""
    code = (
        "import sys, torch\n"
        "from models.ops.ms_deform_attn import load_extension_from\n"
        "ext = load_extension_from(sys.argv[1])\n"
        "try:\n"
        "    ext.forward(torch.zeros(1, 4, 1, 2), torch.tensor([[2, 2]]), torch.tensor([0]),\n"
        "                torch.zeros(1, 1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 1))\n"
        "except RuntimeError as exc:\n"
        "    assert 'must be a CUDA tensor' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('CPU tensors accepted')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(built_extension)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def cuda_ext(request, restore_extension_state):
    """The extension built from the current sources (or, without nvcc, the installed one), active
    for the test. Skips without a GPU; never touches CUDA before the test runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _nvcc_available():
        return load_extension_from(request.getfixturevalue("built_extension"))
    if extension.extension_available():
        return extension.get_extension()
    pytest.skip(f"no nvcc to build the extension and none installed ({BUILD_COMMAND})")


def check_cuda(D, dtype, grad_tol, out_tol, **shape):
    check_against_pytorch_path(lambda inputs, g: grads(ms_deform_attn, inputs, g),
                               make_inputs(D=D, dtype=dtype, device="cuda", **shape), out_tol,
                               grad_tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("D", CHANNELS)
def test_cuda_matches_pytorch_path(cuda_ext, D, dtype):
    if dtype == torch.float64:
        check_cuda(D, dtype, F64_TOL, F64_TOL)
    else:
        check_cuda(D, dtype, F32_GRAD_TOL, F32_TOL)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("D", LARGE_CHANNELS)
def test_cuda_matches_pytorch_path_large_channels(cuda_ext, D):
    check_cuda(D, torch.float64, F64_TOL, F64_TOL, N=1, Lq=3, M=2)
    check_cuda(D, torch.float32, dict(rtol=1e-3, atol=1e-3), F32_TOL, N=1, Lq=3, M=2)


@pytest.mark.cuda
@pytest.mark.parametrize("D", CHANNELS)
def test_cuda_gradcheck(cuda_ext, D):
    value, shapes, starts, locations, weights = make_inputs(
        N=1, Lq=2, M=2, D=D, shapes=((6, 4), (3, 2)), device="cuda", lo=-0.1, hi=1.1)
    args = tuple(t.requires_grad_() for t in (value, locations, weights))
    # nondet_tol: grad_value is summed with atomicAdd in no fixed order.
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w),
                                    args, nondet_tol=1e-12)


@pytest.mark.cuda
def test_cuda_dispatch_uses_extension_and_location_weight_grads_are_deterministic(
        cuda_ext, monkeypatch):
    calls = []
    counting = types.SimpleNamespace(
        forward=lambda *a: calls.append("forward") or cuda_ext.forward(*a),
        backward=lambda *a: calls.append("backward") or cuda_ext.backward(*a))
    monkeypatch.setattr(function, "get_extension", lambda: counting)
    inputs = make_inputs(D=32, dtype=torch.float32, device="cuda")
    grad_output = torch.randn(2, 5, 3 * 32, device="cuda")
    first, second = grads(ms_deform_attn, inputs, grad_output), grads(ms_deform_attn, inputs, grad_output)
    assert calls == ["forward", "backward"] * 2
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_half_inputs(cuda_ext, dtype):
    inputs = make_inputs(D=32, dtype=dtype, device="cuda")
    grad_output = representable_grad_output(2, 5, 96)
    actual = grads(ms_deform_attn, inputs, grad_output)
    as_float = [t.float() if t.is_floating_point() else t for t in inputs]
    expected = grads(ms_deform_attn, as_float, grad_output)
    assert [t.dtype for t in actual] == [dtype] * 4
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=2e-2, atol=2e-2)
    for a, e, name in zip(actual, expected, NAMES):
        torch.testing.assert_close(a, e.to(dtype), msg=name, **tol)


@pytest.mark.cuda
def test_cuda_autocast(cuda_ext):
    value, shapes, starts, locations, weights = make_inputs(D=8, dtype=torch.float32, device="cuda")
    proj = torch.nn.Linear(8, 8).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        projected = proj(value)
        out = ms_deform_attn(projected, shapes, starts, locations.requires_grad_(), weights)
    assert projected.dtype == out.dtype == torch.float16
    out.float().sum().backward()
    assert proj.weight.grad is not None and locations.grad.dtype == torch.float32
    assert torch.isfinite(locations.grad).all()


@pytest.mark.cuda
def test_cuda_non_contiguous_and_empty_inputs(cuda_ext):
    value, shapes, starts, locations, weights = make_inputs(D=8, device="cuda")
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not strided.is_contiguous()
    torch.testing.assert_close(ms_deform_attn(strided, shapes, starts, locations, weights),
                               ms_deform_attn(value, shapes, starts, locations, weights))
    empty = ms_deform_attn(value, shapes, starts, locations[:, :0], weights[:, :0])
    assert empty.shape == (2, 0, 24)


@pytest.mark.cuda
def test_cuda_without_extension_falls_back_with_notice(monkeypatch, restore_extension_state,
                                                        capfd):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(function, "get_extension", lambda: None)
    monkeypatch.setattr(function, "get_cpu_kernels", lambda: None)
    inputs = make_inputs(device="cuda")
    out = ms_deform_attn(*inputs)
    ms_deform_attn(*inputs)
    torch.testing.assert_close(out.cpu(), ms_deform_attn_pytorch(*[t.cpu() for t in inputs]))
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and "CUDA tensors run on the slower PyTorch path" in err, err
    ms_deform_attn(*[t.cpu() for t in inputs])  # CPU tensors: a notice of their own, once
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and "CPU tensors run on the slower PyTorch path" in err, err
