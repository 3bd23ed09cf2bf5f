// CPU kernels of depthwise_conv2d_layernorm: LayerNorm over the channels of conv2d(x, w, b, groups=C),
// written channels-last (B, Ho, Wo, C) — HiFuse's Local block (depthwise 3x3 -> permute -> LayerNorm) in
// one pass. The row walk of depthwise_conv_cpu.h holds every output row channels-last already, so the
// LayerNorm of a pixel reads C contiguous values; the formulas are those of depthwise_conv_math.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/check_message.h"
#include "depthwise_conv/depthwise_conv_cpu.h"
#include "ops.h"

namespace medkernels {
namespace dwcpu {
namespace {

template <typename acc_t>
struct LayerNormEpilogue {
  const RowKernels<acc_t>* kern;
  LayerNormArgs<acc_t> args;
  bool needs_z = true;
  bool conv_fused = false;
  bool bwd_fused = false;

  void forward(const acc_t* z, acc_t* out) const { kern->ln_forward(args, z, out); }
  // extra: this task's d gamma (C,) then d beta (C,)
  void backward(const acc_t* z, const acc_t* gy, acc_t* gz, acc_t* extra, bool own) const {
    kern->ln_backward(args, z, gy, gz, own ? extra : nullptr, own ? extra + args.C : nullptr);
  }
};

// Strides of a (B, Ho, Wo, C) tensor seen as (B, C, Ho, Wo).
Strides bhwc_strides(const at::Tensor& t) {
  Strides s;
  s.b = t.stride(0);
  s.h = t.stride(1);
  s.w = t.stride(2);
  s.c = t.stride(3);
  return s;
}

template <typename T, typename acc_t>
std::vector<acc_t> vector_or(const c10::optional<at::Tensor>& v, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (v.has_value() && v->defined()) {
    const T* p = v->const_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

struct LnArgs {
  ConvArgs conv;
  bool has_gamma = false, has_beta = false;
};

LnArgs check_ln_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& ln_weight,
                     const c10::optional<at::Tensor>& ln_bias, int64_t stride, int64_t padding, double eps) {
  LnArgs a;
  a.conv = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CPU);
  dwconv::check_vector(op, "ln_weight", ln_weight, x, a.conv.g.C);
  dwconv::check_vector(op, "ln_bias", ln_bias, x, a.conv.g.C);
  MK_CHECK_VALUE(eps >= 0, op, ": expected eps >= 0, but got ", eps);
  a.has_gamma = ln_weight.has_value() && ln_weight->defined();
  a.has_beta = ln_bias.has_value() && ln_bias->defined();
  return a;
}

}  // namespace
}  // namespace dwcpu

using dwcpu::Geometry;
using dwcpu::Strides;

at::Tensor depthwise_conv2d_layernorm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& ln_weight,
                                              const c10::optional<at::Tensor>& ln_bias, int64_t stride,
                                              int64_t padding, double eps) {
  const char* op = "depthwise_conv2d_layernorm_fwd_cpu";
  const dwcpu::LnArgs a = dwcpu::check_ln_args(op, x, weight, bias, ln_weight, ln_bias, stride, padding, eps);
  const Geometry& g = a.conv.g;
  at::Tensor out = at::empty({g.B, g.Ho, g.Wo, g.C}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_layernorm_fwd_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const auto params = dwcpu::row_params<T, acc_t>(weight, a.conv.has_bias ? &*bias : nullptr, g.C, g.k, false);
    const auto gamma = dwcpu::vector_or<T, acc_t>(ln_weight, g.C, acc_t(1));
    const auto beta = dwcpu::vector_or<T, acc_t>(ln_bias, g.C, acc_t(0));
    dwcpu::RowProblem<T, acc_t> P;
    P.g = g;
    P.kern = dwcpu::row_kernels<acc_t>(g.k, DwAct::kNone);
    P.params = &params;
    P.x = x.const_data_ptr<T>();
    P.xs = Strides(x);
    P.out = out.mutable_data_ptr<T>();
    P.os = dwcpu::bhwc_strides(out);
    const dwcpu::LayerNormEpilogue<acc_t> epi{
        &P.kern, {gamma.data(), beta.data(), static_cast<acc_t>(eps), g.Wo, g.C}, true, false, false};
    at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t r0, int64_t r1) { dwcpu::rows_forward(P, epi, r0, r1); });
  });
  return out;
}

std::vector<at::Tensor> depthwise_conv2d_layernorm_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const c10::optional<at::Tensor>& ln_weight,
                                                           const c10::optional<at::Tensor>& ln_bias,
                                                           int64_t stride, int64_t padding, double eps) {
  const char* op = "depthwise_conv2d_layernorm_bwd_cpu";
  const dwcpu::LnArgs a = dwcpu::check_ln_args(op, x, weight, bias, ln_weight, ln_bias, stride, padding, eps);
  const Geometry& g = a.conv.g;
  dwconv::check_grad(op, grad, x, {g.B, g.Ho, g.Wo, g.C}, "(B, Ho, Wo, C)");
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(weight);
  at::Tensor gb = a.conv.has_bias ? at::empty_like(*bias) : at::Tensor();
  at::Tensor ggamma = a.has_gamma ? at::empty_like(*ln_weight) : at::Tensor();
  at::Tensor gbeta = a.has_beta ? at::empty_like(*ln_bias) : at::Tensor();
  const int64_t kk = g.k * g.k, C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_layernorm_bwd_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const int64_t stride_t = (kk + 3) * C;  // gw (k * k, C), gb (C,), d gamma (C,), d beta (C,)
    std::vector<acc_t> sums(stride_t, acc_t(0));
    if (g.B > 0 && C > 0) {
      const auto params = dwcpu::row_params<T, acc_t>(weight, a.conv.has_bias ? &*bias : nullptr, C, g.k);
      const auto gamma = dwcpu::vector_or<T, acc_t>(ln_weight, C, acc_t(1));
      const auto beta = dwcpu::vector_or<T, acc_t>(ln_bias, C, acc_t(0));
      dwcpu::RowProblem<T, acc_t> P;
      P.g = g;
      P.kern = dwcpu::row_kernels<acc_t>(g.k, DwAct::kNone);
      P.params = &params;
      P.x = x.const_data_ptr<T>();
      P.xs = Strides(x);
      P.grad = grad.const_data_ptr<T>();
      P.gs = dwcpu::bhwc_strides(grad);
      P.gx = gx.mutable_data_ptr<T>();
      P.gxs = Strides(gx);
      const dwcpu::LayerNormEpilogue<acc_t> epi{
          &P.kern, {gamma.data(), beta.data(), static_cast<acc_t>(eps), g.Wo, C}, true, false, false};
      const int64_t ntasks = g.B * dwcpu::band_count(g);
      std::vector<acc_t> part(ntasks * stride_t);
      at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
        dwcpu::rows_backward_tasks(P, epi, part.data(), stride_t, t0, t1);
      });
      dwcpu::reduce_partials(part.data(), ntasks, stride_t, stride_t, sums.data());
    }
    T* gwp = gw.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t e = 0; e < kk; ++e) gwp[c * kk + e] = static_cast<T>(sums[e * C + c]);
    const at::Tensor* outs[3] = {&gb, &ggamma, &gbeta};
    for (int64_t m = 0; m < 3; ++m) {
      if (!outs[m]->defined()) continue;
      T* dst = outs[m]->mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<T>(sums[(kk + m) * C + c]);
    }
  });
  return {gx, gw, gb, ggamma, gbeta};
}

}  // namespace medkernels
