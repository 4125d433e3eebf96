// Python bindings of the MSDeformAttn CUDA op: input checks, output allocation, kernel launch.
// The Python wrapper (models/ops/ms_deform_attn/function.py) already casts and makes the inputs
// contiguous; these checks keep a direct call from reading out of bounds.
// Only the headers needed (not <torch/extension.h>, the whole C++ frontend): a third of the
// compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/python.h>

#include <limits>
#include <vector>

#include "ms_deform_attn.h"

namespace {

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn extension: value must be a CUDA tensor "
              "(CPU tensors go through ms_deform_attn_pytorch)");
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"value", &value}, {"spatial_shapes", &spatial_shapes},
      {"level_start_index", &level_start_index}, {"sampling_locations", &sampling_locations},
      {"attention_weights", &attention_weights}};
  for (const auto& [name, tensor] : named) {
    TORCH_CHECK(tensor->device() == value.device(), "ms_deform_attn extension: ", name, " is on ",
                tensor->device(), " but value is on ", value.device());
    TORCH_CHECK(tensor->is_contiguous(), "ms_deform_attn extension: ", name, " must be contiguous");
  }
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "ms_deform_attn extension: value must be float32 or float64, got ", dtype);
  TORCH_CHECK(sampling_locations.scalar_type() == dtype && attention_weights.scalar_type() == dtype,
              "ms_deform_attn extension: value, sampling_locations and attention_weights must "
              "share one dtype");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn extension: spatial_shapes and level_start_index must be int64");

  TORCH_CHECK(value.dim() == 4, "ms_deform_attn extension: value must be (N, S, M, D), got ",
              value.sizes());
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn extension: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn extension: level_start_index must be (L,) with L = ", L, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == N &&
                  sampling_locations.size(2) == M && sampling_locations.size(3) == L &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn extension: sampling_locations must be (N, Lq, M, L, P, 2) = (", N,
              ", Lq, ", M, ", ", L, ", P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn extension: attention_weights must be (N, Lq, M, L, P) = ",
              sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(M * D <= int_max && L * sampling_locations.size(4) <= int_max,
              "ms_deform_attn extension: M * D and L * P must fit in int32");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  auto output = at::empty({value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)},
                          value.options());
  ms_deform_attn::forward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights, output);
  return output;
}

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.device() == value.device() && grad_output.is_contiguous() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn extension: grad_output must be a contiguous tensor of value's dtype "
              "and device");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == sampling_locations.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn extension: grad_output must be (N, Lq, M * D), got ",
              grad_output.sizes());
  const c10::cuda::CUDAGuard device_guard(value.device());
  // grad_value is accumulated with atomicAdd; the other two are overwritten but zeroed anyway so
  // that degenerate shapes (D == 0) still return zeros.
  auto grad_value = at::zeros_like(value);
  auto grad_sampling_locations = at::zeros_like(sampling_locations);
  auto grad_attention_weights = at::zeros_like(attention_weights);
  ms_deform_attn::backward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights, grad_output, grad_value, grad_sampling_locations,
                                grad_attention_weights);
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention CUDA kernels (float32, float64)";
  m.def("forward", &forward, "MSDeformAttn forward: (N, Lq, M * D) output");
  m.def("backward", &backward,
        "MSDeformAttn backward: (grad_value, grad_sampling_locations, grad_attention_weights)");
}
