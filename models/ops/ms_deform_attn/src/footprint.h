// The bilinear footprint of one sample, shared by the CUDA kernels (ms_deform_attn_kernels.cuh)
// and the CPU kernels (ms_deform_attn_cpu.cpp), so both read the same corners with the same
// weights.
//
// Sampling convention (grid_sample with align_corners=False and zero padding): a normalised
// location (x, y) maps to the pixel coordinates w = x * W - 0.5, h = y * H - 0.5. A sample
// contributes only when -1 < h < H and -1 < w < W; corners outside the map read as zero.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MSDA_INLINE __host__ __device__ __forceinline__
#else
#define MSDA_INLINE inline
#endif

namespace ms_deform_attn {
namespace kernels {

#ifndef __CUDACC__
using std::floor;  // the float overload on the host; CUDA has its own
#endif

// Bilinear footprint of one sample on one level.
template <typename scalar_t>
struct Footprint {
  bool inside = false;  // -1 < h < H and -1 < w < W; the other fields are only set when true
  // Offsets of the corners (h0, w0), (h0, w1), (h1, w0), (h1, w1) from the level's first pixel,
  // in value elements; -1 for a corner outside the map.
  int64_t offset[4] = {-1, -1, -1, -1};
  scalar_t lh = 0, lw = 0;  // fractional parts of h and w

  MSDA_INLINE Footprint(scalar_t x, scalar_t y, int H, int W, int64_t pixel_stride) {
    const scalar_t h = y * H - scalar_t(0.5);
    const scalar_t w = x * W - scalar_t(0.5);
    inside = h > scalar_t(-1) && w > scalar_t(-1) && h < scalar_t(H) && w < scalar_t(W);
    if (!inside) return;
    const scalar_t h_floor = floor(h), w_floor = floor(w);
    const int h0 = static_cast<int>(h_floor), w0 = static_cast<int>(w_floor);
    const int h1 = h0 + 1, w1 = w0 + 1;
    lh = h - h_floor;
    lw = w - w_floor;
    const bool h0_in = h0 >= 0, h1_in = h1 < H, w0_in = w0 >= 0, w1_in = w1 < W;
    if (h0_in && w0_in) offset[0] = (int64_t(h0) * W + w0) * pixel_stride;
    if (h0_in && w1_in) offset[1] = (int64_t(h0) * W + w1) * pixel_stride;
    if (h1_in && w0_in) offset[2] = (int64_t(h1) * W + w0) * pixel_stride;
    if (h1_in && w1_in) offset[3] = (int64_t(h1) * W + w1) * pixel_stride;
  }

  // Bilinear weights of the four corners, in the order of `offset`.
  MSDA_INLINE void corner_weights(scalar_t (&w)[4]) const {
    const scalar_t hl = 1 - lh, wl = 1 - lw;  // weights of the low corners
    w[0] = hl * wl;
    w[1] = hl * lw;
    w[2] = lh * wl;
    w[3] = lh * lw;
  }

  // Corner value of one channel; `level` points at that channel of the level's first pixel.
  MSDA_INLINE scalar_t corner(const scalar_t* level, int k) const {
    return offset[k] >= 0 ? level[offset[k]] : scalar_t(0);
  }
};

}  // namespace kernels
}  // namespace ms_deform_attn
