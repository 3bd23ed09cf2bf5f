// Launch and reduction helpers of the HFF CUDA kernels (hff_attention_cuda.cu, hff_fused_tail_cuda.cu).
// Every reduction here has a fixed order (shared-memory trees and warp butterflies), so results do not
// depend on scheduling: no atomics.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

namespace medkernels {
namespace hff_cuda {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks of kThreads for a grid-stride loop over n elements, capped at a few waves of the device.
inline unsigned int elementwise_blocks(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

// Sum of v over the block (blockDim.x == kThreads, one-dimensional); every thread gets the result.
// `smem` holds kThreads values.
template <typename T>
__device__ inline T block_sum(T v, T* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const T total = smem[0];
  __syncthreads();
  return total;
}

// Sum over the 32 lanes of a warp (butterfly: every lane gets the same, order-fixed result).
template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace hff_cuda
}  // namespace medkernels
