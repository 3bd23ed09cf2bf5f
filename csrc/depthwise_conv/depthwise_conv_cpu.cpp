// CPU kernels of depthwise_conv2d: act(conv2d(x, w, b, stride, padding, groups=C)), forward and backward,
// with the bias and the activation fused. The walks (planes for NCHW in and out, channels-last rows for
// everything else) are described in depthwise_conv_cpu.h; the vector row kernels they call live in
// depthwise_conv_cpu_kernels.cpp; the activation formulas in depthwise_conv_math.h (shared with CUDA).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <string>

#include "common/check_message.h"
#include "depthwise_conv/depthwise_conv_cpu.h"
#include "ops.h"

namespace medkernels {
namespace dwcpu {
namespace {

// The activation epilogue of the row walk, on (Wo, C) rows.
template <typename acc_t>
struct ActEpilogue {
  const RowKernels<acc_t>* kern;
  int64_t n;  // Wo * C
  bool needs_z;
  bool conv_fused;  // the convolution kernel applies the activation (RowKernels::conv_rows_act)
  bool bwd_fused;   // the backward goes through RowKernels::bwd_rows

  void forward(const acc_t* z, acc_t* out) const { kern->act_forward(z, out, n); }
  void backward(const acc_t* z, const acc_t* g, acc_t* gz, acc_t*, bool) const { kern->act_backward(z, g, gz, n); }
};

// ------------------------------------------------------------------------------------------------------
// The plane walk (NCHW in and out)
//
// Stride 1 treats a plane as one long row: with the padded input rows `pitch` apart, output (oh, ow) at
// oh * pitch + ow reads tap (i, j) at oh * pitch + ow + i * pitch + j, so one vector loop over the flat
// index covers the plane (the pitch - Wo columns past each row's end are computed and dropped). In the
// backward the gradient rows are padded with zeros past Wo, so those columns' d loss / d z are zero and
// land harmlessly in the dilated plane's padding. Larger strides go row by row over the phase-split rows.

template <typename T, typename acc_t>
struct PlaneProblem {
  Geometry g;
  RowKernels<acc_t> kern;
  bool needs_z = true;
  const T* x = nullptr;
  Strides xs;
  const T* w = nullptr;     // (C, k * k)
  const T* bias = nullptr;  // (C,) or null
  T* out = nullptr;
  Strides os;
  const T* grad = nullptr;
  Strides gs;
  T* gx = nullptr;
  Strides gxs;
  acc_t* part = nullptr;  // (B * C, k * k + 1): per-plane d weight then d bias
};

// Padded input plane (b, c) into buf. Stride 1: padded row r = ih + p at r * pitch, column q = iw + p at q.
// Stride s > 1: row r at r * s * phase_len, column q at phase q % s, index q / s (pitch is ignored). Only
// the positions of input values are written: buf starts zeroed and the padding stays zero from plane to plane.
template <typename T, typename acc_t>
void load_plane(const PlaneProblem<T, acc_t>& P, int64_t b, int64_t c, int64_t pitch, int64_t phase_len,
                acc_t* buf) {
  const Geometry& g = P.g;
  const int64_t s = g.s, p = g.p;
  const int64_t row_elems = s == 1 ? pitch : s * phase_len;
  const int64_t n = std::max<int64_t>(0, std::min(g.W, g.padded_cols() - p));  // input columns that are read
  const int64_t rows = std::min(g.H, g.padded_rows() - p);
  const T* plane = P.x + b * P.xs.b + c * P.xs.c;
  for (int64_t ih = 0; ih < rows; ++ih) {
    acc_t* dst = buf + (ih + p) * row_elems;
    const T* src = plane + ih * P.xs.h;
    if (s == 1 && P.xs.w == 1) {
      convert_run(P.kern, src, n, dst + p);
      continue;
    }
    for (int64_t ph = 0; ph < s; ++ph) {
      int64_t iw = ((ph - p) % s + s) % s;  // the first input column with (iw + p) % s == ph
      acc_t* out = dst + (s == 1 ? 0 : ph * phase_len) + (iw + p) / s;
      for (; iw < n; iw += s) *out++ = static_cast<acc_t>(src[iw * P.xs.w]);
    }
  }
}

// n rounded up to whole vectors of the widest ISA: scratch rows are allocated with that slack, so that the
// elementwise kernels run without a scalar remainder.
inline int64_t padded_len(int64_t n) {
  return (n + 15) / 16 * 16;
}

template <typename T, typename acc_t>
void store_plane_row(const RowKernels<acc_t>& kern, const acc_t* src, T* dst, int64_t n, int64_t stride) {
  if constexpr (std::is_same_v<T, acc_t>) {
    if (stride == 1) {
      convert_run(kern, src, n, dst);
      return;
    }
  }
  for (int64_t e = 0; e < n; ++e) dst[e * stride] = static_cast<T>(src[e]);
}

template <typename T, typename acc_t>
void plane_forward_tasks(const PlaneProblem<T, acc_t>& P, int64_t t0, int64_t t1) {
  const Geometry& g = P.g;
  const int64_t k = g.k, kk = k * k, s = g.s;
  const int64_t pitch = g.padded_cols(), phase_len = ceil_div(g.padded_cols(), s);
  const int64_t row_elems = s == 1 ? pitch : s * phase_len;
  // stride 1: the flat outputs, Ho rows `pitch` apart; else one row
  const int64_t flat = s == 1 ? (g.Ho - 1) * pitch + g.Wo : g.Wo;
  std::vector<acc_t> buf(g.padded_rows() * row_elems), z(padded_len(flat)), w(kk);
  const acc_t* rows[kMaxKernel];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / g.C, c = t % g.C;
    load_plane(P, b, c, pitch, phase_len, buf.data());
    for (int64_t e = 0; e < kk; ++e) w[e] = static_cast<acc_t>(P.w[c * kk + e]);
    const acc_t bias = P.bias ? static_cast<acc_t>(P.bias[c]) : acc_t(0);
    T* plane = P.out + b * P.os.b + c * P.os.c;
    const bool fused = P.kern.act_fused;
    const auto conv = fused ? P.kern.conv_plane_act : P.kern.conv_plane;
    if (s == 1) {
      for (int64_t i = 0; i < k; ++i) rows[i] = buf.data() + i * pitch;
      conv({rows, w.data(), bias, z.data(), flat, 1, 0, k});
      if (!fused) P.kern.act_forward(z.data(), z.data(), padded_len(flat));
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        store_plane_row(P.kern, z.data() + oh * pitch, plane + oh * P.os.h, g.Wo, P.os.w);
      continue;
    }
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      for (int64_t i = 0; i < k; ++i) rows[i] = buf.data() + (oh * s + i) * row_elems;
      conv({rows, w.data(), bias, z.data(), g.Wo, s, phase_len, k});
      if (!fused) P.kern.act_forward(z.data(), z.data(), padded_len(g.Wo));
      store_plane_row(P.kern, z.data(), plane + oh * P.os.h, g.Wo, P.os.w);
    }
  }
}

template <typename T, typename acc_t>
void plane_backward_tasks(const PlaneProblem<T, acc_t>& P, int64_t t0, int64_t t1) {
  const Geometry& g = P.g;
  const int64_t k = g.k, kk = k * k, s = g.s, p = g.p;
  // stride 1 keeps every plane at the dilated plane's pitch, so the flat index means the same everywhere
  const int64_t pitch = g.dilated_cols(), phase_len = ceil_div(g.padded_cols(), s);
  const int64_t row_elems = s == 1 ? pitch : s * phase_len;
  const int64_t flat = s == 1 ? (g.Ho - 1) * pitch + g.Wo : g.Wo;
  const int64_t flat_in = (g.H - 1) * pitch + g.W;
  const int64_t dsize = g.dilated_rows() * pitch;
  // the padding of buf, dbuf and grow is zeroed here once and never written
  std::vector<acc_t> buf(g.padded_rows() * row_elems), dbuf(dsize), z(padded_len(flat));
  std::vector<acc_t> grow(padded_len(s == 1 ? g.Ho * pitch : g.Wo)), gz_row(padded_len(g.Wo));
  std::vector<acc_t> gxflat(flat_in), w(kk), wflip(kk);
  const acc_t* rows[kMaxKernel];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / g.C, c = t % g.C;
    load_plane(P, b, c, pitch, phase_len, buf.data());
    for (int64_t e = 0; e < kk; ++e) {
      w[e] = static_cast<acc_t>(P.w[c * kk + e]);
      wflip[kk - 1 - e] = w[e];
    }
    const acc_t bias = P.bias ? static_cast<acc_t>(P.bias[c]) : acc_t(0);
    acc_t* gw = P.part + t * (kk + 1);
    std::fill(gw, gw + kk + 1, acc_t(0));
    const T* gplane = P.grad + b * P.gs.b + c * P.gs.c;
    // d loss / d z of output (oh, ow) goes to the dilated plane at (k - 1 + oh * s, k - 1 + ow * s)
    acc_t* gz0 = dbuf.data() + (k - 1) * pitch + (k - 1);
    if (s == 1) {
      for (int64_t i = 0; i < k; ++i) rows[i] = buf.data() + i * pitch;
      if (P.needs_z) P.kern.conv_plane({rows, w.data(), bias, z.data(), flat, 1, 0, k});
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const T* src = gplane + oh * P.gs.h;
        acc_t* dst = grow.data() + oh * pitch;
        for (int64_t o = 0; o < g.Wo; ++o) dst[o] = static_cast<acc_t>(src[o * P.gs.w]);
      }
      // the columns past Wo have zero gradient, so their d loss / d z is zero in dbuf's padding
      P.kern.act_backward(z.data(), grow.data(), gz0, flat);
      P.kern.grads_plane({rows, gz0, gw, gw + kk, flat, 1, 0, k});
    } else {
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for (int64_t i = 0; i < k; ++i) rows[i] = buf.data() + (oh * s + i) * row_elems;
        if (P.needs_z) P.kern.conv_plane({rows, w.data(), bias, z.data(), g.Wo, s, phase_len, k});
        const T* src = gplane + oh * P.gs.h;
        for (int64_t o = 0; o < g.Wo; ++o) grow[o] = static_cast<acc_t>(src[o * P.gs.w]);
        P.kern.act_backward(z.data(), grow.data(), gz_row.data(), padded_len(g.Wo));
        P.kern.grads_plane({rows, gz_row.data(), gw, gw + kk, g.Wo, s, phase_len, k});
        acc_t* drow = gz0 + oh * s * pitch;
        for (int64_t o = 0; o < g.Wo; ++o) drow[o * s] = gz_row[o];
      }
    }
    // the input gradient: the flipped kernel over the dilated plane, read from (p, p), flat at the pitch
    for (int64_t i = 0; i < k; ++i) rows[i] = dbuf.data() + (p + i) * pitch + p;
    P.kern.conv_plane({rows, wflip.data(), acc_t(0), gxflat.data(), flat_in, 1, 0, k});
    T* gxplane = P.gx + b * P.gxs.b + c * P.gxs.c;
    for (int64_t ih = 0; ih < g.H; ++ih)
      store_plane_row(P.kern, gxflat.data() + ih * pitch, gxplane + ih * P.gxs.h, g.W, P.gxs.w);
  }
}


// Rows of NCHW kind: the W stride is 1 (or W is 1).
bool w_contiguous(const at::Tensor& t) {
  return t.size(3) == 1 || t.stride(3) == 1;
}

// Output rows at least this wide go through the plane walk when the layouts allow it; narrower planes cost
// more per element there (per-plane set-up, short vector loops) than the row walk's transposes.
constexpr int64_t kMinPlaneWidth = 20;

}  // namespace

}  // namespace dwcpu

// ------------------------------------------------------------------------------------------------------
// Entry points

using dwcpu::Geometry;
using dwcpu::Strides;

namespace {

// Whether the forward can save act'(z) for the backward (depthwise_conv2d_fwd_save_cpu): SiLU or GELU (ReLU's
// backward, g where z > 0, would not keep PyTorch's zero for a non-finite g as a product g * act'(z) does; it
// is cheap to recompute anyway), the computing type, stride 1 and outputs the size of the input (the input
// gradient then takes dact's place), and the row walk.
bool can_save_derivative(const at::Tensor& x, const Geometry& g, DwAct act, bool planes) {
  const auto t = x.scalar_type();
  return (act == DwAct::kSilu || act == DwAct::kGelu) && (t == at::kFloat || t == at::kDouble) && g.s == 1 &&
         g.Ho == g.H && g.Wo == g.W && !planes;
}

bool uses_planes(const at::Tensor& x, const Geometry& g, bool channels_last) {
  return !channels_last && dwcpu::w_contiguous(x) && g.Wo >= dwcpu::kMinPlaneWidth;
}

// The forward; with dact non-null, also allocates it (x's shape and layout: only called so when the output
// has x's size) and writes act'(z) to it.
at::Tensor conv_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const dwcpu::ConvArgs& a, DwAct act,
                        bool channels_last, at::Tensor* dact) {
  const Geometry& g = a.g;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options().memory_format(format));
  if (dact != nullptr) *dact = at::empty_like(x);  // x's layout, as the input gradient that it becomes
  if (out.numel() == 0) return out;
  const bool planes = uses_planes(x, g, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_fwd_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const auto kern = dwcpu::row_kernels<acc_t>(g.k, act);
    if (planes) {
      dwcpu::PlaneProblem<T, acc_t> P;
      P.g = g;
      P.kern = kern;
      P.x = x.const_data_ptr<T>();
      P.xs = Strides(x);
      P.w = weight.const_data_ptr<T>();
      P.bias = a.has_bias ? bias->const_data_ptr<T>() : nullptr;
      P.out = out.mutable_data_ptr<T>();
      P.os = Strides(out);
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t t0, int64_t t1) { dwcpu::plane_forward_tasks(P, t0, t1); });
    } else {
      const auto params = dwcpu::row_params<T, acc_t>(weight, a.has_bias ? &*bias : nullptr, g.C, g.k, false);
      auto P = dwcpu::make_row_problem<T>(g, kern, params, x);
      P.out = out.mutable_data_ptr<T>();
      P.os = Strides(out);
      if (dact != nullptr) {
        P.dact = dact->mutable_data_ptr<T>();
        P.ds = Strides(*dact);
      }
      const dwcpu::ActEpilogue<acc_t> epi{&P.kern, g.Wo * g.C, act != DwAct::kNone, P.kern.act_fused, false};
      at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t r0, int64_t r1) { dwcpu::rows_forward(P, epi, r0, r1); });
    }
  });
  return out;
}

}  // namespace

at::Tensor depthwise_conv2d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                                    const std::string& activation, bool channels_last) {
  const char* op = "depthwise_conv2d_fwd_cpu";
  const dwcpu::ConvArgs a = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CPU);
  const DwAct act = dwconv::parse_activation(op, activation);
  return conv_forward(op, x, weight, bias, a, act, channels_last, nullptr);
}

std::vector<at::Tensor> depthwise_conv2d_fwd_save_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias, int64_t stride,
                                                      int64_t padding, const std::string& activation,
                                                      bool channels_last) {
  const char* op = "depthwise_conv2d_fwd_save_cpu";
  const dwcpu::ConvArgs a = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CPU);
  const DwAct act = dwconv::parse_activation(op, activation);
  if (!can_save_derivative(x, a.g, act, uses_planes(x, a.g, channels_last))) {
    return {conv_forward(op, x, weight, bias, a, act, channels_last, nullptr), at::empty({0}, x.options())};
  }
  at::Tensor dact;
  at::Tensor out = conv_forward(op, x, weight, bias, a, act, channels_last, &dact);
  return {out, dact};
}

namespace {

// The row walk's backward: gx and the parameter gradients' sums dw (C, k * k), db (C,). With dact (the saved
// derivative, which must be gx; act is then ignored), d loss / d z = grad * dact and gx is written over it.
template <typename T, typename acc_t>
void rows_backward(const Geometry& g, const dwcpu::RowKernels<acc_t>& kern, const at::Tensor& x,
                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& grad,
                   DwAct act, at::Tensor& gx, const at::Tensor* dact, acc_t* dw, acc_t* db) {
  const int64_t kk = g.k * g.k, C = g.C;
  const bool has_bias = dwconv::present(bias);
  const auto params = dwcpu::row_params<T, acc_t>(weight, has_bias ? &*bias : nullptr, C, g.k);
  auto P = dwcpu::make_row_problem<T>(g, kern, params, x);
  P.grad = grad.const_data_ptr<T>();
  P.gs = Strides(grad);
  P.gx = gx.mutable_data_ptr<T>();
  P.gxs = Strides(gx);
  std::vector<acc_t> halo;
  if (dact != nullptr) {
    P.dact = P.gx;
    P.ds = P.gxs;
    halo.resize(g.B * (dwcpu::band_count(g) - 1) * dwcpu::halo_rows(g) * g.Wo * C);
    dwcpu::copy_halo(P, halo.data());
    P.halo = halo.data();
  }
  // with dact, nothing is recomputed (needs_z false) and rows_backward_band forms grad * dact
  const bool with_act = act != DwAct::kNone && dact == nullptr;
  const dwcpu::ActEpilogue<acc_t> epi{&P.kern, g.Wo * C, with_act, false, with_act && P.kern.bwd_fused};
  const int64_t ntasks = g.B * dwcpu::band_count(g), stride_t = (kk + 1) * C;
  std::vector<acc_t> part(ntasks * stride_t);
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    dwcpu::rows_backward_tasks(P, epi, part.data(), stride_t, t0, t1);
  });
  std::vector<acc_t> sums(stride_t);  // (k * k + 1, C)
  dwcpu::reduce_partials(part.data(), ntasks, stride_t, stride_t, sums.data());
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t e = 0; e < kk; ++e) dw[c * kk + e] = sums[e * C + c];
    db[c] = sums[kk * C + c];
  }
}

// The parameter gradients' sums in acc_t into gw (C, 1, k, k) and gb (C,) (when given).
template <typename T, typename acc_t>
void store_param_grads(const std::vector<acc_t>& dw, const std::vector<acc_t>& db, at::Tensor& gw, at::Tensor* gb) {
  T* gwp = gw.mutable_data_ptr<T>();
  for (size_t e = 0; e < dw.size(); ++e) gwp[e] = static_cast<T>(dw[e]);
  if (gb != nullptr) {
    T* gbp = gb->mutable_data_ptr<T>();
    for (size_t c = 0; c < db.size(); ++c) gbp[c] = static_cast<T>(db[c]);
  }
}

}  // namespace

std::vector<at::Tensor> depthwise_conv2d_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                 int64_t stride, int64_t padding, const std::string& activation) {
  const char* op = "depthwise_conv2d_bwd_cpu";
  const dwcpu::ConvArgs a = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CPU);
  const DwAct act = dwconv::parse_activation(op, activation);
  const Geometry& g = a.g;
  dwconv::check_grad(op, grad, x, {g.B, g.C, g.Ho, g.Wo}, "(B, C, Ho, Wo)");
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(weight);
  at::Tensor gb = a.has_bias ? at::empty_like(*bias) : at::Tensor();
  const int64_t kk = g.k * g.k, C = g.C;
  const bool planes = dwcpu::w_contiguous(x) && dwcpu::w_contiguous(grad) && dwcpu::w_contiguous(gx) &&
                      g.Wo >= dwcpu::kMinPlaneWidth;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_bwd_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    std::vector<acc_t> dw(C * kk, acc_t(0)), db(C, acc_t(0));
    if (g.B > 0 && C > 0) {
      const auto kern = dwcpu::row_kernels<acc_t>(g.k, act);
      if (planes) {
        dwcpu::PlaneProblem<T, acc_t> P;
        P.g = g;
        P.kern = kern;
        P.needs_z = act != DwAct::kNone;
        P.x = x.const_data_ptr<T>();
        P.xs = Strides(x);
        P.w = weight.const_data_ptr<T>();
        P.bias = a.has_bias ? bias->const_data_ptr<T>() : nullptr;
        P.grad = grad.const_data_ptr<T>();
        P.gs = Strides(grad);
        P.gx = gx.mutable_data_ptr<T>();
        P.gxs = Strides(gx);
        std::vector<acc_t> part(g.B * C * (kk + 1));
        P.part = part.data();
        at::parallel_for(0, g.B * C, 1, [&](int64_t t0, int64_t t1) { dwcpu::plane_backward_tasks(P, t0, t1); });
        std::vector<acc_t> sums(C * (kk + 1));  // (C, k * k + 1), summed over the batch in order
        dwcpu::reduce_partials(part.data(), g.B, C * (kk + 1), C * (kk + 1), sums.data());
        for (int64_t c = 0; c < C; ++c) {
          std::copy(sums.begin() + c * (kk + 1), sums.begin() + c * (kk + 1) + kk, dw.begin() + c * kk);
          db[c] = sums[c * (kk + 1) + kk];
        }
      } else {
        rows_backward<T, acc_t>(g, kern, x, weight, bias, grad, act, gx, nullptr, dw.data(), db.data());
      }
    }
    store_param_grads<T, acc_t>(dw, db, gw, a.has_bias ? &gb : nullptr);
  });
  return {gx, gw, gb};
}

std::vector<at::Tensor> depthwise_conv2d_bwd_saved_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias, const at::Tensor& dact,
                                                       int64_t stride, int64_t padding) {
  const char* op = "depthwise_conv2d_bwd_saved_cpu";
  const dwcpu::ConvArgs a = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CPU);
  const Geometry& g = a.g;
  dwconv::check_grad(op, grad, x, {g.B, g.C, g.Ho, g.Wo}, "(B, C, Ho, Wo)");
  MK_CHECK_VALUE(stride == 1 && g.Ho == g.H && g.Wo == g.W, op,
                 ": a saved derivative needs stride 1 and outputs the size of the input, got stride ", stride,
                 " and padding ", padding, " for kernel size ", g.k);
  MK_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": a saved derivative needs float32 or float64, got ", x.scalar_type());
  MK_CHECK_VALUE(dact.defined() && dact.sizes() == grad.sizes(), op, ": expected dact to have shape (B, C, Ho, Wo) = ",
                 grad.sizes(), ", but got ", dact.defined() ? dact.sizes() : at::IntArrayRef{});
  MK_CHECK_TYPE(dact.scalar_type() == x.scalar_type(), op, ": expected dact to have x's dtype ", x.scalar_type(),
                ", but got ", dact.scalar_type());
  MK_CHECK_VALUE(dact.device() == x.device(), op, ": expected dact on x's device ", x.device(), ", but it is on ",
                 dact.device());
  // the input gradient is written over dact, row by row
  MK_CHECK_VALUE(dact.is_non_overlapping_and_dense(), op, ": expected dact to be dense (its storage becomes the ",
                 "input gradient)");
  const int64_t kk = g.k * g.k, C = g.C;
  at::Tensor gw = at::empty_like(weight);
  at::Tensor gb = a.has_bias ? at::empty_like(*bias) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_bwd_saved_cpu", [&] {
    using T = scalar_t;
    std::vector<T> dw(C * kk, T(0)), db(C, T(0));
    if (g.B > 0 && C > 0 && g.H > 0 && g.W > 0) {
      const auto kern = dwcpu::row_kernels<T>(g.k, DwAct::kNone);
      at::Tensor gx = dact;
      rows_backward<T, T>(g, kern, x, weight, bias, grad, DwAct::kNone, gx, &dact, dw.data(), db.data());
    }
    store_param_grads<T, T>(dw, db, gw, a.has_bias ? &gb : nullptr);
  });
  return {dact, gw, gb};
}

}  // namespace medkernels
