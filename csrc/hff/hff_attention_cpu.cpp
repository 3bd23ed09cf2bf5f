// CPU kernels of HiFuse's HFF spatial and channel gates (the formulas are in hff_attention_math.h).
//
// Spatial gate of x (B, C, H, W): one pass over x, tile by tile of pixels, takes the channel max (and its
// channel) and mean of every pixel with the pixels of a tile as the vector lanes; the 7x7 convolution and
// the BatchNorm then run on the small (B, 2, H, W) map (row-vectorised taps, statistics summed in double
// in a fixed order) and the gate multiplies x in one more pass. The backward recomputes the map from the
// saved pooled values, needs one pass over grad and x for d loss / d gate (unless gate_only), and writes dx
// in one pass: grad * gate + d mean / C + d max at the saved argmax channel.
//
// Channel gate: one pass over x, row by row of H * W pixels, gives each (b, c) its max, first argmax and
// mean; the MLP runs on the (B, 2, C) pooled values (hff_channel_mlp.cpp); the gate multiplies x in one
// pass. The backward mirrors the spatial one.
//
// All reductions have a fixed order (per-task partials combined in task order), so results do not
// depend on the thread count or scheduling.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "hff/hff_attention_checks.h"
#include "hff/hff_attention_math.h"
#include "hff/hff_channel_mlp.h"
#include "hff/hff_cpu_utils.h"
#include "ops.h"

namespace medkernels {
namespace {

using hff_cpu::PixelTiles;

constexpr int64_t kPoolTile = 256;  // pixels per task of the channel reductions

// ---- spatial gate: channel pooling -------------------------------------------------------------

// pooled[b, 0, p] = max_c x[b, c, p], pooled[b, 1, p] = mean_c x[b, c, p], argmax[b, p] = first max channel.
template <typename T, typename acc_t>
void channel_pool(const T* x, int64_t B, int64_t C, int64_t HW, acc_t* pooled, int64_t* argmax) {
  const PixelTiles tiles(HW, kPoolTile);
  at::parallel_for(0, B * tiles.tiles, hff_cpu::work_grain(B * tiles.tiles, C * tiles.tile), [&](int64_t begin, int64_t end) {
    acc_t mx[kPoolTile], sum[kPoolTile];
    int32_t am[kPoolTile];  // 32-bit like the float lanes, so that the selects vectorise
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles.tiles, t = task % tiles.tiles;
      const int64_t p0 = tiles.begin(t), n = tiles.size(t, HW);
      const T* base = x + b * C * HW + p0;
      for (int64_t i = 0; i < n; ++i) {
        mx[i] = sum[i] = static_cast<acc_t>(base[i]);
        am[i] = 0;
      }
      for (int64_t c = 1; c < C; ++c) {
        const T* row = base + c * HW;
        if (c + hff_cpu::kPrefetchAhead < C) hff_cpu::prefetch_span<0>(row + hff_cpu::kPrefetchAhead * HW, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = static_cast<acc_t>(row[i]);
          const bool take = hff_takes_max(v, mx[i]);
          mx[i] = take ? v : mx[i];
          am[i] = take ? static_cast<int32_t>(c) : am[i];
          sum[i] += v;
        }
      }
      acc_t* out_max = pooled + b * 2 * HW + p0;
      acc_t* out_mean = out_max + HW;
      const acc_t inv_c = acc_t(1) / acc_t(C);
      for (int64_t i = 0; i < n; ++i) {
        out_max[i] = mx[i];
        out_mean[i] = sum[i] * inv_c;
        argmax[b * HW + p0 + i] = am[i];
      }
    }
  });
}

// ---- spatial gate: the small map ---------------------------------------------------------------

// The 2 -> 1 channel k x k convolution (zero padding k / 2) of one image, output row by output row, each
// tap a contiguous multiply-add over the valid columns.
template <typename acc_t>
void conv_image(const acc_t* map, const acc_t* weight, int64_t H, int64_t W, int k, acc_t* z) {
  const int r = k / 2;
  for (int64_t h = 0; h < H; ++h) {
    acc_t* out = z + h * W;
    std::fill(out, out + W, acc_t(0));
    for (int c = 0; c < 2; ++c) {
      for (int i = 0; i < k; ++i) {
        const int64_t hh = h + i - r;
        if (hh < 0 || hh >= H) continue;
        const acc_t* src = map + c * H * W + hh * W;
        for (int j = 0; j < k; ++j) {
          const acc_t tap = weight[(c * k + i) * k + j];
          const int64_t off = j - r, lo = std::max<int64_t>(0, -off), hi = std::min<int64_t>(W, W - off);
#pragma omp simd
          for (int64_t w = lo; w < hi; ++w) out[w] += tap * src[w + off];
        }
      }
    }
  }
}

// d loss / d map of one image from dz: the transposed convolution, row by row.
template <typename acc_t>
void conv_transpose_image(const acc_t* dz, const acc_t* weight, int64_t H, int64_t W, int k, acc_t* dmap) {
  const int r = k / 2;
  for (int c = 0; c < 2; ++c) {
    for (int64_t hh = 0; hh < H; ++hh) {
      acc_t* out = dmap + c * H * W + hh * W;
      std::fill(out, out + W, acc_t(0));
      for (int i = 0; i < k; ++i) {
        const int64_t h = hh - i + r;
        if (h < 0 || h >= H) continue;
        const acc_t* src = dz + h * W;
        for (int j = 0; j < k; ++j) {
          const acc_t tap = weight[(c * k + i) * k + j];
          const int64_t off = r - j, lo = std::max<int64_t>(0, -off), hi = std::min<int64_t>(W, W - off);
#pragma omp simd
          for (int64_t w = lo; w < hi; ++w) out[w] += tap * src[w + off];
        }
      }
    }
  }
}

// dweight[c, i, j] += sum over pixels of dz * map[c] shifted by the tap, for one image: per tap, the products
// of every row are added into per-column partials (vectorised), summed once at the end.
template <typename acc_t>
void conv_weight_grad_image(const acc_t* dz, const acc_t* map, int64_t H, int64_t W, int k, acc_t* dweight) {
  const int r = k / 2;
  std::vector<acc_t> column(W);
  for (int c = 0; c < 2; ++c) {
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < k; ++j) {
        const int64_t off = j - r, lo = std::max<int64_t>(0, -off), hi = std::min<int64_t>(W, W - off);
        std::fill(column.begin(), column.end(), acc_t(0));
        acc_t* col = column.data();
        for (int64_t h = std::max<int64_t>(0, r - i); h < std::min<int64_t>(H, H + r - i); ++h) {
          const acc_t* drow = dz + h * W;
          const acc_t* src = map + c * H * W + (h + i - r) * W + off;
#pragma omp simd
          for (int64_t w = lo; w < hi; ++w) col[w] += drow[w] * src[w];
        }
        dweight[(c * k + i) * k + j] += hff_cpu::lane_sum<acc_t>(W, [&](int64_t w) { return col[w]; });
      }
    }
  }
}

// Images per parallel chunk of the map's convolutions: enough taps times pixels to pay for a parallel region.
int64_t map_grain(int64_t HW, int k) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, HW * 2 * k * k));
}

// The map stage's parameters as plain values (absent BatchNorm affine parameters are 1 and 0).
template <typename acc_t>
struct SpatialMap {
  int64_t B = 0, H = 0, W = 0;
  int k = 0;
  const acc_t* weight = nullptr;
  bool batch_stats = true;
  acc_t eps = 0, bn_weight = 1, bn_bias = 0, running_mean = 0, running_var = 1;
  int64_t pixels() const { return B * H * W; }
};

template <typename acc_t>
SpatialMap<acc_t> spatial_map_params(const at::Tensor& x, const at::Tensor& conv_weight, int k,
                                     const c10::optional<at::Tensor>& bn_weight,
                                     const c10::optional<at::Tensor>& bn_bias,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var, bool use_batch_stats,
                                     double eps) {
  SpatialMap<acc_t> m;
  m.B = x.size(0);
  m.H = x.size(2);
  m.W = x.size(3);
  m.k = k;
  m.weight = conv_weight.const_data_ptr<acc_t>();
  m.batch_stats = use_batch_stats;
  m.eps = static_cast<acc_t>(eps);
  if (const at::Tensor* t = hff_present(bn_weight)) m.bn_weight = *t->const_data_ptr<acc_t>();
  if (const at::Tensor* t = hff_present(bn_bias)) m.bn_bias = *t->const_data_ptr<acc_t>();
  if (!use_batch_stats) {
    m.running_mean = *hff_present(running_mean)->const_data_ptr<acc_t>();
    m.running_var = *hff_present(running_var)->const_data_ptr<acc_t>();
  }
  return m;
}

// What the backward needs of the forward's map stage.
template <typename acc_t>
struct MapState {
  HffAffine<acc_t> affine;
  acc_t mean;
  double batch_mean = 0, batch_var_unbiased = 0;
};

// z = conv(pooled) for every image, then the BatchNorm's statistics (batch ones summed in double, in pixel
// order) folded into an affine map.
template <typename acc_t>
MapState<acc_t> map_forward(const SpatialMap<acc_t>& m, const acc_t* pooled, acc_t* z) {
  const int64_t HW = m.H * m.W, n = m.pixels();
  at::parallel_for(0, m.B, map_grain(HW, m.k), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) conv_image(pooled + b * 2 * HW, m.weight, m.H, m.W, m.k, z + b * HW);
  });
  MapState<acc_t> s;
  acc_t mean = m.running_mean, var = m.running_var;
  if (m.batch_stats) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += z[i];
    const double mu = sum / double(n);
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) sq += (z[i] - mu) * (z[i] - mu);
    s.batch_mean = mu;
    s.batch_var_unbiased = sq / double(n - 1);
    mean = static_cast<acc_t>(mu);
    var = static_cast<acc_t>(sq / double(n));
  }
  s.mean = mean;
  s.affine = hff_bn_affine<acc_t>(mean, var, m.eps, m.bn_weight, m.bn_bias);
  return s;
}

template <typename acc_t>
void map_gate(const MapState<acc_t>& s, const acc_t* z, int64_t n, acc_t* gate) {
  for (int64_t i = 0; i < n; ++i) gate[i] = hff_sigmoid<acc_t>(z[i] * s.affine.scale + s.affine.shift);
}

// Gradients of the map stage from dgate: dpooled (B, 2, H, W), dweight (2 k k), d bn weight and bias.
template <typename acc_t>
void map_backward(const SpatialMap<acc_t>& m, const MapState<acc_t>& s, const acc_t* pooled, const acc_t* z,
                  const acc_t* gate, const acc_t* dgate, acc_t* dpooled, acc_t* dweight, acc_t* dbn_weight,
                  acc_t* dbn_bias) {
  const int64_t HW = m.H * m.W, n = m.pixels();
  std::vector<acc_t> dy(n), dz(n);
  double sum_dy = 0, sum_dy_zhat = 0;
  for (int64_t i = 0; i < n; ++i) {
    dy[i] = dgate[i] * hff_sigmoid_grad<acc_t>(gate[i]);
    sum_dy += dy[i];
    sum_dy_zhat += dy[i] * ((z[i] - s.mean) * s.affine.rstd);
  }
  const acc_t sdy = static_cast<acc_t>(sum_dy), sdyz = static_cast<acc_t>(sum_dy_zhat);
  const acc_t inv_n = acc_t(1) / acc_t(n);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t zhat = (z[i] - s.mean) * s.affine.rstd;
    dz[i] = hff_bn_input_grad<acc_t>(dy[i], zhat, s.affine.scale, m.batch_stats, sdy, sdyz, inv_n);
  }
  *dbn_weight = sdyz;
  *dbn_bias = sdy;
  const int64_t taps = 2 * m.k * m.k;
  std::vector<acc_t> part(m.B * taps, acc_t(0));
  at::parallel_for(0, m.B, map_grain(HW, m.k), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      conv_transpose_image(dz.data() + b * HW, m.weight, m.H, m.W, m.k, dpooled + b * 2 * HW);
      conv_weight_grad_image(dz.data() + b * HW, pooled + b * 2 * HW, m.H, m.W, m.k, part.data() + b * taps);
    }
  });
  for (int64_t t = 0; t < taps; ++t) {
    acc_t v = acc_t(0);
    for (int64_t b = 0; b < m.B; ++b) v += part[b * taps + t];
    dweight[t] = v;
  }
}

// ---- spatial gate: passes over x ---------------------------------------------------------------

// out[b, c, p] = x[b, c, p] * gate[b, p].
template <typename T, typename acc_t>
void multiply_pixel_gate(const T* x, const acc_t* gate, int64_t B, int64_t C, int64_t HW, T* out) {
  at::parallel_for(0, B * C, hff_cpu::work_grain(B * C, HW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* s = gate + (row / C) * HW;
      const T* src = x + row * HW;
      T* dst = out + row * HW;
#pragma omp simd
      for (int64_t p = 0; p < HW; ++p) dst[p] = static_cast<T>(static_cast<acc_t>(src[p]) * s[p]);
    }
  });
}

// dgate[b, p] = sum_c grad[b, c, p] * x[b, c, p].
template <typename T, typename acc_t>
void pixel_gate_grad(const T* grad, const T* x, int64_t B, int64_t C, int64_t HW, acc_t* dgate) {
  const PixelTiles tiles(HW, kPoolTile);
  at::parallel_for(0, B * tiles.tiles, hff_cpu::work_grain(B * tiles.tiles, 2 * C * tiles.tile), [&](int64_t begin, int64_t end) {
    acc_t sum[kPoolTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles.tiles, t = task % tiles.tiles;
      const int64_t p0 = tiles.begin(t), n = tiles.size(t, HW);
      std::fill(sum, sum + n, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (b * C + c) * HW + p0;
        if (c + hff_cpu::kPrefetchAhead < C) {
          hff_cpu::prefetch_span<0>(grad + off + hff_cpu::kPrefetchAhead * HW, n);
          hff_cpu::prefetch_span<0>(x + off + hff_cpu::kPrefetchAhead * HW, n);
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) sum[i] += static_cast<acc_t>(grad[off + i]) * static_cast<acc_t>(x[off + i]);
      }
      std::copy(sum, sum + n, dgate + b * HW + p0);
    }
  });
}

// dx[b, c, p] (+)= grad * gate (unless gate_only) + dpooled[b, 1, p] / C + dpooled[b, 0, p] at the argmax
// channel; added to dx's values when accumulate.
template <typename T, typename acc_t>
void spatial_input_grad(const T* grad, const acc_t* gate, const acc_t* dpooled, const int64_t* argmax,
                        int64_t B, int64_t C, int64_t HW, bool gate_only, bool accumulate, T* dx) {
  const acc_t inv_c = acc_t(1) / acc_t(C);
  // 32-bit channel indices, like the float lanes, so that the selects below vectorise
  std::vector<int32_t> argmax32(argmax, argmax + B * HW);
  at::parallel_for(0, B * C, hff_cpu::work_grain(B * C, HW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C;
      const int32_t c = static_cast<int32_t>(row % C);
      const acc_t* dmax = dpooled + b * 2 * HW;
      const acc_t* dmean = dmax + HW;
      const int32_t* am = argmax32.data() + b * HW;
      const acc_t* s = gate + b * HW;
      T* out = dx + row * HW;
      // the loads are unconditional so that the selects are blends
      if (gate_only && accumulate) {
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          const acc_t top = dmax[p];
          out[p] = static_cast<T>(static_cast<acc_t>(out[p]) + dmean[p] * inv_c + (am[p] == c ? top : acc_t(0)));
        }
      } else if (gate_only) {
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          const acc_t top = dmax[p];
          out[p] = static_cast<T>(dmean[p] * inv_c + (am[p] == c ? top : acc_t(0)));
        }
      } else {
        const T* g = grad + row * HW;
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          const acc_t top = dmax[p];
          const acc_t direct = static_cast<acc_t>(g[p]) * s[p] + (accumulate ? static_cast<acc_t>(out[p]) : acc_t(0));
          out[p] = static_cast<T>(direct + dmean[p] * inv_c + (am[p] == c ? top : acc_t(0)));
        }
      }
    }
  });
}

// ---- channel gate ------------------------------------------------------------------------------

// Max (NaN if any), first argmax and sum of a row. Short rows (HiFuse's 7x7 maps) in one scalar pass; long
// ones in vector lanes, then a scan for the first maximum.
template <typename T, typename acc_t>
void row_pool(const T* row, int64_t n, acc_t* max_out, acc_t* sum_out, int64_t* arg_out) {
  if (n < 64) {
    // NaNs only set a flag here (keeping the loop free of branches); the first one is found afterwards
    acc_t mx = static_cast<acc_t>(row[0]), sum = mx;
    int64_t arg = 0;
    bool nan = mx != mx;
    for (int64_t e = 1; e < n; ++e) {
      const acc_t v = static_cast<acc_t>(row[e]);
      const bool take = v > mx;
      mx = take ? v : mx;
      arg = take ? e : arg;
      sum += v;
      nan |= v != v;
    }
    if (nan) {
      arg = 0;
      while (!(static_cast<acc_t>(row[arg]) != static_cast<acc_t>(row[arg]))) ++arg;
      mx = std::numeric_limits<acc_t>::quiet_NaN();
    }
    *max_out = mx;
    *sum_out = sum;
    *arg_out = arg;
    return;
  }
  constexpr int64_t L = hff_cpu::kLanes;
  acc_t lane_max[L], lane_sum[L];
  int lane_nan[L];
  for (int64_t j = 0; j < L; ++j) {
    lane_max[j] = -std::numeric_limits<acc_t>::infinity();
    lane_sum[j] = acc_t(0);
    lane_nan[j] = 0;
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int64_t j = 0; j < L; ++j) {
      const acc_t v = static_cast<acc_t>(row[i + j]);
      lane_max[j] = v > lane_max[j] ? v : lane_max[j];
      lane_sum[j] += v;
      lane_nan[j] |= (v != v);
    }
  }
  acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = acc_t(0);
  bool nan = false;
  for (int64_t j = 0; j < L; ++j) {
    mx = lane_max[j] > mx ? lane_max[j] : mx;
    sum += lane_sum[j];
    nan = nan || lane_nan[j] != 0;
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(row[i]);
    mx = v > mx ? v : mx;
    sum += v;
    nan = nan || v != v;
  }
  int64_t arg = 0;
  for (int64_t e = 0; e < n; ++e) {
    const acc_t v = static_cast<acc_t>(row[e]);
    if (nan ? v != v : v == mx) {
      arg = e;
      break;
    }
  }
  *max_out = nan ? std::numeric_limits<acc_t>::quiet_NaN() : mx;
  *sum_out = sum;
  *arg_out = arg;
}

// pooled[b, 0, c] = max_p x[b, c, p], pooled[b, 1, c] = mean_p x[b, c, p], argmax[b, c] = first max pixel.
template <typename T, typename acc_t>
void pixel_pool(const T* x, int64_t B, int64_t C, int64_t HW, acc_t* pooled, int64_t* argmax) {
  at::parallel_for(0, B * C, hff_cpu::work_grain(B * C, HW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      acc_t sum;
      row_pool(x + row * HW, HW, pooled + b * 2 * C + c, &sum, argmax + row);
      pooled[b * 2 * C + C + c] = sum / acc_t(HW);
    }
  });
}

// out[b, c, p] = x[b, c, p] * gate[b, c].
template <typename T, typename acc_t>
void multiply_channel_gate(const T* x, const acc_t* gate, int64_t rows, int64_t HW, T* out) {
  at::parallel_for(0, rows, hff_cpu::work_grain(rows, HW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t s = gate[row];
      const T* src = x + row * HW;
      T* dst = out + row * HW;
#pragma omp simd
      for (int64_t p = 0; p < HW; ++p) dst[p] = static_cast<T>(static_cast<acc_t>(src[p]) * s);
    }
  });
}

// dgate[b, c] = sum_p grad[b, c, p] * x[b, c, p].
template <typename T, typename acc_t>
void channel_gate_grad(const T* grad, const T* x, int64_t rows, int64_t HW, acc_t* dgate) {
  at::parallel_for(0, rows, hff_cpu::work_grain(rows, HW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* g = grad + row * HW;
      const T* v = x + row * HW;
      dgate[row] = hff_cpu::lane_sum<acc_t>(
          HW, [&](int64_t p) { return static_cast<acc_t>(g[p]) * static_cast<acc_t>(v[p]); });
    }
  });
}

// dx[b, c, p] (+)= grad * gate (unless gate_only) + dpooled[b, 1, c] / HW, plus dpooled[b, 0, c] at the
// argmax; added to dx's values when accumulate.
template <typename T, typename acc_t>
void channel_input_grad(const T* grad, const acc_t* gate, const acc_t* dpooled, const int64_t* argmax,
                        int64_t B, int64_t C, int64_t HW, bool gate_only, bool accumulate, T* dx) {
  at::parallel_for(0, B * C, hff_cpu::work_grain(B * C, HW), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      const acc_t dmean = dpooled[b * 2 * C + C + c] / acc_t(HW);
      const acc_t s = gate[row];
      const T* g = gate_only ? nullptr : grad + row * HW;
      T* out = dx + row * HW;
      const int64_t a = argmax[row];
      // the argmax element's value before this pass, for its own update below
      const acc_t base = (accumulate ? static_cast<acc_t>(out[a]) : acc_t(0)) +
                         (gate_only ? acc_t(0) : static_cast<acc_t>(g[a]) * s);
      if (gate_only && accumulate) {
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) out[p] = static_cast<T>(static_cast<acc_t>(out[p]) + dmean);
      } else if (gate_only) {
        for (int64_t p = 0; p < HW; ++p) out[p] = static_cast<T>(dmean);
      } else if (accumulate) {
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          out[p] = static_cast<T>(static_cast<acc_t>(out[p]) + static_cast<acc_t>(g[p]) * s + dmean);
        }
      } else {
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) out[p] = static_cast<T>(static_cast<acc_t>(g[p]) * s + dmean);
      }
      out[a] = static_cast<T>(base + dmean + dpooled[b * 2 * C + c]);
    }
  });
}

at::Tensor optional_grad(const c10::optional<at::Tensor>& param, const at::Tensor& value) {
  return hff_present(param) != nullptr ? value : at::Tensor();
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------------

std::vector<at::Tensor> hff_spatial_gate_fwd_cpu(MEDKERNELS_HFF_SPATIAL_ARGS) {
  const char* op = "hff_spatial_gate_fwd_cpu";
  const int k = hff_check_spatial_gate(op, c10::DeviceType::CPU, x, conv_weight, bn_weight, bn_bias,
                                       running_mean, running_var, use_batch_stats);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const auto acc = hff_acc_dtype(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor pooled = at::empty({B, 2, H, W}, acc_opts);
  at::Tensor argmax = at::empty({B, H, W}, x.options().dtype(at::kLong));
  at::Tensor gate = at::empty({B, 1, H, W}, acc_opts);
  at::Tensor batch_mean = at::empty({use_batch_stats ? 1 : 0}, acc_opts);
  at::Tensor batch_var = at::empty({use_batch_stats ? 1 : 0}, acc_opts);
  at::Tensor y = gate_only ? gate : at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto m = spatial_map_params<acc_t>(x, conv_weight, k, bn_weight, bn_bias, running_mean, running_var,
                                             use_batch_stats, eps);
    channel_pool(x.const_data_ptr<scalar_t>(), B, C, HW, pooled.mutable_data_ptr<acc_t>(),
                 argmax.mutable_data_ptr<int64_t>());
    std::vector<acc_t> z(B * HW);
    const auto state = map_forward(m, pooled.const_data_ptr<acc_t>(), z.data());
    map_gate(state, z.data(), B * HW, gate.mutable_data_ptr<acc_t>());
    if (use_batch_stats) {
      *batch_mean.mutable_data_ptr<acc_t>() = static_cast<acc_t>(state.batch_mean);
      *batch_var.mutable_data_ptr<acc_t>() = static_cast<acc_t>(state.batch_var_unbiased);
    }
    if (!gate_only) {
      multiply_pixel_gate(x.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), B, C, HW,
                          y.mutable_data_ptr<scalar_t>());
    }
  });
  return {y, batch_mean, batch_var, pooled, argmax};
}

std::vector<at::Tensor> hff_spatial_gate_bwd_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                                 const at::Tensor& argmax, MEDKERNELS_HFF_SPATIAL_ARGS,
                                                 const c10::optional<at::Tensor>& dx_accumulate) {
  const char* op = "hff_spatial_gate_bwd_cpu";
  const int k = hff_check_spatial_gate(op, c10::DeviceType::CPU, x, conv_weight, bn_weight, bn_bias,
                                       running_mean, running_var, use_batch_stats);
  hff_check_spatial_saved(op, c10::DeviceType::CPU, x, pooled, argmax);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  hff_check_gate_grad(op, c10::DeviceType::CPU, grad, x, gate_only, {B, 1, H, W}, "(B, 1, H, W)");
  const auto acc_opts = x.options().dtype(hff_acc_dtype(x.scalar_type()));
  const bool accumulate = hff_present(dx_accumulate) != nullptr;
  at::Tensor dx = hff_input_grad_buffer(op, c10::DeviceType::CPU, x, dx_accumulate);
  at::Tensor dconv = at::empty_like(conv_weight);
  at::Tensor dbn_w = at::empty({1}, acc_opts), dbn_b = at::empty({1}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto m = spatial_map_params<acc_t>(x, conv_weight, k, bn_weight, bn_bias, running_mean, running_var,
                                             use_batch_stats, eps);
    const acc_t* pooled_p = pooled.const_data_ptr<acc_t>();
    std::vector<acc_t> z(B * HW), gate(B * HW), dgate_buf;
    const auto state = map_forward(m, pooled_p, z.data());
    map_gate(state, z.data(), B * HW, gate.data());
    const acc_t* dgate = nullptr;
    if (gate_only) {
      dgate = grad.const_data_ptr<acc_t>();
    } else {
      dgate_buf.resize(B * HW);
      pixel_gate_grad(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), B, C, HW, dgate_buf.data());
      dgate = dgate_buf.data();
    }
    std::vector<acc_t> dpooled(B * 2 * HW);
    map_backward(m, state, pooled_p, z.data(), gate.data(), dgate, dpooled.data(), dconv.mutable_data_ptr<acc_t>(),
                 dbn_w.mutable_data_ptr<acc_t>(), dbn_b.mutable_data_ptr<acc_t>());
    spatial_input_grad(gate_only ? nullptr : grad.const_data_ptr<scalar_t>(), gate.data(), dpooled.data(),
                       argmax.const_data_ptr<int64_t>(), B, C, HW, gate_only, accumulate,
                       dx.mutable_data_ptr<scalar_t>());
  });
  return {dx, dconv, optional_grad(bn_weight, dbn_w), optional_grad(bn_bias, dbn_b)};
}

std::vector<at::Tensor> hff_channel_gate_fwd_cpu(MEDKERNELS_HFF_CHANNEL_ARGS) {
  const char* op = "hff_channel_gate_fwd_cpu";
  hff_check_channel_gate(op, c10::DeviceType::CPU, x, fc1_weight, fc2_weight);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto acc_opts = x.options().dtype(hff_acc_dtype(x.scalar_type()));
  at::Tensor pooled = at::empty({B, 2, C}, acc_opts);
  at::Tensor argmax = at::empty({B, C}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pixel_pool(x.const_data_ptr<scalar_t>(), B, C, HW, pooled.mutable_data_ptr<acc_t>(),
               argmax.mutable_data_ptr<int64_t>());
  });
  at::Tensor gate = hff_channel_mlp_gate(pooled, fc1_weight, fc2_weight).contiguous();
  if (gate_only) return {gate.view({B, C, 1, 1}), pooled, argmax};
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multiply_channel_gate(x.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), B * C, HW,
                          y.mutable_data_ptr<scalar_t>());
  });
  return {y, pooled, argmax};
}

std::vector<at::Tensor> hff_channel_gate_bwd_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                                 const at::Tensor& argmax, MEDKERNELS_HFF_CHANNEL_ARGS,
                                                 const c10::optional<at::Tensor>& dx_accumulate) {
  const char* op = "hff_channel_gate_bwd_cpu";
  hff_check_channel_gate(op, c10::DeviceType::CPU, x, fc1_weight, fc2_weight);
  hff_check_channel_saved(op, c10::DeviceType::CPU, x, pooled, argmax);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  hff_check_gate_grad(op, c10::DeviceType::CPU, grad, x, gate_only, {B, C, 1, 1}, "(B, C, 1, 1)");
  at::Tensor dgate = gate_only ? grad.view({B, C}) : at::empty({B, C}, pooled.options());
  if (!gate_only) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      channel_gate_grad(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), B * C, HW,
                        dgate.mutable_data_ptr<acc_t>());
    });
  }
  const auto mlp = hff_channel_mlp_backward(dgate, pooled, fc1_weight, fc2_weight);
  const at::Tensor& gate = mlp[3];
  const bool accumulate = hff_present(dx_accumulate) != nullptr;
  at::Tensor dx = hff_input_grad_buffer(op, c10::DeviceType::CPU, x, dx_accumulate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_input_grad(gate_only ? nullptr : grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(),
                       mlp[0].const_data_ptr<acc_t>(), argmax.const_data_ptr<int64_t>(), B, C, HW, gate_only,
                       accumulate, dx.mutable_data_ptr<scalar_t>());
  });
  return {dx, mlp[1], mlp[2]};
}

}  // namespace medkernels
