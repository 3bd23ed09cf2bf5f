// The transforms of the Winograd F(4x4, 3x3) convolution on CPU (the formulas: winograd_f4x3.h; the matrix
// products between them run in PyTorch, see medkernels/ops/conv3x3.py). Maps are channels-last
// (batch, H, W, C) float32; the transformed tiles are (36, tiles, C) with tile t = (b * tiles_h + i) * tiles_w + j
// covering outputs [4i, 4i + 4) x [4j, 4j + 4) (tiles_h = ceil(H / 4)), so that each of the 36 slices is the
// row-major left operand (or result) of one matrix product over channels.
//
// Every loop runs over a channel block of one vector (16, 8 or 4 floats, per ISA variant) with a scalar tail:
// the same formulas and summation order at every width, so the variants agree to the bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/check_message.h"
#include "common/cpu_simd.h"
#include "conv3x3/winograd_f4x3.h"
#include "ops.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace medkernels {
namespace {

using namespace winograd;

template <int N>
struct FVec {
  typedef float type __attribute__((vector_size(4 * N), aligned(4)));
};

template <typename V>
struct Lanes {
  static constexpr int value = sizeof(V) / sizeof(float);
};
template <>
struct Lanes<float> {
  static constexpr int value = 1;
};

template <typename V>
MK_CPU_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
MK_CPU_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

struct TileGeometry {
  int64_t batch, height, width, tiles_h, tiles_w;
  int64_t tiles() const { return batch * tiles_h * tiles_w; }
};

TileGeometry geometry(int64_t batch, int64_t height, int64_t width) {
  return {batch, height, width, (height + 3) / 4, (width + 3) / 4};
}

// A channels-last map: pixel (b, row, col) starts at data + ((b * height + row) * width + col) * pixel_stride.
template <typename P>
struct Map {
  P* data;
  int64_t pixel_stride;
};

// The transformed tiles of a chunk [t0, t1): tile t's value e of channel c at data + e * plane + (t - t0) * row + c.
template <typename P>
struct Tiles {
  P* data;
  int64_t plane, row;
};

// (B^T d B) of the 6x6 input tile at (row0, col0) (zero outside the map), channels c .. c + lanes, as Tiles row r.
template <typename V>
MK_CPU_INLINE void input_tile(Map<const float> x, Tiles<float> v, const TileGeometry& g, int64_t b, int64_t row0,
                              int64_t col0, int64_t r, int64_t c) {
  V t1[6][6];  // t1[a][xx] = sum_y B^T[a][y] d[y][xx]
  for (int xx = 0; xx < 6; ++xx) {
    const int64_t col = col0 + xx;
    V d[6];
    for (int y = 0; y < 6; ++y) {
      const int64_t row = row0 + y;
      const bool inside = row >= 0 && row < g.height && col >= 0 && col < g.width;
      d[y] = inside ? load<V>(x.data + ((b * g.height + row) * g.width + col) * x.pixel_stride + c) : V{};
    }
    V col_t[6];
    input_1d(d, col_t);
    for (int a = 0; a < 6; ++a) t1[a][xx] = col_t[a];
  }
  for (int a = 0; a < 6; ++a) {
    V out[6];
    input_1d(t1[a], out);
    for (int bb = 0; bb < 6; ++bb) store<V>(v.data + (a * 6 + bb) * v.plane + r * v.row + c, out[bb]);
  }
}

// The 4x4 output tile at (row0, col0) (cropped to the map) = A^T M A from Tiles row r, channels c .. c + lanes.
template <typename V>
MK_CPU_INLINE void output_tile(const float* const* m, int64_t m_row, Map<float> y, const TileGeometry& g, int64_t b,
                               int64_t row0, int64_t col0, int64_t r, int64_t c) {
  V t1[4][6];  // t1[i][bb] = sum_a A^T[i][a] M[a][bb]
  for (int bb = 0; bb < 6; ++bb) {
    V col[6];
    for (int a = 0; a < 6; ++a) col[a] = load<V>(m[a * 6 + bb] + r * m_row + c);
    V out[4];
    output_1d(col, out);
    for (int i = 0; i < 4; ++i) t1[i][bb] = out[i];
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + i;
    if (row >= g.height) break;
    V out[4];
    output_1d(t1[i], out);
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + j;
      if (col >= g.width) break;
      store<V>(y.data + ((b * g.height + row) * g.width + col) * y.pixel_stride + c, out[j]);
    }
  }
}

// (A dy A^T) of the 4x4 gradient tile at (row0, col0) (zero beyond the map), channels c .. c + lanes, as Tiles row r.
template <typename V>
MK_CPU_INLINE void grad_output_tile(Map<const float> dy, Tiles<float> z, const TileGeometry& g, int64_t b,
                                    int64_t row0, int64_t col0, int64_t r, int64_t c) {
  V t1[6][4];  // t1[a][j] = sum_i A[a][i] dy[i][j]
  for (int j = 0; j < 4; ++j) {
    const int64_t col = col0 + j;
    V d[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + i;
      d[i] = (row < g.height && col < g.width)
                 ? load<V>(dy.data + ((b * g.height + row) * g.width + col) * dy.pixel_stride + c)
                 : V{};
    }
    V out[6];
    grad_output_1d(d, out);
    for (int a = 0; a < 6; ++a) t1[a][j] = out[a];
  }
  for (int a = 0; a < 6; ++a) {
    V out[6];
    grad_output_1d(t1[a], out);
    for (int bb = 0; bb < 6; ++bb) store<V>(z.data + (a * 6 + bb) * z.plane + r * z.row + c, out[bb]);
  }
}

// The tile loops: tiles [begin, end) of the chunk starting at tile t0, every channel of [0, channels).
struct TileJob {
  TileGeometry g;
  int64_t t0, channels;
};

#define MK_WINOGRAD_FOR_TILES(body)                                                         \
  constexpr int L = Lanes<V>::value;                                                        \
  for (int64_t t = job.t0 + begin; t < job.t0 + end; ++t) {                                 \
    const int64_t j = t % job.g.tiles_w, i = (t / job.g.tiles_w) % job.g.tiles_h;           \
    const int64_t b = t / (job.g.tiles_w * job.g.tiles_h), r = t - job.t0;                  \
    int64_t c = 0;                                                                          \
    for (; c + L <= job.channels; c += L) body(V);                                          \
    for (; c < job.channels; ++c) body(float);                                              \
  }

template <typename V>
MK_CPU_INLINE void input_tiles(const TileJob& job, Map<const float> x, Tiles<float> v, int64_t begin, int64_t end) {
#define MK_BODY(T) input_tile<T>(x, v, job.g, b, 4 * i - 1, 4 * j - 1, r, c)
  MK_WINOGRAD_FOR_TILES(MK_BODY)
#undef MK_BODY
}

template <typename V>
MK_CPU_INLINE void output_tiles(const TileJob& job, const float* const* m, int64_t m_row, Map<float> y, int64_t begin,
                                int64_t end) {
#define MK_BODY(T) output_tile<T>(m, m_row, y, job.g, b, 4 * i, 4 * j, r, c)
  MK_WINOGRAD_FOR_TILES(MK_BODY)
#undef MK_BODY
}

template <typename V>
MK_CPU_INLINE void grad_output_tiles(const TileJob& job, Map<const float> dy, Tiles<float> z, int64_t begin,
                                     int64_t end) {
#define MK_BODY(T) grad_output_tile<T>(dy, z, job.g, b, 4 * i, 4 * j, r, c)
  MK_WINOGRAD_FOR_TILES(MK_BODY)
#undef MK_BODY
}

// The filter transform of one vector of lanes: lane l's 3x3 taps at w + l * lane_stride (rotated by 180 degrees
// when flipped); result e stored at u + e * plane.
template <typename V>
MK_CPU_INLINE void filter_lanes(const float* w, int64_t lane_stride, bool flip, float* u, int64_t plane) {
  constexpr int L = Lanes<V>::value;
  V g[3][3];
  for (int r = 0; r < 3; ++r) {
    for (int s = 0; s < 3; ++s) {
      const int tap = flip ? (2 - r) * 3 + (2 - s) : r * 3 + s;
      float lanes[L];
      for (int l = 0; l < L; ++l) lanes[l] = w[l * lane_stride + tap];
      g[r][s] = load<V>(lanes);
    }
  }
  V t1[6][3];  // t1[a][s] = sum_r G[a][r] g[r][s]
  for (int s = 0; s < 3; ++s) {
    const V col[3] = {g[0][s], g[1][s], g[2][s]};
    V out[6];
    filter_1d(col, out);
    for (int a = 0; a < 6; ++a) t1[a][s] = out[a];
  }
  for (int a = 0; a < 6; ++a) {
    V out[6];
    filter_1d(t1[a], out);
    for (int bb = 0; bb < 6; ++bb) store<V>(u + (a * 6 + bb) * plane, out[bb]);
  }
}

struct FilterJob {
  const float* w;
  float* u;
  int64_t plane, cols, lane_stride, row_stride;
  bool flip;
};

// Rows [begin, end) of every U[e]: row r, columns c (lanes) from w + r * row_stride + c * lane_stride.
template <typename V>
MK_CPU_INLINE void filter_rows(const FilterJob& job, int64_t begin, int64_t end) {
  constexpr int L = Lanes<V>::value;
  for (int64_t r = begin; r < end; ++r) {
    const float* w = job.w + r * job.row_stride;
    float* u = job.u + r * job.cols;
    int64_t c = 0;
    for (; c + L <= job.cols; c += L) filter_lanes<V>(w + c * job.lane_stride, job.lane_stride, job.flip, u + c, job.plane);
    for (; c < job.cols; ++c) filter_lanes<float>(w + c * job.lane_stride, job.lane_stride, job.flip, u + c, job.plane);
  }
}

// dw for one vector of input channels i0 .. i0 + lanes of output channel o (m, dw already offset to them).
template <typename V>
MK_CPU_INLINE void filter_grad_lanes(const float* m, int64_t plane, float* dw) {
  constexpr int L = Lanes<V>::value;
  V t1[3][6];  // t1[r][bb] = sum_a G^T[r][a] M[a][bb]
  for (int bb = 0; bb < 6; ++bb) {
    V col[6];
    for (int a = 0; a < 6; ++a) col[a] = load<V>(m + (a * 6 + bb) * plane);
    V out[3];
    filter_grad_1d(col, out);
    for (int r = 0; r < 3; ++r) t1[r][bb] = out[r];
  }
  float taps[9][L];
  for (int r = 0; r < 3; ++r) {
    V out[3];
    filter_grad_1d(t1[r], out);
    for (int s = 0; s < 3; ++s) store<V>(taps[r * 3 + s], out[s]);
  }
  for (int l = 0; l < L; ++l)
    for (int tap = 0; tap < 9; ++tap) dw[l * 9 + tap] = taps[tap][l];
}

struct FilterGradJob {
  const float* m;
  float* dw;
  int64_t plane, ci;
};

template <typename V>
MK_CPU_INLINE void filter_grad_rows(const FilterGradJob& job, int64_t begin, int64_t end) {
  constexpr int L = Lanes<V>::value;
  for (int64_t o = begin; o < end; ++o) {
    int64_t i = 0;
    for (; i + L <= job.ci; i += L) filter_grad_lanes<V>(job.m + o * job.ci + i, job.plane, job.dw + (o * job.ci + i) * 9);
    for (; i < job.ci; ++i) filter_grad_lanes<float>(job.m + o * job.ci + i, job.plane, job.dw + (o * job.ci + i) * 9);
  }
}

#define MK_WINOGRAD_VARIANTS(name, params, args)                                                      \
  void name##_generic params { name<FVec<4>::type> args; }                                             \
  MK_WINOGRAD_X86_VARIANTS(name, params, args)                                                         \
  void name##_dispatch params { MK_WINOGRAD_X86_DISPATCH(name, args) name##_generic args; }

#ifdef MK_CPU_X86_DISPATCH
#define MK_WINOGRAD_X86_VARIANTS(name, params, args)                            \
  MK_CPU_TARGET_AVX2 void name##_avx2 params { name<FVec<8>::type> args; }      \
  MK_CPU_TARGET_AVX512 void name##_avx512 params { name<FVec<16>::type> args; }
#define MK_WINOGRAD_X86_DISPATCH(name, args) \
  if (cpu_use_avx512()) return name##_avx512 args; \
  if (cpu_use_avx2()) return name##_avx2 args;
#else
#define MK_WINOGRAD_X86_VARIANTS(name, params, args)
#define MK_WINOGRAD_X86_DISPATCH(name, args)
#endif

MK_WINOGRAD_VARIANTS(input_tiles,
                     (const TileJob& job, Map<const float> x, Tiles<float> v, int64_t begin, int64_t end),
                     (job, x, v, begin, end))
MK_WINOGRAD_VARIANTS(output_tiles,
                     (const TileJob& job, const float* const* m, int64_t m_row, Map<float> y, int64_t begin,
                      int64_t end),
                     (job, m, m_row, y, begin, end))
MK_WINOGRAD_VARIANTS(grad_output_tiles,
                     (const TileJob& job, Map<const float> dy, Tiles<float> z, int64_t begin, int64_t end),
                     (job, dy, z, begin, end))
MK_WINOGRAD_VARIANTS(filter_rows, (const FilterJob& job, int64_t begin, int64_t end), (job, begin, end))
MK_WINOGRAD_VARIANTS(filter_grad_rows, (const FilterGradJob& job, int64_t begin, int64_t end), (job, begin, end))

// Tiles per parallel task: enough work (a few hundred kB moved) to amortise a task.
int64_t tile_grain(int64_t channels) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(channels, 1)); }

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  MK_CHECK_VALUE(t.defined() && t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  MK_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

void check_map(const at::Tensor& t, const char* op, const char* name) {
  check_float_cpu(t, op, name);
  MK_CHECK_VALUE(t.dim() == 4 && t.is_contiguous(), op, ": ", name,
                 " must be a contiguous (batch, H, W, C) tensor, got shape ", t.sizes(), " and strides ", t.strides());
}

void check_range(int64_t lo, int64_t hi, int64_t size, const char* op, const char* what) {
  MK_CHECK_VALUE(0 <= lo && lo <= hi && hi <= size, op, ": ", what, " range [", lo, ", ", hi, ") is outside [0, ",
                 size, ")");
}

void check_out(const at::Tensor& out, int64_t rows, int64_t cols, const char* op) {
  check_float_cpu(out, op, "out");
  MK_CHECK_VALUE(out.is_contiguous() && out.dim() == 3 && out.size(0) == 36 && out.size(1) == rows &&
                     out.size(2) == cols,
                 op, ": out must be a contiguous (36, ", rows, ", ", cols, ") tensor, got shape ", out.sizes());
}

using TileTransform = void (*)(const TileJob&, Map<const float>, Tiles<float>, int64_t, int64_t);

// The tiles [t0, t1) of a channels-last map (x, or the output gradient) transformed by `transform` into out.
void transform_tiles(const at::Tensor& map, int64_t t0, int64_t t1, const at::Tensor& out, const char* op,
                     const char* name, TileTransform transform) {
  check_map(map, op, name);
  const TileGeometry g = geometry(map.size(0), map.size(1), map.size(2));
  check_range(t0, t1, g.tiles(), op, "tile");
  const int64_t channels = map.size(3), n = t1 - t0;
  check_out(out, n, channels, op);
  const TileJob job{g, t0, channels};
  const Map<const float> src{map.const_data_ptr<float>(), channels};
  const Tiles<float> dst{out.mutable_data_ptr<float>(), n * channels, channels};
  at::parallel_for(0, n, tile_grain(channels),
                   [&](int64_t begin, int64_t end) { transform(job, src, dst, begin, end); });
}

}  // namespace

void winograd_input_transform_cpu(const at::Tensor& x, int64_t t0, int64_t t1, const at::Tensor& v) {
  transform_tiles(x, t0, t1, v, "winograd_input_transform_cpu", "x", input_tiles_dispatch);
}

void winograd_grad_output_transform_cpu(const at::Tensor& dy, int64_t t0, int64_t t1, const at::Tensor& z) {
  transform_tiles(dy, t0, t1, z, "winograd_grad_output_transform_cpu", "dy", grad_output_tiles_dispatch);
}

void winograd_output_transform_cpu(const std::vector<at::Tensor>& m, const at::Tensor& y, int64_t t0, int64_t c0) {
  check_map(y, "winograd_output_transform_cpu", "y");
  const char* op = "winograd_output_transform_cpu";
  MK_CHECK_VALUE(m.size() == 36, op, ": m must hold the 36 products of the tiles, got ", m.size());
  const TileGeometry g = geometry(y.size(0), y.size(1), y.size(2));
  MK_CHECK_VALUE(m[0].dim() == 2, op, ": m[0] must be a (tiles, channels) matrix");
  const int64_t n = m[0].size(0), channels = m[0].size(1);
  check_range(t0, t0 + n, g.tiles(), op, "tile");
  check_range(c0, c0 + channels, y.size(3), op, "channel");
  std::vector<const float*> mp(36);
  for (int e = 0; e < 36; ++e) {
    check_float_cpu(m[e], op, "m[e]");
    MK_CHECK_VALUE(m[e].dim() == 2 && m[e].size(0) == n && m[e].size(1) == channels && m[e].stride(1) == 1 &&
                       m[e].stride(0) == channels,
                   op, ": m[", e, "] must be a contiguous (", n, ", ", channels, ") matrix");
    mp[e] = m[e].const_data_ptr<float>();
  }
  const TileJob job{g, t0, channels};
  const Map<float> ym{y.mutable_data_ptr<float>() + c0, y.size(3)};
  at::parallel_for(0, n, tile_grain(channels), [&](int64_t begin, int64_t end) {
    output_tiles_dispatch(job, mp.data(), channels, ym, begin, end);
  });
}

// U[e, o, i] = (G w[o, i] G^T)[e]; with flip_transpose, U[e, i, o] from w[o, i] rotated by 180 degrees (the
// filter of the input gradient). Vectorised over the contiguous index of U (i, or o when flipped): lane l's
// nine taps are at w + l * lane_stride, and each of the 36 results is stored as one vector.
void winograd_filter_transform_cpu(const at::Tensor& w, bool flip_transpose, int64_t r0, int64_t r1,
                                   const at::Tensor& u) {
  const char* op = "winograd_filter_transform_cpu";
  check_float_cpu(w, op, "w");
  MK_CHECK_VALUE(w.is_contiguous() && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, op,
                 ": w must be a contiguous (out, in, 3, 3) tensor, got shape ", w.sizes());
  const int64_t co = w.size(0), ci = w.size(1);
  // rows of U: o (vectors over i) or, flipped, i (vectors over o)
  const int64_t cols = flip_transpose ? co : ci;
  check_range(r0, r1, flip_transpose ? ci : co, op, "row");
  const int64_t n = r1 - r0;
  check_out(u, n, cols, op);
  FilterJob job{w.const_data_ptr<float>(), u.mutable_data_ptr<float>() - r0 * cols, n * cols, cols,
                flip_transpose ? ci * 9 : 9, flip_transpose ? 9 : ci * 9, flip_transpose};
  at::parallel_for(r0, r1, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) { filter_rows_dispatch(job, begin, end); });
}

// dw[o, i] = G^T M[:, o, i] G for M (36, out, in): the filter gradient from the summed tile products.
void winograd_filter_grad_transform_cpu(const at::Tensor& m, const at::Tensor& dw, int64_t o0) {
  const char* op = "winograd_filter_grad_transform_cpu";
  check_float_cpu(m, op, "m");
  check_float_cpu(dw, op, "dw");
  MK_CHECK_VALUE(m.is_contiguous() && m.dim() == 3 && m.size(0) == 36, op,
                 ": m must be a contiguous (36, out, in) tensor, got shape ", m.sizes());
  MK_CHECK_VALUE(dw.is_contiguous() && dw.dim() == 4 && dw.size(1) == m.size(2) && dw.size(2) == 3 &&
                     dw.size(3) == 3,
                 op, ": dw must be a contiguous (out, ", m.size(2), ", 3, 3) tensor, got shape ", dw.sizes());
  const int64_t n = m.size(1), ci = m.size(2);
  check_range(o0, o0 + n, dw.size(0), op, "output channel");
  FilterGradJob job{m.const_data_ptr<float>(), dw.mutable_data_ptr<float>() + o0 * ci * 9, n * ci, ci};
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(ci, 1)),
                   [&](int64_t begin, int64_t end) { filter_grad_rows_dispatch(job, begin, end); });
}

}  // namespace medkernels
