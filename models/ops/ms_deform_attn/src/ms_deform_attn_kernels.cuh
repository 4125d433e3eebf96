// CUDA kernels of multi-scale deformable attention (MSDeformAttn).
//
// Sampling convention and bilinear corners: footprint.h.
//
// Forward: one thread per output element (n, q, m, c). Neighbouring threads take neighbouring
// channels of one head, so the value reads of a warp are coalesced.
//
// Backward: a group of G lanes per (n, q, m), G = min(32, smallest power of two >= D), so a
// group never straddles a warp. Lane k handles channels k, k + G, k + 2G, ... For each (level, point)
// the lanes accumulate their part of the channel sums behind the location and weight gradients,
// the group adds them up with an xor butterfly of warp shuffles and lane 0 stores them: no
// atomics there, so those two gradients are deterministic. The value gradient is scattered into
// the four bilinear corners with atomicAdd: its summation order, hence its rounding, varies
// from run to run.
//
// This header holds the kernels only and needs nothing but the CUDA built-ins (blockIdx,
// blockDim, threadIdx, __shfl_xor_sync, atomicAdd) and footprint.h, so the tests can also compile
// it for the host with an emulated warp (host_emulation.cpp) and check it on machines without a
// GPU.

#pragma once

#include <cstdint>

#include "footprint.h"

namespace ms_deform_attn {
namespace kernels {

constexpr int kThreadsPerBlock = 256;
constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights, scalar_t* __restrict__ output,
    int64_t num_outputs, int64_t S, int64_t Lq, int M, int D, int L, int P) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= num_outputs) return;
  // output is (N, Lq, M, D) in memory, so index = ((n * Lq + q) * M + m) * D + c.
  const int c = static_cast<int>(index % D);
  const int64_t nqm = index / D;
  const int m = static_cast<int>(nqm % M);
  const int64_t n = nqm / (Lq * M);
  const int64_t pixel_stride = int64_t(M) * D;  // elements between two pixels of value
  const scalar_t* value_nmc = value + n * S * pixel_stride + int64_t(m) * D + c;
  const scalar_t* weight = attention_weights + nqm * L * P;
  const scalar_t* loc = sampling_locations + nqm * L * P * 2;

  scalar_t acc = 0;
  for (int l = 0; l < L; ++l) {
    const int H = static_cast<int>(spatial_shapes[2 * l]);
    const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
    const scalar_t* level = value_nmc + level_start_index[l] * pixel_stride;
    for (int p = 0; p < P; ++p, ++weight, loc += 2) {
      const Footprint<scalar_t> f(loc[0], loc[1], H, W, pixel_stride);
      if (!f.inside) continue;
      scalar_t w[4];
      f.corner_weights(w);
      const scalar_t sampled = w[0] * f.corner(level, 0) + w[1] * f.corner(level, 1) +
                               w[2] * f.corner(level, 2) + w[3] * f.corner(level, 3);
      acc += *weight * sampled;
    }
  }
  output[index] = acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock) backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights, const scalar_t* __restrict__ grad_output,
    scalar_t* __restrict__ grad_value, scalar_t* __restrict__ grad_sampling_locations,
    scalar_t* __restrict__ grad_attention_weights, int64_t num_groups, int64_t S, int64_t Lq,
    int M, int D, int L, int P, int group_size) {
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / group_size;
  const int lane = static_cast<int>(thread % group_size);
  // Threads past the last group read group 0 (so every load stays in bounds) but add nothing and
  // store nothing; they must not return early because the whole warp joins the shuffles.
  const bool active = group < num_groups;
  const int64_t nqm = active ? group : 0;  // flat (n, q, m)
  const int m = static_cast<int>(nqm % M);
  const int64_t n = nqm / (Lq * M);
  const int64_t pixel_stride = int64_t(M) * D;
  const int64_t head_offset = n * S * pixel_stride + int64_t(m) * D;
  const scalar_t* grad_out = grad_output + nqm * D;  // grad_output is (N, Lq, M, D) in memory

  int64_t sample = nqm * L * P;  // flat (n, q, m, l, p)
  for (int l = 0; l < L; ++l) {
    const int H = static_cast<int>(spatial_shapes[2 * l]);
    const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
    const int64_t level_offset = head_offset + level_start_index[l] * pixel_stride;
    for (int p = 0; p < P; ++p, ++sample) {
      const scalar_t x = sampling_locations[2 * sample];
      const scalar_t y = sampling_locations[2 * sample + 1];
      const scalar_t weight = attention_weights[sample];
      const Footprint<scalar_t> f(x, y, H, W, pixel_stride);
      // This lane's share of sum_c grad_out[c] * sampled[c] and of the derivatives of that sum
      // (times the attention weight) with respect to the pixel coordinates w and h.
      scalar_t g_weight = 0, g_w = 0, g_h = 0;
      if (active && f.inside) {
        const scalar_t hl = 1 - f.lh, wl = 1 - f.lw;
        scalar_t corner_weight[4];
        f.corner_weights(corner_weight);
        for (int c = lane; c < D; c += group_size) {
          const scalar_t* level = value + level_offset + c;
          const scalar_t v00 = f.corner(level, 0), v01 = f.corner(level, 1);
          const scalar_t v10 = f.corner(level, 2), v11 = f.corner(level, 3);
          const scalar_t go = grad_out[c];
          const scalar_t go_weighted = go * weight;
          g_weight += go * (corner_weight[0] * v00 + corner_weight[1] * v01 +
                            corner_weight[2] * v10 + corner_weight[3] * v11);
          g_w += go_weighted * (hl * (v01 - v00) + f.lh * (v11 - v10));
          g_h += go_weighted * (wl * (v10 - v00) + f.lw * (v11 - v01));
          scalar_t* grad_level = grad_value + level_offset + c;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (f.offset[k] >= 0) {
              atomicAdd(grad_level + f.offset[k], go_weighted * corner_weight[k]);
            }
          }
        }
      }
      // Xor offsets below group_size keep the exchange inside the group's aligned lanes.
      for (int o = group_size / 2; o > 0; o /= 2) {
        g_weight += __shfl_xor_sync(kFullWarpMask, g_weight, o);
        g_w += __shfl_xor_sync(kFullWarpMask, g_w, o);
        g_h += __shfl_xor_sync(kFullWarpMask, g_h, o);
      }
      if (active && lane == 0) {
        grad_attention_weights[sample] = g_weight;
        // Chain rule back to normalised coordinates: dw/dx = W, dh/dy = H.
        grad_sampling_locations[2 * sample] = g_w * W;
        grad_sampling_locations[2 * sample + 1] = g_h * H;
      }
    }
  }
}

// Lanes per (n, q, m) in backward_kernel: min(32, smallest power of two >= D).
inline int backward_group_size(int64_t D) {
  int group_size = 1;
  while (group_size < D && group_size < 32) group_size *= 2;
  return group_size;
}

}  // namespace kernels
}  // namespace ms_deform_attn
