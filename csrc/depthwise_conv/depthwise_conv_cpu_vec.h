// Vector primitives of the CPU depthwise row kernels (depthwise_conv_cpu_kernels.cpp, which alone includes
// this header): GCC vector types of any width, the inline float exp / reciprocal / sigmoid, the activations
// applied to channel vectors, and how many kernel rows fit in registers.
#pragma once

#include <cstring>
#include <type_traits>
#include <utility>

#include "common/cpu_simd.h"
#include "depthwise_conv/depthwise_conv_cpu.h"

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
MK_CPU_INLINE void vload(V& v, const S* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename S>
MK_CPU_INLINE void vstore(S* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename S>
MK_CPU_INLINE void vbroadcast(V& v, S s) {
  if constexpr (std::is_same_v<V, S>) {
    v = s;
  } else {
    for (int e = 0; e < static_cast<int>(sizeof(V) / sizeof(S)); ++e) v[e] = s;  // one broadcast instruction
  }
}
template <typename S, typename V>
MK_CPU_INLINE S vsum(const V& v) {
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
MK_CPU_INLINE void vclamp(V& x, float lo, float hi) {
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
MK_CPU_INLINE void fast_exp_inplace(V& x) {
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
MK_CPU_INLINE void fast_recip_inplace(V& v) {
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
  static MK_CPU_INLINE acc_t exp(acc_t v) {
    if constexpr (std::is_same_v<acc_t, float>) {
      fast_exp_inplace(v);
      return v;
    } else {
      return dw_exp<acc_t>(v);
    }
  }
  template <typename acc_t>
  static MK_CPU_INLINE acc_t erf(acc_t v) {
    return dw_erf<acc_t>(v);
  }
  template <typename acc_t>
  static MK_CPU_INLINE acc_t recip(acc_t v) {
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
#ifdef MK_CPU_X86_DISPATCH
template <>
struct IsZmmFloat<VecOf<float, 64>::type> : std::true_type {};
#endif

template <typename V>
MK_CPU_INLINE V zmm_sigmoid(const V& z) {
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
MK_CPU_INLINE V vec_sigmoid(const V& z) {
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
MK_CPU_INLINE V silu_derivative(const V& z, const V& s) {
  return s * (1.0f + z * (1.0f - s));
}

// The activations that the float convolution kernels apply to each channel vector of outputs right after
// computing it, while it is in L1 (no extra pass over memory): SiLU as dw_activation<kSilu> with CpuMath
// states it, z * 1 / (1 + e^-z) (zmm_sigmoid with AVX-512); ReLU; none. GELU (erf) and float64 go through
// act_forward afterwards.
template <DwAct A>
struct VecActivation {
  template <typename V>
  static MK_CPU_INLINE void apply(V& z) {
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
  static MK_CPU_INLINE void apply(V& z, const V& g) {
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

}  // namespace
}  // namespace dwcpu
}  // namespace medkernels
