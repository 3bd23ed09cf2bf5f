// Small helpers of the HFF CPU kernels (hff_attention_cpu.cpp, hff_fused_tail_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cpu_simd.h"

// The per-task bodies of the compute-heavy kernels are compiled twice, for AVX2 + FMA and for the baseline
// ISA of the build, and the AVX2 version runs when the CPU has it. Both sum in the same order; the AVX2 one
// may contract a * b + c into an FMA, so the two can differ in the last bit (each is deterministic). The
// guard (MK_CPU_X86_DISPATCH) and the target attributes come from common/cpu_simd.h.

namespace medkernels {
namespace hff_cpu {

// AVX-512 (used by the channel MLP's double loops only) and AVX2, as cpu_isa.h allows them.
inline bool use_avx512() {
#ifdef MK_CPU_X86_DISPATCH
  return cpu_use_avx512();
#else
  return false;
#endif
}

inline bool use_avx2() {
#ifdef MK_CPU_X86_DISPATCH
  return cpu_use_avx2();
#else
  return false;
#endif
}

// Independent partial sums per lane: the compiler vectorises the lane loop without being allowed to
// reorder floating-point additions, and the summation order stays fixed (deterministic). Few lanes keep
// the final combination cheap for the short sums over a tile.
constexpr int64_t kLanes = 8;

// sum over i < n of term(i), in kLanes interleaved partial sums combined in lane order.
template <typename acc_t, typename Term>
MK_CPU_INLINE acc_t lane_sum(int64_t n, Term&& term) {
  acc_t part[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) part[j] = acc_t(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) part[j] += term(i + j);
  }
  acc_t sum = acc_t(0);
  for (int64_t j = 0; j < kLanes; ++j) sum += part[j];
  for (; i < n; ++i) sum += term(i);
  return sum;
}

// Prefetches the n elements at p (for writing when kWrite): the row segments the kernels walk are short and
// one per page, which the hardware prefetchers do not follow.
template <int kWrite, typename T>
MK_CPU_INLINE void prefetch_span(const T* p, int64_t n) {
  constexpr int64_t step = std::max<int64_t>(1, int64_t(64) / int64_t(sizeof(T)));
  for (int64_t i = 0; i < n; i += step) __builtin_prefetch(p + i, kWrite);
  if (n > 0) __builtin_prefetch(p + n - 1, kWrite);
}

// Channels ahead of the current one whose row segments are prefetched.
constexpr int64_t kPrefetchAhead = 4;

// Pixel tiles of one image: `tiles` tiles of at most `tile` pixels.
struct PixelTiles {
  int64_t tile, tiles;
  PixelTiles(int64_t pixels, int64_t max_tile)
      : tile(std::max<int64_t>(1, std::min(pixels, max_tile))), tiles((pixels + tile - 1) / tile) {}
  int64_t begin(int64_t t) const { return t * tile; }
  int64_t size(int64_t t, int64_t pixels) const { return std::min(tile, pixels - t * tile); }
};

// Passes over fewer elements than this (about a millisecond of work) run on the calling thread: a parallel
// region costs tens of microseconds on an idle machine, but a whole scheduler time slice (milliseconds) when
// the machine is busy and an OpenMP worker has to wait for a core.
constexpr int64_t kSerialElements = int64_t(1) << 18;

// Grain of at::parallel_for over `items` items of `item_len` elements each: all of them (no parallel region)
// for a pass of fewer than kSerialElements elements, else chunks of at least ~32k elements.
inline int64_t work_grain(int64_t items, int64_t item_len) {
  item_len = std::max<int64_t>(1, item_len);
  if (items * item_len < kSerialElements) return std::max<int64_t>(1, items);
  return std::max<int64_t>(1, (int64_t(1) << 15) / item_len);
}

}  // namespace hff_cpu
}  // namespace medkernels
