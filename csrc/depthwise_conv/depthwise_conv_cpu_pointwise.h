// The pointwise and data-movement row kernels of the CPU depthwise convolution (depthwise_conv_cpu_kernels.cpp,
// which alone includes this header): activations, their backward and saving forms, LayerNorm, and the 2-D copies
// and in-register transposes between layouts.
#pragma once

#include <cstring>
#include <type_traits>
#include <utility>

#include "common/cpu_simd.h"
#include "depthwise_conv/depthwise_conv_cpu.h"
#include "depthwise_conv/depthwise_conv_cpu_vec.h"

namespace medkernels {
namespace dwcpu {
namespace {

// ---- activations and LayerNorm (omp simd loops over the formulas of depthwise_conv_math.h)

template <DwAct A, typename acc_t>
MK_CPU_INLINE void act_forward_impl(const acc_t* z, acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] = dw_activation<A, acc_t, CpuMath>(z[e]);
}

template <DwAct A, typename acc_t, int VB>
MK_CPU_INLINE void act_backward_impl(const acc_t* __restrict__ z, const acc_t* __restrict__ g,
                                    acc_t* __restrict__ gz, int64_t n) {
  if constexpr (A == DwAct::kNone) {
    std::memcpy(gz, g, n * sizeof(acc_t));
  } else if constexpr (A == DwAct::kSilu && IsZmmFloat<typename VecOf<acc_t, VB>::type>::value) {
    using V = typename VecOf<acc_t, VB>::type;
    int64_t e = 0;
    for (; e + 16 <= n; e += 16) {
      V zv, gv;
      vload(zv, z + e);
      vload(gv, g + e);
      vstore(gz + e, gv * silu_derivative(zv, zmm_sigmoid(zv)));
    }
    for (; e < n; ++e) gz[e] = g[e] * dw_activation_grad<A, acc_t, CpuMath>(z[e]);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) gz[e] = g[e] * dw_activation_grad<A, acc_t, CpuMath>(z[e]);
  }
}

// Rows of npix pixels of C channels: out = act(z) and dact = act'(z) (out in place when out == z), the forward
// that saves the derivative for the backward. Float SiLU goes channel vector by channel vector as the fused
// convolution does (conv_rows_impl's split into whole vectors and a scalar remainder), computing the sigmoid once
// for both outputs: out then equals conv_rows_act's to the bit, dact the fused backward's act'(z). The rest
// (GELU, float64) uses the formulas of act_forward and act_backward.
template <typename V, typename acc_t>
MK_CPU_INLINE void silu_save(const acc_t* z, acc_t* out, acc_t* dact) {
  V zv;
  vload(zv, z);
  const V s = vec_sigmoid(zv);
  vstore(dact, silu_derivative(zv, s));
  vstore(out, zv * s);
}

template <DwAct A, typename acc_t, int VB>
MK_CPU_INLINE void act_forward_save_impl(const acc_t* z, acc_t* out, acc_t* __restrict__ dact, int64_t npix,
                                        int64_t C) {
  if constexpr (A == DwAct::kSilu && std::is_same_v<acc_t, float>) {
    constexpr int64_t L = VB / sizeof(float);
    for (int64_t q = 0; q < npix; ++q) {
      const int64_t o = q * C;
      int64_t c = 0;
      for (; c + L <= C; c += L) silu_save<typename VecOf<float, VB>::type>(z + o + c, out + o + c, dact + o + c);
      for (; c < C; ++c) silu_save<float>(z + o + c, out + o + c, dact + o + c);
    }
  } else {
    // two loops, each act_backward's or act_forward's own (one loop would share and round their common terms)
    const int64_t n = npix * C;
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dact[e] = dw_activation_grad<A, acc_t, CpuMath>(z[e]);
    act_forward_impl<A, acc_t>(z, out, n);
  }
}

// out[e] = a[e] * b[e]
template <typename acc_t>
MK_CPU_INLINE void mul_impl(const acc_t* __restrict__ a, const acc_t* __restrict__ b, acc_t* __restrict__ out,
                           int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] = a[e] * b[e];
}

// mean and 1 / sqrt(var + eps) of one pixel's C values (two passes over L1-resident data).
template <typename acc_t>
MK_CPU_INLINE void ln_moments(const acc_t* __restrict__ z, int64_t C, acc_t eps, acc_t& mean, acc_t& rstd) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += z[c];
  mean = sum / acc_t(C);
  acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) sq += (z[c] - mean) * (z[c] - mean);
  rstd = dw_ln_rstd<acc_t>(sq / acc_t(C), eps);
}

template <typename acc_t>
MK_CPU_INLINE void ln_forward_impl(const LayerNormArgs<acc_t>& a, const acc_t* z, acc_t* out) {
  const int64_t C = a.C;
  const acc_t* __restrict__ gamma = a.gamma;
  const acc_t* __restrict__ beta = a.beta;
  for (int64_t w = 0; w < a.n; ++w) {
    const acc_t* v = z + w * C;
    acc_t* o = out + w * C;
    acc_t mean, rstd;
    ln_moments(v, C, a.eps, mean, rstd);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = (v[c] - mean) * rstd * gamma[c] + beta[c];
  }
}

template <typename acc_t>
MK_CPU_INLINE void ln_backward_impl(const LayerNormArgs<acc_t>& a, const acc_t* z, const acc_t* gy, acc_t* gz,
                                   acc_t* dgamma, acc_t* dbeta) {
  const int64_t C = a.C;
  const acc_t* __restrict__ gamma = a.gamma;
  for (int64_t w = 0; w < a.n; ++w) {
    const acc_t* __restrict__ v = z + w * C;
    const acc_t* __restrict__ gyw = gy + w * C;
    acc_t* __restrict__ out = gz + w * C;
    acc_t mean, rstd;
    ln_moments(v, C, a.eps, mean, rstd);
    acc_t sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = gyw[c] * gamma[c];
      sum_g += g;
      sum_gx += g * (v[c] - mean) * rstd;
    }
    const acc_t mean_g = sum_g / acc_t(C), mean_gx = sum_gx / acc_t(C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      out[c] = dw_ln_input_grad<acc_t>(gyw[c] * gamma[c], (v[c] - mean) * rstd, rstd, mean_g, mean_gx);
    }
    if (dgamma != nullptr) {
      acc_t* __restrict__ dg = dgamma;
      acc_t* __restrict__ db = dbeta;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dg[c] += gyw[c] * (v[c] - mean) * rstd;
        db[c] += gyw[c];
      }
    }
  }
}

// dst[r * ds + c] = src[r * ss + c], r < rows, c < cols: vector loads and stores (glibc's memcpy switches to
// `rep movsb` above a few KB, which is several times slower on some x86 CPUs and VMs).
template <typename acc_t, int VB>
MK_CPU_INLINE void copy2d_impl(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int64_t L = VB / sizeof(acc_t);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* in = src + r * ss;
    acc_t* out = dst + r * ds;
    int64_t e = 0;
    for (; e + 4 * L <= cols; e += 4 * L) {
      V v0, v1, v2, v3;
      vload(v0, in + e);
      vload(v1, in + e + L);
      vload(v2, in + e + 2 * L);
      vload(v3, in + e + 3 * L);
      vstore(out + e, v0);
      vstore(out + e + L, v1);
      vstore(out + e + 2 * L, v2);
      vstore(out + e + 3 * L, v3);
    }
    for (; e + L <= cols; e += L) {
      V v;
      vload(v, in + e);
      vstore(out + e, v);
    }
    for (; e < cols; ++e) out[e] = in[e];
  }
}

// ---- in-register transposes of L x L blocks: log2(L) butterfly stages, stage h swapping the off-diagonal
// h x h blocks of each pair of rows (i, i + h). The shuffle masks are compile-time constants.

template <typename acc_t>
struct LaneIndex;
template <>
struct LaneIndex<float> {
  typedef int32_t type;
};
template <>
struct LaneIndex<double> {
  typedef int64_t type;
};

// The masks of stage h for a pair (a, b): lanes of the first row, then of the second (indices >= L pick b).
template <typename M, int L, int h, bool kFirst, typename Seq>
struct StageMask;
template <typename M, int L, int h, bool kFirst, int... E>
struct StageMask<M, L, h, kFirst, std::integer_sequence<int, E...>> {
  static constexpr M value = M{(kFirst ? ((E & h) ? L + E - h : E) : ((E & h) ? L + E : E + h))...};
};

template <typename acc_t, typename V, int L, int h>
MK_CPU_INLINE void transpose_stages(V* r) {
  if constexpr (h >= 1) {
    using M = typename VecOf<typename LaneIndex<acc_t>::type, sizeof(V)>::type;
    using Seq = std::make_integer_sequence<int, L>;
    for (int i = 0; i < L; ++i) {
      if (i & h) continue;
      const V a = r[i], b = r[i + h];
      r[i] = __builtin_shuffle(a, b, StageMask<M, L, h, true, Seq>::value);
      r[i + h] = __builtin_shuffle(a, b, StageMask<M, L, h, false, Seq>::value);
    }
    transpose_stages<acc_t, V, L, h / 2>(r);
  }
}

template <typename acc_t, typename V, int L>
MK_CPU_INLINE void transpose_block(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds) {
  V blk[L];
  for (int i = 0; i < L; ++i) vload(blk[i], src + i * ss);
  transpose_stages<acc_t, V, L, L / 2>(blk);
  for (int i = 0; i < L; ++i) vstore(dst + i * ds, blk[i]);
}

// dst[c * ds + r] = src[r * ss + c], r < rows, c < cols: L x L blocks in registers, the last block of a row
// or column of blocks shifted back to overlap the previous one (it rewrites equal values); sizes below L go
// to half-width blocks, down to 16-byte vectors, then element by element. The baseline ISA (SSE2, whose
// two-source shuffles are slow) goes element by element.
template <typename acc_t, int VB, bool kVex = (VB >= 32)>
MK_CPU_INLINE void transpose_impl(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols) {
  constexpr int L = VB / sizeof(acc_t);
  if constexpr (kVex && L >= 2) {
    if (rows >= L && cols >= L) {
      using V = typename VecOf<acc_t, VB>::type;
      for (int64_t r0 = 0; r0 < rows; r0 += L) {
        const int64_t r = std::min<int64_t>(r0, rows - L);
        for (int64_t c0 = 0; c0 < cols; c0 += L) {
          const int64_t c = std::min<int64_t>(c0, cols - L);
          transpose_block<acc_t, V, L>(src + r * ss + c, ss, dst + c * ds + r, ds);
        }
      }
      return;
    }
    if constexpr (VB > 16) {
      transpose_impl<acc_t, VB / 2, true>(src, ss, dst, ds, rows, cols);
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ds + r] = src[r * ss + c];
}

}  // namespace
}  // namespace dwcpu
}  // namespace medkernels
