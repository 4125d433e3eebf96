"""Multi-scale deformable attention: the op, its PyTorch path, and the dispatch between the PyTorch
path and the compiled kernels (CUDA extension, CPU kernels).

Shapes (N batch, S = sum_l H_l * W_l value positions, M heads, D channels per head, Lq queries,
L levels, P points per level):
    value               (N, S, M, D)
    spatial_shapes      (L, 2) int64, (H_l, W_l)
    level_start_index   (L,) int64, offset of each level in S
    sampling_locations  (N, Lq, M, L, P, 2), normalised (x, y); 0 and 1 are the outer edges of
                        the map (align_corners=False), samples outside read zeros
    attention_weights   (N, Lq, M, L, P), already normalised over L * P
    output              (N, Lq, M * D)
"""
import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .cpu_kernels import ENV_SWITCH, cpu_kernels_load_error, get_cpu_kernels, switched_off
from .extension import BUILD_COMMAND, extension_load_error, get_extension

# Device types ("cpu", "cuda") whose fallback notice this process has printed: one line each.
_notices_shown = set()
# Set by `pytorch_path()`: every call takes the PyTorch path.
_pytorch_path_forced = False


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    N, _, M, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(f"level_start_index must be (L,) with L={L}, got shape "
                         f"{tuple(level_start_index.shape)}")
    if (sampling_locations.dim() != 6 or sampling_locations.shape[0] != N
            or sampling_locations.shape[2:4] != (M, L) or sampling_locations.shape[5] != 2):
        raise ValueError(f"sampling_locations must be (N, Lq, M, L, P, 2) with N={N}, M={M}, "
                         f"L={L}, got shape {tuple(sampling_locations.shape)}")
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(f"attention_weights must be (N, Lq, M, L, P) = "
                         f"{tuple(sampling_locations.shape[:5])}, got {tuple(attention_weights.shape)}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_levels(value, spatial_shapes, level_start_index):
    """([(H_l, W_l)], [H_l * W_l]) after checking that the levels cover value's S positions and
    start where `level_start_index` says (this reads both tensors on the host)."""
    S = value.shape[1]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != S:
        raise ValueError(f"spatial_shapes {shapes} cover {sum(sizes)} positions but value has S={S}")
    starts = [sum(sizes[:l]) for l in range(len(shapes))]
    if level_start_index.tolist() != starts:
        raise ValueError(f"level_start_index {level_start_index.tolist()} does not match "
                         f"spatial_shapes {shapes} (expected {starts})")
    return shapes, sizes


def _compute_dtype(*tensors):
    """float64 if any input is float64, else float32 (half and bfloat16 run in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# FLOPs per sampled value and channel: bilinear interpolation reads 4 neighbours (4 multiply-adds),
# the attention weight scales the sample into the sum (1 multiply-add); 2 FLOPs per multiply-add.
FLOPS_PER_SAMPLE = 2 * (4 + 1)


def sampling_flops(sampled_shape):
    """FLOPs of the sampling and weighted sum behind `sampled_shape` sampled values (the grid_sample
    output of one level on the PyTorch path, (N*M, D, P, Lq); the op over all levels is the sum), which
    FLOP counters that know only matrix products and convolutions miss."""
    n = 1
    for side in sampled_shape:
        n *= int(side)
    return FLOPS_PER_SAMPLE * n


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights):
    """Pure-PyTorch path: one `grid_sample` per level. Runs on any device; the result has the
    dtype of `value`. `level_start_index` is only checked against `spatial_shapes`."""
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    shapes, sizes = _check_levels(value, spatial_shapes, level_start_index)
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape

    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    # Explicit dtype: autocast must not lower grid_sample or the weighted sum.
    with torch.autocast(value.device.type, enabled=False):
        levels = value.to(dtype).split(sizes, dim=1)
        # (N, Lq, M, L, P, 2) -> (L, N*M, P, Lq, 2), each level's grid contiguous: with the points
        # before the queries, grid_sample's output (N*M, D, P, Lq) and the weights have the long query
        # axis innermost, where the weighted sum's products and its sum over points run fastest on CPU.
        # .contiguous(): for N = 1 the reshapes are strided views (see _ContiguousGrad below).
        grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample wants [-1, 1]
        grids = grids.permute(3, 0, 2, 4, 1, 5).reshape(L, N * M, P, Lq, 2).contiguous()
        weights = attention_weights.to(dtype).permute(3, 0, 2, 4, 1).reshape(L, N * M, 1, P, Lq).contiguous()
        output = None
        # The levels' weighted sums are added one after another instead of stacking the samples of
        # all levels first: that stack was the largest copy of a CPU training step.
        for l, (H, W) in enumerate(shapes):
            # (N, H*W, M, D) -> (N*M, D, H, W)
            level = levels[l].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
            sampled = F.grid_sample(level, grids[l], mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # (N*M, D, P, Lq)
            term = (sampled * weights[l]).sum(2)  # (N*M, D, Lq)
            output = term if output is None else output + term
        # For N = 1 the gradient of (N, Lq, M*D) would come back through the transpose as a
        # channel-strided view (undoing the view needs no copy then), and the weighted sum's
        # products and grid_sample's backward would inherit that layout, as they would the strided
        # weights: a 1.5x longer CPU training step of Deformable-DETR at batch 1 (the model of
        # benchmarks.vs_transformers, 384 px; tests/test_ms_deform_attn.py checks the
        # layout).
        output = _ContiguousGrad.apply(output).view(N, M * D, Lq).transpose(1, 2)
    return output.to(value.dtype).contiguous()


class _MSDeformAttnCompiled(torch.autograd.Function):
    """The compiled kernels (`kernels`: the CUDA extension or the CPU kernels); inputs are
    contiguous, on one device, float32 or float64 alike."""

    @staticmethod
    def forward(ctx, kernels, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        ctx.kernels = kernels
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return kernels.forward(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_locations, grad_weights = ctx.kernels.backward(
            *ctx.saved_tensors, grad_output.contiguous())
        return None, grad_value, None, None, grad_locations, grad_weights


def _ms_deform_attn_compiled(kernels, value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not value.is_cuda:  # the CPU kernels trust the levels; on a GPU the check would sync
        _check_levels(value, spatial_shapes, level_start_index)
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    device = value.device
    try:
        # The casts are recorded by autograd, so gradients reach the inputs in their own dtypes.
        output = _MSDeformAttnCompiled.apply(
            kernels, value.to(dtype).contiguous(),
            spatial_shapes.to(device, torch.int64).contiguous(),
            level_start_index.to(device, torch.int64).contiguous(),
            sampling_locations.to(dtype).contiguous(), attention_weights.to(dtype).contiguous())
    except RuntimeError as exc:
        if "no kernel image" not in str(exc):
            raise
        arch = ".".join(map(str, torch.cuda.get_device_capability(device))) if value.is_cuda else "?"
        raise RuntimeError(f"the MSDeformAttn extension was not compiled for this GPU (compute "
                           f"capability {arch}); rebuild it with TORCH_CUDA_ARCH_LIST='{arch}' "
                           f"{BUILD_COMMAND}") from exc
    return output.to(value.dtype)


def _one_line(error):
    return f" ({' '.join(str(error).split())})" if error else ""  # on one line, whatever it said


def _fallback_notice(device):
    """The one-line notice for the PyTorch path taken on `device` without its compiled kernels."""
    if device.type == "cuda":
        return (f"MSDeformAttn: CUDA tensors run on the slower PyTorch path (grid_sample) because "
                f"the compiled extension is not loaded{_one_line(extension_load_error())}; build "
                f"it with `make op` ({BUILD_COMMAND}; needs nvcc, not a GPU)")
    if switched_off():
        return (f"MSDeformAttn: CPU tensors run on the PyTorch path (grid_sample): the CPU kernels "
                f"are switched off by {ENV_SWITCH}=0")
    return (f"MSDeformAttn: CPU tensors run on the slower PyTorch path (grid_sample) because the "
            f"CPU kernels are not loaded{_one_line(cpu_kernels_load_error())}; they need a C++17 "
            f"compiler (CXX, or c++/g++ on PATH); {ENV_SWITCH}=0 switches them off")


def _note_fallback(device):
    """Print the fallback notice to stderr, once per process and device type. Printed rather
    than logged, so that it shows without any logging configuration."""
    if device.type in _notices_shown:
        return
    _notices_shown.add(device.type)
    notice = _fallback_notice(device)
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    if getattr(tqdm, "_instances", None):  # a progress bar is drawn (training): print above it
        tqdm.write(notice, file=sys.stderr)
    else:
        print(notice, file=sys.stderr, flush=True)


@contextlib.contextmanager
def pytorch_path():
    """Within this context every call takes `ms_deform_attn_pytorch`, whatever is compiled (for
    FLOP counters, which see grid_sample but not the compiled kernels, and for comparisons)."""
    global _pytorch_path_forced
    saved, _pytorch_path_forced = _pytorch_path_forced, True
    try:
        yield
    finally:
        _pytorch_path_forced = saved


def _compiled_kernels(device):
    """The compiled kernels for `device`, or None."""
    if device.type == "cuda":
        return get_extension()
    if device.type == "cpu":
        return get_cpu_kernels()
    return None


def path_taken(device):
    """Which implementation a call with tensors on `device` takes now: "CUDA extension",
    "CPU kernels" or "PyTorch path" (loading the compiled kernels if not done yet)."""
    if _pytorch_path_forced or _compiled_kernels(torch.device(device)) is None:
        return "PyTorch path"
    return "CUDA extension" if torch.device(device).type == "cuda" else "CPU kernels"


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention, (N, Lq, M * D) in the dtype of `value`.

    CUDA tensors use the CUDA extension when it is loaded, CPU tensors the CPU kernels (compiled
    on first use, see cpu_kernels.py); otherwise, and inside `pytorch_path()`, the op runs
    `ms_deform_attn_pytorch`, and when that is for want of the compiled kernels one line on stderr
    says so, once per process and device type. Half and bfloat16 inputs are computed in float32.
    On CUDA the value gradient is accumulated with atomicAdd, so it is not bitwise reproducible;
    on CPU it is.
    """
    if not _pytorch_path_forced:
        kernels = _compiled_kernels(value.device)
        if kernels is not None:
            return _ms_deform_attn_compiled(kernels, value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights)
        if value.device.type in ("cpu", "cuda"):
            _note_fallback(value.device)
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)
