// Launchers of the MSDeformAttn CUDA kernels (ms_deform_attn_kernels.cuh): dtype dispatch
// (float and double; the Python wrapper runs half/bfloat16 inputs in float), launch
// configuration, the current stream and launch error checks.

#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <limits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_kernels.cuh"

namespace ms_deform_attn {
namespace {

using kernels::kThreadsPerBlock;

unsigned int num_blocks(int64_t num_threads) {
  const int64_t blocks = (num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ms_deform_attn: problem too large (",
              num_threads, " threads)");
  return static_cast<unsigned int>(blocks);
}

// Problem sizes; value is (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2). The kernels take
// M, D, L and P as int (ms_deform_attn.cpp checks that M * D and L * P fit).
struct Sizes {
  int64_t N, S, Lq;
  int M, D, L, P;
  Sizes(const at::TensorBase& value, const at::TensorBase& sampling_locations)
      : N(value.size(0)), S(value.size(1)), Lq(sampling_locations.size(1)),
        M(static_cast<int>(value.size(2))), D(static_cast<int>(value.size(3))),
        L(static_cast<int>(sampling_locations.size(3))),
        P(static_cast<int>(sampling_locations.size(4))) {}
};

}  // namespace

void forward_cuda(const at::TensorBase& value, const at::TensorBase& spatial_shapes,
                  const at::TensorBase& level_start_index, const at::TensorBase& sampling_locations,
                  const at::TensorBase& attention_weights, const at::TensorBase& output) {
  const Sizes n(value, sampling_locations);
  const int64_t num_outputs = n.N * n.Lq * n.M * n.D;  // one thread each
  if (num_outputs == 0) return;
  const unsigned int blocks = num_blocks(num_outputs);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(value.device().index());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    kernels::forward_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
        num_outputs, n.S, n.Lq, n.M, n.D, n.L, n.P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const at::TensorBase& value, const at::TensorBase& spatial_shapes,
                   const at::TensorBase& level_start_index, const at::TensorBase& sampling_locations,
                   const at::TensorBase& attention_weights, const at::TensorBase& grad_output,
                   const at::TensorBase& grad_value, const at::TensorBase& grad_sampling_locations,
                   const at::TensorBase& grad_attention_weights) {
  const Sizes n(value, sampling_locations);
  const int64_t num_groups = n.N * n.Lq * n.M;  // one lane group each
  if (num_groups == 0 || n.D == 0) return;
  const int group_size = kernels::backward_group_size(n.D);
  const unsigned int blocks = num_blocks(num_groups * group_size);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(value.device().index());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    kernels::backward_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
        value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<scalar_t>(),
        grad_sampling_locations.mutable_data_ptr<scalar_t>(),
        grad_attention_weights.mutable_data_ptr<scalar_t>(), num_groups, n.S, n.Lq, n.M, n.D, n.L,
        n.P, group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ms_deform_attn
