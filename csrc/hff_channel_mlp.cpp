// The channel gate's MLP (see hff_channel_mlp.h). On CUDA a few ATen products (cuBLAS); on CPU plain loops
// on the calling thread, in double: the products are tiny (batch x 2 x C by C x hidden), a BLAS library's
// thread pool costs more than they do (and much more when the machine is busy), and double sums cost nothing
// here while keeping the gate's gradients as exact as the pooled inputs allow. The loops' order is fixed, so
// the results are deterministic.

#include "hff_channel_mlp.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "hff_attention_math.h"
#include "hff_cpu_utils.h"

namespace medkernels {
namespace {

struct MlpSizes {
  int64_t batch, channels, hidden;
};

MlpSizes mlp_sizes(const at::Tensor& pooled, const at::Tensor& fc1_weight) {
  return {pooled.size(0), pooled.size(2), fc1_weight.size(0)};
}

// pre (B, 2, hidden) = pooled @ fc1^T and hidden (B, hidden) = relu(pre[:, 0]) + relu(pre[:, 1]).
template <typename acc_t>
MK_HFF_INLINE void mlp_hidden(const MlpSizes& n, const acc_t* pooled, const acc_t* w1, acc_t* pre, acc_t* hidden) {
  for (int64_t b = 0; b < n.batch; ++b) {
    for (int64_t j = 0; j < n.hidden; ++j) {
      acc_t h = acc_t(0);
      for (int64_t s = 0; s < 2; ++s) {
        const acc_t* v = pooled + (b * 2 + s) * n.channels;
        const acc_t* w = w1 + j * n.channels;
        const acc_t p = hff_cpu::lane_sum<acc_t>(n.channels, [&](int64_t c) { return v[c] * w[c]; });
        pre[(b * 2 + s) * n.hidden + j] = p;
        h += p <= acc_t(0) ? acc_t(0) : p;  // relu, NaN kept (as torch.relu)
      }
      hidden[b * n.hidden + j] = h;
    }
  }
}

// gate (B, C) = sigmoid(hidden @ fc2^T).
template <typename acc_t>
MK_HFF_INLINE void mlp_gate(const MlpSizes& n, const acc_t* hidden, const acc_t* w2, acc_t* gate) {
  for (int64_t b = 0; b < n.batch; ++b) {
    const acc_t* h = hidden + b * n.hidden;
    for (int64_t c = 0; c < n.channels; ++c) {
      const acc_t* w = w2 + c * n.hidden;
      gate[b * n.channels + c] = hff_sigmoid<acc_t>(hff_cpu::lane_sum<acc_t>(n.hidden, [&](int64_t j) { return h[j] * w[j]; }));
    }
  }
}

// A contiguous CPU tensor's values in double. The conversions are plain loops: ATen's copy and fill would
// open parallel regions for these few tens of thousands of values.
std::vector<double> to_double(const at::Tensor& t) {
  std::vector<double> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "hff_channel_mlp_to_double", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(src[i]);
  });
  return out;
}

at::Tensor from_double(const std::vector<double>& values, at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "hff_channel_mlp_from_double", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) dst[i] = static_cast<scalar_t>(values[i]);
  });
  return out;
}

struct MlpForward {
  MlpSizes n;
  const double *pooled, *w1, *w2;
  double *pre, *hidden, *gate;
};

MK_HFF_INLINE void mlp_forward_body(const MlpForward& f) {
  mlp_hidden(f.n, f.pooled, f.w1, f.pre, f.hidden);
  mlp_gate(f.n, f.hidden, f.w2, f.gate);
}

void mlp_forward_generic(const MlpForward& f) { mlp_forward_body(f); }
#ifdef MK_HFF_X86_DISPATCH
MK_HFF_TARGET_AVX2 void mlp_forward_avx2(const MlpForward& f) { mlp_forward_body(f); }
#endif

at::Tensor mlp_gate_cpu(const at::Tensor& pooled, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  const MlpSizes n = mlp_sizes(pooled, fc1_weight);
  const std::vector<double> p = to_double(pooled), w1 = to_double(fc1_weight), w2 = to_double(fc2_weight);
  std::vector<double> pre(n.batch * 2 * n.hidden), hidden(n.batch * n.hidden), gate(n.batch * n.channels);
  const MlpForward f{n, p.data(), w1.data(), w2.data(), pre.data(), hidden.data(), gate.data()};
#ifdef MK_HFF_X86_DISPATCH
  if (hff_cpu::use_avx2()) {
    mlp_forward_avx2(f);
  } else {
    mlp_forward_generic(f);
  }
#else
  mlp_forward_generic(f);
#endif
  return from_double(gate, {n.batch, n.channels}, pooled.options());
}

struct MlpBackward {
  MlpSizes n;
  const double *p, *w1, *w2, *dg;
  double *s, *dp, *dw1, *dw2, *pre, *hidden, *dhidden;  // s: the gate, recomputed
};

MK_HFF_INLINE void mlp_backward_body(const MlpBackward& m) {
  const MlpSizes& n = m.n;
  const double *p = m.p, *w1 = m.w1, *w2 = m.w2, *dg = m.dg;
  double *s = m.s, *dp = m.dp, *dw1 = m.dw1, *dw2 = m.dw2, *pre = m.pre, *hidden = m.hidden, *dhidden = m.dhidden;
  mlp_hidden(n, p, w1, pre, hidden);
  mlp_gate(n, hidden, w2, s);
  for (int64_t b = 0; b < n.batch; ++b) {
    const double* h = hidden + b * n.hidden;
    std::fill(dhidden, dhidden + n.hidden, 0.0);
    for (int64_t c = 0; c < n.channels; ++c) {
      const double dlogit = dg[b * n.channels + c] * hff_sigmoid_grad<double>(s[b * n.channels + c]);
      const double* w = w2 + c * n.hidden;
      double* dw = dw2 + c * n.hidden;
      for (int64_t j = 0; j < n.hidden; ++j) {
        dw[j] += dlogit * h[j];
        dhidden[j] += dlogit * w[j];
      }
    }
    for (int64_t si = 0; si < 2; ++si) {
      const double* v = p + (b * 2 + si) * n.channels;
      double* dv = dp + (b * 2 + si) * n.channels;
      for (int64_t j = 0; j < n.hidden; ++j) {
        // relu's gradient as torch's (threshold_backward): zero where pre <= 0, passed through for NaN pre
        if (pre[(b * 2 + si) * n.hidden + j] <= 0.0) continue;
        const double dpre = dhidden[j];
        const double* w = w1 + j * n.channels;
        double* dw = dw1 + j * n.channels;
        for (int64_t c = 0; c < n.channels; ++c) {
          dw[c] += dpre * v[c];
          dv[c] += dpre * w[c];
        }
      }
    }
  }
}

void mlp_backward_generic(const MlpBackward& m) { mlp_backward_body(m); }
#ifdef MK_HFF_X86_DISPATCH
MK_HFF_TARGET_AVX2 void mlp_backward_avx2(const MlpBackward& m) { mlp_backward_body(m); }
#endif

std::vector<at::Tensor> mlp_backward_cpu(const at::Tensor& dgate, const at::Tensor& pooled,
                                         const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  const MlpSizes n = mlp_sizes(pooled, fc1_weight);
  const std::vector<double> p = to_double(pooled), w1 = to_double(fc1_weight), w2 = to_double(fc2_weight);
  const std::vector<double> dg = to_double(dgate);
  std::vector<double> s(n.batch * n.channels), dp(p.size(), 0.0), dw1(w1.size(), 0.0), dw2(w2.size(), 0.0);
  std::vector<double> pre(n.batch * 2 * n.hidden), hidden(n.batch * n.hidden), dhidden(n.hidden);
  const MlpBackward m{n, p.data(), w1.data(), w2.data(), dg.data(), s.data(), dp.data(), dw1.data(), dw2.data(),
                      pre.data(), hidden.data(), dhidden.data()};
#ifdef MK_HFF_X86_DISPATCH
  if (hff_cpu::use_avx2()) {
    mlp_backward_avx2(m);
  } else {
    mlp_backward_generic(m);
  }
#else
  mlp_backward_generic(m);
#endif
  return {from_double(dp, pooled.sizes(), pooled.options()), from_double(dw1, fc1_weight.sizes(), fc1_weight.options()),
          from_double(dw2, fc2_weight.sizes(), fc2_weight.options()), from_double(s, {n.batch, n.channels}, pooled.options())};
}

}  // namespace

at::Tensor hff_channel_mlp_gate(const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                const at::Tensor& fc2_weight) {
  if (pooled.device().is_cpu()) return mlp_gate_cpu(pooled, fc1_weight, fc2_weight);
  const at::Tensor hidden = at::relu(at::matmul(pooled, fc1_weight.t())).sum(1);  // (B, hidden)
  return at::sigmoid(at::matmul(hidden, fc2_weight.t()));
}

std::vector<at::Tensor> hff_channel_mlp_backward(const at::Tensor& dgate, const at::Tensor& pooled,
                                                 const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  if (pooled.device().is_cpu()) return mlp_backward_cpu(dgate.contiguous(), pooled, fc1_weight, fc2_weight);
  const int64_t batch = pooled.size(0), channels = pooled.size(2);
  const at::Tensor pre = at::matmul(pooled, fc1_weight.t());                // (B, 2, hidden)
  const at::Tensor hidden = at::relu(pre).sum(1);                            // (B, hidden)
  const at::Tensor gate = at::sigmoid(at::matmul(hidden, fc2_weight.t()));  // (B, C)
  const at::Tensor dlogit = dgate * gate * (1 - gate);
  const at::Tensor dfc2 = at::matmul(dlogit.t(), hidden);                   // (C, hidden)
  // relu's gradient as torch's: zero where pre <= 0 (even for a NaN dhidden), passed through for NaN pre
  const at::Tensor dhidden = at::matmul(dlogit, fc2_weight).unsqueeze(1).expand_as(pre);
  const at::Tensor dpre = at::threshold_backward(dhidden, pre, 0);  // (B, 2, hidden)
  const at::Tensor dfc1 = at::matmul(dpre.reshape({2 * batch, -1}).t(), pooled.reshape({2 * batch, channels}));
  const at::Tensor dpooled = at::matmul(dpre, fc1_weight);                  // (B, 2, C)
  return {dpooled.contiguous(), dfc1, dfc2, gate.contiguous()};
}

}  // namespace medkernels
