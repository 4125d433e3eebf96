"""Multi-scale deformable attention (MSDeformAttn): CUDA kernels, CPU kernels and a pure-PyTorch
path.

    from models.ops.ms_deform_attn import ms_deform_attn
    out = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights)  # (N, Lq, M * D)

Build the CUDA extension with `python -m models.ops.ms_deform_attn.build` (README.md beside this
file); without it CUDA tensors run on the PyTorch path. The CPU kernels compile themselves on the
first CPU call (a C++17 compiler, a few seconds). Importing this package loads neither.
"""
from .cpu_kernels import cpu_kernels_load_error
from .extension import BUILD_COMMAND, extension_available, extension_load_error, load_extension_from
from .function import ms_deform_attn, ms_deform_attn_pytorch, path_taken, pytorch_path, sampling_flops

__all__ = ["BUILD_COMMAND", "cpu_kernels_load_error", "extension_available", "extension_load_error",
           "load_extension_from", "ms_deform_attn", "ms_deform_attn_pytorch", "path_taken",
           "pytorch_path", "sampling_flops"]
