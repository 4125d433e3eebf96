// Test harness, not part of the extension: compiles the kernels of
// models/ops/ms_deform_attn/src/ms_deform_attn_kernels.cuh for
// the host, so that tests/test_ms_deform_attn.py can check their index arithmetic, warp
// reductions and chain rule on machines without a GPU. The launch mirrors
// ms_deform_attn_cuda.cu (blocks of kThreadsPerBlock threads); the 32 lanes of a warp run on
// separate std::threads and meet at a barrier in every __shfl_xor_sync, as the lanes of a real
// warp do. A lane that leaves the kernel while others still shuffle (undefined
// behaviour on a GPU) is reported as an error.
//
//   c++ -std=c++20 -O1 -shared -fPIC -pthread -I models/ops/ms_deform_attn/src \
//       tests/harness/host_emulation.cpp -o host_emulation.so
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)

namespace {

struct UInt3 {
  unsigned int x = 0, y = 0, z = 0;
};
thread_local UInt3 blockIdx, threadIdx;
UInt3 blockDim;

constexpr int kLanes = 32;

struct Warp {
  std::barrier<> sync{kLanes};
  alignas(8) unsigned char slots[kLanes][8];
  std::atomic<bool> exited[kLanes] = {};
  std::atomic<bool> error = false;
};
thread_local Warp* warp = nullptr;
thread_local int lane_id = 0;

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu) warp->error = true;  // the kernels only use full-warp shuffles
  std::memcpy(warp->slots[lane_id], &value, sizeof(T));
  warp->sync.arrive_and_wait();
  const int source = lane_id ^ lane_mask;
  T result;
  std::memcpy(&result, warp->slots[source], sizeof(T));
  if (warp->exited[source]) warp->error = true;
  warp->sync.arrive_and_wait();
  return result;
}

std::mutex atomic_mutex;

template <typename T>
T atomicAdd(T* address, T value) {
  const std::lock_guard<std::mutex> lock(atomic_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}

}  // namespace

#include "ms_deform_attn_kernels.cuh"

namespace {

using ms_deform_attn::kernels::kThreadsPerBlock;

// Runs kernel() on num_threads rounded up to whole blocks; false when a shuffle went wrong.
// Lane k of every warp runs on the k-th of 32 std::threads; each warp has its own barrier.
template <typename Kernel>
bool launch(int64_t num_threads, const Kernel& kernel) {
  constexpr int warps_per_block = kThreadsPerBlock / kLanes;
  const int64_t num_blocks = (num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int64_t num_warps = num_blocks * warps_per_block;
  const std::unique_ptr<Warp[]> warps(new Warp[num_warps]);
  blockDim.x = kThreadsPerBlock;
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kLanes; ++lane) {
    lanes.emplace_back([&, lane] {
      lane_id = lane;
      for (int64_t w = 0; w < num_warps; ++w) {
        blockIdx.x = static_cast<unsigned int>(w / warps_per_block);
        threadIdx.x = static_cast<unsigned int>((w % warps_per_block) * kLanes + lane);
        warp = &warps[w];
        kernel();
        warp->exited[lane] = true;
        warp->sync.arrive_and_drop();
      }
    });
  }
  for (auto& lane : lanes) lane.join();
  for (int64_t w = 0; w < num_warps; ++w) {
    if (warps[w].error) return false;
  }
  return true;
}

template <typename T>
int forward(const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
            const T* sampling_locations, const T* attention_weights, T* output, int64_t N,
            int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t num_outputs = N * Lq * M * D;
  if (num_outputs == 0) return 0;
  const bool ok = launch(num_outputs, [&] {
    ms_deform_attn::kernels::forward_kernel<T>(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
        num_outputs, S, Lq, int(M), int(D), int(L), int(P));
  });
  return ok ? 0 : 1;
}

template <typename T>
int backward(const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
             const T* sampling_locations, const T* attention_weights, const T* grad_output,
             T* grad_value, T* grad_sampling_locations, T* grad_attention_weights, int64_t N,
             int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t num_groups = N * Lq * M;
  if (num_groups == 0 || D == 0) return 0;
  const int group_size = ms_deform_attn::kernels::backward_group_size(D);
  const bool ok = launch(num_groups * group_size, [&] {
    ms_deform_attn::kernels::backward_kernel<T>(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output, grad_value, grad_sampling_locations, grad_attention_weights, num_groups, S,
        Lq, int(M), int(D), int(L), int(P), group_size);
  });
  return ok ? 0 : 1;
}

}  // namespace

// C entry points for ctypes; the tensors are contiguous and laid out as in the extension.
#define MSDA_ENTRY_POINTS(T, SUFFIX)                                                            \
  extern "C" int msda_forward_##SUFFIX(const T* value, const int64_t* spatial_shapes,         \
                                       const int64_t* level_start_index,                      \
                                       const T* sampling_locations,                           \
                                       const T* attention_weights, T* output, int64_t N,      \
                                       int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, \
                                       int64_t P) {                                           \
    return forward(value, spatial_shapes, level_start_index, sampling_locations,              \
                   attention_weights, output, N, S, M, D, Lq, L, P);                          \
  }                                                                                           \
  extern "C" int msda_backward_##SUFFIX(                                                      \
      const T* value, const int64_t* spatial_shapes, const int64_t* level_start_index,       \
      const T* sampling_locations, const T* attention_weights, const T* grad_output,         \
      T* grad_value, T* grad_sampling_locations, T* grad_attention_weights, int64_t N,       \
      int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {                   \
    return backward(value, spatial_shapes, level_start_index, sampling_locations,            \
                    attention_weights, grad_output, grad_value, grad_sampling_locations,     \
                    grad_attention_weights, N, S, M, D, Lq, L, P);                           \
  }

MSDA_ENTRY_POINTS(float, f32)
MSDA_ENTRY_POINTS(double, f64)
