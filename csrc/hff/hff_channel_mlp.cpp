// The channel gate's MLP (see hff_channel_mlp.h). On CUDA a few ATen products (cuBLAS); on CPU plain loops
// on the calling thread, in double: the products are tiny (batch x 2 x C by C x hidden), a BLAS library's
// thread pool costs more than they do (and much more when the machine is busy), and double sums cost nothing
// here while keeping the gate's gradients as exact as the pooled inputs allow.
//
// Every product is one small row-major matrix product (gemm below) on copies of the operands padded to whole
// vectors: each output is summed over k in index order (fixed: deterministic), sixteen outputs of up to four
// rows at a time in registers, so that each vector of the right operand, loaded once, feeds several FMAs and
// the operands stream through the caches a few times rather than once per output row. The ISA variants sum
// in the same order; FMA contraction may differ in the last bit between them.

// glibc's libmvec has vector variants of exp (common/cpu_simd.h, opted in here): the gate's sigmoid loop calls
// them instead of one scalar exp per channel.
#define MK_CPU_LIBMVEC 1

#include "hff/hff_channel_mlp.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "hff/hff_attention_math.h"
#include "hff/hff_cpu_utils.h"
#include "common/cpu_simd.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace medkernels {
namespace {

// A vector of VB bytes of doubles (GCC vector extensions), used at its ISA's native width: 64 bytes with
// AVX-512, 32 with AVX2, 16 otherwise (wider ones would be split through memory).
template <int VB>
struct DVec {
  typedef double type __attribute__((vector_size(VB), aligned(8)));
};

template <typename V>
MK_CPU_INLINE V vload(const double* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
MK_CPU_INLINE void vstore(double* p, V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Column block of the products: sixteen doubles (two AVX-512 vectors).
constexpr int64_t kBlock = 16;

inline int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// A row-major matrix view: element (i, k) at data[i * ld + k].
struct Mat {
  const double* data;
  int64_t ld;
};

// out[i, n] = sum_{k < K} a[i, k] * m[k, n] for R rows i from a and out's first rows and the columns
// [n0, n0 + kBlock), in vectors V.
template <typename V, int R>
MK_CPU_INLINE void gemm_block(Mat a, Mat m, int64_t K, int64_t n0, double* out, int64_t ldo) {
  constexpr int NV = kBlock * sizeof(double) / sizeof(V);
  constexpr int L = sizeof(V) / sizeof(double);
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V mv[NV];
    for (int q = 0; q < NV; ++q) mv[q] = vload<V>(m.data + k * m.ld + n0 + q * L);
    for (int r = 0; r < R; ++r) {
      const double s = a.data[r * a.ld + k];
      for (int q = 0; q < NV; ++q) acc[r][q] += s * mv[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NV; ++q) vstore<V>(out + r * ldo + n0 + q * L, acc[r][q]);
}

// out (rows, N) = a (rows, K) @ m (K, N), N a multiple of kBlock; out's row pitch ldo. R rows at a time: as
// many as the ISA's registers hold accumulators for.
template <typename V, int R>
MK_CPU_INLINE void gemm(Mat a, int64_t rows, Mat m, int64_t K, int64_t N, double* out, int64_t ldo) {
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
    int64_t i = 0;
    for (; i + R <= rows; i += R) gemm_block<V, R>({a.data + i * a.ld, a.ld}, m, K, n0, out + i * ldo, ldo);
    for (; i < rows; ++i) gemm_block<V, 1>({a.data + i * a.ld, a.ld}, m, K, n0, out + i * ldo, ldo);
  }
}

// The vector type and rows per block of each ISA variant.
struct IsaGeneric {
  typedef DVec<16>::type V;
  static constexpr int R = 1;
};
struct IsaAvx2 {
  typedef DVec<32>::type V;
  static constexpr int R = 2;
};
struct IsaAvx512 {
  typedef DVec<64>::type V;
  static constexpr int R = 4;
};

// The MLP's operands in double, zero-padded to whole column blocks: P (2B, Cp) the pooled vectors, W1 (hidden, Cp)
// and its transpose W1T (C, Hp), W2 (C, Hp) and its transpose W2T (hidden, Cp); Cp, Hp: C and hidden padded.
struct MlpOperands {
  int64_t B, C, Hd, Cp, Hp;
  std::vector<double> P, W1, W1T, W2, W2T;
};

template <typename scalar_t>
void fill_padded(const scalar_t* src, int64_t rows, int64_t cols, bool transpose, std::vector<double>& dst,
                 int64_t ld) {
  // dst (rows, cols) at pitch ld, or (cols, rows) when transposing; dst is zeroed beforehand
  if (!transpose) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = static_cast<double>(src[r * cols + c]);
    return;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int64_t r1 = std::min(rows, r0 + 8);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * ld + r] = static_cast<double>(src[r * cols + c]);
  }
}

MlpOperands mlp_operands(const at::Tensor& pooled, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  MlpOperands o;
  o.B = pooled.size(0);
  o.C = pooled.size(2);
  o.Hd = fc1_weight.size(0);
  o.Cp = padded(o.C);
  o.Hp = padded(o.Hd);
  o.P.assign(2 * o.B * o.Cp, 0.0);
  o.W1.assign(o.Hd * o.Cp, 0.0);
  o.W1T.assign(o.C * o.Hp, 0.0);
  o.W2.assign(o.C * o.Hp, 0.0);
  o.W2T.assign(o.Hd * o.Cp, 0.0);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "hff_channel_mlp_operands", [&] {
    const scalar_t* w1 = fc1_weight.const_data_ptr<scalar_t>();
    const scalar_t* w2 = fc2_weight.const_data_ptr<scalar_t>();
    fill_padded(pooled.const_data_ptr<scalar_t>(), 2 * o.B, o.C, false, o.P, o.Cp);
    fill_padded(w1, o.Hd, o.C, false, o.W1, o.Cp);
    fill_padded(w1, o.Hd, o.C, true, o.W1T, o.Hp);
    fill_padded(w2, o.C, o.Hd, false, o.W2, o.Hp);
    fill_padded(w2, o.C, o.Hd, true, o.W2T, o.Cp);
  });
  return o;
}

// The forward's values: pre (2B, Hp) = P @ fc1^T, hidden (B, Hp) = relu(pre[2b]) + relu(pre[2b + 1]),
// gate (B, Cp) = sigmoid(hidden @ fc2^T) (the padding columns hold sigmoid(0), never read).
struct MlpValues {
  std::vector<double> pre, hidden, gate;
};

template <typename Isa>
MK_CPU_INLINE void mlp_forward_body(const MlpOperands& o, MlpValues& v) {
  using V = typename Isa::V;
  constexpr int R = Isa::R;
  gemm<V, R>({o.P.data(), o.Cp}, 2 * o.B, {o.W1T.data(), o.Hp}, o.C, o.Hp, v.pre.data(), o.Hp);
  for (int64_t b = 0; b < o.B; ++b) {
    for (int64_t j = 0; j < o.Hp; ++j) {
      const double p0 = v.pre[(2 * b) * o.Hp + j], p1 = v.pre[(2 * b + 1) * o.Hp + j];
      v.hidden[b * o.Hp + j] = (p0 <= 0.0 ? 0.0 : p0) + (p1 <= 0.0 ? 0.0 : p1);  // relu, NaN kept (torch.relu)
    }
  }
  gemm<V, R>({v.hidden.data(), o.Hp}, o.B, {o.W2T.data(), o.Cp}, o.Hd, o.Cp, v.gate.data(), o.Cp);
  double* g = v.gate.data();
#pragma omp simd
  for (int64_t e = 0; e < o.B * o.Cp; ++e) g[e] = hff_sigmoid<double>(g[e]);
}

MlpValues mlp_values(const MlpOperands& o) {
  return {std::vector<double>(2 * o.B * o.Hp), std::vector<double>(o.B * o.Hp), std::vector<double>(o.B * o.Cp)};
}

void mlp_forward_generic(const MlpOperands& o, MlpValues& v) { mlp_forward_body<IsaGeneric>(o, v); }
#ifdef MK_CPU_X86_DISPATCH
MK_CPU_TARGET_AVX2 void mlp_forward_avx2(const MlpOperands& o, MlpValues& v) { mlp_forward_body<IsaAvx2>(o, v); }
MK_CPU_TARGET_AVX512 void mlp_forward_avx512(const MlpOperands& o, MlpValues& v) {
  mlp_forward_body<IsaAvx512>(o, v);
}
#endif

void mlp_forward(const MlpOperands& o, MlpValues& v) {
#ifdef MK_CPU_X86_DISPATCH
  if (hff_cpu::use_avx512()) {
    mlp_forward_avx512(o, v);
  } else if (hff_cpu::use_avx2()) {
    mlp_forward_avx2(o, v);
  } else {
    mlp_forward_generic(o, v);
  }
#else
  mlp_forward_generic(o, v);
#endif
}

// rows x cols of src (pitch ld_src) into a tensor of `shape` (rows * cols elements, row-major).
at::Tensor to_tensor(const double* src, int64_t rows, int64_t cols, int64_t ld_src, at::IntArrayRef shape,
                     const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "hff_channel_mlp_to_tensor", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<scalar_t>(src[r * ld_src + c]);
  });
  return out;
}

at::Tensor mlp_gate_cpu(const at::Tensor& pooled, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  const MlpOperands o = mlp_operands(pooled, fc1_weight, fc2_weight);
  MlpValues v = mlp_values(o);
  mlp_forward(o, v);
  return to_tensor(v.gate.data(), o.B, o.C, o.Cp, {o.B, o.C}, pooled.options());
}

// The backward's buffers: dlogit (B, Cp) and its transpose (C, B), dhidden (B, Hp), dpre (2B, Hp) and its
// transpose (Hp, 2B), and the gradients dP (2B, Cp), dW1 (hidden, Cp), dW2 (C, Hp).
struct MlpGrads {
  std::vector<double> dlogit, dlogit_t, dhidden, dpre, dpre_t, dP, dW1, dW2;
};

template <typename Isa>
MK_CPU_INLINE void mlp_backward_body(const MlpOperands& o, const MlpValues& v, const double* dgate, MlpGrads& d) {
  using V = typename Isa::V;
  constexpr int R = Isa::R;
  const int64_t B = o.B, C = o.C, Cp = o.Cp, Hp = o.Hp, nv = 2 * B;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const double dl = dgate[b * C + c] * hff_sigmoid_grad<double>(v.gate[b * Cp + c]);
      d.dlogit[b * Cp + c] = dl;
      d.dlogit_t[c * B + b] = dl;
    }
  }
  // dhidden = dlogit @ fc2; d fc2 = dlogit^T @ hidden
  gemm<V, R>({d.dlogit.data(), Cp}, B, {o.W2.data(), Hp}, C, Hp, d.dhidden.data(), Hp);
  gemm<V, R>({d.dlogit_t.data(), B}, C, {v.hidden.data(), Hp}, B, Hp, d.dW2.data(), Hp);
  // relu's gradient as torch's (threshold_backward): zero where pre <= 0, passed through for NaN pre
  for (int64_t r = 0; r < nv; ++r) {
    for (int64_t j = 0; j < Hp; ++j) {
      const double g = v.pre[r * Hp + j] <= 0.0 ? 0.0 : d.dhidden[(r / 2) * Hp + j];
      d.dpre[r * Hp + j] = g;
      d.dpre_t[j * nv + r] = g;
    }
  }
  // d fc1 = dpre^T @ P; dP = dpre @ fc1
  gemm<V, R>({d.dpre_t.data(), nv}, o.Hd, {o.P.data(), Cp}, nv, Cp, d.dW1.data(), Cp);
  gemm<V, R>({d.dpre.data(), Hp}, nv, {o.W1.data(), Cp}, o.Hd, Cp, d.dP.data(), Cp);
}

void mlp_backward_generic(const MlpOperands& o, const MlpValues& v, const double* dg, MlpGrads& d) {
  mlp_backward_body<IsaGeneric>(o, v, dg, d);
}
#ifdef MK_CPU_X86_DISPATCH
MK_CPU_TARGET_AVX2 void mlp_backward_avx2(const MlpOperands& o, const MlpValues& v, const double* dg, MlpGrads& d) {
  mlp_backward_body<IsaAvx2>(o, v, dg, d);
}
MK_CPU_TARGET_AVX512 void mlp_backward_avx512(const MlpOperands& o, const MlpValues& v, const double* dg,
                                              MlpGrads& d) {
  mlp_backward_body<IsaAvx512>(o, v, dg, d);
}
#endif

std::vector<at::Tensor> mlp_backward_cpu(const at::Tensor& dgate, const at::Tensor& pooled,
                                         const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  const MlpOperands o = mlp_operands(pooled, fc1_weight, fc2_weight);
  MlpValues v = mlp_values(o);
  mlp_forward(o, v);  // the gate and hidden units, recomputed
  std::vector<double> dg(dgate.numel());
  AT_DISPATCH_FLOATING_TYPES(dgate.scalar_type(), "hff_channel_mlp_dgate", [&] {
    const scalar_t* src = dgate.const_data_ptr<scalar_t>();
    for (size_t e = 0; e < dg.size(); ++e) dg[e] = static_cast<double>(src[e]);
  });
  const int64_t B = o.B, V = 2 * o.B;
  MlpGrads d{std::vector<double>(B * o.Cp, 0.0), std::vector<double>(o.C * B), std::vector<double>(B * o.Hp),
             std::vector<double>(V * o.Hp), std::vector<double>(o.Hp * V), std::vector<double>(V * o.Cp),
             std::vector<double>(o.Hd * o.Cp), std::vector<double>(o.C * o.Hp)};
#ifdef MK_CPU_X86_DISPATCH
  if (hff_cpu::use_avx512()) {
    mlp_backward_avx512(o, v, dg.data(), d);
  } else if (hff_cpu::use_avx2()) {
    mlp_backward_avx2(o, v, dg.data(), d);
  } else {
    mlp_backward_generic(o, v, dg.data(), d);
  }
#else
  mlp_backward_generic(o, v, dg.data(), d);
#endif
  const auto opts = pooled.options();
  return {to_tensor(d.dP.data(), V, o.C, o.Cp, pooled.sizes(), opts),
          to_tensor(d.dW1.data(), o.Hd, o.C, o.Cp, fc1_weight.sizes(), opts),
          to_tensor(d.dW2.data(), o.C, o.Hd, o.Hp, fc2_weight.sizes(), opts),
          to_tensor(v.gate.data(), B, o.C, o.Cp, {B, o.C}, opts)};
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
