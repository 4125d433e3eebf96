// CPU kernels of multi-scale deformable attention (MSDeformAttn): the bilinear sampling of every
// point and the attention-weighted sum in one pass, forward and backward, without materialising
// the sampled values (the PyTorch path writes them out, N * M * D * L * P * Lq of them, and
// grid_sample's backward reads them back).
//
// A plain C++17 shared library with C entry points, loaded with ctypes by cpu_kernels.py: it
// needs no torch headers, so it compiles in seconds and does not depend on the torch ABI. The
// tensors are contiguous, laid out as in the CUDA extension:
//   value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
//   sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P),
//   output and grad_output (N, Lq, M, D).
//
// Work is split over std::threads by head: forward over (n, m, block of queries), backward over
// (n, m), so that every thread owns the value gradient of its heads and the result does not
// depend on the number of threads (no atomics, a fixed summation order: bitwise reproducible).
// A head's value rows (S * D elements) are what its queries sample, so a thread's reads stay
// within a few hundred kilobytes to a few megabytes.
//
//   c++ -std=c++17 -O3 -fopenmp-simd -shared -fPIC -pthread [-march=native] \
//       ms_deform_attn_cpu.cpp -o msda_cpu.so
// (-fopenmp-simd: only the `omp simd` pragma, which lets the compiler vectorise the channel dot
// products in a fixed order; no OpenMP runtime. cpu_kernels.py adds -march=native on x86 Linux.)
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "footprint.h"

namespace {

using ms_deform_attn::kernels::Footprint;

// Queries per forward task: enough work per task that a thread's share is a few long runs.
constexpr int64_t kQueriesPerTask = 256;

// Runs body(task) for task in [0, num_tasks) on up to num_threads threads, each taking one
// contiguous range of tasks (neighbouring tasks share a head, hence its value rows).
template <typename Body>
void parallel_for(int64_t num_tasks, int num_threads, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tasks));
  auto run = [&](int64_t t) {
    const int64_t begin = num_tasks * t / threads, end = num_tasks * (t + 1) / threads;
    for (int64_t task = begin; task < end; ++task) body(task);
  };
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < threads; ++t) workers.emplace_back(run, t);
  run(0);
  for (auto& worker : workers) worker.join();
}

template <typename T>
void forward(const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
             const T* sampling_locations, const T* attention_weights, T* output, int64_t N,
             int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P, int num_threads) {
  const int64_t pixel_stride = M * D;
  const int64_t blocks = (Lq + kQueriesPerTask - 1) / kQueriesPerTask;
  parallel_for(N * M * blocks, num_threads, [&](int64_t task) {
    const int64_t block = task % blocks, nm = task / blocks, m = nm % M, n = nm / M;
    const T* head = value + n * S * pixel_stride + m * D;
    const int64_t q_end = std::min(Lq, (block + 1) * kQueriesPerTask);
    for (int64_t q = block * kQueriesPerTask; q < q_end; ++q) {
      const int64_t nqm = (n * Lq + q) * M + m;
      T* __restrict__ out = output + nqm * D;
      std::fill(out, out + D, T(0));
      const T* weight = attention_weights + nqm * L * P;
      const T* loc = sampling_locations + nqm * L * P * 2;
      for (int64_t l = 0; l < L; ++l) {
        const int H = static_cast<int>(spatial_shapes[2 * l]);
        const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
        const T* level = head + level_start_index[l] * pixel_stride;
        for (int64_t p = 0; p < P; ++p, ++weight, loc += 2) {
          const Footprint<T> f(loc[0], loc[1], H, W, pixel_stride);
          if (!f.inside) continue;
          T cw[4];
          f.corner_weights(cw);
          for (int k = 0; k < 4; ++k) {
            if (f.offset[k] < 0) continue;
            const T scale = *weight * cw[k];
            const T* __restrict__ v = level + f.offset[k];
            for (int64_t c = 0; c < D; ++c) out[c] += scale * v[c];
          }
        }
      }
    }
  });
}

// grad_value must be zero-filled; grad_sampling_locations and grad_attention_weights are fully
// overwritten.
template <typename T>
void backward(const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
              const T* sampling_locations, const T* attention_weights, const T* grad_output,
              T* grad_value, T* grad_sampling_locations, T* grad_attention_weights, int64_t N,
              int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P,
              int num_threads) {
  const int64_t pixel_stride = M * D;
  parallel_for(N * M, num_threads, [&](int64_t nm) {
    const int64_t m = nm % M, n = nm / M;
    const int64_t head_offset = n * S * pixel_stride + m * D;
    for (int64_t q = 0; q < Lq; ++q) {
      const int64_t nqm = (n * Lq + q) * M + m;
      const T* __restrict__ go = grad_output + nqm * D;
      int64_t sample = nqm * L * P;  // flat (n, q, m, l, p)
      for (int64_t l = 0; l < L; ++l) {
        const int H = static_cast<int>(spatial_shapes[2 * l]);
        const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
        const int64_t level_offset = head_offset + level_start_index[l] * pixel_stride;
        for (int64_t p = 0; p < P; ++p, ++sample) {
          const T weight = attention_weights[sample];
          const Footprint<T> f(sampling_locations[2 * sample], sampling_locations[2 * sample + 1],
                               H, W, pixel_stride);
          // dot[k] = sum_c grad_out[c] * corner_k[c]; zero for a corner outside the map.
          T dot[4] = {0, 0, 0, 0};
          if (f.inside) {
            T cw[4];
            f.corner_weights(cw);
            for (int k = 0; k < 4; ++k) {
              if (f.offset[k] < 0) continue;
              const T* __restrict__ v = value + level_offset + f.offset[k];
              T* __restrict__ gv = grad_value + level_offset + f.offset[k];
              const T scale = weight * cw[k];
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t c = 0; c < D; ++c) {
                acc += go[c] * v[c];
                gv[c] += scale * go[c];
              }
              dot[k] = acc;
            }
            grad_attention_weights[sample] =
                cw[0] * dot[0] + cw[1] * dot[1] + cw[2] * dot[2] + cw[3] * dot[3];
            // d sampled / d w and d h, times the weight; chain rule back to normalised
            // coordinates: dw/dx = W, dh/dy = H.
            const T hl = 1 - f.lh, wl = 1 - f.lw;
            const T g_w = weight * (hl * (dot[1] - dot[0]) + f.lh * (dot[3] - dot[2]));
            const T g_h = weight * (wl * (dot[2] - dot[0]) + f.lw * (dot[3] - dot[1]));
            grad_sampling_locations[2 * sample] = g_w * W;
            grad_sampling_locations[2 * sample + 1] = g_h * H;
          } else {
            grad_attention_weights[sample] = 0;
            grad_sampling_locations[2 * sample] = 0;
            grad_sampling_locations[2 * sample + 1] = 0;
          }
        }
      }
    }
  });
}

}  // namespace

// C entry points for ctypes.
#define MSDA_CPU_ENTRY_POINTS(T, SUFFIX)                                                       \
  extern "C" void msda_cpu_forward_##SUFFIX(                                                  \
      const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,       \
      const T* sampling_locations, const T* attention_weights, T* output, int64_t N,         \
      int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P, int num_threads) {  \
    forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, \
            output, N, S, M, D, Lq, L, P, num_threads);                                      \
  }                                                                                           \
  extern "C" void msda_cpu_backward_##SUFFIX(                                                 \
      const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,       \
      const T* sampling_locations, const T* attention_weights, const T* grad_output,         \
      T* grad_value, T* grad_sampling_locations, T* grad_attention_weights, int64_t N,       \
      int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P, int num_threads) {  \
    backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,\
             grad_output, grad_value, grad_sampling_locations, grad_attention_weights, N, S, \
             M, D, Lq, L, P, num_threads);                                                   \
  }

MSDA_CPU_ENTRY_POINTS(float, f32)
MSDA_CPU_ENTRY_POINTS(double, f64)
