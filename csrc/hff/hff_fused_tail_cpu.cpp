// CPU kernels of the HFF fusion tail: out = channels-first LayerNorm of cat[g * channel_gate,
// l * spatial_gate, x_f], written straight into the (B, C2 + C1 + Ci, H, W) output (formulas in
// hff_attention_math.h).
//
// A task is one image b and a tile of pixels. The task reads its tile of every input channel once into a
// (channels, tile) buffer in the accumulation type (gated on the way), which stays in the L2/L3 caches for
// the mean, the centred variance and the output pass; the pixels of the tile are the vector lanes, and the row
// segments of the next channels are prefetched (each lies in its own page, which the hardware prefetchers
// do not follow). The backward recomputes the gated values from the saved mean and rstd the same way,
// buffers dout, and per pixel sums dxhat and dxhat * xhat over the channels; a second pass over the buffers
// writes dl, dg and dx_f and sums d loss / d spatial_gate per pixel. The parameter gradients and
// d loss / d channel_gate are summed per task, then over the tasks in task order (deterministic).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "hff/hff_attention_checks.h"
#include "hff/hff_attention_math.h"
#include "hff/hff_cpu_utils.h"
#include "ops.h"

namespace medkernels {
namespace {

using hff_cpu::kPrefetchAhead;
using hff_cpu::PixelTiles;
using hff_cpu::prefetch_span;

// Pixels per task. Every channel costs a task some fixed work (row addresses, prefetches, horizontal sums),
// so tiles are large: the whole image up to kWholeImage pixels, else as many pixels as fit a (channels, tile)
// buffer of kBufferBytes (a multiple of 8, at least kMinTile), balanced over the image; and split further
// when the batch alone gives fewer than kMinTasks tasks. The tiling depends on the shapes only, not on the
// thread count, so the per-task partial sums (hence the results) do not either.
constexpr int64_t kWholeImage = 256;
constexpr int64_t kBufferBytes = 256 * 1024;
constexpr int64_t kMinTile = 128;
constexpr int64_t kMaxTile = 512;
constexpr int64_t kMinTasks = 8;

int64_t tail_tile(int64_t batch, int64_t channels, int64_t pixels, int64_t acc_size) {
  if (batch <= 0 || pixels <= 0) return 8;  // nothing to compute (an empty batch): any tile, no division by zero
  const int64_t fit = pixels <= kWholeImage
                          ? pixels
                          : std::min(kMaxTile, std::max(kMinTile, kBufferBytes / std::max<int64_t>(1, channels * acc_size)));
  int64_t tiles = (pixels + fit - 1) / fit;
  if (batch * tiles < kMinTasks) tiles = std::min((kMinTasks + batch - 1) / batch, (pixels + 15) / 16);
  const int64_t balanced = (pixels + tiles - 1) / tiles;
  return (balanced + 7) / 8 * 8;
}

template <typename T, typename acc_t>
struct TailProblem {
  int64_t B = 0, C1 = 0, C2 = 0, Ci = 0, HW = 0;
  const T *l = nullptr, *g = nullptr, *x_f = nullptr;
  const acc_t *spatial_gate = nullptr, *channel_gate = nullptr, *weight = nullptr, *bias = nullptr;
  int64_t channels() const { return C1 + C2 + Ci; }
};

// The tile of concatenated channel c of image b: the offset of its row (at the tile's first pixel) in its
// source tensor, the source, and the gate. Channels [0, C2) are g's (gated per channel), [C2, C2 + C1) l's
// (gated per pixel), the rest x_f's.
template <typename T, typename acc_t>
struct TailChannel {
  int kind;  // 0: g, 1: l, 2: x_f
  int64_t offset;
  const T* src;
  acc_t channel_gate;
};

template <typename T, typename acc_t>
MK_CPU_INLINE TailChannel<T, acc_t> tail_channel(const TailProblem<T, acc_t>& P, int64_t b, int64_t c, int64_t p0) {
  if (c < P.C2) {
    const int64_t off = (b * P.C2 + c) * P.HW + p0;
    return {0, off, P.g + off, P.channel_gate[b * P.C2 + c]};
  }
  if (c < P.C2 + P.C1) {
    const int64_t off = (b * P.C1 + c - P.C2) * P.HW + p0;
    return {1, off, P.l + off, acc_t(1)};
  }
  const int64_t off = (b * P.Ci + c - P.C2 - P.C1) * P.HW + p0;
  return {2, off, P.x_f + off, acc_t(1)};
}

// buf[i] = the gated value of the channel at pixel p0 + i.
template <typename T, typename acc_t>
MK_CPU_INLINE void load_gated(const TailChannel<T, acc_t>& ch, const acc_t* __restrict__ sgate, int64_t n,
                              acc_t* __restrict__ buf) {
  const T* __restrict__ src = ch.src;
  if (ch.kind == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]) * sgate[i];
  } else {
    const acc_t s = ch.channel_gate;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]) * s;
  }
}

// ---- forward -------------------------------------------------------------------------------------

template <typename T, typename acc_t>
struct TailForward {
  TailProblem<T, acc_t> P;
  PixelTiles tiles{1, 1};
  acc_t eps = 0;
  T* out = nullptr;
  acc_t *mean = nullptr, *rstd = nullptr;
};

// One task; buf holds (channels, tile) values, mu and rs one tile each.
template <typename T, typename acc_t>
MK_CPU_INLINE void tail_forward_task(const TailForward<T, acc_t>& F, int64_t task, acc_t* __restrict__ buf,
                                     acc_t* __restrict__ mu, acc_t* __restrict__ rs) {
  const TailProblem<T, acc_t>& P = F.P;
  const int64_t CT = P.channels(), stride = F.tiles.tile;
  const acc_t inv_ct = acc_t(1) / acc_t(CT);
  const int64_t b = task / F.tiles.tiles, t = task % F.tiles.tiles;
  const int64_t p0 = F.tiles.begin(t), n = F.tiles.size(t, P.HW);
  const acc_t* sgate = P.spatial_gate + b * P.HW + p0;
  std::fill(mu, mu + n, acc_t(0));
  std::fill(rs, rs + n, acc_t(0));
  for (int64_t c = 0; c < CT; ++c) {
    acc_t* v = buf + c * stride;
    if (c + kPrefetchAhead < CT) prefetch_span<0>(tail_channel(P, b, c + kPrefetchAhead, p0).src, n);
    load_gated(tail_channel(P, b, c, p0), sgate, n, v);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) mu[i] += v[i];
  }
  for (int64_t i = 0; i < n; ++i) mu[i] *= inv_ct;
  for (int64_t c = 0; c < CT; ++c) {
    const acc_t* v = buf + c * stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) rs[i] += (v[i] - mu[i]) * (v[i] - mu[i]);
  }
  for (int64_t i = 0; i < n; ++i) rs[i] = acc_t(1) / std::sqrt(rs[i] * inv_ct + F.eps);
  for (int64_t c = 0; c < CT; ++c) {
    const acc_t* v = buf + c * stride;
    const acc_t w = P.weight[c], bias = P.bias[c];
    T* __restrict__ dst = F.out + (b * CT + c) * P.HW + p0;
    if (c + kPrefetchAhead < CT) prefetch_span<1>(dst + kPrefetchAhead * P.HW, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(hff_ln_out<acc_t>(v[i], mu[i], rs[i], w, bias));
  }
  std::copy(mu, mu + n, F.mean + b * P.HW + p0);
  std::copy(rs, rs + n, F.rstd + b * P.HW + p0);
}

template <typename T, typename acc_t>
void tail_forward_generic(const TailForward<T, acc_t>& F, int64_t task, acc_t* buf, acc_t* mu, acc_t* rs) {
  tail_forward_task(F, task, buf, mu, rs);
}

#ifdef MK_CPU_X86_DISPATCH
template <typename T, typename acc_t>
MK_CPU_TARGET_AVX2 void tail_forward_avx2(const TailForward<T, acc_t>& F, int64_t task, acc_t* buf, acc_t* mu,
                                          acc_t* rs) {
  tail_forward_task(F, task, buf, mu, rs);
}
#endif

template <typename T, typename acc_t>
void tail_forward(const TailForward<T, acc_t>& F) {
  auto task_fn = &tail_forward_generic<T, acc_t>;
#ifdef MK_CPU_X86_DISPATCH
  if (hff_cpu::use_avx2()) task_fn = &tail_forward_avx2<T, acc_t>;
#endif
  const int64_t tile = F.tiles.tile;
  const int64_t tasks = F.P.B * F.tiles.tiles;
  at::parallel_for(0, tasks, tasks * F.P.channels() * tile < hff_cpu::kSerialElements ? tasks : 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(F.P.channels() * tile), mu(tile), rs(tile);
    for (int64_t task = begin; task < end; ++task) task_fn(F, task, buf.data(), mu.data(), rs.data());
  });
}

// ---- backward ------------------------------------------------------------------------------------

template <typename T, typename acc_t>
struct TailBackward {
  TailProblem<T, acc_t> P;
  PixelTiles tiles{1, 1};
  const T* dout = nullptr;
  const acc_t *mean = nullptr, *rstd = nullptr;
  T *dl = nullptr, *dg = nullptr, *dx_f = nullptr;
  acc_t* dspatial_gate = nullptr;
  acc_t *dweight_part = nullptr, *dbias_part = nullptr, *dchannel_gate_part = nullptr;  // one row per task
};

// One task; xhat and dxhat hold (channels, tile) values, m1, m2 and ds one tile each.
template <typename T, typename acc_t>
MK_CPU_INLINE void tail_backward_task(const TailBackward<T, acc_t>& G, int64_t task, acc_t* __restrict__ xhat,
                                      acc_t* __restrict__ dxhat, acc_t* __restrict__ m1, acc_t* __restrict__ m2,
                                      acc_t* __restrict__ ds) {
  const TailProblem<T, acc_t>& P = G.P;
  const int64_t CT = P.channels(), stride = G.tiles.tile;
  const acc_t inv_ct = acc_t(1) / acc_t(CT);
  const int64_t b = task / G.tiles.tiles, t = task % G.tiles.tiles;
  const int64_t p0 = G.tiles.begin(t), n = G.tiles.size(t, P.HW);
  const acc_t* __restrict__ sgate = P.spatial_gate + b * P.HW + p0;
  const acc_t* __restrict__ mu = G.mean + b * P.HW + p0;
  const acc_t* __restrict__ rs = G.rstd + b * P.HW + p0;
  acc_t* dw_part = G.dweight_part + task * CT;
  acc_t* db_part = G.dbias_part + task * CT;
  acc_t* dcg_part = G.dchannel_gate_part + task * P.C2;
  std::fill(m1, m1 + n, acc_t(0));
  std::fill(m2, m2 + n, acc_t(0));
  std::fill(ds, ds + n, acc_t(0));
  for (int64_t c = 0; c < CT; ++c) {
    acc_t* xh = xhat + c * stride;
    acc_t* dxh = dxhat + c * stride;
    const T* __restrict__ d = G.dout + (b * CT + c) * P.HW + p0;
    if (c + kPrefetchAhead < CT) {
      prefetch_span<0>(tail_channel(P, b, c + kPrefetchAhead, p0).src, n);
      prefetch_span<0>(d + kPrefetchAhead * P.HW, n);
    }
    load_gated(tail_channel(P, b, c, p0), sgate, n, xh);
    const acc_t w = P.weight[c];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      xh[i] = (xh[i] - mu[i]) * rs[i];
      dxh[i] = static_cast<acc_t>(d[i]);
    }
    dw_part[c] = hff_cpu::lane_sum<acc_t>(n, [&](int64_t i) { return dxh[i] * xh[i]; });
    db_part[c] = hff_cpu::lane_sum<acc_t>(n, [&](int64_t i) { return dxh[i]; });
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dxh[i] *= w;
      m1[i] += dxh[i];
      m2[i] += dxh[i] * xh[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    m1[i] *= inv_ct;
    m2[i] *= inv_ct;
  }
  for (int64_t c = 0; c < CT; ++c) {
    acc_t* xh = xhat + c * stride;
    const acc_t* dxh = dxhat + c * stride;
    // xh becomes d loss / d v, the gradient of the concatenated (gated) value
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xh[i] = hff_ln_input_grad<acc_t>(dxh[i], xh[i], rs[i], m1[i], m2[i]);
    const TailChannel<T, acc_t> ch = tail_channel(P, b, c, p0);
    if (c + kPrefetchAhead < CT) {
      const TailChannel<T, acc_t> next = tail_channel(P, b, c + kPrefetchAhead, p0);
      prefetch_span<1>((next.kind == 0 ? G.dg : next.kind == 1 ? G.dl : G.dx_f) + next.offset, n);
    }
    const T* __restrict__ src = ch.src;
    if (ch.kind == 0) {
      T* __restrict__ dst = G.dg + ch.offset;
      const acc_t s = ch.channel_gate;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(xh[i] * s);
      dcg_part[c] = hff_cpu::lane_sum<acc_t>(n, [&](int64_t i) { return xh[i] * static_cast<acc_t>(src[i]); });
    } else if (ch.kind == 1) {
      T* __restrict__ dst = G.dl + ch.offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = static_cast<T>(xh[i] * sgate[i]);
        ds[i] += xh[i] * static_cast<acc_t>(src[i]);
      }
    } else {
      T* __restrict__ dst = G.dx_f + ch.offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(xh[i]);
    }
  }
  std::copy(ds, ds + n, G.dspatial_gate + b * P.HW + p0);
}

template <typename T, typename acc_t>
void tail_backward_generic(const TailBackward<T, acc_t>& G, int64_t task, acc_t* xhat, acc_t* dxhat, acc_t* m1,
                           acc_t* m2, acc_t* ds) {
  tail_backward_task(G, task, xhat, dxhat, m1, m2, ds);
}

#ifdef MK_CPU_X86_DISPATCH
template <typename T, typename acc_t>
MK_CPU_TARGET_AVX2 void tail_backward_avx2(const TailBackward<T, acc_t>& G, int64_t task, acc_t* xhat,
                                           acc_t* dxhat, acc_t* m1, acc_t* m2, acc_t* ds) {
  tail_backward_task(G, task, xhat, dxhat, m1, m2, ds);
}
#endif

template <typename T, typename acc_t>
void tail_backward(const TailBackward<T, acc_t>& G) {
  auto task_fn = &tail_backward_generic<T, acc_t>;
#ifdef MK_CPU_X86_DISPATCH
  if (hff_cpu::use_avx2()) task_fn = &tail_backward_avx2<T, acc_t>;
#endif
  const int64_t tile = G.tiles.tile, CT = G.P.channels();
  const int64_t tasks = G.P.B * G.tiles.tiles;
  at::parallel_for(0, tasks, tasks * CT * tile < hff_cpu::kSerialElements ? tasks : 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xhat(CT * tile), dxhat(CT * tile), m1(tile), m2(tile), ds(tile);
    for (int64_t task = begin; task < end; ++task) {
      task_fn(G, task, xhat.data(), dxhat.data(), m1.data(), m2.data(), ds.data());
    }
  });
}

// out[e] = sum over r < rows of part[r * size + e], in row order, for e < size.
template <typename acc_t>
void sum_rows(const acc_t* part, int64_t rows, int64_t size, acc_t* out) {
  // a parallel region only pays for itself on enough work
  const int64_t grain = std::max<int64_t>(256, (int64_t(1) << 16) / std::max<int64_t>(1, rows));
  at::parallel_for(0, size, grain, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t v = acc_t(0);
      for (int64_t r = 0; r < rows; ++r) v += part[r * size + e];
      out[e] = v;
    }
  });
}

template <typename T, typename acc_t>
TailProblem<T, acc_t> tail_problem(const at::Tensor& l, const at::Tensor& g, const at::Tensor& x_f,
                                   const at::Tensor& spatial_gate, const at::Tensor& channel_gate,
                                   const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  TailProblem<T, acc_t> P;
  P.B = l.size(0);
  P.C1 = l.size(1);
  P.C2 = g.size(1);
  P.Ci = x_f.size(1);
  P.HW = l.size(2) * l.size(3);
  P.l = l.const_data_ptr<T>();
  P.g = g.const_data_ptr<T>();
  P.x_f = x_f.const_data_ptr<T>();
  P.spatial_gate = spatial_gate.const_data_ptr<acc_t>();
  P.channel_gate = channel_gate.const_data_ptr<acc_t>();
  P.weight = ln_weight.const_data_ptr<acc_t>();
  P.bias = ln_bias.const_data_ptr<acc_t>();
  return P;
}

}  // namespace

std::vector<at::Tensor> hff_fused_tail_fwd_cpu(MEDKERNELS_HFF_TAIL_ARGS, double eps) {
  const char* op = "hff_fused_tail_fwd_cpu";
  hff_check_fused_tail(op, c10::DeviceType::CPU, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
  const int64_t B = l.size(0), H = l.size(2), W = l.size(3);
  const int64_t CT = l.size(1) + g.size(1) + x_f.size(1);
  at::Tensor out = at::empty({B, CT, H, W}, l.options());
  const auto acc_opts = l.options().dtype(hff_acc_dtype(l.scalar_type()));
  at::Tensor mean = at::empty({B, H, W}, acc_opts), rstd = at::empty({B, H, W}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "hff_fused_tail_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TailForward<scalar_t, acc_t> F;
    F.P = tail_problem<scalar_t, acc_t>(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
    F.tiles = PixelTiles(F.P.HW, tail_tile(B, CT, F.P.HW, sizeof(acc_t)));
    F.eps = static_cast<acc_t>(eps);
    F.out = out.mutable_data_ptr<scalar_t>();
    F.mean = mean.mutable_data_ptr<acc_t>();
    F.rstd = rstd.mutable_data_ptr<acc_t>();
    tail_forward(F);
  });
  return {out, mean, rstd};
}

std::vector<at::Tensor> hff_fused_tail_bwd_cpu(const at::Tensor& dout, MEDKERNELS_HFF_TAIL_ARGS,
                                               const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "hff_fused_tail_bwd_cpu";
  hff_check_fused_tail(op, c10::DeviceType::CPU, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
  const int64_t B = l.size(0), C2 = g.size(1), H = l.size(2), W = l.size(3);
  const int64_t CT = l.size(1) + C2 + x_f.size(1);
  const auto acc = hff_acc_dtype(l.scalar_type());
  hff_check_operand(dout, op, "dout", l.scalar_type(), {B, CT, H, W}, "(B, C1 + C2 + Ci, H, W)",
                    c10::DeviceType::CPU);
  hff_check_operand(mean, op, "mean", acc, {B, H, W}, "(B, H, W)", c10::DeviceType::CPU);
  hff_check_operand(rstd, op, "rstd", acc, {B, H, W}, "(B, H, W)", c10::DeviceType::CPU);
  const auto acc_opts = l.options().dtype(acc);
  at::Tensor dl = at::empty_like(l), dg = at::empty_like(g), dx_f = at::empty_like(x_f);
  at::Tensor dsg = at::empty({B, 1, H, W}, acc_opts), dcg = at::empty({B, C2, 1, 1}, acc_opts);
  at::Tensor dw = at::empty({CT}, acc_opts), db = at::empty({CT}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "hff_fused_tail_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TailBackward<scalar_t, acc_t> G;
    G.P = tail_problem<scalar_t, acc_t>(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
    G.tiles = PixelTiles(G.P.HW, tail_tile(B, CT, G.P.HW, sizeof(acc_t)));
    const int64_t tasks = B * G.tiles.tiles;
    std::vector<acc_t> dw_part(tasks * CT), db_part(tasks * CT), dcg_part(tasks * C2);
    G.dout = dout.const_data_ptr<scalar_t>();
    G.mean = mean.const_data_ptr<acc_t>();
    G.rstd = rstd.const_data_ptr<acc_t>();
    G.dl = dl.mutable_data_ptr<scalar_t>();
    G.dg = dg.mutable_data_ptr<scalar_t>();
    G.dx_f = dx_f.mutable_data_ptr<scalar_t>();
    G.dspatial_gate = dsg.mutable_data_ptr<acc_t>();
    G.dweight_part = dw_part.data();
    G.dbias_part = db_part.data();
    G.dchannel_gate_part = dcg_part.data();
    tail_backward(G);
    sum_rows(dw_part.data(), tasks, CT, dw.mutable_data_ptr<acc_t>());
    sum_rows(db_part.data(), tasks, CT, db.mutable_data_ptr<acc_t>());
    for (int64_t b = 0; b < B; ++b) {
      sum_rows(dcg_part.data() + b * G.tiles.tiles * C2, G.tiles.tiles, C2, dcg.mutable_data_ptr<acc_t>() + b * C2);
    }
  });
  return {dl, dg, dx_f, dsg, dcg, dw, db};
}

}  // namespace medkernels
