// Vector row kernels of the CPU depthwise convolution (contracts in depthwise_conv_cpu.h), written with GCC
// vector types and compiled three times — baseline (16-byte vectors), AVX2 + FMA (32 bytes), AVX-512 (64
// bytes) — the best one for the CPU being picked at run time. Kernel sizes 3, 5 and 7 are compile-time
// constants (taps fully unrolled, weights held in registers; at stride 1 each input vector is loaded once for
// the k outputs it feeds); other sizes take a generic path.
//
// Activations: for float, SiLU and ReLU are applied by the convolution kernels themselves (no extra pass over
// memory), with an inline exp and reciprocal instead of library calls and divisions; GELU (erf) and float64
// use the formulas of depthwise_conv_math.h in `omp simd` loops calling libmvec's vector exp / erf. The
// LayerNorm loops are `omp simd` loops over the same header's formulas.

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu_isa.h"
#include "depthwise_conv_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(MEDKERNELS_DW_NO_LIBMVEC)
// The vector variants exist in libmvec (see selective_scan_cpu.cpp); `const` as under -fno-math-errno.
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch"), const));
extern "C" double exp(double) noexcept __attribute__((simd("notinbranch"), const));
#if __GLIBC_PREREQ(2, 35)
extern "C" float erff(float) noexcept __attribute__((simd("notinbranch"), const));
extern "C" double erf(double) noexcept __attribute__((simd("notinbranch"), const));
#endif
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MEDKERNELS_DW_FORCE_GENERIC)
#define MK_DW_X86_DISPATCH 1
#endif

#if defined(__GNUC__)
#define MK_DW_INLINE inline __attribute__((always_inline))
#else
#define MK_DW_INLINE inline
#endif

namespace medkernels {
namespace dwcpu {
namespace {

// A vector of VB bytes of acc_t; VB == sizeof(acc_t) is the plain scalar (the remainder loops).
template <typename acc_t, int VB, bool kScalar = (VB == sizeof(acc_t))>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(VB)));
};
template <typename acc_t, int VB>
struct VecOf<acc_t, VB, true> {
  typedef acc_t type;
};

template <typename V, typename S>
MK_DW_INLINE void vload(V& v, const S* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename S>
MK_DW_INLINE void vstore(S* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename S>
MK_DW_INLINE void vbroadcast(V& v, S s) {
  if constexpr (std::is_same_v<V, S>) {
    v = s;
  } else {
    for (int e = 0; e < static_cast<int>(sizeof(V) / sizeof(S)); ++e) v[e] = s;  // one broadcast instruction
  }
}
template <typename S, typename V>
MK_DW_INLINE S vsum(const V& v) {
  constexpr int n = sizeof(V) / sizeof(S);
  S lanes[n];
  std::memcpy(lanes, &v, sizeof(V));
  S out = 0;
  for (int e = 0; e < n; ++e) out += lanes[e];
  return out;
}

// ---- float exp and reciprocal without library calls or divisions, on a float or a vector of floats in place,
// so that the activation loops become straight-line vector code.

template <typename V>
struct IntLanes {
  typedef typename VecOf<int32_t, sizeof(V)>::type type;
};
template <>
struct IntLanes<float> {
  typedef int32_t type;
};

template <typename V>
MK_DW_INLINE void vclamp(V& x, float lo, float hi) {
  V l, h;
  vbroadcast(l, lo);
  vbroadcast(h, hi);
  x = x > l ? x : l;  // the operand order of max / min instructions (NaN gives the bound)
  x = x < h ? x : h;
}

// e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by Cephes' expf polynomial (about 1 ulp).
// x is clamped to [-87.33, 88.37] (n in [-126, 127]): below, the result is the smallest normal float
// instead of a denormal or zero, which the activations cannot tell apart.
template <typename V>
MK_DW_INLINE void fast_exp_inplace(V& x) {
  vclamp(x, -87.3365447f, 88.3762626f);
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // rounds to nearest, |n| < 2^22
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V q = r * 1.9875691500e-4f + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  typename IntLanes<V>::type bits;
  if constexpr (std::is_same_v<V, float>) {
    bits = static_cast<int32_t>(n);
  } else {
    bits = __builtin_convertvector(n, typename IntLanes<V>::type);
  }
  bits = (bits + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  x = (q * r * r + r + 1.0f) * scale;
}

// 1 / v for v in [1, 2^125] (larger v are clamped: the sigmoid then gives 2^-125 instead of something
// smaller, which the activations cannot tell apart): an initial guess from the exponent bits (within 13%),
// then three Newton steps r <- r (2 - v r), each squaring the relative error (about 2 ulp in the end).
template <typename V>
MK_DW_INLINE void fast_recip_inplace(V& v) {
  vclamp(v, 1.0f, 4.2535296e37f);
  typename IntLanes<V>::type bits;
  std::memcpy(&bits, &v, sizeof(V));
  bits = 0x7EF311C3 - bits;
  V r;
  std::memcpy(&r, &bits, sizeof(V));
  r = r * (2.0f - v * r);
  r = r * (2.0f - v * r);
  v = r * (2.0f - v * r);
}

// The CPU kernels' elementary functions for the shared formulas of depthwise_conv_math.h: the inline float
// exp and reciprocal above, the C library (vectorised by libmvec) else.
struct CpuMath {
  template <typename acc_t>
  static MK_DW_INLINE acc_t exp(acc_t v) {
    if constexpr (std::is_same_v<acc_t, float>) {
      fast_exp_inplace(v);
      return v;
    } else {
      return dw_exp<acc_t>(v);
    }
  }
  template <typename acc_t>
  static MK_DW_INLINE acc_t erf(acc_t v) {
    return dw_erf<acc_t>(v);
  }
  template <typename acc_t>
  static MK_DW_INLINE acc_t recip(acc_t v) {
    if constexpr (std::is_same_v<acc_t, float>) {
      fast_recip_inplace(v);
      return v;
    } else {
      return acc_t(1) / v;
    }
  }
};

// ---- the sigmoid on 16 floats with AVX-512 (the kernels' hot path for SiLU): about half the instructions of
// the portable version above. Written with inline asm for the instructions GCC's vector extensions cannot
// express (max, min, scalef, rcp14), which keeps the surrounding code ISA-generic: the asm only ever lands
// in functions compiled for AVX-512 (IsaAvx512 below).
//
// e^-z for z clamped to [-88, 88]: n = round(-z / ln 2), s = z + n ln 2 (two-part ln 2, exact first product),
// e^-s on |s| <= ln 2 / 2 by a degree-5 polynomial 1 - s + s^2 (c2 - c3 s + c4 s^2 - c5 s^3) (coefficients
// fitted here for minimal relative error: 1.1e-7 in exact arithmetic, 1.8e-7 evaluated in float), times 2^n
// by vscalefps. 1 / (1 + e^-z): vrcp14ps (relative error < 2^-14) and one Newton step (error ~2^-28 plus
// rounding). NaN inputs: the clamp turns them into -88, and the caller's multiplication by z gives NaN.
template <typename V>
struct IsZmmFloat : std::false_type {};
#ifdef MK_DW_X86_DISPATCH
template <>
struct IsZmmFloat<VecOf<float, 64>::type> : std::true_type {};
#endif

template <typename V>
MK_DW_INLINE V zmm_sigmoid(const V& z) {
  V lo, hi, zc, e, r;
  vbroadcast(lo, -88.0f);
  vbroadcast(hi, 88.0f);
  asm("vmaxps %2, %1, %0" : "=v"(zc) : "v"(z), "v"(lo));  // max(z, lo); NaN gives lo
  asm("vminps %2, %1, %0" : "=v"(zc) : "v"(zc), "v"(hi));
  const V n = (zc * -1.44269504088896341f + 12582912.0f) - 12582912.0f;  // rounds to nearest, |n| <= 127
  V s = zc + n * 0.693359375f;
  s = s + n * -2.12194440e-4f;
  V p = s * -8.312525228e-3f + 4.189011455e-2f;
  p = p * s - 1.666711420e-1f;
  p = p * s + 4.999923110e-1f;
  p = p * s - 1.0f;
  p = p * s + 1.0f;
  asm("vscalefps %2, %1, %0" : "=v"(e) : "v"(p), "v"(n));  // p * 2^n
  const V d = e + 1.0f;
  asm("vrcp14ps %1, %0" : "=v"(r) : "v"(d));
  const V t = 1.0f - d * r;
  return r + r * t;
}

// 1 / (1 + e^-z) on a float or a vector of floats: zmm_sigmoid with AVX-512, else the inline exp and reciprocal.
template <typename V>
MK_DW_INLINE V vec_sigmoid(const V& z) {
  if constexpr (IsZmmFloat<V>::value) {
    return zmm_sigmoid(z);
  } else {
    V s = -z;
    fast_exp_inplace(s);
    s = s + 1.0f;
    fast_recip_inplace(s);
    return s;
  }
}

// SiLU's derivative from z and its sigmoid s: s (1 + z (1 - s)), dw_activation_grad's form. The fused backward,
// the saving forward and act_backward all use it, so that a saved derivative and a recomputed one agree to the
// bit; it has no product that the saving forward shares with its output z s (a shared product would be rounded
// there, while the backward alone contracts it into an FMA).
template <typename V>
MK_DW_INLINE V silu_derivative(const V& z, const V& s) {
  return s * (1.0f + z * (1.0f - s));
}

// The activations that the float convolution kernels apply to each channel vector of outputs right after
// computing it, while it is in L1 (no extra pass over memory): SiLU as dw_activation<kSilu> with CpuMath
// states it, z * 1 / (1 + e^-z) (zmm_sigmoid with AVX-512); ReLU; none. GELU (erf) and float64 go through
// act_forward afterwards.
template <DwAct A>
struct VecActivation {
  template <typename V>
  static MK_DW_INLINE void apply(V& z) {
    if constexpr (A == DwAct::kSilu) {
      z = z * vec_sigmoid(z);
    } else if constexpr (A == DwAct::kRelu) {
      V zero{};
      z = z <= zero ? zero : z;  // NaN stays NaN, as torch.relu
    }
  }
};
using NoActivation = VecActivation<DwAct::kNone>;

// The activations' backward on a channel vector, for the fused backward rows (float; SiLU, ReLU): z (the
// pre-activation) is replaced by g * act'(z), act' as dw_activation_grad states it.
template <DwAct A>
struct VecActivationGrad {
  template <typename V>
  static MK_DW_INLINE void apply(V& z, const V& g) {
    if constexpr (A == DwAct::kSilu) {
      z = g * silu_derivative(z, vec_sigmoid(z));
    } else if constexpr (A == DwAct::kRelu) {
      V zero{};
      z = z <= zero ? zero : g;  // NaN z passes g, as dw_activation_grad
    } else {
      z = g;
    }
  }
};

// Kernel rows whose weights are held in registers at once: all of them when they fit (16 vector registers
// below AVX-512, 32 with it), else one.
template <int VB, int K>
constexpr int rows_per_pass() {
  return K == 0 ? 1 : (VB >= 64 ? (K <= 5 ? K : 1) : (K <= 3 ? K : 1));
}

// ---- channels-last rows: vectors over channels, the channel-vector loop outside the pixel loop so that
// the weights stay in registers while the row is walked.

// Stride 1, outputs [o, o + U) of one channel vector: each input pixel of a kernel row is loaded once and
// used by every output it reaches (k of them), the U accumulators staying in registers.
template <typename acc_t, typename V, int K, int R, int U>
MK_DW_INLINE void conv_rows_block_s1(const V (*w)[K], const acc_t* const* src, int64_t ps, V* acc, int64_t o) {
  for (int r = 0; r < R; ++r) {
    const acc_t* x = src[r] + o * ps;
    for (int m = 0; m < U + K - 1; ++m) {
      V v;
      vload(v, x);
      x += ps;
      for (int j = 0; j < K; ++j) {
        const int u = m - j;
        if (u >= 0 && u < U) acc[u] += w[r][j] * v;
      }
    }
  }
}

// ---- rows read in place (RowClip): the outputs [o0, o1) whose taps all lie inside the row go through the
// vector loops from shifted row pointers; the others, at the row's two ends, add only the taps inside it.

struct Interior {
  int64_t o0, o1;
};

inline Interior interior(const RowClip* clip, int64_t n) {
  return clip != nullptr ? Interior{clip->lo, std::max(clip->lo, clip->hi)} : Interior{0, n};
}

// src[r]: kernel row i0 + r at channel c, advanced to the first tap of output o0.
template <typename acc_t, int R>
MK_DW_INLINE void interior_rows(const acc_t* const* rows, int64_t i0, int64_t c, const RowClip* clip, int64_t o0,
                                int64_t s, int64_t ps, const acc_t** src) {
  const int64_t shift = clip != nullptr ? (o0 * s - clip->p) * ps : 0;
  for (int r = 0; r < R; ++r) src[r] = rows[i0 + r] + c + shift;
}

// f(o, col0, j0, j1) for each output outside [o0, o1): its tap j reads column col0 + j, inside the row for
// j0 <= j < j1.
template <typename F>
MK_DW_INLINE void for_each_clipped(const RowClip& clip, Interior in, int64_t n, int64_t s, int64_t k, F&& f) {
  for (int64_t o = 0; o < n; ++o) {
    if (o == in.o0) o = in.o1;
    if (o >= n) break;
    const int64_t col0 = o * s - clip.p;
    f(o, col0, std::max<int64_t>(0, -col0), std::min<int64_t>(k, clip.W - col0));
  }
}

// One channel vector of one row of outputs. With a.clip, the rows are read in place from image column 0 and
// outputs [0, clip->lo) and [clip->hi, n), whose taps reach past the row's ends, add only their taps inside it.
template <typename acc_t, typename V, int K, int R, typename Epi>
MK_DW_INLINE void conv_rows_lanes(const ConvRowsArgs<acc_t>& a, int64_t c) {
  constexpr int KJ = K > 0 ? K : static_cast<int>(kMaxKernel);
  // outputs per register block at stride 1: weights (R k) + accumulators + 1 input fit 16 or 32 registers
  constexpr int U = std::is_same_v<V, acc_t> || K == 0 ? 1 : (sizeof(V) >= 64 ? 6 : (R * K + 6 <= 16 ? 4 : 2));
  const int64_t k = K > 0 ? K : a.k, C = a.C, ps = a.ps, step = a.s * ps, n = a.n;
  const Interior in = interior(a.clip, n);
  const int64_t o0 = in.o0, o1 = in.o1;
  V init;
  vload(init, a.init + c);
  acc_t* dst = a.out + c;
  for (int64_t i0 = 0; i0 < k; i0 += R) {
    V w[R][KJ];
    const acc_t* src[R];
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < k; ++j) vload(w[r][j], a.w + ((i0 + r) * k + j) * C + c);
    }
    const bool first = i0 == 0, last = i0 + R >= k;
    if (o1 > o0) {
      interior_rows<acc_t, R>(a.rows, i0, c, a.clip, o0, a.s, ps, src);  // src[r] + o * step: output o0 + o
      acc_t* out = dst + o0 * C;
      const int64_t m = o1 - o0;
      int64_t o = 0;
      if constexpr (U > 1) {
        if (a.s == 1) {
          for (; o + U <= m; o += U) {
            V acc[U];
            for (int u = 0; u < U; ++u) {
              if (first) {
                acc[u] = init;
              } else {
                vload(acc[u], out + (o + u) * C);
              }
            }
            conv_rows_block_s1<acc_t, V, K, R, U>(w, src, ps, acc, o);
            for (int u = 0; u < U; ++u) vstore(out + (o + u) * C, acc[u]);
          }
        }
      }
      for (; o < m; ++o) {
        V acc;
        if (first) {
          acc = init;
        } else {
          vload(acc, out + o * C);
        }
        for (int r = 0; r < R; ++r) {
          const acc_t* x = src[r] + o * step;
          for (int64_t j = 0; j < k; ++j) {
            V v;
            vload(v, x + j * ps);
            acc += w[r][j] * v;
          }
        }
        vstore(out + o * C, acc);
      }
    }
    if (a.clip != nullptr) {
      for_each_clipped(*a.clip, in, n, a.s, k, [&](int64_t o, int64_t col0, int64_t j0, int64_t j1) {
        V acc;
        if (first) {
          acc = init;
        } else {
          vload(acc, dst + o * C);
        }
        for (int r = 0; r < R; ++r) {
          const acc_t* row = a.rows[i0 + r] + c;
          for (int64_t j = j0; j < j1; ++j) {
            V v;
            vload(v, row + (col0 + j) * ps);
            acc += w[r][j] * v;
          }
        }
        vstore(dst + o * C, acc);
      });
    }
    // the activation as a separate loop over the channel vector's outputs, still in L1: its long dependency
    // chains then overlap from output to output instead of queueing behind each output's FMAs
    if constexpr (!std::is_same_v<Epi, NoActivation>) {
      if (last) {
        for (int64_t q = 0; q < n; ++q) {
          V v;
          vload(v, dst + q * C);
          Epi::apply(v);
          vstore(dst + q * C, v);
        }
      }
    }
  }
}

template <typename acc_t, int VB, int K, typename Epi = NoActivation>
MK_DW_INLINE void conv_rows_impl(const ConvRowsArgs<acc_t>& a) {
  constexpr int64_t L = VB / sizeof(acc_t);
  constexpr int R = rows_per_pass<VB, K>();
  int64_t c = 0;
  for (; c + L <= a.C; c += L) conv_rows_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, R, Epi>(a, c);
  for (; c < a.C; ++c) conv_rows_lanes<acc_t, acc_t, K, R, Epi>(a, c);
}

// The parameter gradients of one channel vector of one row (GradsRowsArgs). At stride 1, blocks of U outputs
// keep their d loss / d z vectors in registers and load each input vector once for the k taps it meets (instead
// of once per tap: the loads, not the FMAs, bounded the one-output loop). With a.clip, as conv_rows_lanes: the
// rows are read in place and the outputs at the row's ends add only their taps inside it (after the others).
template <typename acc_t, typename V, int K, int R>
MK_DW_INLINE void grads_rows_lanes(const GradsRowsArgs<acc_t>& a, int64_t c) {
  constexpr int KJ = K > 0 ? K : static_cast<int>(kMaxKernel);
  // outputs per block: R K accumulators + U gradients + 1 input within 32 (AVX-512) or 16 vector registers
  constexpr int U = std::is_same_v<V, acc_t> || K == 0 ? 1
                    : sizeof(V) >= 64                   ? (R * K <= 9 ? 8 : (R * K <= 25 ? 4 : 1))
                                                        : (R * K <= 9 ? 4 : 1);
  const int64_t k = K > 0 ? K : a.k, C = a.C, ps = a.ps, step = a.s * ps, n = a.n;
  const Interior in = interior(a.clip, n);
  const int64_t o0 = in.o0, o1 = in.o1;
  const acc_t* gz = a.gz + c;
  for (int64_t i0 = 0; i0 < k; i0 += R) {
    const bool first = i0 == 0;
    V acc[R][KJ];
    V accb{};
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < k; ++j) acc[r][j] = V{};
    if (o1 > o0) {
      const acc_t* src[R];
      interior_rows<acc_t, R>(a.rows, i0, c, a.clip, o0, a.s, ps, src);  // src[r] + o * step: output o0 + o
      const acc_t* g0 = gz + o0 * C;
      const int64_t m = o1 - o0;
      int64_t o = 0;
      if constexpr (U > 1) {
        if (a.s == 1) {
          for (; o + U <= m; o += U) {
            V g[U];
            for (int u = 0; u < U; ++u) {
              vload(g[u], g0 + (o + u) * C);
              if (first) accb += g[u];
            }
            for (int r = 0; r < R; ++r) {
              const acc_t* x = src[r] + o * ps;
              for (int q = 0; q < U + K - 1; ++q) {
                V v;
                vload(v, x + q * ps);
                for (int j = 0; j < K; ++j) {
                  const int u = q - j;
                  if (u >= 0 && u < U) acc[r][j] += g[u] * v;
                }
              }
            }
          }
        }
      }
      for (; o < m; ++o) {
        V g;
        vload(g, g0 + o * C);
        if (first) accb += g;
        for (int r = 0; r < R; ++r) {
          const acc_t* x = src[r] + o * step;
          for (int64_t j = 0; j < k; ++j) {
            V v;
            vload(v, x + j * ps);
            acc[r][j] += g * v;
          }
        }
      }
    }
    if (a.clip != nullptr) {
      for_each_clipped(*a.clip, in, n, a.s, k, [&](int64_t o, int64_t col0, int64_t j0, int64_t j1) {
        V g;
        vload(g, gz + o * C);
        if (first) accb += g;
        for (int r = 0; r < R; ++r) {
          const acc_t* row = a.rows[i0 + r] + c;
          for (int64_t j = j0; j < j1; ++j) {
            V v;
            vload(v, row + (col0 + j) * ps);
            acc[r][j] += g * v;
          }
        }
      });
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        acc_t* out = a.gw + ((i0 + r) * k + j) * C + c;
        V cur;
        vload(cur, out);
        cur += acc[r][j];
        vstore(out, cur);
      }
    }
    if (first) {
      V cur;
      vload(cur, a.gb + c);
      cur += accb;
      vstore(a.gb + c, cur);
    }
  }
}

template <typename acc_t, int VB, int K>
MK_DW_INLINE void grads_rows_impl(const GradsRowsArgs<acc_t>& a) {
  constexpr int64_t L = VB / sizeof(acc_t);
  constexpr int R = rows_per_pass<VB, K>();
  int64_t c = 0;
  for (; c + L <= a.C; c += L) grads_rows_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, R>(a, c);
  for (; c < a.C; ++c) grads_rows_lanes<acc_t, acc_t, K, R>(a, c);
}

// The fused backward of one row (BwdRowsArgs), channel vector by channel vector: z, then g * act'(z) in place,
// then the parameter gradients, while the vector's k input rows, gradients and outputs are in L1.
template <typename acc_t, typename V, int K, int R, DwAct A>
MK_DW_INLINE void bwd_rows_lanes(const BwdRowsArgs<acc_t>& a, int64_t c) {
  conv_rows_lanes<acc_t, V, K, R, NoActivation>(a.conv, c);
  const int64_t C = a.conv.C, n = a.conv.n;
  acc_t* out = a.conv.out + c;
  const acc_t* g = a.g + c;
  for (int64_t q = 0; q < n; ++q) {
    V z, gv;
    vload(z, out + q * C);
    vload(gv, g + q * C);
    VecActivationGrad<A>::apply(z, gv);
    vstore(out + q * C, z);
  }
  if (a.gw != nullptr) {
    grads_rows_lanes<acc_t, V, K, R>({a.conv.rows, a.conv.out, a.gw, a.gb, n, C, a.conv.s, a.conv.k, a.conv.ps,
                                      a.conv.clip},
                                     c);
  }
}

template <typename acc_t, int VB, int K, DwAct A>
MK_DW_INLINE void bwd_rows_impl(const BwdRowsArgs<acc_t>& a) {
  constexpr int64_t L = VB / sizeof(acc_t);
  constexpr int R = rows_per_pass<VB, K>();
  int64_t c = 0;
  for (; c + L <= a.conv.C; c += L) bwd_rows_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, R, A>(a, c);
  for (; c < a.conv.C; ++c) bwd_rows_lanes<acc_t, acc_t, K, R, A>(a, c);
}

// ---- plane rows: vectors over output columns, scalar weights broadcast.

// Outputs [o, o + U * lanes) of one plane row; the weights come broadcast, the tap offsets folded into the
// per-tap source pointers (locals, so that the stores to out do not force reloads).
template <typename acc_t, typename V, int U, typename Epi>
MK_DW_INLINE void conv_plane_block(const V* w, const acc_t* const* src, int64_t ntaps, V init, acc_t* out,
                                   int64_t o) {
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  V acc[U];
  for (int u = 0; u < U; ++u) acc[u] = init;
  for (int64_t t = 0; t < ntaps; ++t) {
    const acc_t* x = src[t] + o;
    for (int u = 0; u < U; ++u) {
      V v;
      vload(v, x + u * L);
      acc[u] += w[t] * v;
    }
  }
  for (int u = 0; u < U; ++u) {
    Epi::apply(acc[u]);
    vstore(out + o + u * L, acc[u]);
  }
}

template <typename acc_t, typename V, int K, typename Epi>
MK_DW_INLINE void conv_plane_lanes(const ConvPlaneArgs<acc_t>& a, const acc_t* const* src, int64_t ntaps,
                                   int64_t o0, int64_t o1) {
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  constexpr int U = sizeof(V) == sizeof(acc_t) ? 1 : 4;
  constexpr int64_t NT = K > 0 ? K * K : kMaxKernel * kMaxKernel;
  V w[NT];
  for (int64_t t = 0; t < ntaps; ++t) vbroadcast(w[t], a.w[t]);
  V init;
  vbroadcast(init, a.init);
  acc_t* out = a.out;
  int64_t o = o0;
  for (; o + U * L <= o1; o += U * L) conv_plane_block<acc_t, V, U, Epi>(w, src, K > 0 ? NT : ntaps, init, out, o);
  for (; o + L <= o1; o += L) conv_plane_block<acc_t, V, 1, Epi>(w, src, K > 0 ? NT : ntaps, init, out, o);
  if constexpr (L > 1) {
    if (o < o1 && o1 - o0 >= L) {
      conv_plane_block<acc_t, V, 1, Epi>(w, src, K > 0 ? NT : ntaps, init, out, o1 - L);  // overlaps, equal values
    } else if (o < o1) {
      conv_plane_lanes<acc_t, acc_t, K, Epi>(a, src, ntaps, o, o1);
    }
  }
}

template <typename acc_t, int VB, int K, typename Epi = NoActivation>
MK_DW_INLINE void conv_plane_impl(const ConvPlaneArgs<acc_t>& a) {
  const int64_t k = K > 0 ? K : a.k;
  const acc_t* src[kMaxKernel * kMaxKernel];
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) src[i * k + j] = a.rows[i] + (j % a.s) * a.phase_len + j / a.s;
  conv_plane_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, Epi>(a, src, k * k, 0, a.n);
}

template <typename acc_t, typename V, int K, int R>
MK_DW_INLINE void grads_plane_rows(const GradsPlaneArgs<acc_t>& a, const int64_t* tap, int64_t i0, acc_t* gw,
                                   acc_t& gb) {
  constexpr int KJ = K > 0 ? K : static_cast<int>(kMaxKernel);
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  const int64_t k = K > 0 ? K : a.k, n = a.n;
  V acc[R][KJ];
  V accb{};
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < k; ++j) acc[r][j] = V{};
  int64_t o = 0;
  for (; o + L <= n; o += L) {
    V g;
    vload(g, a.gz + o);
    accb += g;
    for (int r = 0; r < R; ++r) {
      const acc_t* x = a.rows[i0 + r] + o;
      for (int64_t j = 0; j < k; ++j) {
        V v;
        vload(v, x + tap[j]);
        acc[r][j] += g * v;
      }
    }
  }
  acc_t accs[R][KJ];
  acc_t accbs = 0;
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < k; ++j) accs[r][j] = 0;
  for (; o < n; ++o) {
    const acc_t g = a.gz[o];
    accbs += g;
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < k; ++j) accs[r][j] += g * a.rows[i0 + r][o + tap[j]];
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < k; ++j) gw[(i0 + r) * k + j] += vsum<acc_t>(acc[r][j]) + accs[r][j];
  gb += vsum<acc_t>(accb) + accbs;
}

template <typename acc_t, int VB, int K>
MK_DW_INLINE void grads_plane_impl(const GradsPlaneArgs<acc_t>& a) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int R = rows_per_pass<VB, K>();
  const int64_t k = K > 0 ? K : a.k;
  int64_t tap[kMaxKernel];
  for (int64_t j = 0; j < k; ++j) tap[j] = (j % a.s) * a.phase_len + j / a.s;
  acc_t gb = 0, unused = 0;
  for (int64_t i0 = 0; i0 < k; i0 += R) grads_plane_rows<acc_t, V, K, R>(a, tap, i0, a.gw, i0 == 0 ? gb : unused);
  a.gb[0] += gb;
}

// ---- activations and LayerNorm (omp simd loops over the formulas of depthwise_conv_math.h)

template <DwAct A, typename acc_t>
MK_DW_INLINE void act_forward_impl(const acc_t* z, acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] = dw_activation<A, acc_t, CpuMath>(z[e]);
}

template <DwAct A, typename acc_t, int VB>
MK_DW_INLINE void act_backward_impl(const acc_t* __restrict__ z, const acc_t* __restrict__ g,
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
MK_DW_INLINE void silu_save(const acc_t* z, acc_t* out, acc_t* dact) {
  V zv;
  vload(zv, z);
  const V s = vec_sigmoid(zv);
  vstore(dact, silu_derivative(zv, s));
  vstore(out, zv * s);
}

template <DwAct A, typename acc_t, int VB>
MK_DW_INLINE void act_forward_save_impl(const acc_t* z, acc_t* out, acc_t* __restrict__ dact, int64_t npix,
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
MK_DW_INLINE void mul_impl(const acc_t* __restrict__ a, const acc_t* __restrict__ b, acc_t* __restrict__ out,
                           int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] = a[e] * b[e];
}

// mean and 1 / sqrt(var + eps) of one pixel's C values (two passes over L1-resident data).
template <typename acc_t>
MK_DW_INLINE void ln_moments(const acc_t* __restrict__ z, int64_t C, acc_t eps, acc_t& mean, acc_t& rstd) {
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
MK_DW_INLINE void ln_forward_impl(const LayerNormArgs<acc_t>& a, const acc_t* z, acc_t* out) {
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
MK_DW_INLINE void ln_backward_impl(const LayerNormArgs<acc_t>& a, const acc_t* z, const acc_t* gy, acc_t* gz,
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
MK_DW_INLINE void copy2d_impl(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols) {
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
MK_DW_INLINE void transpose_stages(V* r) {
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
MK_DW_INLINE void transpose_block(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds) {
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
MK_DW_INLINE void transpose_impl(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols) {
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

// ---- the ISA variants: each wraps the inline kernels in functions compiled for one target.

#define MK_DW_DEFINE_ISA(NAME, ATTR, VB)                                                                   \
  struct NAME {                                                                                            \
    template <typename acc_t, int K>                                                                       \
    ATTR static void conv_rows(const ConvRowsArgs<acc_t>& a) {                                             \
      conv_rows_impl<acc_t, VB, K>(a);                                                                     \
    }                                                                                                      \
    template <typename acc_t, int K, DwAct A>                                                              \
    ATTR static void conv_rows_act(const ConvRowsArgs<acc_t>& a) {                                         \
      conv_rows_impl<acc_t, VB, K, VecActivation<A>>(a);                                                   \
    }                                                                                                      \
    template <typename acc_t, int K, DwAct A>                                                              \
    ATTR static void conv_plane_act(const ConvPlaneArgs<acc_t>& a) {                                       \
      conv_plane_impl<acc_t, VB, K, VecActivation<A>>(a);                                                  \
    }                                                                                                      \
    template <typename acc_t, int K, DwAct A>                                                              \
    ATTR static void bwd_rows(const BwdRowsArgs<acc_t>& a) {                                               \
      bwd_rows_impl<acc_t, VB, K, A>(a);                                                                   \
    }                                                                                                      \
    template <typename acc_t, int K>                                                                       \
    ATTR static void grads_rows(const GradsRowsArgs<acc_t>& a) {                                           \
      grads_rows_impl<acc_t, VB, K>(a);                                                                    \
    }                                                                                                      \
    template <typename acc_t, int K>                                                                       \
    ATTR static void conv_plane(const ConvPlaneArgs<acc_t>& a) {                                           \
      conv_plane_impl<acc_t, VB, K>(a);                                                                    \
    }                                                                                                      \
    template <typename acc_t, int K>                                                                       \
    ATTR static void grads_plane(const GradsPlaneArgs<acc_t>& a) {                                         \
      grads_plane_impl<acc_t, VB, K>(a);                                                                   \
    }                                                                                                      \
    template <DwAct A, typename acc_t>                                                                     \
    ATTR static void act_forward(const acc_t* z, acc_t* out, int64_t n) {                                  \
      act_forward_impl<A, acc_t>(z, out, n);                                                               \
    }                                                                                                      \
    template <DwAct A, typename acc_t>                                                                     \
    ATTR static void act_forward_save(const acc_t* z, acc_t* out, acc_t* dact, int64_t npix, int64_t C) { \
      act_forward_save_impl<A, acc_t, VB>(z, out, dact, npix, C);                                          \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void mul(const acc_t* a, const acc_t* b, acc_t* out, int64_t n) {                          \
      mul_impl<acc_t>(a, b, out, n);                                                                       \
    }                                                                                                      \
    template <DwAct A, typename acc_t>                                                                     \
    ATTR static void act_backward(const acc_t* z, const acc_t* g, acc_t* gz, int64_t n) {                  \
      act_backward_impl<A, acc_t, VB>(z, g, gz, n);                                                            \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void ln_forward(const LayerNormArgs<acc_t>& a, const acc_t* z, acc_t* out) {               \
      ln_forward_impl<acc_t>(a, z, out);                                                                   \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void copy2d(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols) { \
      copy2d_impl<acc_t, VB>(src, ss, dst, ds, rows, cols);                                                \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void transpose(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows,         \
                               int64_t cols) {                                                             \
      transpose_impl<acc_t, VB>(src, ss, dst, ds, rows, cols);                                             \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void ln_backward(const LayerNormArgs<acc_t>& a, const acc_t* z, const acc_t* gy, acc_t* gz, \
                                 acc_t* dgamma, acc_t* dbeta) {                                            \
      ln_backward_impl<acc_t>(a, z, gy, gz, dgamma, dbeta);                                                \
    }                                                                                                      \
  };

MK_DW_DEFINE_ISA(IsaBaseline, , 16)
#ifdef MK_DW_X86_DISPATCH
MK_DW_DEFINE_ISA(IsaAvx2, __attribute__((target("avx2,fma"))), 32)
MK_DW_DEFINE_ISA(IsaAvx512, __attribute__((target("avx512f,avx2,fma"))), 64)
#endif

template <typename Isa, typename acc_t, int K>
void set_size_kernels(RowKernels<acc_t>& r, DwAct act) {
  r.conv_rows = &Isa::template conv_rows<acc_t, K>;
  r.grads_rows = &Isa::template grads_rows<acc_t, K>;
  r.conv_plane = &Isa::template conv_plane<acc_t, K>;
  r.grads_plane = &Isa::template grads_plane<acc_t, K>;
  r.act_fused = std::is_same_v<acc_t, float> && act != DwAct::kGelu;
  // (without an activation the backward needs no z, and the unfused path skips its convolution)
  r.bwd_fused = std::is_same_v<acc_t, float> && (act == DwAct::kSilu || act == DwAct::kRelu);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (act == DwAct::kSilu) {
      r.bwd_rows = &Isa::template bwd_rows<acc_t, K, DwAct::kSilu>;
    } else if (act == DwAct::kRelu) {
      r.bwd_rows = &Isa::template bwd_rows<acc_t, K, DwAct::kRelu>;
    }
    if (act == DwAct::kSilu) {
      r.conv_rows_act = &Isa::template conv_rows_act<acc_t, K, DwAct::kSilu>;
      r.conv_plane_act = &Isa::template conv_plane_act<acc_t, K, DwAct::kSilu>;
    } else if (act == DwAct::kRelu) {
      r.conv_rows_act = &Isa::template conv_rows_act<acc_t, K, DwAct::kRelu>;
      r.conv_plane_act = &Isa::template conv_plane_act<acc_t, K, DwAct::kRelu>;
    }
  }
  if (act == DwAct::kNone) {
    r.conv_rows_act = r.conv_rows;
    r.conv_plane_act = r.conv_plane;
  }
}

template <typename Isa, typename acc_t, DwAct A>
void set_act_kernels(RowKernels<acc_t>& r) {
  r.act_forward = &Isa::template act_forward<A, acc_t>;
  r.act_backward = &Isa::template act_backward<A, acc_t>;
  r.act_forward_save = &Isa::template act_forward_save<A, acc_t>;
}

template <typename Isa, typename acc_t>
RowKernels<acc_t> kernels_for(int64_t k, DwAct act) {
  RowKernels<acc_t> r{};
  switch (k) {
    case 3:
      set_size_kernels<Isa, acc_t, 3>(r, act);
      break;
    case 5:
      set_size_kernels<Isa, acc_t, 5>(r, act);
      break;
    case 7:
      set_size_kernels<Isa, acc_t, 7>(r, act);
      break;
    default:
      set_size_kernels<Isa, acc_t, 0>(r, act);
  }
  switch (act) {
    case DwAct::kSilu:
      set_act_kernels<Isa, acc_t, DwAct::kSilu>(r);
      break;
    case DwAct::kGelu:
      set_act_kernels<Isa, acc_t, DwAct::kGelu>(r);
      break;
    case DwAct::kRelu:
      set_act_kernels<Isa, acc_t, DwAct::kRelu>(r);
      break;
    default:
      set_act_kernels<Isa, acc_t, DwAct::kNone>(r);
  }
  r.ln_forward = &Isa::template ln_forward<acc_t>;
  r.ln_backward = &Isa::template ln_backward<acc_t>;
  r.mul = &Isa::template mul<acc_t>;
  r.copy2d = &Isa::template copy2d<acc_t>;
  r.transpose = &Isa::template transpose<acc_t>;
  return r;
}

}  // namespace

template <typename acc_t>
RowKernels<acc_t> row_kernels(int64_t k, DwAct act) {
#ifdef MK_DW_X86_DISPATCH
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const CpuIsa cap = cpu_isa_cap();
  if (avx512 && cap >= CpuIsa::kAvx512) return kernels_for<IsaAvx512, acc_t>(k, act);
  if (avx2 && cap >= CpuIsa::kAvx2) return kernels_for<IsaAvx2, acc_t>(k, act);
#endif
  return kernels_for<IsaBaseline, acc_t>(k, act);
}

template RowKernels<float> row_kernels<float>(int64_t, DwAct);
template RowKernels<double> row_kernels<double>(int64_t, DwAct);

}  // namespace dwcpu
}  // namespace medkernels
