// Kernel launchers implemented in ms_deform_attn_cuda.cu. The caller (ms_deform_attn.cpp) has
// validated the inputs: contiguous CUDA tensors on one device, float32 or float64, shapes
//   value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
//   sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P),
// and allocated the outputs.
#pragma once

#include <ATen/core/TensorBase.h>

namespace ms_deform_attn {

// output (N, Lq, M * D), fully overwritten.
void forward_cuda(const at::TensorBase& value, const at::TensorBase& spatial_shapes,
                  const at::TensorBase& level_start_index, const at::TensorBase& sampling_locations,
                  const at::TensorBase& attention_weights, const at::TensorBase& output);

// grad_value must be zero-filled (it is accumulated with atomicAdd); grad_sampling_locations and
// grad_attention_weights are fully overwritten.
void backward_cuda(const at::TensorBase& value, const at::TensorBase& spatial_shapes,
                   const at::TensorBase& level_start_index, const at::TensorBase& sampling_locations,
                   const at::TensorBase& attention_weights, const at::TensorBase& grad_output,
                   const at::TensorBase& grad_value, const at::TensorBase& grad_sampling_locations,
                   const at::TensorBase& grad_attention_weights);

}  // namespace ms_deform_attn
