"""Multi-scale deformable attention (MSDeformAttn): CUDA kernels plus a pure-PyTorch path.

    from models.ops.ms_deform_attn import ms_deform_attn
    out = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights)  # (N, Lq, M * D)

Build the CUDA extension with `python -m models.ops.ms_deform_attn.build` (README.md beside this
file); without it everything runs on the PyTorch path. Importing this package never loads it.
"""
from .extension import BUILD_COMMAND, extension_available, extension_load_error, load_extension_from
from .function import ms_deform_attn, ms_deform_attn_pytorch, sampling_flops

__all__ = ["BUILD_COMMAND", "extension_available", "extension_load_error", "load_extension_from",
           "ms_deform_attn", "ms_deform_attn_pytorch", "sampling_flops"]
