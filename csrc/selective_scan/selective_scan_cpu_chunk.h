// The chunk-level pieces of the CPU selective scan engine (selective_scan_cpu_kernels.cpp, which alone
// includes this header): the problem description, the per-task scratch buffers and the inlined helpers
// that gather, decay and scan one chunk of positions. See selective_scan_cpu_kernels.cpp for the layout.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/vec16.h"  // first: its -Wpsabi pragma must precede the v16f instantiations of the shared math
#include "selective_scan/selective_scan_math.h"
#include "common/cpu_simd.h"
#include "cross_scan/cross_scan.h"

namespace medkernels {
namespace {

// Positions per chunk: the chunk's (kChunk, N) buffers stay in L1 for N = 16, and the backward pass
// stores one state per channel and chunk boundary.
constexpr int64_t kChunk = 64;

// Everything the kernels read and write, as raw pointers, with the index math of both layouts.
// Plain scan: rows of u / delta / z / out are (b, d); B, C are (batch, groups, N, L); A row d.
// SS2D: u / out / du rows are (b, d), delta rows (b, k, d); B, C are (batch, 4, N, L) with L = H * W
// in pixel order; A row k * dim + d; position t of direction k reads pixel cross_scan_pixel(k, t, H, W).
template <typename T, typename acc_t>
struct ScanProblem {
  int64_t batch = 0, dim = 0, groups = 1, L = 0, N = 0, H = 0, W = 0;
  int64_t nsplit = 1;  // tasks sharing one group's channels
  bool ss2d = false, softplus = false;

  const T *u = nullptr, *delta = nullptr, *z = nullptr, *B = nullptr, *C = nullptr, *dout = nullptr;
  const acc_t *A = nullptr, *Dskip = nullptr, *bias = nullptr, *dlast = nullptr;

  T* out = nullptr;
  acc_t* last_state = nullptr;

  T *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dB = nullptr, *dC = nullptr;
  acc_t *dA_part = nullptr, *dD_part = nullptr, *dbias_part = nullptr;  // (batch, rows, N), (batch, rows)
  acc_t *dB_part = nullptr, *dC_part = nullptr;  // (batch, groups, nsplit, N, L) when nsplit > 1

  // Channels per group (the plain scan's dim / G; all dim channels for each SS2D direction).
  int64_t group_channels() const { return ss2d ? dim : dim / groups; }
  // Rows of A, D and delta_bias.
  int64_t rows() const { return ss2d ? groups * dim : dim; }
  int64_t a_row(int64_t g, int64_t d) const { return ss2d ? g * dim + d : d; }
  // Offset of the (b, d) row of u, out, du (and z, dz of the plain scan).
  int64_t channel_row(int64_t b, int64_t d) const { return (b * dim + d) * L; }
  // Offset of the row of delta / ddelta read by channel d of group g.
  int64_t delta_row(int64_t b, int64_t g, int64_t d) const {
    return ss2d ? ((b * groups + g) * dim + d) * L : (b * dim + d) * L;
  }
  int64_t bc_base(int64_t b, int64_t g) const { return (b * groups + g) * N * L; }
  // Whether group g walks consecutive memory (the plain scan, and SS2D's row-major direction 0).
  bool contiguous_walk(int64_t g) const { return !ss2d || g == 0; }
  int64_t pixel(int64_t g, int64_t t) const {
    return ss2d ? cross_scan_pixel(static_cast<int>(g), t, H, W) : t;
  }
  // First channel of split s of group g.
  int64_t split_begin(int64_t g, int64_t s) const {
    const int64_t cpg = group_channels();
    return (ss2d ? 0 : g * cpg) + (s * cpg) / nsplit;
  }
};

// Per-task scratch space.
template <typename acc_t>
struct Scratch {
  std::vector<int64_t> idx;                                // (kChunk,) memory offset of each position
  std::vector<int64_t> next_idx;                           // (kChunk,) the same for the chunk walked next
  int64_t next_len = 0;
  std::vector<acc_t> Bt, Ct, E, X, dBt, dCt;               // (kChunk, N)
  std::vector<acc_t> raw, dt, uv, gv, dtg, zv, dov, yv;    // (kChunk,)
  std::vector<acc_t> state;                                // (channels, N)
  std::vector<acc_t> bound;                                // (channels, chunks, N), backward only

  Scratch(int64_t N, int64_t channels) {
    idx.resize(kChunk);
    next_idx.resize(kChunk);
    for (auto* v : {&Bt, &Ct, &E, &X, &dBt, &dCt}) v->resize(kChunk * N);
    for (auto* v : {&raw, &dt, &uv, &gv, &dtg, &zv, &dov, &yv}) v->resize(kChunk);
    state.resize(channels * N);
  }
};

// The state size: the compile-time NC of the specialised kernels, else the run-time N.
template <int NC>
MK_CPU_INLINE int64_t state_size(int64_t N) {
  return NC > 0 ? NC : N;
}

template <typename T, typename acc_t>
MK_CPU_INLINE void gather_positions(const ScanProblem<T, acc_t>& P, int64_t g, int64_t c0, int64_t len,
                                   int64_t* idx) {
  if (!P.ss2d) {
    for (int64_t i = 0; i < len; ++i) idx[i] = c0 + i;
  } else {
    for (int64_t i = 0; i < len; ++i) idx[i] = P.pixel(g, c0 + i);
  }
}

// Positions of the chunk starting at c0 that is walked next (none when c0 is outside [0, L)), so that
// the channel rows it reads can be prefetched while the current chunk is computed: the rows of the many
// channels of a unit are walked in interleaved chunks, which the hardware prefetchers do not follow.
template <typename T, typename acc_t>
MK_CPU_INLINE void plan_next_chunk(const ScanProblem<T, acc_t>& P, int64_t g, int64_t c0, Scratch<acc_t>& w) {
  w.next_len = (c0 >= 0 && c0 < P.L) ? std::min(kChunk, P.L - c0) : 0;
  if (w.next_len > 0) gather_positions(P, g, c0, w.next_len, w.next_idx.data());
}

// Prefetches the rows channel d reads at the given positions: delta and u; z too for rows >= 1, and
// dout for rows == 2 (the backward's second sweep).
template <typename T, typename acc_t>
MK_CPU_INLINE void prefetch_channel(const ScanProblem<T, acc_t>& P, int64_t b, int64_t g, int64_t d,
                                   const int64_t* idx, int64_t len, int rows_kind) {
  if (len <= 0) return;
  // Column-major SS2D directions read one pixel per image row: every position is its own cache line.
  const int64_t step = (P.ss2d && (g & 1)) ? 1 : std::max<int64_t>(1, 64 / int64_t(sizeof(T)));
  const int64_t crow = P.channel_row(b, d);
  const T* rows[4] = {P.delta + P.delta_row(b, g, d), P.u + crow,
                      rows_kind >= 2 ? P.dout + crow : nullptr,
                      (rows_kind >= 1 && P.z != nullptr) ? P.z + crow : nullptr};
  for (const T* row : rows) {
    if (row == nullptr) continue;
    for (int64_t i = 0; i < len; i += step) __builtin_prefetch(row + idx[i]);
    __builtin_prefetch(row + idx[len - 1]);
  }
}

// While channel d of [d0, d1) works on the current chunk, prefetches the rows of the channel kAhead
// places later in the walk (possibly in the next chunk).
template <typename T, typename acc_t>
MK_CPU_INLINE void prefetch_ahead(const ScanProblem<T, acc_t>& P, int64_t b, int64_t g, int64_t d0,
                                 int64_t d1, int64_t d, const Scratch<acc_t>& w, int64_t len,
                                 int rows_kind) {
  constexpr int64_t kAhead = 2;
  const int64_t target = d + kAhead;
  if (target < d1) {
    prefetch_channel(P, b, g, target, w.idx.data(), len, rows_kind);
  } else if (d0 + (target - d1) < d1) {
    prefetch_channel(P, b, g, d0 + (target - d1), w.next_idx.data(), w.next_len, rows_kind);
  }
}

// dst[i] = row[idx[i]] in acc_t; `contiguous` says idx[i] = idx[0] + i (a plain copy that vectorises).
template <typename T, typename acc_t>
MK_CPU_INLINE void gather_row(const T* __restrict__ row, const int64_t* __restrict__ idx, int64_t len,
                             acc_t* __restrict__ dst, bool contiguous) {
  if (contiguous) {
    const T* __restrict__ src = row + idx[0];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      dst[i] = static_cast<acc_t>(src[i]);
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    dst[i] = static_cast<acc_t>(row[idx[i]]);
  }
}

// dst[i * N + n] = src[n * L + idx[i]]: the (N, L) rows of B or C at the chunk's positions, position-major.
template <typename T, typename acc_t>
MK_CPU_INLINE void gather_chunk(const T* __restrict__ src, const int64_t* __restrict__ idx, int64_t len,
                               int64_t N, int64_t L, acc_t* __restrict__ dst) {
  for (int64_t n = 0; n < N; ++n) {
    const T* row = src + n * L;
    for (int64_t i = 0; i < len; ++i) {
      dst[i * N + n] = static_cast<acc_t>(row[idx[i]]);
    }
  }
}

// Inverse of gather_chunk for the gradients: dst[n * L + idx[i]] = src[i * N + n].
template <typename out_t, typename acc_t>
MK_CPU_INLINE void scatter_chunk(const acc_t* __restrict__ src, const int64_t* __restrict__ idx,
                                int64_t len, int64_t N, int64_t L, out_t* __restrict__ dst) {
  for (int64_t n = 0; n < N; ++n) {
    out_t* row = dst + n * L;
    for (int64_t i = 0; i < len; ++i) {
      row[idx[i]] = static_cast<out_t>(src[i * N + n]);
    }
  }
}

// dt of one channel at the chunk's positions, from the raw delta values (vectorised, softplus included).
template <typename acc_t>
MK_CPU_INLINE void chunk_dt(const acc_t* __restrict__ raw, int64_t len, acc_t bias, bool softplus,
                           acc_t* __restrict__ dt) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    dt[i] = ss_dt<acc_t>(raw[i], bias, softplus);
  }
}

// The decays exp(dt_i * A_n) of one channel over the chunk: the exponentials of ss_state_step, computed
// once per (position, state) as vector calls over contiguous rows.
template <int NC, typename acc_t>
MK_CPU_INLINE void chunk_decays(const acc_t* __restrict__ dt, const acc_t* __restrict__ a, int64_t len,
                               int64_t N_, acc_t* __restrict__ E) {
  const int64_t N = state_size<NC>(N_);
  for (int64_t i = 0; i < len; ++i) {
    const acc_t dti = dt[i];
    acc_t* __restrict__ Ei = E + i * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      Ei[n] = mk_exp<acc_t>(dti * a[n]);
    }
  }
}

// Advances the N states x of one channel over the chunk, without outputs (backward, first sweep).
template <int NC, typename acc_t>
MK_CPU_INLINE void advance_states(acc_t* __restrict__ x_mem, const acc_t* __restrict__ E,
                                 const acc_t* __restrict__ Bt, const acc_t* __restrict__ dt,
                                 const acc_t* __restrict__ uv, int64_t len, int64_t N_) {
  const int64_t N = state_size<NC>(N_);
  acc_t local[NC > 0 ? NC : 1];
  acc_t* __restrict__ x = x_mem;
  if constexpr (NC > 0) {
    std::copy(x_mem, x_mem + NC, local);
    x = local;
  }
  for (int64_t i = 0; i < len; ++i) {
    const acc_t dti = dt[i], ui = uv[i];
    const acc_t* __restrict__ Ei = E + i * N;
    const acc_t* __restrict__ Bi = Bt + i * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      x[n] = ss_state_step_decayed<acc_t>(x[n], Ei[n], dti, Bi[n], ui);
    }
  }
  if constexpr (NC > 0) {
    std::copy(local, local + NC, x_mem);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward

// Advances the N states x of one channel over the chunk and writes y_i = sum_n C_i,n x_i,n.
template <int NC, typename acc_t>
MK_CPU_INLINE void scan_chunk_outputs_generic(acc_t* __restrict__ x_mem, const acc_t* __restrict__ E,
                                             const acc_t* __restrict__ Bt, const acc_t* __restrict__ Ct,
                                             const acc_t* __restrict__ dt, const acc_t* __restrict__ uv,
                                             int64_t begin, int64_t len, int64_t N_, acc_t* __restrict__ yv) {
  const int64_t N = state_size<NC>(N_);
  acc_t local[NC > 0 ? NC : 1];
  acc_t* __restrict__ x = x_mem;
  if constexpr (NC > 0) {
    std::copy(x_mem, x_mem + NC, local);
    x = local;
  }
  for (int64_t i = begin; i < len; ++i) {
    const acc_t dti = dt[i], ui = uv[i];
    const acc_t* __restrict__ Ei = E + i * N;
    const acc_t* __restrict__ Bi = Bt + i * N;
    const acc_t* __restrict__ Ci = Ct + i * N;
    acc_t y = acc_t(0);
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const acc_t xn = ss_state_step_decayed<acc_t>(x[n], Ei[n], dti, Bi[n], ui);
      x[n] = xn;
      y += Ci[n] * xn;
    }
    yv[i] = y;
  }
  if constexpr (NC > 0) {
    std::copy(local, local + NC, x_mem);
  }
}


// Whether scan_chunk_outputs takes its N = 16 float path, which computes the decays itself.
template <int NC, typename acc_t>
constexpr bool kFusedDecays16 =
#ifdef MK_HAVE_V16
    NC == 16 && std::is_same_v<acc_t, float>;
#else
    false;
#endif

// Positions of a chunk of `len` that the N = 16 float path handles (whole blocks of 16).
template <int NC, typename acc_t>
MK_CPU_INLINE int64_t fused_decay_positions(int64_t len) {
  return kFusedDecays16<NC, acc_t> ? len / 16 * 16 : 0;
}

// scan_chunk_outputs_generic over the chunk.  For N = 16 in float, blocks of 16 positions take a
// path that computes the decays exp(dt_i * a) in registers (E is then only read from position
// fused_decay_positions(len) on) and reduces the block's 16 dot products C_i . x_i together.
template <int NC, typename acc_t>
MK_CPU_INLINE void scan_chunk_outputs(acc_t* __restrict__ x_mem, const acc_t* __restrict__ a,
                                     const acc_t* __restrict__ E, const acc_t* __restrict__ Bt,
                                     const acc_t* __restrict__ Ct, const acc_t* __restrict__ dt,
                                     const acc_t* __restrict__ uv, int64_t len, int64_t N,
                                     acc_t* __restrict__ yv) {
  const int64_t done = fused_decay_positions<NC, acc_t>(len);
#ifdef MK_HAVE_V16
  if constexpr (kFusedDecays16<NC, acc_t>) {
    const v16f av = v16_load(a);
    v16f x = v16_load(x_mem);
    for (int64_t i0 = 0; i0 < done; i0 += 16) {
      v16f prod[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t i = i0 + j;
        const v16f dti = v16_splat(dt[i]);
        x = ss_state_step_decayed<v16f>(x, v16_exp(dti * av), dti, v16_load(Bt + i * 16), v16_splat(uv[i]));
        prod[j] = v16_load(Ct + i * 16) * x;
      }
      v16_store(yv + i0, v16_sum_each_of_16(prod));
    }
    v16_store(x_mem, x);
  }
#endif
  if (done < len) {
    scan_chunk_outputs_generic<NC>(x_mem, E, Bt, Ct, dt, uv, done, len, N, yv);
  }
}

}  // namespace
}  // namespace medkernels
