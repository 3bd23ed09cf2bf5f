// Per-element math of the depthwise convolution's fused epilogues, shared by the C++ CPU kernels and the
// CUDA kernels so that the CPU tests exercise the formulas the GPU code runs. `acc_t` is the arithmetic
// type: float for float16/bfloat16/float32 inputs, double for float64 inputs.
//
// Activations of the pre-activation z = conv(x, w) + bias, and their derivatives d act / dz:
//   none  z                                    1
//   silu  z * sigmoid(z)                       s * (1 + z * (1 - s)),  s = sigmoid(z)
//   gelu  z / 2 * (1 + erf(z / sqrt(2)))       (1 + erf(z / sqrt(2))) / 2 + z * exp(-z^2 / 2) / sqrt(2 pi)
//   relu  max(z, 0), NaN for NaN               0 if z <= 0 else 1 (as torch's threshold_backward)
//
// LayerNorm over the C channels of one pixel (biased variance, eps inside the square root):
//   xhat_c = (z_c - mean) * rstd,  rstd = 1 / sqrt(var + eps),  out_c = xhat_c * gamma_c + beta_c
// Backward with gy = d loss / d out:  g_c = gy_c * gamma_c,
//   dz_c = rstd * (g_c - mean_c(g) - xhat_c * mean_c(g * xhat)),  dgamma_c += gy_c * xhat_c,  dbeta_c += gy_c
#pragma once

#include <cmath>

#include "cross_scan/cross_scan.h"  // MK_HOST_DEVICE

namespace medkernels {

enum class DwAct : int { kNone = 0, kSilu = 1, kGelu = 2, kRelu = 3 };

template <typename acc_t>
MK_HOST_DEVICE inline acc_t dw_exp(acc_t v) {
  return exp(v);
}
template <>
MK_HOST_DEVICE inline float dw_exp<float>(float v) {
  return expf(v);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t dw_erf(acc_t v) {
  return erf(v);
}
template <>
MK_HOST_DEVICE inline float dw_erf<float>(float v) {
  return erff(v);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t dw_sqrt(acc_t v) {
  return sqrt(v);
}
template <>
MK_HOST_DEVICE inline float dw_sqrt<float>(float v) {
  return sqrtf(v);
}

// The elementary functions the formulas below call: the C library's (host) or CUDA's (device). The CPU
// kernels pass their own policy (inlinable float exp and reciprocal), so that their loops vectorise into
// straight-line code without library calls or divisions.
struct DwLibMath {
  template <typename acc_t>
  MK_HOST_DEVICE static acc_t exp(acc_t v) {
    return dw_exp<acc_t>(v);
  }
  template <typename acc_t>
  MK_HOST_DEVICE static acc_t erf(acc_t v) {
    return dw_erf<acc_t>(v);
  }
  // 1 / v for v >= 1 (the sigmoid's denominator).
  template <typename acc_t>
  MK_HOST_DEVICE static acc_t recip(acc_t v) {
    return acc_t(1) / v;
  }
};

template <typename acc_t, typename M = DwLibMath>
MK_HOST_DEVICE inline acc_t dw_sigmoid(acc_t z) {
  return M::template recip<acc_t>(acc_t(1) + M::template exp<acc_t>(-z));
}

template <DwAct A, typename acc_t, typename M = DwLibMath>
MK_HOST_DEVICE inline acc_t dw_activation(acc_t z) {
  if constexpr (A == DwAct::kSilu) {
    return z * dw_sigmoid<acc_t, M>(z);
  } else if constexpr (A == DwAct::kGelu) {
    return acc_t(0.5) * z * (acc_t(1) + M::template erf<acc_t>(z * acc_t(0.70710678118654752440)));
  } else if constexpr (A == DwAct::kRelu) {
    return z <= acc_t(0) ? acc_t(0) : z;  // NaN stays NaN, as torch.relu
  } else {
    return z;
  }
}

template <DwAct A, typename acc_t, typename M = DwLibMath>
MK_HOST_DEVICE inline acc_t dw_activation_grad(acc_t z) {
  if constexpr (A == DwAct::kSilu) {
    const acc_t s = dw_sigmoid<acc_t, M>(z);
    return s * (acc_t(1) + z * (acc_t(1) - s));
  } else if constexpr (A == DwAct::kGelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + M::template erf<acc_t>(z * acc_t(0.70710678118654752440)));
    const acc_t pdf = M::template exp<acc_t>(acc_t(-0.5) * z * z) * acc_t(0.39894228040143267794);
    return cdf + z * pdf;
  } else if constexpr (A == DwAct::kRelu) {
    return z <= acc_t(0) ? acc_t(0) : acc_t(1);
  } else {
    return acc_t(1);
  }
}

// 1 / sqrt(var + eps) of LayerNorm.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t dw_ln_rstd(acc_t var, acc_t eps) {
  return acc_t(1) / dw_sqrt<acc_t>(var + eps);
}

// dz of one channel of LayerNorm's backward: rstd * (g - mean(g) - xhat * mean(g * xhat)), g = gy * gamma.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t dw_ln_input_grad(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_g, acc_t mean_gxhat) {
  return rstd * (g - mean_g - xhat * mean_gxhat);
}

}  // namespace medkernels
