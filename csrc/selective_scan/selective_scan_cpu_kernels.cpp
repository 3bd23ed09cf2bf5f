// CPU kernels of the selective scan (mamba_ssm's selective_scan_fn, real A) and of the fused SS2D scan
// (MedMamba's four directions walked in place).  The per-element formulas come from
// selective_scan_math.h, shared with the CUDA kernels; the SS2D walk uses cross_scan.h.
//
// Work layout.  A "unit" is one batch element b, one group g of channels sharing B and C (a group of the
// plain scan, a direction of SS2D) and a block [d0, d1) of that group's channels.  The sequence is walked
// in chunks of kChunk positions: per chunk, B and C of the group are gathered once into small
// position-major (kChunk, N) buffers in acc_t (so the n-loops read contiguous memory and vectorise),
// then every channel of the block advances its N states over the chunk.  States live in a
// (channels, N) buffer of the task, so nothing of size (batch, dim, L, N) is ever stored.
//
// Backward.  Per unit, a first forward sweep saves each channel's state at every chunk boundary; the
// chunks are then walked in reverse: the chunk's decays exp(dt * A) and states are recomputed from the
// saved boundary state into (kChunk, N) buffers, and the reverse recurrence runs over them.  dB / dC of a
// group are summed over the group's channels inside the unit; when a group's channels are split over
// several tasks (to use all threads), each task writes its own partial buffer and a final pass sums
// them in a fixed order, so results do not depend on scheduling.  dA, dD and ddelta_bias are summed
// per (batch, row) and reduced over the batch at the end, likewise in a fixed order.
//
// Vectorisation.  The hot n-loops call expf / exp through selective_scan_math.h.  glibc declares the
// SIMD variants of expf / exp (libmvec) only under -ffast-math; common/cpu_simd.h declares them (this
// file opts in with MK_CPU_LIBMVEC) so that `#pragma omp simd` loops call the vector versions (a few ulp,
// as the scalar ones) without fast-math semantics anywhere else.  The task bodies are compiled for
// AVX-512, for AVX2+FMA and for the baseline ISA, and the best one that cpu_use_avx512() / cpu_use_avx2()
// allow is picked at run time.
//
// Files.  selective_scan_cpu_chunk.h: the problem, scratch and chunk helpers; this file: the units and
// tasks, their ISA variants and the drivers (scan_forward / scan_backward of selective_scan_cpu.h);
// selective_scan_cpu.cpp and ss2d_scan_cpu.cpp: the two ops' checks and entry points.

#define MK_CPU_LIBMVEC 1  // vector expf / exp / log1p (common/cpu_simd.h)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/check_message.h"
#include "common/cpu_isa.h"
#include "common/checks.h"
#include "cross_scan/cross_scan.h"
#include "common/vec16.h"  // first: its -Wpsabi pragma must precede the v16f instantiations of the shared math
#include "selective_scan/selective_scan_math.h"
#include "common/cpu_simd.h"
#include "selective_scan/selective_scan_cpu.h"
#include "selective_scan/selective_scan_cpu_chunk.h"

namespace medkernels {
namespace {

using scan_cpu::ScanShapes;

// One unit: channels [d0, d1) of group g of batch element b.  With `accum` (SS2D: (d1 - d0, L) in acc_t,
// pixel order) the outputs are added there; otherwise they are written to P.out.
template <int NC, typename T, typename acc_t>
MK_CPU_INLINE void forward_unit(const ScanProblem<T, acc_t>& P, int64_t b, int64_t g, int64_t d0,
                               int64_t d1, Scratch<acc_t>& w, acc_t* accum) {
  const int64_t L = P.L, N = state_size<NC>(P.N), nch = d1 - d0;
  acc_t* states = w.state.data();
  std::fill(states, states + nch * N, acc_t(0));
  const T* Bg = P.B + P.bc_base(b, g);
  const T* Cg = P.C + P.bc_base(b, g);
  int64_t* idx = w.idx.data();
  acc_t* __restrict__ Bt = w.Bt.data();
  acc_t* __restrict__ Ct = w.Ct.data();
  acc_t* __restrict__ E = w.E.data();
  acc_t* __restrict__ raw = w.raw.data();
  acc_t* __restrict__ dt = w.dt.data();
  acc_t* __restrict__ uv = w.uv.data();
  acc_t* __restrict__ zv = w.zv.data();
  acc_t* __restrict__ yv = w.yv.data();
  const bool has_z = P.z != nullptr;
  const bool contig = P.contiguous_walk(g);

  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t len = std::min(kChunk, L - c0);
    gather_positions(P, g, c0, len, idx);
    plan_next_chunk(P, g, c0 + kChunk, w);
    gather_chunk(Bg, idx, len, N, L, Bt);
    gather_chunk(Cg, idx, len, N, L, Ct);
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t ar = P.a_row(g, d);
      const acc_t* __restrict__ a = P.A + ar * N;
      const acc_t dskip = P.Dskip ? P.Dskip[ar] : acc_t(0);
      const acc_t bias = P.bias ? P.bias[ar] : acc_t(0);
      const int64_t crow = P.channel_row(b, d);
      const T* delta_row = P.delta + P.delta_row(b, g, d);
      gather_row(delta_row, idx, len, raw, contig);
      gather_row(P.u + crow, idx, len, uv, contig);
      if (has_z) gather_row(P.z + crow, idx, len, zv, contig);
      prefetch_ahead(P, b, g, d0, d1, d, w, len, /*rows_kind=*/1);
      chunk_dt(raw, len, bias, P.softplus, dt);
      const int64_t fused = fused_decay_positions<NC, acc_t>(len);
      chunk_decays<NC>(dt + fused, a, len - fused, N, E + fused * N);
      scan_chunk_outputs<NC>(states + (d - d0) * N, a, E, Bt, Ct, dt, uv, len, N, yv);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        yv[i] = ss_output<acc_t>(yv[i], uv[i], dskip, has_z, has_z ? zv[i] : acc_t(0));
      }
      if (accum != nullptr) {
        acc_t* row = accum + (d - d0) * L;
        for (int64_t i = 0; i < len; ++i) row[idx[i]] += yv[i];
      } else if (contig) {
        T* __restrict__ row = P.out + crow + c0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) row[i] = static_cast<T>(yv[i]);
      } else {
        T* row = P.out + crow;
        for (int64_t i = 0; i < len; ++i) row[idx[i]] = static_cast<T>(yv[i]);
      }
    }
  }
  if (P.last_state != nullptr) {
    for (int64_t d = d0; d < d1; ++d) {
      std::copy(states + (d - d0) * N, states + (d - d0 + 1) * N, P.last_state + (b * P.dim + d) * N);
    }
  }
}

template <int NC, typename T, typename acc_t>
MK_CPU_INLINE void forward_task(const ScanProblem<T, acc_t>& P, int64_t task) {
  const int64_t s = task % P.nsplit;
  const int64_t rest = task / P.nsplit;
  if (!P.ss2d) {
    const int64_t g = rest % P.groups, b = rest / P.groups;
    const int64_t d0 = P.split_begin(g, s), d1 = P.split_begin(g, s + 1);
    if (d1 == d0) return;
    Scratch<acc_t> w(P.N, d1 - d0);
    forward_unit<NC>(P, b, g, d0, d1, w, static_cast<acc_t*>(nullptr));
  } else {
    const int64_t b = rest;
    const int64_t d0 = P.split_begin(0, s), d1 = P.split_begin(0, s + 1);
    if (d1 == d0) return;
    Scratch<acc_t> w(P.N, d1 - d0);
    // The four directions' outputs are summed in acc_t and rounded once.
    std::vector<acc_t> accum((d1 - d0) * P.L, acc_t(0));
    for (int64_t k = 0; k < P.groups; ++k) {
      forward_unit<NC>(P, b, k, d0, d1, w, accum.data());
    }
    T* out = P.out + P.channel_row(b, d0);
    for (int64_t j = 0; j < (d1 - d0) * P.L; ++j) {
      out[j] = static_cast<T>(accum[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward

// Per-channel sums of one unit: dA (channels, N), dD and ddelta_bias (channels).
template <typename acc_t>
struct ParamGrads {
  std::vector<acc_t> dA, dD, dbias;
  ParamGrads(int64_t channels, int64_t N) : dA(channels * N), dD(channels), dbias(channels) {}
  void clear() {
    std::fill(dA.begin(), dA.end(), acc_t(0));
    std::fill(dD.begin(), dD.end(), acc_t(0));
    std::fill(dbias.begin(), dbias.end(), acc_t(0));
  }
};

// One unit, as forward_unit.  With `du_accum` (SS2D: (d1 - d0, L) acc_t, pixel order) du is added
// there, otherwise written to P.du.  Split s of the group selects the dB / dC partial buffer.
template <int NC, typename T, typename acc_t>
MK_CPU_INLINE void backward_unit(const ScanProblem<T, acc_t>& P, int64_t b, int64_t g, int64_t s,
                                int64_t d0, int64_t d1, Scratch<acc_t>& w, ParamGrads<acc_t>& pg,
                                acc_t* du_accum) {
  const int64_t L = P.L, N = state_size<NC>(P.N), nch = d1 - d0;
  const int64_t nchunks = (L + kChunk - 1) / kChunk;
  const T* Bg = P.B + P.bc_base(b, g);
  const T* Cg = P.C + P.bc_base(b, g);
  int64_t* idx = w.idx.data();
  acc_t* __restrict__ Bt = w.Bt.data();
  acc_t* __restrict__ Ct = w.Ct.data();
  acc_t* __restrict__ E = w.E.data();
  acc_t* __restrict__ X = w.X.data();
  acc_t* __restrict__ dBt = w.dBt.data();
  acc_t* __restrict__ dCt = w.dCt.data();
  acc_t* __restrict__ raw = w.raw.data();
  acc_t* __restrict__ dt = w.dt.data();
  acc_t* __restrict__ uv = w.uv.data();
  acc_t* __restrict__ gv = w.gv.data();
  acc_t* __restrict__ dtg = w.dtg.data();
  acc_t* __restrict__ zv = w.zv.data();
  acc_t* __restrict__ dov = w.dov.data();
  acc_t* __restrict__ yv = w.yv.data();
  const bool has_z = P.z != nullptr;
  const bool contig = P.contiguous_walk(g);

  // Sweep 1: the state of every channel before each chunk.
  w.bound.resize(nch * nchunks * N);
  acc_t* bound = w.bound.data();
  acc_t* states = w.state.data();
  std::fill(states, states + nch * N, acc_t(0));
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * kChunk, len = std::min(kChunk, L - c0);
    for (int64_t j = 0; j < nch; ++j) {
      std::copy(states + j * N, states + (j + 1) * N, bound + (j * nchunks + c) * N);
    }
    if (c == nchunks - 1) break;  // the last chunk's end state is not needed
    gather_positions(P, g, c0, len, idx);
    plan_next_chunk(P, g, c0 + kChunk, w);
    gather_chunk(Bg, idx, len, N, L, Bt);
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t ar = P.a_row(g, d);
      const acc_t bias = P.bias ? P.bias[ar] : acc_t(0);
      const T* delta_row = P.delta + P.delta_row(b, g, d);
      const T* u_row = P.u + P.channel_row(b, d);
      gather_row(delta_row, idx, len, raw, contig);
      gather_row(u_row, idx, len, uv, contig);
      prefetch_ahead(P, b, g, d0, d1, d, w, len, /*rows_kind=*/0);
      chunk_dt(raw, len, bias, P.softplus, dt);
      chunk_decays<NC>(dt, P.A + ar * N, len, N, E);
      advance_states<NC>(states + (d - d0) * N, E, Bt, dt, uv, len, N);
    }
  }

  // Sweep 2, chunks in reverse.  `states` now carries, per channel, exp(dt_t * A) * h_t for the first
  // position t of the chunk processed last, i.e. the part of h_{t-1} coming from the future; it starts
  // as d last_state (h_{L-1} gets it directly).
  for (int64_t d = d0; d < d1; ++d) {
    acc_t* h = states + (d - d0) * N;
    if (P.dlast != nullptr) {
      std::copy(P.dlast + (b * P.dim + d) * N, P.dlast + (b * P.dim + d + 1) * N, h);
    } else {
      std::fill(h, h + N, acc_t(0));
    }
  }
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t c0 = c * kChunk, len = std::min(kChunk, L - c0);
    gather_positions(P, g, c0, len, idx);
    plan_next_chunk(P, g, c0 - kChunk, w);
    gather_chunk(Bg, idx, len, N, L, Bt);
    gather_chunk(Cg, idx, len, N, L, Ct);
    std::fill(dBt, dBt + len * N, acc_t(0));
    std::fill(dCt, dCt + len * N, acc_t(0));
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t j = d - d0;
      const int64_t ar = P.a_row(g, d);
      const acc_t* __restrict__ a = P.A + ar * N;
      const acc_t dskip = P.Dskip ? P.Dskip[ar] : acc_t(0);
      const acc_t bias = P.bias ? P.bias[ar] : acc_t(0);
      const bool softplus = P.softplus;
      const int64_t crow = P.channel_row(b, d);
      const int64_t drow = P.delta_row(b, g, d);

      gather_row(P.delta + drow, idx, len, raw, contig);
      gather_row(P.u + crow, idx, len, uv, contig);
      gather_row(P.dout + crow, idx, len, dov, contig);
      if (has_z) gather_row(P.z + crow, idx, len, zv, contig);
      prefetch_ahead(P, b, g, d0, d1, d, w, len, /*rows_kind=*/2);
      chunk_dt(raw, len, bias, softplus, dt);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        dtg[i] = ss_dt_grad<acc_t>(raw[i], bias, softplus);
      }
      if (has_z) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          gv[i] = dov[i] * ss_silu<acc_t>(zv[i]);
        }
      } else {
        std::copy(dov, dov + len, gv);
      }
      chunk_decays<NC>(dt, a, len, N, E);

      // The chunk's states, recomputed from the boundary state, and y = C . x where z needs it.
      const acc_t* x0 = bound + (j * nchunks + c) * N;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t dti = dt[i], ui = uv[i];
        const acc_t* __restrict__ xp = i == 0 ? x0 : X + (i - 1) * N;
        const acc_t* __restrict__ Ei = E + i * N;
        const acc_t* __restrict__ Bi = Bt + i * N;
        const acc_t* __restrict__ Ci = Ct + i * N;
        acc_t* __restrict__ Xi = X + i * N;
        acc_t y = acc_t(0);
#pragma omp simd reduction(+ : y)
        for (int64_t n = 0; n < N; ++n) {
          const acc_t xn = ss_state_step_decayed<acc_t>(xp[n], Ei[n], dti, Bi[n], ui);
          Xi[n] = xn;
          y += Ci[n] * xn;
        }
        yv[i] = y;
      }

      // Reverse recurrence; h (and dA) in locals for the specialised state sizes.
      acc_t* h_mem = states + j * N;
      acc_t* dA_mem = pg.dA.data() + j * N;
      acc_t h_local[NC > 0 ? NC : 1], dA_local[NC > 0 ? NC : 1];
      acc_t* __restrict__ h = h_mem;
      acc_t* __restrict__ dA = dA_mem;
      if constexpr (NC > 0) {
        std::copy(h_mem, h_mem + NC, h_local);
        std::copy(dA_mem, dA_mem + NC, dA_local);
        h = h_local;
        dA = dA_local;
      }
      for (int64_t i = len - 1; i >= 0; --i) {
        const acc_t dti = dt[i], ui = uv[i], gi = gv[i];
        const acc_t dtu = dti * ui;
        const acc_t* __restrict__ xp = i == 0 ? x0 : X + (i - 1) * N;
        const acc_t* __restrict__ Xi = X + i * N;
        const acc_t* __restrict__ Ei = E + i * N;
        const acc_t* __restrict__ Bi = Bt + i * N;
        const acc_t* __restrict__ Ci = Ct + i * N;
        acc_t* __restrict__ dBi = dBt + i * N;
        acc_t* __restrict__ dCi = dCt + i * N;
        acc_t hB = acc_t(0), qA = acc_t(0);
#pragma omp simd reduction(+ : hB, qA)
        for (int64_t n = 0; n < N; ++n) {
          const acc_t hn = h[n] + gi * Ci[n];  // h_t
          dCi[n] += gi * Xi[n];
          dBi[n] += hn * dtu;
          hB += hn * Bi[n];
          const acc_t q = hn * xp[n] * Ei[n];  // h_t x_{t-1} exp(dt_t A)
          qA += q * a[n];
          dA[n] += q * dti;
          h[n] = hn * Ei[n];  // carried to t - 1
        }
        // du and ddelta for position i (yv becomes du, raw becomes ddelta).
        yv[i] = has_z ? dov[i] * ss_output<acc_t>(yv[i], ui, dskip, false, acc_t(0)) *
                            ss_silu_grad<acc_t>(zv[i])
                      : acc_t(0);
        raw[i] = (qA + ui * hB) * dtg[i];
        gv[i] = gi * dskip + dti * hB;
        dov[i] = gi * ui;  // summand of dD
      }
      if constexpr (NC > 0) {
        std::copy(h_local, h_local + NC, h_mem);
        std::copy(dA_local, dA_local + NC, dA_mem);
      }
      // raw = ddelta, gv = du, yv = dz, dov = dD summands.
      acc_t dD = acc_t(0), dbias = acc_t(0);
      for (int64_t i = 0; i < len; ++i) {
        dD += dov[i];
        dbias += raw[i];
      }
      pg.dD[j] += dD;
      pg.dbias[j] += dbias;
      {
        T* row = P.ddelta + drow;
        for (int64_t i = 0; i < len; ++i) row[idx[i]] = static_cast<T>(raw[i]);
      }
      if (du_accum != nullptr) {
        acc_t* row = du_accum + j * L;
        for (int64_t i = 0; i < len; ++i) row[idx[i]] += gv[i];
      } else {
        T* row = P.du + crow;
        for (int64_t i = 0; i < len; ++i) row[idx[i]] = static_cast<T>(gv[i]);
      }
      if (has_z) {
        T* row = P.dz + crow;
        for (int64_t i = 0; i < len; ++i) row[idx[i]] = static_cast<T>(yv[i]);
      }
    }
    // The group's dB / dC at this chunk, summed over the unit's channels.
    if (P.nsplit == 1) {
      scatter_chunk(dBt, idx, len, N, L, P.dB + P.bc_base(b, g));
      scatter_chunk(dCt, idx, len, N, L, P.dC + P.bc_base(b, g));
    } else {
      const int64_t part = ((b * P.groups + g) * P.nsplit + s) * N * L;
      scatter_chunk(dBt, idx, len, N, L, P.dB_part + part);
      scatter_chunk(dCt, idx, len, N, L, P.dC_part + part);
    }
  }
}

template <typename T, typename acc_t>
MK_CPU_INLINE void store_param_grads(const ScanProblem<T, acc_t>& P, int64_t b, int64_t g, int64_t d0,
                                    int64_t d1, const ParamGrads<acc_t>& pg) {
  const int64_t N = P.N, rows = P.rows();
  for (int64_t d = d0; d < d1; ++d) {
    const int64_t j = d - d0, ar = P.a_row(g, d);
    std::copy(pg.dA.begin() + j * N, pg.dA.begin() + (j + 1) * N, P.dA_part + (b * rows + ar) * N);
    P.dD_part[b * rows + ar] = pg.dD[j];
    P.dbias_part[b * rows + ar] = pg.dbias[j];
  }
}

// An empty split still owns its (zero) partial dB / dC.
template <typename T, typename acc_t>
MK_CPU_INLINE void zero_split_parts(const ScanProblem<T, acc_t>& P, int64_t b, int64_t g, int64_t s) {
  if (P.nsplit == 1) return;
  const int64_t part = ((b * P.groups + g) * P.nsplit + s) * P.N * P.L;
  std::fill(P.dB_part + part, P.dB_part + part + P.N * P.L, acc_t(0));
  std::fill(P.dC_part + part, P.dC_part + part + P.N * P.L, acc_t(0));
}

template <int NC, typename T, typename acc_t>
MK_CPU_INLINE void backward_task(const ScanProblem<T, acc_t>& P, int64_t task) {
  const int64_t s = task % P.nsplit;
  const int64_t rest = task / P.nsplit;
  if (!P.ss2d) {
    const int64_t g = rest % P.groups, b = rest / P.groups;
    const int64_t d0 = P.split_begin(g, s), d1 = P.split_begin(g, s + 1);
    if (d1 == d0) {
      zero_split_parts(P, b, g, s);
      return;
    }
    Scratch<acc_t> w(P.N, d1 - d0);
    ParamGrads<acc_t> pg(d1 - d0, P.N);
    backward_unit<NC>(P, b, g, s, d0, d1, w, pg, static_cast<acc_t*>(nullptr));
    store_param_grads(P, b, g, d0, d1, pg);
  } else {
    const int64_t b = rest;
    const int64_t d0 = P.split_begin(0, s), d1 = P.split_begin(0, s + 1);
    if (d1 == d0) {
      for (int64_t k = 0; k < P.groups; ++k) zero_split_parts(P, b, k, s);
      return;
    }
    Scratch<acc_t> w(P.N, d1 - d0);
    ParamGrads<acc_t> pg(d1 - d0, P.N);
    // du sums the four directions in acc_t and is rounded once.
    std::vector<acc_t> du_accum((d1 - d0) * P.L, acc_t(0));
    for (int64_t k = 0; k < P.groups; ++k) {
      pg.clear();
      backward_unit<NC>(P, b, k, s, d0, d1, w, pg, du_accum.data());
      store_param_grads(P, b, k, d0, d1, pg);
    }
    T* du = P.du + P.channel_row(b, d0);
    for (int64_t j = 0; j < (d1 - d0) * P.L; ++j) {
      du[j] = static_cast<T>(du_accum[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// ISA dispatch: the task bodies (always inlined) compiled for AVX2+FMA and for the baseline, each with
// the state size 16 (MedMamba's and Mamba's d_state) fixed at compile time and for any N.

template <int NC, typename T, typename acc_t>
void forward_task_generic(const ScanProblem<T, acc_t>& P, int64_t task) {
  forward_task<NC>(P, task);
}
template <int NC, typename T, typename acc_t>
void backward_task_generic(const ScanProblem<T, acc_t>& P, int64_t task) {
  backward_task<NC>(P, task);
}

#ifdef MK_CPU_X86_DISPATCH
template <int NC, typename T, typename acc_t>
MK_CPU_TARGET_AVX2 void forward_task_avx2(const ScanProblem<T, acc_t>& P, int64_t task) {
  forward_task<NC>(P, task);
}
template <int NC, typename T, typename acc_t>
MK_CPU_TARGET_AVX2 void backward_task_avx2(const ScanProblem<T, acc_t>& P, int64_t task) {
  backward_task<NC>(P, task);
}

template <int NC, typename T, typename acc_t>
MK_CPU_TARGET_AVX512 void forward_task_avx512(const ScanProblem<T, acc_t>& P, int64_t task) {
  forward_task<NC>(P, task);
}
template <int NC, typename T, typename acc_t>
MK_CPU_TARGET_AVX512 void backward_task_avx512(const ScanProblem<T, acc_t>& P, int64_t task) {
  backward_task<NC>(P, task);
}

#endif

template <typename T, typename acc_t>
using TaskFn = void (*)(const ScanProblem<T, acc_t>&, int64_t);

template <int NC, typename T, typename acc_t>
TaskFn<T, acc_t> pick_task(bool backward) {
#ifdef MK_CPU_X86_DISPATCH
  if (cpu_use_avx512()) {
    return backward ? &backward_task_avx512<NC, T, acc_t> : &forward_task_avx512<NC, T, acc_t>;
  }
  if (cpu_use_avx2()) {
    return backward ? &backward_task_avx2<NC, T, acc_t> : &forward_task_avx2<NC, T, acc_t>;
  }
#endif
  return backward ? &backward_task_generic<NC, T, acc_t> : &forward_task_generic<NC, T, acc_t>;
}

template <typename T, typename acc_t>
void run_tasks(const ScanProblem<T, acc_t>& P, int64_t ntasks, bool backward) {
  const TaskFn<T, acc_t> task_fn = P.N == 16 ? pick_task<16, T, acc_t>(backward)
                                             : pick_task<0, T, acc_t>(backward);
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) task_fn(P, t);
  });
}

// How many tasks share one group's channels: enough tasks for every thread, no more (a split group's
// backward needs partial dB / dC buffers).
int64_t choose_nsplit(int64_t base_tasks, int64_t group_channels) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (base_tasks <= 0 || group_channels <= 1 || base_tasks >= threads) return 1;
  return std::min(group_channels, (threads + base_tasks - 1) / base_tasks);
}

// dB[b, g, n, p] = sum over splits of part[b, g, s, n, p], in split order.
template <typename T, typename acc_t>
void reduce_split_parts(const acc_t* part, T* out, int64_t batch_groups, int64_t nsplit, int64_t NL) {
  at::parallel_for(0, batch_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const acc_t* src = part + bg * nsplit * NL;
      T* dst = out + bg * NL;
      for (int64_t e = 0; e < NL; ++e) {
        acc_t v = src[e];
        for (int64_t s = 1; s < nsplit; ++s) v += src[s * NL + e];
        dst[e] = static_cast<T>(v);
      }
    }
  });
}

// dA[r, n] = sum over b of part[b, r, n], in batch order (likewise dD, ddelta_bias with n = 1).
template <typename acc_t>
void reduce_over_batch(const acc_t* part, acc_t* out, int64_t batch, int64_t size) {
  for (int64_t e = 0; e < size; ++e) {
    acc_t v = acc_t(0);
    for (int64_t b = 0; b < batch; ++b) v += part[b * size + e];
    out[e] = v;
  }
}

template <typename T>
const T* data_or_null(const at::Tensor* t) {
  return t != nullptr ? t->const_data_ptr<T>() : nullptr;
}

template <typename T, typename acc_t>
void fill_inputs(ScanProblem<T, acc_t>& P, const ScanShapes& s, bool ss2d, bool softplus,
                 const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const at::Tensor* D_skip, const at::Tensor* z,
                 const at::Tensor* delta_bias) {
  P.batch = s.batch;
  P.dim = s.dim;
  P.groups = s.groups;
  P.L = s.L;
  P.N = s.N;
  P.H = s.H;
  P.W = s.W;
  P.ss2d = ss2d;
  P.softplus = softplus;
  P.u = u.const_data_ptr<T>();
  P.delta = delta.const_data_ptr<T>();
  P.B = B.const_data_ptr<T>();
  P.C = C.const_data_ptr<T>();
  P.z = data_or_null<T>(z);
  P.A = A.const_data_ptr<acc_t>();
  P.Dskip = data_or_null<acc_t>(D_skip);
  P.bias = data_or_null<acc_t>(delta_bias);
  P.nsplit = choose_nsplit(ss2d ? s.batch : s.batch * s.groups, ss2d ? s.dim : s.dim / s.groups);
}

int64_t task_count(const ScanShapes& s, bool ss2d, int64_t nsplit) {
  return (ss2d ? s.batch : s.batch * s.groups) * nsplit;
}

}  // namespace

namespace scan_cpu {

// Runs the forward pass of either op into out (and last_state, the plain scan's, when given).
void scan_forward(bool ss2d, const ScanShapes& s, bool softplus, const at::Tensor& u, const at::Tensor& delta,
                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor* D_skip,
                  const at::Tensor* z, const at::Tensor* delta_bias, at::Tensor& out, at::Tensor* last_state) {
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    using acc_t = at::opmath_type<T>;
    ScanProblem<T, acc_t> P;
    fill_inputs(P, s, ss2d, softplus, u, delta, A, B, C, D_skip, z, delta_bias);
    P.out = out.mutable_data_ptr<T>();
    if (last_state != nullptr) P.last_state = last_state->mutable_data_ptr<acc_t>();
    run_tasks(P, task_count(s, ss2d, P.nsplit), /*backward=*/false);
  };
  // (one dispatch per op, under the op's name)
  if (ss2d) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "ss2d_scan_fwd_cpu",
                                    [&] { run(scalar_t()); });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_fwd_cpu",
                                    [&] { run(scalar_t()); });
  }
}

// Runs the backward pass of either op into freshly allocated gradients:
// {du, ddelta, dA, dB, dC, dD, ddelta_bias, dz} (dz undefined unless z is given).
std::vector<at::Tensor> scan_backward(const char* op, bool ss2d, const ScanShapes& s,
                                      const at::Tensor& dout, const at::Tensor* dlast,
                                      const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor* D_skip,
                                      const at::Tensor* z, const at::Tensor* delta_bias,
                                      bool softplus) {
  at::Tensor du = at::empty_like(u);
  at::Tensor ddelta = at::empty_like(delta);
  at::Tensor dB = at::empty_like(B);
  at::Tensor dC = at::empty_like(C);
  at::Tensor dz = z != nullptr ? at::empty_like(*z) : at::Tensor();
  at::Tensor dA = at::empty_like(A);
  at::Tensor dD = at::empty({A.size(0)}, A.options());
  at::Tensor dbias = at::empty({A.size(0)}, A.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_cpu_backward", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<scalar_t>;
    ScanProblem<T, acc_t> P;
    fill_inputs(P, s, ss2d, softplus, u, delta, A, B, C, D_skip, z, delta_bias);
    P.dout = dout.const_data_ptr<T>();
    P.dlast = data_or_null<acc_t>(dlast);
    P.du = du.mutable_data_ptr<T>();
    P.ddelta = ddelta.mutable_data_ptr<T>();
    P.dB = dB.mutable_data_ptr<T>();
    P.dC = dC.mutable_data_ptr<T>();
    P.dz = z != nullptr ? dz.mutable_data_ptr<T>() : nullptr;
    const int64_t rows = P.rows();
    at::Tensor dA_part = at::zeros({s.batch, rows, s.N}, A.options());
    at::Tensor dD_part = at::zeros({s.batch, rows}, A.options());
    at::Tensor dbias_part = at::zeros({s.batch, rows}, A.options());
    P.dA_part = dA_part.mutable_data_ptr<acc_t>();
    P.dD_part = dD_part.mutable_data_ptr<acc_t>();
    P.dbias_part = dbias_part.mutable_data_ptr<acc_t>();
    if (s.L == 0 || s.batch == 0 || s.dim == 0) {
      // Nothing flows: zero gradients for the parameters, empty ones for the rest.
      P.nsplit = 1;
      dB.zero_();
      dC.zero_();
    } else {
      at::Tensor dB_part, dC_part;
      if (P.nsplit > 1) {
        dB_part = at::empty({s.batch, s.groups, P.nsplit, s.N, s.L}, A.options());
        dC_part = at::empty({s.batch, s.groups, P.nsplit, s.N, s.L}, A.options());
        P.dB_part = dB_part.mutable_data_ptr<acc_t>();
        P.dC_part = dC_part.mutable_data_ptr<acc_t>();
      }
      run_tasks(P, task_count(s, ss2d, P.nsplit), /*backward=*/true);
      if (P.nsplit > 1) {
        reduce_split_parts(P.dB_part, P.dB, s.batch * s.groups, P.nsplit, s.N * s.L);
        reduce_split_parts(P.dC_part, P.dC, s.batch * s.groups, P.nsplit, s.N * s.L);
      }
    }
    reduce_over_batch(P.dA_part, dA.mutable_data_ptr<acc_t>(), s.batch, rows * s.N);
    reduce_over_batch(P.dD_part, dD.mutable_data_ptr<acc_t>(), s.batch, rows);
    reduce_over_batch(P.dbias_part, dbias.mutable_data_ptr<acc_t>(), s.batch, rows);
  });
  return {du,
          ddelta,
          dA,
          dB,
          dC,
          D_skip != nullptr ? dD : at::Tensor(),
          delta_bias != nullptr ? dbias : at::Tensor(),
          dz};
}

}  // namespace scan_cpu
}  // namespace medkernels
