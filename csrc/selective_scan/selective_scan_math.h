// Per-element math of the selective scan, shared by the C++ CPU kernels and the CUDA kernels so that the
// CPU tests exercise the formulas the GPU code runs. `acc_t` is the state/arithmetic type: float for
// float16/bfloat16/float32 inputs, double for float64 inputs.
//
// For one (batch, channel) and state index n, over positions t:
//   dt_t  = delta_t + delta_bias            (then softplus(dt_t) when delta_softplus)
//   x_t   = exp(dt_t * A_n) * x_{t-1} + dt_t * B_t,n * u_t          (x_{-1} = 0)
//   y_t   = sum_n C_t,n * x_t + D * u_t
//   out_t = y_t * silu(z_t)                  (when z is given)
// Backward, with g_t = d loss / d y_t and h_t,n = d loss / d x_t,n:
//   h_t,n = g_t * C_t,n + exp(dt_{t+1} * A_n) * h_{t+1},n          (h_{L-1} also gets d last_state)
//   dC_t,n = g_t * x_t,n;  dB_t,n = h_t,n * dt_t * u_t
//   du_t  = g_t * D + sum_n h_t,n * dt_t * B_t,n
//   ddt_t = sum_n h_t,n * (x_{t-1},n * exp(dt_t * A_n) * A_n + B_t,n * u_t)
//   dA_n  = sum_t h_t,n * x_{t-1},n * exp(dt_t * A_n) * dt_t
//   ddelta_t = ddt_t * sigmoid(delta_t + delta_bias) with softplus (else ddt_t); ddelta_bias = sum_t ddelta_t
#pragma once

#include <cmath>

#include "cross_scan/cross_scan.h"  // MK_HOST_DEVICE

namespace medkernels {

template <typename acc_t>
MK_HOST_DEVICE inline acc_t mk_exp(acc_t v) {
  return exp(v);
}
template <>
MK_HOST_DEVICE inline float mk_exp<float>(float v) {
  return expf(v);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t mk_log1p(acc_t v) {
  return log1p(v);
}
template <>
MK_HOST_DEVICE inline float mk_log1p<float>(float v) {
  return log1pf(v);
}

// softplus(v) = log(1 + exp(v)), linear above 20 as torch.nn.functional.softplus (threshold 20).
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_softplus(acc_t v) {
  return v <= acc_t(20) ? mk_log1p<acc_t>(mk_exp<acc_t>(v)) : v;
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + mk_exp<acc_t>(-v));
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_silu(acc_t v) {
  return v * ss_sigmoid<acc_t>(v);
}

// d silu(v) / dv = s * (1 + v * (1 - s)), s = sigmoid(v).
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_silu_grad(acc_t v) {
  const acc_t s = ss_sigmoid<acc_t>(v);
  return s * (acc_t(1) + v * (acc_t(1) - s));
}

// The step size dt from the raw delta: delta + bias, then softplus when asked.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_dt(acc_t delta, acc_t bias, bool softplus) {
  const acc_t v = delta + bias;
  return softplus ? ss_softplus<acc_t>(v) : v;
}

// d dt / d delta: sigmoid(delta + bias) with softplus (1 above the linear threshold), else 1.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_dt_grad(acc_t delta, acc_t bias, bool softplus) {
  const acc_t v = delta + bias;
  return softplus ? (v <= acc_t(20) ? ss_sigmoid<acc_t>(v) : acc_t(1)) : acc_t(1);
}

// One forward step of one state with its decay exp(dt * a) already computed: decay * x + dt * b * u.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_state_step_decayed(acc_t x, acc_t decay, acc_t dt, acc_t b, acc_t u) {
  return decay * x + dt * b * u;
}

// One forward step of one state: x <- exp(dt * a) * x + dt * b * u.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_state_step(acc_t x, acc_t dt, acc_t a, acc_t b, acc_t u) {
  return ss_state_step_decayed<acc_t>(x, mk_exp<acc_t>(dt * a), dt, b, u);
}

// The output of one position from y = sum_n C x: adds the skip D * u and the silu(z) gate.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t ss_output(acc_t y, acc_t u, acc_t d_skip, bool has_z, acc_t z) {
  const acc_t out = y + d_skip * u;
  return has_z ? out * ss_silu<acc_t>(z) : out;
}

}  // namespace medkernels
