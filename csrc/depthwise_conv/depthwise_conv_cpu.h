// Shared machinery of the CPU depthwise-convolution kernels (depthwise_conv_cpu.cpp: conv + bias +
// activation; depthwise_conv2d_layernorm_cpu.cpp: conv + bias + LayerNorm over channels; the vector row kernels
// in depthwise_conv_cpu_kernels.cpp). Internal to those files.
//
// Everything is computed in acc_t (float, or double for float64 inputs) on rows copied into small
// buffers: loaders convert and zero-pad input rows, storers convert back and write any layout. Two walks:
//
// * Planes (NCHW in and out, activation epilogue): a task is one (b, c) plane. The padded input plane is
//   copied into a buffer whose rows are split into `stride` phases (padded column q at phase q % s, index
//   q / s), so every tap reads a contiguous run whatever the stride: output column ow of tap j reads phase
//   j % s at ow + j / s. The vector loops run over output columns.
// * Rows (any other layout pair, and LayerNorm): rows are held channels-last, (columns, C), whatever the
//   tensors' layouts (the loaders and storers transpose NCHW rows). When x has the computing type and
//   contiguous channels, its rows are read in place (RowClip: the outputs at a row's ends skip the taps past
//   it); otherwise a ring keeps padded copies of the k input rows an output row reads, each loaded once. The
//   vector loops run over channels.
//
// Backward. d loss / d z (z: the pre-activation) is formed row by row and scattered into a zero-padded,
// stride-dilated copy (value of output (oh, ow) at (k - 1 + oh * s, k - 1 + ow * s), zeros between), so
// that the input gradient is a plain stride-1 convolution of that copy with the flipped kernel, read from
// offset (p, p): the same vector kernels as the forward, for every stride. The plane walk keeps the whole
// dilated plane; the row walk keeps a ring of dilated rows over a band of kBandRows output rows, gathering
// each input row's gradient as soon as the rows it reads are formed (rows shared with the next band are
// formed again there).
//
// Weight, bias (and LayerNorm) gradients are per-task partial sums (a task: a (b, c) plane, or a (b, band)
// of rows; independent of the thread count) reduced afterwards in task order: deterministic, no atomics.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "depthwise_conv/depthwise_conv_args.h"

namespace medkernels {
namespace dwcpu {

using dwconv::ceil_div;
using dwconv::ConvArgs;
using dwconv::Geometry;
using dwconv::kMaxKernel;

// Output rows per backward task of the row walk.
constexpr int64_t kBandRows = 16;

// Element (b, c, h, w) of a 4-D tensor lives at b * b_ + c * c_ + h * h_ + w * w_.
struct Strides {
  int64_t b = 0, c = 0, h = 0, w = 0;
  Strides() = default;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// ------------------------------------------------------------------------------------------------------
// Vector row kernels (depthwise_conv_cpu_kernels.cpp), picked once per call for the CPU's ISA.

// Rows read in place (ConvRowsArgs::clip): the rows start at image column 0 and are W pixels long; output o's
// tap j reads column o * s - p + j, and only the outputs outside [lo, hi) have taps outside [0, W).
struct RowClip {
  int64_t lo, hi, W, p;
};

// Channels-last rows: out[o, c] = init[c] + sum_{i, j} w[i * k + j, c] * rows[i][(o * s + j) * ps + c], o < n;
// ps is the pixel stride of the source rows (C for the padded row buffers). With clip, the rows are unpadded
// instead: out[o, c] = init[c] + the sum over the taps with 0 <= o * s - p + j < W of
// w[i * k + j, c] * rows[i][(o * s - p + j) * ps + c].
template <typename acc_t>
struct ConvRowsArgs {
  const acc_t* const* rows;
  const acc_t* w;     // (k * k, C)
  const acc_t* init;  // (C,)
  acc_t* out;         // (n, C)
  int64_t n, C, s, k, ps;
  const RowClip* clip = nullptr;
};

// One plane row: out[o] = init + sum_{i, j} w[i * k + j] * rows[i][(j % s) * phase_len + j / s + o], o < n.
template <typename acc_t>
struct ConvPlaneArgs {
  const acc_t* const* rows;
  const acc_t* w;  // (k * k,)
  acc_t init;
  acc_t* out;  // (n,)
  int64_t n, s, phase_len, k;
};

// Channels-last parameter gradients of one output row:
// gw[(i * k + j) * C + c] += sum_o gz[o * C + c] * rows[i][(o * s + j) * ps + c], gb[c] += sum_o gz[o * C + c];
// with clip, the rows are unpadded as in ConvRowsArgs (only the taps inside them count).
template <typename acc_t>
struct GradsRowsArgs {
  const acc_t* const* rows;
  const acc_t* gz;  // (n, C)
  acc_t* gw;        // (k * k, C)
  acc_t* gb;        // (C,)
  int64_t n, C, s, k, ps;
  const RowClip* clip = nullptr;
};

// Plane parameter gradients of one output row: gw[i * k + j] += sum_o gz[o] * rows[i][tap(j) + o], gb += sum gz.
template <typename acc_t>
struct GradsPlaneArgs {
  const acc_t* const* rows;
  const acc_t* gz;  // (n,)
  acc_t* gw;        // (k * k,)
  acc_t* gb;        // (1,)
  int64_t n, s, phase_len, k;
};

// One output row of the activation's backward, fused (RowKernels::bwd_rows): per channel vector, the
// pre-activation z = conv (conv.rows, conv.w, conv.init) of conv.n outputs goes to conv.out (pixel stride C),
// is replaced there by d loss / d z = g * act'(z), and when gw is non-null the parameter gradients of the
// row are added as by grads_rows (gw (k * k, C), gb (C,)): the channel vector's data stays in L1 throughout.
// g: the gradient of the activation's output, (n, C) at pixel stride C. The rows are read as conv states
// (pixel stride conv.ps, padded or clipped).
template <typename acc_t>
struct BwdRowsArgs {
  ConvRowsArgs<acc_t> conv;
  const acc_t* g;
  acc_t* gw;
  acc_t* gb;
};

// LayerNorm over the C channels of each of n pixels (rows (n, C)); gamma, beta (C,).
template <typename acc_t>
struct LayerNormArgs {
  const acc_t* gamma;
  const acc_t* beta;
  acc_t eps;
  int64_t n, C;
};

template <typename acc_t>
struct RowKernels {
  void (*conv_rows)(const ConvRowsArgs<acc_t>&);
  void (*conv_plane)(const ConvPlaneArgs<acc_t>&);
  // The same with the activation applied before the store, when act_fused (float, activation other than
  // GELU); else act_forward runs on the stored rows.
  bool act_fused;
  void (*conv_rows_act)(const ConvRowsArgs<acc_t>&);
  void (*conv_plane_act)(const ConvPlaneArgs<acc_t>&);
  void (*grads_rows)(const GradsRowsArgs<acc_t>&);
  // Set with bwd_fused (float; SiLU or ReLU): the fused backward row kernel (BwdRowsArgs).
  bool bwd_fused;
  void (*bwd_rows)(const BwdRowsArgs<acc_t>&);
  void (*grads_plane)(const GradsPlaneArgs<acc_t>&);
  // out[e] = act(z[e]); in place when out == z.
  void (*act_forward)(const acc_t* z, acc_t* out, int64_t n);
  // gz[e] = g[e] * act'(z[e]) (z unused for no activation).
  void (*act_backward)(const acc_t* z, const acc_t* g, acc_t* gz, int64_t n);
  // Rows (npix, C): out = act(z), dact = act'(z); in place when out == z. out has the values of conv_rows_act
  // (or act_forward), and grad * dact those of bwd_rows (or act_backward).
  void (*act_forward_save)(const acc_t* z, acc_t* out, acc_t* dact, int64_t npix, int64_t C);
  // out[e] = a[e] * b[e].
  void (*mul)(const acc_t* a, const acc_t* b, acc_t* out, int64_t n);
  // out (n, C) = LayerNorm(z); in place when out == z.
  void (*ln_forward)(const LayerNormArgs<acc_t>&, const acc_t* z, acc_t* out);
  // From z and gy (n, C): gz = d loss / d z; dgamma, dbeta (C,) += this row's sums when non-null.
  void (*ln_backward)(const LayerNormArgs<acc_t>&, const acc_t* z, const acc_t* gy, acc_t* gz, acc_t* dgamma,
                      acc_t* dbeta);
  // dst[r * ds + c] = src[r * ss + c], r < rows, c < cols.
  void (*copy2d)(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols);
  // dst[c * ds + r] = src[r * ss + c], r < rows, c < cols.
  void (*transpose)(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols);
};

// The kernels for kernel size k and activation `act`, compiled for the best ISA this CPU has.
template <typename acc_t>
RowKernels<acc_t> row_kernels(int64_t k, DwAct act);

// ------------------------------------------------------------------------------------------------------
// Loaders and storers (any strides; acc_t <-> T)

// dst[i] = src[i] converted, i < n. Same-type runs go through the vector copy kernel above a few hundred
// bytes (glibc's memcpy switches to `rep movsb` above a few KB, several times slower on some x86 CPUs).
template <typename T, typename acc_t>
inline void convert_run(const RowKernels<acc_t>& kern, const T* src, int64_t n, acc_t* dst) {
  if constexpr (std::is_same_v<T, acc_t>) {
    if (n * static_cast<int64_t>(sizeof(acc_t)) >= 512) {
      kern.copy2d(src, 0, dst, 0, 1, n);
    } else {
      std::memcpy(dst, src, n * sizeof(acc_t));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

// Whether row h of a (B, C, *, n) tensor of type T, read as channels-last (n, C) acc_t, can be used in
// place: the same type, C contiguous and the pixels packed.
template <typename T, typename acc_t>
inline bool row_in_place(const Strides& st, int64_t C) {
  return std::is_same_v<T, acc_t> && st.c == 1 && st.w == C;
}

// Row h of image b of a (B, C, *, n) tensor as a channels-last row (n, C) in acc_t: a copy when the channels
// are contiguous, a transpose when the columns are (NCHW rows).
template <typename T, typename acc_t>
inline void load_row(const RowKernels<acc_t>& kern, const T* t, const Strides& st, int64_t C, int64_t n, int64_t b,
                     int64_t h, acc_t* dst) {
  const T* row = t + b * st.b + h * st.h;
  if constexpr (std::is_same_v<T, acc_t>) {
    if (st.c == 1 && st.w == C) {
      convert_run(kern, row, n * C, dst);
    } else if (st.c == 1) {
      kern.copy2d(row, st.w, dst, C, n, C);
    } else if (st.w == 1) {
      kern.transpose(row, st.c, dst, C, C, n);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < n; ++w) dst[w * C + c] = row[c * st.c + w * st.w];
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t w = 0; w < n; ++w) dst[w * C + c] = static_cast<acc_t>(row[c * st.c + w * st.w]);
  }
}

// The inverse of load_row: writes the channels-last row (n, C) to row h of image b.
template <typename T, typename acc_t>
inline void store_row(const RowKernels<acc_t>& kern, const acc_t* src, T* t, const Strides& st, int64_t C, int64_t n,
                      int64_t b, int64_t h) {
  T* row = t + b * st.b + h * st.h;
  if constexpr (std::is_same_v<T, acc_t>) {
    if (st.c == 1) {
      kern.copy2d(src, C, row, st.w, n, C);
    } else if (st.w == 1) {
      kern.transpose(src, C, row, st.c, n, C);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < n; ++w) row[c * st.c + w * st.w] = src[w * C + c];
    }
  } else {
    for (int64_t w = 0; w < n; ++w)
      for (int64_t c = 0; c < C; ++c) row[c * st.c + w * st.w] = static_cast<T>(src[w * C + c]);
  }
}

// Input row ih of image b as the channels-last padded row dst (padded_cols, C): input column q - p at padded
// column q, zeros outside the image.
template <typename T, typename acc_t>
inline void load_padded_row(const RowKernels<acc_t>& kern, const T* x, const Strides& st, const Geometry& g,
                            int64_t b, int64_t ih, acc_t* dst) {
  const int64_t C = g.C, cols = g.padded_cols();
  // the padded columns inside the image: [a0, a1)
  const int64_t a0 = std::min(g.p, cols);
  const int64_t a1 = std::clamp<int64_t>(g.p + g.W, a0, cols);
  std::fill(dst, dst + a0 * C, acc_t(0));
  if (a1 > a0) load_row(kern, x + (a0 - g.p) * st.w, st, C, a1 - a0, b, ih, dst + a0 * C);
  std::fill(dst + a1 * C, dst + cols * C, acc_t(0));
}

// A ring of `slots` rows of `row_elems` values, each tagged with the row it holds.
template <typename acc_t>
struct RowRing {
  int64_t slots = 0, row_elems = 0;
  std::vector<acc_t> data;
  std::vector<int64_t> tag;
  RowRing(int64_t slots_, int64_t row_elems_)
      : slots(slots_), row_elems(row_elems_), data(slots_ * row_elems_), tag(slots_, INT64_MIN) {}
  int64_t index(int64_t r) const { return ((r % slots) + slots) % slots; }
  void reset() { std::fill(tag.begin(), tag.end(), INT64_MIN); }
  acc_t* slot(int64_t r) { return data.data() + index(r) * row_elems; }
  bool holds(int64_t r) const { return tag[index(r)] == r; }
  void mark(int64_t r) { tag[index(r)] = r; }
};

// Fixed-order reduction: out[e] = sum over tasks t of part[t * stride + e], e < n.
template <typename acc_t>
inline void reduce_partials(const acc_t* part, int64_t ntasks, int64_t stride, int64_t n, acc_t* out) {
  std::fill(out, out + n, acc_t(0));
  for (int64_t t = 0; t < ntasks; ++t) {
    const acc_t* src = part + t * stride;
    for (int64_t e = 0; e < n; ++e) out[e] += src[e];
  }
}

// The parameters in acc_t: weights (C, 1, k, k) as wt (k * k, C) and flipped (wflip[i, j] = w[k-1-i, k-1-j],
// for the input gradient; left empty when `flipped` is false, as the forward needs none), bias (C,) (zeros
// when absent).
template <typename acc_t>
struct RowParams {
  std::vector<acc_t> wt, wflip, bias, zeros;
};

template <typename T, typename acc_t>
inline RowParams<acc_t> row_params(const at::Tensor& weight, const at::Tensor* bias, int64_t C, int64_t k,
                                   bool flipped = true) {
  RowParams<acc_t> r;
  const int64_t kk = k * k;
  const T* w = weight.const_data_ptr<T>();
  r.wt.resize(kk * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kk; ++t) r.wt[t * C + c] = static_cast<acc_t>(w[c * kk + t]);
  if (flipped) {
    r.wflip.resize(kk * C);
    for (int64_t t = 0; t < kk; ++t) std::copy_n(r.wt.data() + t * C, C, r.wflip.data() + (kk - 1 - t) * C);
  }
  r.bias.assign(C, acc_t(0));
  if (bias != nullptr) {
    const T* bp = bias->const_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) r.bias[c] = static_cast<acc_t>(bp[c]);
  }
  r.zeros.assign(C, acc_t(0));
  return r;
}

// ------------------------------------------------------------------------------------------------------
// The row walk (channels-last rows), shared by both ops

template <typename T, typename acc_t>
struct RowProblem {
  Geometry g;
  RowKernels<acc_t> kern;
  const RowParams<acc_t>* params = nullptr;
  const T* x = nullptr;
  Strides xs;
  T* out = nullptr;  // forward output, (B, C, Ho, Wo) through os
  Strides os;
  const T* grad = nullptr;  // backward input, (B, C, Ho, Wo) through gs
  Strides gs;
  T* gx = nullptr;  // input gradient, through gxs
  Strides gxs;
  // The saved activation derivative (stride 1, Ho = H, Wo = W, T = acc_t; see rows_forward and
  // rows_backward_band): act'(z) of every output, (B, C, Ho, Wo) through ds; null when not used.
  T* dact = nullptr;
  Strides ds;
  // Backward with dact: the rows of dact that a band reads but another band owns, copied before the walk
  // (copy_halo): halo_rows(g) rows per image and band boundary.
  const acc_t* halo = nullptr;
};

// A row problem over x with the given kernels and parameters (the other tensors are set by the caller).
template <typename T, typename acc_t>
inline RowProblem<T, acc_t> make_row_problem(const Geometry& g, const RowKernels<acc_t>& kern,
                                             const RowParams<acc_t>& params, const at::Tensor& x) {
  RowProblem<T, acc_t> P;
  P.g = g;
  P.kern = kern;
  P.params = &params;
  P.x = x.const_data_ptr<T>();
  P.xs = Strides(x);
  return P;
}

// The padded input rows read by output row oh of image b (a shared zero row outside the image), loaded into
// the ring as needed.
template <typename T, typename acc_t>
inline void input_rows(const RowProblem<T, acc_t>& P, RowRing<acc_t>& ring, const acc_t* zero_row, int64_t b,
                       int64_t oh, const acc_t** rows) {
  const Geometry& g = P.g;
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t ih = oh * g.s - g.p + i;
    if (ih < 0 || ih >= g.H) {
      rows[i] = zero_row;
      continue;
    }
    acc_t* row = ring.slot(ih);
    if (!ring.holds(ih)) {
      load_padded_row(P.kern, P.x, P.xs, g, b, ih, row);
      ring.mark(ih);
    }
    rows[i] = row;
  }
}

// The pixel stride at which the row walk reads x's rows in place (RowClip), or 0 when it copies them into padded
// rows: in place when x has the computing type and contiguous channels.
template <typename T, typename acc_t>
inline int64_t direct_pixel_stride(const Strides& xs, int64_t C) {
  return std::is_same_v<T, acc_t> && xs.c == 1 ? std::max<int64_t>(xs.w, C) : 0;
}

// The clipping of the rows of x read in place: outputs [lo, hi) have all their taps inside the row
// (0 <= ow * s - p and ow * s - p + k - 1 < W).
inline RowClip row_clip(const Geometry& g) {
  const int64_t lo = std::min(g.Wo, ceil_div(g.p, g.s));
  const int64_t hi = std::max(lo, std::min(g.Wo, dwconv::floor_div(g.W - g.k + g.p, g.s) + 1));
  return {lo, hi, g.W, g.p};
}

// Forward over flattened output rows [r0, r1) (r = b * Ho + oh): z = conv + bias (a channels-last (Wo, C) row,
// written straight into P.out when its rows can take it), then the epilogue in place (unless the convolution
// kernel applied it: epi.conv_fused), then the row is stored to P.out if it was not written there.
//
// With the input of the computing type and its channels contiguous, the convolution reads x in place (RowClip:
// the outputs at the row's ends skip the taps past it); otherwise through a ring of padded channels-last copies.
// With P.dact, the activation is applied by act_forward_save, which also writes act'(z) to P.dact's row.
template <typename T, typename acc_t, typename Epi>
inline void rows_forward(const RowProblem<T, acc_t>& P, const Epi& epi, int64_t r0, int64_t r1) {
  const Geometry& g = P.g;
  const int64_t C = g.C, k = g.k, s = g.s, cols = g.padded_cols();
  const int64_t dps = direct_pixel_stride<T, acc_t>(P.xs, C);
  const bool direct = dps > 0;
  const RowClip clip = row_clip(g);
  const int64_t ps = direct ? dps : C;
  RowRing<acc_t> ring(direct ? 1 : k, direct ? 0 : cols * C);
  std::vector<acc_t> z(g.Wo * C), zero_row(cols * ps, acc_t(0)), drow(P.dact != nullptr ? g.Wo * C : 0);
  const acc_t* rows[kMaxKernel];
  const auto conv = epi.conv_fused && P.dact == nullptr ? P.kern.conv_rows_act : P.kern.conv_rows;
  const acc_t* wt = P.params->wt.data();
  const acc_t* bias = P.params->bias.data();
  int64_t cur_b = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.Ho, oh = r % g.Ho;
    if (b != cur_b) {
      ring.reset();
      cur_b = b;
    }
    const bool in_place = row_in_place<T, acc_t>(P.os, C);
    acc_t* dst = in_place ? reinterpret_cast<acc_t*>(P.out + b * P.os.b + oh * P.os.h) : z.data();
    if (direct) {
      for (int64_t i = 0; i < k; ++i) {
        const int64_t ih = oh * s - g.p + i;
        const bool inside = ih >= 0 && ih < g.H;
        rows[i] = inside ? reinterpret_cast<const acc_t*>(P.x + b * P.xs.b + ih * P.xs.h) : zero_row.data();
      }
      conv({rows, wt, bias, dst, g.Wo, C, s, k, ps, &clip});
    } else {
      input_rows(P, ring, zero_row.data(), b, oh, rows);
      conv({rows, wt, bias, dst, g.Wo, C, s, k, C});
    }
    if (P.dact != nullptr) {
      const bool d_in_place = row_in_place<T, acc_t>(P.ds, C);
      acc_t* d = d_in_place ? reinterpret_cast<acc_t*>(P.dact + b * P.ds.b + oh * P.ds.h) : drow.data();
      P.kern.act_forward_save(dst, dst, d, g.Wo, C);
      if (!d_in_place) store_row(P.kern, d, P.dact, P.ds, C, g.Wo, b, oh);
    } else if (!epi.conv_fused) {
      epi.forward(dst, dst);
    }
    if (!in_place) store_row(P.kern, z.data(), P.out, P.os, C, g.Wo, b, oh);
  }
}

// Per-task scratch of the backward row walk.
template <typename acc_t>
struct BackwardScratch {
  RowRing<acc_t> x_ring, gz_ring;  // padded input rows; dilated d loss / d z rows
  std::vector<acc_t> z, grow, gz, gx, zero_row;
  // x_pixel_stride: the pixel stride of x's rows when they are read in place, else 0 (the ring is used)
  BackwardScratch(const Geometry& g, int64_t x_pixel_stride)
      : x_ring(x_pixel_stride > 0 ? 1 : g.k, x_pixel_stride > 0 ? 0 : g.padded_cols() * g.C),
        gz_ring(g.k, g.dilated_cols() * g.C),
        z(g.Wo * g.C),
        grow(g.Wo * g.C),
        gz(g.Wo * g.C),
        gx(g.W * g.C),
        zero_row(std::max({g.padded_cols() * g.C, g.dilated_cols() * g.C, g.W * x_pixel_stride}), acc_t(0)) {}
};

inline int64_t band_count(const Geometry& g) {
  return (g.Ho + kBandRows - 1) / kBandRows;
}

// Rows of P.dact copied for the backward with a saved derivative: for each image and each boundary R between
// two bands, rows [R - p, R + p) (those inside the output), which the bands on both sides read.
inline int64_t halo_rows(const Geometry& g) {
  return 2 * g.p;
}

template <typename T, typename acc_t>
inline void copy_halo(const RowProblem<T, acc_t>& P, acc_t* halo) {
  const Geometry& g = P.g;
  const int64_t nb = band_count(g), hr = halo_rows(g), n = g.Wo * g.C;
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t j = 1; j < nb; ++j) {
      const int64_t R = j * kBandRows;
      for (int64_t r = 0; r < hr; ++r) {
        const int64_t oh = R - g.p + r;
        acc_t* dst = halo + ((b * (nb - 1) + j - 1) * hr + r) * n;
        if (oh >= 0 && oh < g.Ho) load_row(P.kern, P.dact, P.ds, g.C, g.Wo, b, oh, dst);
      }
    }
  }
}

// Backward of band `band` of image b. part: this task's partial sums, gw (k * k, C) then gb (C,) then the
// epilogue's own. epi.backward(z, grow, gz, extra, own) forms d loss / d z of one (Wo, C) row from the
// pre-activation z (only computed when epi.needs_z) and the row's gradient grow, and adds its parameter
// gradients to `extra` when `own`; or, when epi.bwd_fused, RowKernels::bwd_rows does the convolution, the
// activation's backward and the parameter gradients of the row in one pass.
//
// With P.dact (the derivative saved by the forward; stride 1, Ho = H), d loss / d z = grow * dact and nothing
// is recomputed. The input gradient then goes to P.gx = P.dact: input row ih is written once output rows up to
// ih + p are formed, so row ih of dact has been read; the rows of other bands come from P.halo.
template <typename T, typename acc_t, typename Epi>
inline void rows_backward_band(const RowProblem<T, acc_t>& P, const Epi& epi, int64_t b, int64_t band,
                               BackwardScratch<acc_t>& S, acc_t* part) {
  const Geometry& g = P.g;
  const int64_t C = g.C, k = g.k, s = g.s, nb = band_count(g);
  const int64_t oh0 = band * kBandRows, oh1 = std::min(g.Ho, oh0 + kBandRows);
  // Input rows whose gradient this band writes: a partition of [0, H) over the bands.
  const int64_t ih0 = band == 0 ? 0 : std::min(g.H, oh0 * s);
  const int64_t ih1 = band == nb - 1 ? g.H : std::min(g.H, oh1 * s);
  int64_t lo = oh0, hi = oh1 - 1;
  if (ih0 < ih1) {
    lo = std::min(lo, g.first_out_row(ih0));
    hi = std::max(hi, g.last_out_row(ih1 - 1));
  }
  acc_t* gw = part;
  acc_t* gb = part + k * k * C;
  acc_t* extra = gb + C;
  S.x_ring.reset();
  S.gz_ring.reset();
  const acc_t* rows[kMaxKernel];
  const acc_t* gz_rows[kMaxKernel];
  const int64_t dcols = g.dilated_cols();
  int64_t next_ih = ih0;
  auto emit_ready = [&](int64_t done) {
    while (next_ih < ih1 && g.last_out_row(next_ih) <= done) {
      // flipped kernel row k - 1 - i reads output row (ih + p - i) / s; the dilated rows are read from column p
      for (int64_t i = 0; i < k; ++i) {
        const int64_t t = next_ih + g.p - i;
        const bool hit = t >= 0 && t % s == 0 && t / s < g.Ho;
        gz_rows[k - 1 - i] = (hit ? S.gz_ring.slot(t / s) : S.zero_row.data()) + g.p * C;
      }
      if (row_in_place<T, acc_t>(P.gxs, C)) {
        acc_t* dst = reinterpret_cast<acc_t*>(P.gx + b * P.gxs.b + next_ih * P.gxs.h);
        P.kern.conv_rows({gz_rows, P.params->wflip.data(), P.params->zeros.data(), dst, g.W, C, 1, k, C});
      } else {
        P.kern.conv_rows({gz_rows, P.params->wflip.data(), P.params->zeros.data(), S.gx.data(), g.W, C, 1, k, C});
        store_row(P.kern, S.gx.data(), P.gx, P.gxs, C, g.W, b, next_ih);
      }
      ++next_ih;
    }
  };
  emit_ready(lo - 1);
  // x's rows in place (clipped at the row ends) or padded copies from the ring
  const int64_t dps = direct_pixel_stride<T, acc_t>(P.xs, C);
  const int64_t ps = dps > 0 ? dps : C;
  const RowClip clip = row_clip(g);
  const RowClip* xclip = dps > 0 ? &clip : nullptr;
  for (int64_t oh = lo; oh <= hi; ++oh) {
    const bool own = oh >= oh0 && oh < oh1;
    if (dps > 0) {
      for (int64_t i = 0; i < k; ++i) {
        const int64_t ih = oh * s - g.p + i;
        rows[i] = ih >= 0 && ih < g.H ? reinterpret_cast<const acc_t*>(P.x + b * P.xs.b + ih * P.xs.h)
                                      : S.zero_row.data();
      }
    } else {
      input_rows(P, S.x_ring, S.zero_row.data(), b, oh, rows);
    }
    if (epi.needs_z && !epi.bwd_fused) {
      P.kern.conv_rows({rows, P.params->wt.data(), P.params->bias.data(), S.z.data(), g.Wo, C, s, k, ps, xclip});
    }
    const acc_t* grow = S.grow.data();
    if (row_in_place<T, acc_t>(P.gs, C)) {
      grow = reinterpret_cast<const acc_t*>(P.grad + b * P.gs.b + oh * P.gs.h);
    } else {
      load_row(P.kern, P.grad, P.gs, C, g.Wo, b, oh, S.grow.data());
    }
    // d loss / d z goes straight into the dilated row (zeros, output column ow at k - 1 + ow * s) when the
    // stride is 1, else through S.gz
    acc_t* drow = S.gz_ring.slot(oh);
    acc_t* gz = s == 1 ? drow + (k - 1) * C : S.gz.data();
    if (P.dact != nullptr) {
      const acc_t* d = nullptr;
      if (!own) {
        const int64_t j = oh < oh0 ? band : band + 1, r = oh - (j * kBandRows - g.p);
        d = P.halo + ((b * (nb - 1) + j - 1) * halo_rows(g) + r) * g.Wo * C;
      } else if (row_in_place<T, acc_t>(P.ds, C)) {
        d = reinterpret_cast<const acc_t*>(P.dact + b * P.ds.b + oh * P.ds.h);
      } else {
        load_row(P.kern, P.dact, P.ds, C, g.Wo, b, oh, S.z.data());
        d = S.z.data();
      }
      P.kern.mul(grow, d, gz, g.Wo * C);
      if (own) P.kern.grads_rows({rows, gz, gw, gb, g.Wo, C, s, k, ps, xclip});
    } else if (epi.bwd_fused) {
      const ConvRowsArgs<acc_t> conv{rows, P.params->wt.data(), P.params->bias.data(), gz, g.Wo, C, s, k, ps, xclip};
      P.kern.bwd_rows({conv, grow, own ? gw : nullptr, gb});
    } else {
      epi.backward(S.z.data(), grow, gz, extra, own);
      if (own) P.kern.grads_rows({rows, gz, gw, gb, g.Wo, C, s, k, ps, xclip});
    }
    if (s == 1) {
      std::fill(drow, gz, acc_t(0));
      std::fill(gz + g.Wo * C, drow + dcols * C, acc_t(0));
    } else {
      std::fill(drow, drow + dcols * C, acc_t(0));
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        std::memcpy(drow + (k - 1 + ow * s) * C, gz + ow * C, C * sizeof(acc_t));
      }
    }
    S.gz_ring.mark(oh);
    emit_ready(oh);
  }
  emit_ready(g.Ho);
}

// Backward tasks t0 <= t < t1, one (image, band) each, every one summing into its own zeroed row of `part`
// (`stride` values apart), which the caller reduces in task order.
template <typename T, typename acc_t, typename Epi>
void rows_backward_tasks(const RowProblem<T, acc_t>& P, const Epi& epi, acc_t* part, int64_t stride, int64_t t0,
                         int64_t t1) {
  BackwardScratch<acc_t> S(P.g, direct_pixel_stride<T, acc_t>(P.xs, P.g.C));
  const int64_t nb = band_count(P.g);
  for (int64_t t = t0; t < t1; ++t) {
    acc_t* mine = part + t * stride;
    std::fill(mine, mine + stride, acc_t(0));
    rows_backward_band(P, epi, t / nb, t % nb, S, mine);
  }
}

}  // namespace dwcpu
}  // namespace medkernels
