// Vector row kernels of the CPU depthwise convolution (contracts in depthwise_conv_cpu.h), written with GCC
// vector types and compiled three times — baseline (16-byte vectors), AVX2 + FMA (32 bytes), AVX-512 (64
// bytes) — the best one for the CPU being picked at run time. Kernel sizes 3, 5 and 7 are compile-time
// constants (taps fully unrolled, weights held in registers; at stride 1 each input vector is loaded once for
// the k outputs it feeds); other sizes take a generic path.
//
// Activations: for float, SiLU and ReLU are applied by the convolution kernels themselves (no extra pass over
// memory), with an inline exp and reciprocal instead of library calls and divisions; GELU (erf) and float64
// use the formulas of depthwise_conv_math.h in `omp simd` loops calling libmvec's vector exp / erf. The
// LayerNorm loops are `omp simd` loops over the same header's formulas.
//
// Files: depthwise_conv_cpu_vec.h (vector primitives, inline activations), this file (the convolution and
// parameter-gradient rows, the ISA variants, row_kernels), depthwise_conv_cpu_pointwise.h (activation,
// LayerNorm, copy and transpose loops).

#define MK_CPU_LIBMVEC 1  // vector expf / exp / erf (common/cpu_simd.h)

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/cpu_isa.h"
#include "depthwise_conv/depthwise_conv_cpu.h"
#include "common/cpu_simd.h"
#include "depthwise_conv/depthwise_conv_cpu_vec.h"
#include "depthwise_conv/depthwise_conv_cpu_pointwise.h"

namespace medkernels {
namespace dwcpu {
namespace {

// ---- channels-last rows: vectors over channels, the channel-vector loop outside the pixel loop so that
// the weights stay in registers while the row is walked.

// Stride 1, outputs [o, o + U) of one channel vector: each input pixel of a kernel row is loaded once and
// used by every output it reaches (k of them), the U accumulators staying in registers.
template <typename acc_t, typename V, int K, int R, int U>
MK_CPU_INLINE void conv_rows_block_s1(const V (*w)[K], const acc_t* const* src, int64_t ps, V* acc, int64_t o) {
  for (int r = 0; r < R; ++r) {
    const acc_t* x = src[r] + o * ps;
    for (int m = 0; m < U + K - 1; ++m) {
      V v;
      vload(v, x);
      x += ps;
      for (int j = 0; j < K; ++j) {
        const int u = m - j;
        if (u >= 0 && u < U) acc[u] += w[r][j] * v;
      }
    }
  }
}

// ---- rows read in place (RowClip): the outputs [o0, o1) whose taps all lie inside the row go through the
// vector loops from shifted row pointers; the others, at the row's two ends, add only the taps inside it.

struct Interior {
  int64_t o0, o1;
};

inline Interior interior(const RowClip* clip, int64_t n) {
  return clip != nullptr ? Interior{clip->lo, std::max(clip->lo, clip->hi)} : Interior{0, n};
}

// src[r]: kernel row i0 + r at channel c, advanced to the first tap of output o0.
template <typename acc_t, int R>
MK_CPU_INLINE void interior_rows(const acc_t* const* rows, int64_t i0, int64_t c, const RowClip* clip, int64_t o0,
                                int64_t s, int64_t ps, const acc_t** src) {
  const int64_t shift = clip != nullptr ? (o0 * s - clip->p) * ps : 0;
  for (int r = 0; r < R; ++r) src[r] = rows[i0 + r] + c + shift;
}

// f(o, col0, j0, j1) for each output outside [o0, o1): its tap j reads column col0 + j, inside the row for
// j0 <= j < j1.
template <typename F>
MK_CPU_INLINE void for_each_clipped(const RowClip& clip, Interior in, int64_t n, int64_t s, int64_t k, F&& f) {
  for (int64_t o = 0; o < n; ++o) {
    if (o == in.o0) o = in.o1;
    if (o >= n) break;
    const int64_t col0 = o * s - clip.p;
    f(o, col0, std::max<int64_t>(0, -col0), std::min<int64_t>(k, clip.W - col0));
  }
}

// One channel vector of one row of outputs. With a.clip, the rows are read in place from image column 0 and
// outputs [0, clip->lo) and [clip->hi, n), whose taps reach past the row's ends, add only their taps inside it.
template <typename acc_t, typename V, int K, int R, typename Epi>
MK_CPU_INLINE void conv_rows_lanes(const ConvRowsArgs<acc_t>& a, int64_t c) {
  constexpr int KJ = K > 0 ? K : static_cast<int>(kMaxKernel);
  // outputs per register block at stride 1: weights (R k) + accumulators + 1 input fit 16 or 32 registers
  constexpr int U = std::is_same_v<V, acc_t> || K == 0 ? 1 : (sizeof(V) >= 64 ? 6 : (R * K + 6 <= 16 ? 4 : 2));
  const int64_t k = K > 0 ? K : a.k, C = a.C, ps = a.ps, step = a.s * ps, n = a.n;
  const Interior in = interior(a.clip, n);
  const int64_t o0 = in.o0, o1 = in.o1;
  V init;
  vload(init, a.init + c);
  acc_t* dst = a.out + c;
  for (int64_t i0 = 0; i0 < k; i0 += R) {
    V w[R][KJ];
    const acc_t* src[R];
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < k; ++j) vload(w[r][j], a.w + ((i0 + r) * k + j) * C + c);
    }
    const bool first = i0 == 0, last = i0 + R >= k;
    if (o1 > o0) {
      interior_rows<acc_t, R>(a.rows, i0, c, a.clip, o0, a.s, ps, src);  // src[r] + o * step: output o0 + o
      acc_t* out = dst + o0 * C;
      const int64_t m = o1 - o0;
      int64_t o = 0;
      if constexpr (U > 1) {
        if (a.s == 1) {
          for (; o + U <= m; o += U) {
            V acc[U];
            for (int u = 0; u < U; ++u) {
              if (first) {
                acc[u] = init;
              } else {
                vload(acc[u], out + (o + u) * C);
              }
            }
            conv_rows_block_s1<acc_t, V, K, R, U>(w, src, ps, acc, o);
            for (int u = 0; u < U; ++u) vstore(out + (o + u) * C, acc[u]);
          }
        }
      }
      for (; o < m; ++o) {
        V acc;
        if (first) {
          acc = init;
        } else {
          vload(acc, out + o * C);
        }
        for (int r = 0; r < R; ++r) {
          const acc_t* x = src[r] + o * step;
          for (int64_t j = 0; j < k; ++j) {
            V v;
            vload(v, x + j * ps);
            acc += w[r][j] * v;
          }
        }
        vstore(out + o * C, acc);
      }
    }
    if (a.clip != nullptr) {
      for_each_clipped(*a.clip, in, n, a.s, k, [&](int64_t o, int64_t col0, int64_t j0, int64_t j1) {
        V acc;
        if (first) {
          acc = init;
        } else {
          vload(acc, dst + o * C);
        }
        for (int r = 0; r < R; ++r) {
          const acc_t* row = a.rows[i0 + r] + c;
          for (int64_t j = j0; j < j1; ++j) {
            V v;
            vload(v, row + (col0 + j) * ps);
            acc += w[r][j] * v;
          }
        }
        vstore(dst + o * C, acc);
      });
    }
    // the activation as a separate loop over the channel vector's outputs, still in L1: its long dependency
    // chains then overlap from output to output instead of queueing behind each output's FMAs
    if constexpr (!std::is_same_v<Epi, NoActivation>) {
      if (last) {
        for (int64_t q = 0; q < n; ++q) {
          V v;
          vload(v, dst + q * C);
          Epi::apply(v);
          vstore(dst + q * C, v);
        }
      }
    }
  }
}

template <typename acc_t, int VB, int K, typename Epi = NoActivation>
MK_CPU_INLINE void conv_rows_impl(const ConvRowsArgs<acc_t>& a) {
  constexpr int64_t L = VB / sizeof(acc_t);
  constexpr int R = rows_per_pass<VB, K>();
  int64_t c = 0;
  for (; c + L <= a.C; c += L) conv_rows_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, R, Epi>(a, c);
  for (; c < a.C; ++c) conv_rows_lanes<acc_t, acc_t, K, R, Epi>(a, c);
}

// The parameter gradients of one channel vector of one row (GradsRowsArgs). At stride 1, blocks of U outputs
// keep their d loss / d z vectors in registers and load each input vector once for the k taps it meets (instead
// of once per tap: the loads, not the FMAs, bounded the one-output loop). With a.clip, as conv_rows_lanes: the
// rows are read in place and the outputs at the row's ends add only their taps inside it (after the others).
template <typename acc_t, typename V, int K, int R>
MK_CPU_INLINE void grads_rows_lanes(const GradsRowsArgs<acc_t>& a, int64_t c) {
  constexpr int KJ = K > 0 ? K : static_cast<int>(kMaxKernel);
  // outputs per block: R K accumulators + U gradients + 1 input within 32 (AVX-512) or 16 vector registers
  constexpr int U = std::is_same_v<V, acc_t> || K == 0 ? 1
                    : sizeof(V) >= 64                   ? (R * K <= 9 ? 8 : (R * K <= 25 ? 4 : 1))
                                                        : (R * K <= 9 ? 4 : 1);
  const int64_t k = K > 0 ? K : a.k, C = a.C, ps = a.ps, step = a.s * ps, n = a.n;
  const Interior in = interior(a.clip, n);
  const int64_t o0 = in.o0, o1 = in.o1;
  const acc_t* gz = a.gz + c;
  for (int64_t i0 = 0; i0 < k; i0 += R) {
    const bool first = i0 == 0;
    V acc[R][KJ];
    V accb{};
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < k; ++j) acc[r][j] = V{};
    if (o1 > o0) {
      const acc_t* src[R];
      interior_rows<acc_t, R>(a.rows, i0, c, a.clip, o0, a.s, ps, src);  // src[r] + o * step: output o0 + o
      const acc_t* g0 = gz + o0 * C;
      const int64_t m = o1 - o0;
      int64_t o = 0;
      if constexpr (U > 1) {
        if (a.s == 1) {
          for (; o + U <= m; o += U) {
            V g[U];
            for (int u = 0; u < U; ++u) {
              vload(g[u], g0 + (o + u) * C);
              if (first) accb += g[u];
            }
            for (int r = 0; r < R; ++r) {
              const acc_t* x = src[r] + o * ps;
              for (int q = 0; q < U + K - 1; ++q) {
                V v;
                vload(v, x + q * ps);
                for (int j = 0; j < K; ++j) {
                  const int u = q - j;
                  if (u >= 0 && u < U) acc[r][j] += g[u] * v;
                }
              }
            }
          }
        }
      }
      for (; o < m; ++o) {
        V g;
        vload(g, g0 + o * C);
        if (first) accb += g;
        for (int r = 0; r < R; ++r) {
          const acc_t* x = src[r] + o * step;
          for (int64_t j = 0; j < k; ++j) {
            V v;
            vload(v, x + j * ps);
            acc[r][j] += g * v;
          }
        }
      }
    }
    if (a.clip != nullptr) {
      for_each_clipped(*a.clip, in, n, a.s, k, [&](int64_t o, int64_t col0, int64_t j0, int64_t j1) {
        V g;
        vload(g, gz + o * C);
        if (first) accb += g;
        for (int r = 0; r < R; ++r) {
          const acc_t* row = a.rows[i0 + r] + c;
          for (int64_t j = j0; j < j1; ++j) {
            V v;
            vload(v, row + (col0 + j) * ps);
            acc[r][j] += g * v;
          }
        }
      });
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        acc_t* out = a.gw + ((i0 + r) * k + j) * C + c;
        V cur;
        vload(cur, out);
        cur += acc[r][j];
        vstore(out, cur);
      }
    }
    if (first) {
      V cur;
      vload(cur, a.gb + c);
      cur += accb;
      vstore(a.gb + c, cur);
    }
  }
}

template <typename acc_t, int VB, int K>
MK_CPU_INLINE void grads_rows_impl(const GradsRowsArgs<acc_t>& a) {
  constexpr int64_t L = VB / sizeof(acc_t);
  constexpr int R = rows_per_pass<VB, K>();
  int64_t c = 0;
  for (; c + L <= a.C; c += L) grads_rows_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, R>(a, c);
  for (; c < a.C; ++c) grads_rows_lanes<acc_t, acc_t, K, R>(a, c);
}

// The fused backward of one row (BwdRowsArgs), channel vector by channel vector: z, then g * act'(z) in place,
// then the parameter gradients, while the vector's k input rows, gradients and outputs are in L1.
template <typename acc_t, typename V, int K, int R, DwAct A>
MK_CPU_INLINE void bwd_rows_lanes(const BwdRowsArgs<acc_t>& a, int64_t c) {
  conv_rows_lanes<acc_t, V, K, R, NoActivation>(a.conv, c);
  const int64_t C = a.conv.C, n = a.conv.n;
  acc_t* out = a.conv.out + c;
  const acc_t* g = a.g + c;
  for (int64_t q = 0; q < n; ++q) {
    V z, gv;
    vload(z, out + q * C);
    vload(gv, g + q * C);
    VecActivationGrad<A>::apply(z, gv);
    vstore(out + q * C, z);
  }
  if (a.gw != nullptr) {
    grads_rows_lanes<acc_t, V, K, R>({a.conv.rows, a.conv.out, a.gw, a.gb, n, C, a.conv.s, a.conv.k, a.conv.ps,
                                      a.conv.clip},
                                     c);
  }
}

template <typename acc_t, int VB, int K, DwAct A>
MK_CPU_INLINE void bwd_rows_impl(const BwdRowsArgs<acc_t>& a) {
  constexpr int64_t L = VB / sizeof(acc_t);
  constexpr int R = rows_per_pass<VB, K>();
  int64_t c = 0;
  for (; c + L <= a.conv.C; c += L) bwd_rows_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, R, A>(a, c);
  for (; c < a.conv.C; ++c) bwd_rows_lanes<acc_t, acc_t, K, R, A>(a, c);
}

// ---- plane rows: vectors over output columns, scalar weights broadcast.

// Outputs [o, o + U * lanes) of one plane row; the weights come broadcast, the tap offsets folded into the
// per-tap source pointers (locals, so that the stores to out do not force reloads).
template <typename acc_t, typename V, int U, typename Epi>
MK_CPU_INLINE void conv_plane_block(const V* w, const acc_t* const* src, int64_t ntaps, V init, acc_t* out,
                                   int64_t o) {
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  V acc[U];
  for (int u = 0; u < U; ++u) acc[u] = init;
  for (int64_t t = 0; t < ntaps; ++t) {
    const acc_t* x = src[t] + o;
    for (int u = 0; u < U; ++u) {
      V v;
      vload(v, x + u * L);
      acc[u] += w[t] * v;
    }
  }
  for (int u = 0; u < U; ++u) {
    Epi::apply(acc[u]);
    vstore(out + o + u * L, acc[u]);
  }
}

template <typename acc_t, typename V, int K, typename Epi>
MK_CPU_INLINE void conv_plane_lanes(const ConvPlaneArgs<acc_t>& a, const acc_t* const* src, int64_t ntaps,
                                   int64_t o0, int64_t o1) {
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  constexpr int U = sizeof(V) == sizeof(acc_t) ? 1 : 4;
  constexpr int64_t NT = K > 0 ? K * K : kMaxKernel * kMaxKernel;
  V w[NT];
  for (int64_t t = 0; t < ntaps; ++t) vbroadcast(w[t], a.w[t]);
  V init;
  vbroadcast(init, a.init);
  acc_t* out = a.out;
  int64_t o = o0;
  for (; o + U * L <= o1; o += U * L) conv_plane_block<acc_t, V, U, Epi>(w, src, K > 0 ? NT : ntaps, init, out, o);
  for (; o + L <= o1; o += L) conv_plane_block<acc_t, V, 1, Epi>(w, src, K > 0 ? NT : ntaps, init, out, o);
  if constexpr (L > 1) {
    if (o < o1 && o1 - o0 >= L) {
      conv_plane_block<acc_t, V, 1, Epi>(w, src, K > 0 ? NT : ntaps, init, out, o1 - L);  // overlaps, equal values
    } else if (o < o1) {
      conv_plane_lanes<acc_t, acc_t, K, Epi>(a, src, ntaps, o, o1);
    }
  }
}

template <typename acc_t, int VB, int K, typename Epi = NoActivation>
MK_CPU_INLINE void conv_plane_impl(const ConvPlaneArgs<acc_t>& a) {
  const int64_t k = K > 0 ? K : a.k;
  const acc_t* src[kMaxKernel * kMaxKernel];
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) src[i * k + j] = a.rows[i] + (j % a.s) * a.phase_len + j / a.s;
  conv_plane_lanes<acc_t, typename VecOf<acc_t, VB>::type, K, Epi>(a, src, k * k, 0, a.n);
}

template <typename acc_t, typename V, int K, int R>
MK_CPU_INLINE void grads_plane_rows(const GradsPlaneArgs<acc_t>& a, const int64_t* tap, int64_t i0, acc_t* gw,
                                   acc_t& gb) {
  constexpr int KJ = K > 0 ? K : static_cast<int>(kMaxKernel);
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  const int64_t k = K > 0 ? K : a.k, n = a.n;
  V acc[R][KJ];
  V accb{};
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < k; ++j) acc[r][j] = V{};
  int64_t o = 0;
  for (; o + L <= n; o += L) {
    V g;
    vload(g, a.gz + o);
    accb += g;
    for (int r = 0; r < R; ++r) {
      const acc_t* x = a.rows[i0 + r] + o;
      for (int64_t j = 0; j < k; ++j) {
        V v;
        vload(v, x + tap[j]);
        acc[r][j] += g * v;
      }
    }
  }
  acc_t accs[R][KJ];
  acc_t accbs = 0;
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < k; ++j) accs[r][j] = 0;
  for (; o < n; ++o) {
    const acc_t g = a.gz[o];
    accbs += g;
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < k; ++j) accs[r][j] += g * a.rows[i0 + r][o + tap[j]];
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < k; ++j) gw[(i0 + r) * k + j] += vsum<acc_t>(acc[r][j]) + accs[r][j];
  gb += vsum<acc_t>(accb) + accbs;
}

template <typename acc_t, int VB, int K>
MK_CPU_INLINE void grads_plane_impl(const GradsPlaneArgs<acc_t>& a) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int R = rows_per_pass<VB, K>();
  const int64_t k = K > 0 ? K : a.k;
  int64_t tap[kMaxKernel];
  for (int64_t j = 0; j < k; ++j) tap[j] = (j % a.s) * a.phase_len + j / a.s;
  acc_t gb = 0, unused = 0;
  for (int64_t i0 = 0; i0 < k; i0 += R) grads_plane_rows<acc_t, V, K, R>(a, tap, i0, a.gw, i0 == 0 ? gb : unused);
  a.gb[0] += gb;
}


// ---- the ISA variants: each wraps the inline kernels in functions compiled for one target.

#define MK_DW_DEFINE_ISA(NAME, ATTR, VB)                                                                   \
  struct NAME {                                                                                            \
    template <typename acc_t, int K>                                                                       \
    ATTR static void conv_rows(const ConvRowsArgs<acc_t>& a) {                                             \
      conv_rows_impl<acc_t, VB, K>(a);                                                                     \
    }                                                                                                      \
    template <typename acc_t, int K, DwAct A>                                                              \
    ATTR static void conv_rows_act(const ConvRowsArgs<acc_t>& a) {                                         \
      conv_rows_impl<acc_t, VB, K, VecActivation<A>>(a);                                                   \
    }                                                                                                      \
    template <typename acc_t, int K, DwAct A>                                                              \
    ATTR static void conv_plane_act(const ConvPlaneArgs<acc_t>& a) {                                       \
      conv_plane_impl<acc_t, VB, K, VecActivation<A>>(a);                                                  \
    }                                                                                                      \
    template <typename acc_t, int K, DwAct A>                                                              \
    ATTR static void bwd_rows(const BwdRowsArgs<acc_t>& a) {                                               \
      bwd_rows_impl<acc_t, VB, K, A>(a);                                                                   \
    }                                                                                                      \
    template <typename acc_t, int K>                                                                       \
    ATTR static void grads_rows(const GradsRowsArgs<acc_t>& a) {                                           \
      grads_rows_impl<acc_t, VB, K>(a);                                                                    \
    }                                                                                                      \
    template <typename acc_t, int K>                                                                       \
    ATTR static void conv_plane(const ConvPlaneArgs<acc_t>& a) {                                           \
      conv_plane_impl<acc_t, VB, K>(a);                                                                    \
    }                                                                                                      \
    template <typename acc_t, int K>                                                                       \
    ATTR static void grads_plane(const GradsPlaneArgs<acc_t>& a) {                                         \
      grads_plane_impl<acc_t, VB, K>(a);                                                                   \
    }                                                                                                      \
    template <DwAct A, typename acc_t>                                                                     \
    ATTR static void act_forward(const acc_t* z, acc_t* out, int64_t n) {                                  \
      act_forward_impl<A, acc_t>(z, out, n);                                                               \
    }                                                                                                      \
    template <DwAct A, typename acc_t>                                                                     \
    ATTR static void act_forward_save(const acc_t* z, acc_t* out, acc_t* dact, int64_t npix, int64_t C) { \
      act_forward_save_impl<A, acc_t, VB>(z, out, dact, npix, C);                                          \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void mul(const acc_t* a, const acc_t* b, acc_t* out, int64_t n) {                          \
      mul_impl<acc_t>(a, b, out, n);                                                                       \
    }                                                                                                      \
    template <DwAct A, typename acc_t>                                                                     \
    ATTR static void act_backward(const acc_t* z, const acc_t* g, acc_t* gz, int64_t n) {                  \
      act_backward_impl<A, acc_t, VB>(z, g, gz, n);                                                            \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void ln_forward(const LayerNormArgs<acc_t>& a, const acc_t* z, acc_t* out) {               \
      ln_forward_impl<acc_t>(a, z, out);                                                                   \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void copy2d(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows, int64_t cols) { \
      copy2d_impl<acc_t, VB>(src, ss, dst, ds, rows, cols);                                                \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void transpose(const acc_t* src, int64_t ss, acc_t* dst, int64_t ds, int64_t rows,         \
                               int64_t cols) {                                                             \
      transpose_impl<acc_t, VB>(src, ss, dst, ds, rows, cols);                                             \
    }                                                                                                      \
    template <typename acc_t>                                                                              \
    ATTR static void ln_backward(const LayerNormArgs<acc_t>& a, const acc_t* z, const acc_t* gy, acc_t* gz, \
                                 acc_t* dgamma, acc_t* dbeta) {                                            \
      ln_backward_impl<acc_t>(a, z, gy, gz, dgamma, dbeta);                                                \
    }                                                                                                      \
  };

MK_DW_DEFINE_ISA(IsaBaseline, , 16)
#ifdef MK_CPU_X86_DISPATCH
MK_DW_DEFINE_ISA(IsaAvx2, MK_CPU_TARGET_AVX2, 32)
MK_DW_DEFINE_ISA(IsaAvx512, MK_CPU_TARGET_AVX512F, 64)
#endif

template <typename Isa, typename acc_t, int K>
void set_size_kernels(RowKernels<acc_t>& r, DwAct act) {
  r.conv_rows = &Isa::template conv_rows<acc_t, K>;
  r.grads_rows = &Isa::template grads_rows<acc_t, K>;
  r.conv_plane = &Isa::template conv_plane<acc_t, K>;
  r.grads_plane = &Isa::template grads_plane<acc_t, K>;
  r.act_fused = std::is_same_v<acc_t, float> && act != DwAct::kGelu;
  // (without an activation the backward needs no z, and the unfused path skips its convolution)
  r.bwd_fused = std::is_same_v<acc_t, float> && (act == DwAct::kSilu || act == DwAct::kRelu);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (act == DwAct::kSilu) {
      r.bwd_rows = &Isa::template bwd_rows<acc_t, K, DwAct::kSilu>;
    } else if (act == DwAct::kRelu) {
      r.bwd_rows = &Isa::template bwd_rows<acc_t, K, DwAct::kRelu>;
    }
    if (act == DwAct::kSilu) {
      r.conv_rows_act = &Isa::template conv_rows_act<acc_t, K, DwAct::kSilu>;
      r.conv_plane_act = &Isa::template conv_plane_act<acc_t, K, DwAct::kSilu>;
    } else if (act == DwAct::kRelu) {
      r.conv_rows_act = &Isa::template conv_rows_act<acc_t, K, DwAct::kRelu>;
      r.conv_plane_act = &Isa::template conv_plane_act<acc_t, K, DwAct::kRelu>;
    }
  }
  if (act == DwAct::kNone) {
    r.conv_rows_act = r.conv_rows;
    r.conv_plane_act = r.conv_plane;
  }
}

template <typename Isa, typename acc_t, DwAct A>
void set_act_kernels(RowKernels<acc_t>& r) {
  r.act_forward = &Isa::template act_forward<A, acc_t>;
  r.act_backward = &Isa::template act_backward<A, acc_t>;
  r.act_forward_save = &Isa::template act_forward_save<A, acc_t>;
}

template <typename Isa, typename acc_t>
RowKernels<acc_t> kernels_for(int64_t k, DwAct act) {
  RowKernels<acc_t> r{};
  switch (k) {
    case 3:
      set_size_kernels<Isa, acc_t, 3>(r, act);
      break;
    case 5:
      set_size_kernels<Isa, acc_t, 5>(r, act);
      break;
    case 7:
      set_size_kernels<Isa, acc_t, 7>(r, act);
      break;
    default:
      set_size_kernels<Isa, acc_t, 0>(r, act);
  }
  switch (act) {
    case DwAct::kSilu:
      set_act_kernels<Isa, acc_t, DwAct::kSilu>(r);
      break;
    case DwAct::kGelu:
      set_act_kernels<Isa, acc_t, DwAct::kGelu>(r);
      break;
    case DwAct::kRelu:
      set_act_kernels<Isa, acc_t, DwAct::kRelu>(r);
      break;
    default:
      set_act_kernels<Isa, acc_t, DwAct::kNone>(r);
  }
  r.ln_forward = &Isa::template ln_forward<acc_t>;
  r.ln_backward = &Isa::template ln_backward<acc_t>;
  r.mul = &Isa::template mul<acc_t>;
  r.copy2d = &Isa::template copy2d<acc_t>;
  r.transpose = &Isa::template transpose<acc_t>;
  return r;
}

}  // namespace

template <typename acc_t>
RowKernels<acc_t> row_kernels(int64_t k, DwAct act) {
#ifdef MK_CPU_X86_DISPATCH
  if (cpu_use_avx512()) return kernels_for<IsaAvx512, acc_t>(k, act);
  if (cpu_use_avx2()) return kernels_for<IsaAvx2, acc_t>(k, act);
#endif
  return kernels_for<IsaBaseline, acc_t>(k, act);
}

template RowKernels<float> row_kernels<float>(int64_t, DwAct);
template RowKernels<double> row_kernels<double>(int64_t, DwAct);

}  // namespace dwcpu
}  // namespace medkernels
