// Sixteen floats as one value (GCC/clang vector extensions): a zmm register under AVX-512, two ymm under
// AVX2, four xmm otherwise.  Used by the CPU selective scan for its N = 16 states, where one position's
// states fill exactly one value.
#pragma once

#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 12)
#define MK_HAVE_V16 1

#include <cstdint>

// The helpers are always inlined, so passing 64-byte vectors by value never crosses an ABI boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace medkernels {

typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

#if defined(__GNUC__)
#define MK_V16_INLINE inline __attribute__((always_inline))
#else
#define MK_V16_INLINE inline
#endif

MK_V16_INLINE v16f v16_load(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

MK_V16_INLINE void v16_store(float* p, v16f v) { __builtin_memcpy(p, &v, sizeof(v)); }

MK_V16_INLINE v16f v16_splat(float s) { return v16f{} + s; }

// exp(v) lane-wise, inline: round-to-nearest range reduction v = k ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial for exp(r) (relative error about 1e-7 on that interval, as expf), then 2^k through the
// exponent bits.  Inputs below -87.3 give 0 instead of expf's subnormals (an absolute difference under
// 1.2e-38); above 88.7 give +inf; NaN stays NaN.
MK_V16_INLINE v16f v16_exp(v16f v) {
  const v16f lo = v16_splat(-87.33654f), hi = v16_splat(88.72283f);
  v16f x = v < lo ? lo : v;
  x = x > hi ? hi : x;
  // 1.5 * 2^23 added and taken away rounds to the nearest integer in float arithmetic.
  const v16f magic = v16_splat(12582912.0f);
  const v16f k = (x * v16_splat(1.44269504088896341f) + magic) - magic;
  const v16f r = (x - k * v16_splat(0.693359375f)) - k * v16_splat(-2.12194440e-4f);
  v16f p = v16_splat(1.9875691500e-4f);
  p = p * r + v16_splat(1.3981999507e-3f);
  p = p * r + v16_splat(8.3334519073e-3f);
  p = p * r + v16_splat(4.1665795894e-2f);
  p = p * r + v16_splat(1.6666665459e-1f);
  p = p * r + v16_splat(5.0000001201e-1f);
  p = p * (r * r) + r + v16_splat(1.0f);
  // 2^k for k in [-126, 128]: 2^(k/2) twice keeps k = 128 (the top of the clamp) finite in the exponent.
  const v16i ki = __builtin_convertvector(k, v16i);
  const v16i half = ki >> 1;
  const v16i e1 = (half + 127) << 23, e2 = (ki - half + 127) << 23;
  v16f s1, s2;
  __builtin_memcpy(&s1, &e1, sizeof(s1));
  __builtin_memcpy(&s2, &e2, sizeof(s2));
  v16f out = p * s1 * s2;
  out = v < lo ? v16f{} : out;
  out = v > hi ? v16_splat(__builtin_inff()) : out;
  return v != v ? v : out;
}

// Sums each of 16 vectors: out[j] = sum over n of p[j][n].  Halving all 16 together in four pairwise
// levels costs 15 shuffle pairs and adds, where summing each vector alone serialises on a horizontal
// reduction per vector; the lanes are arranged so that out comes in natural order.
MK_V16_INLINE v16f v16_sum_each_of_16(const v16f* p) {
  v16f h1[8], h2[4], h3[2];
  for (int j = 0; j < 8; ++j) {  // h1[j] = [8 partial sums of p[2j] | 8 of p[2j+1]]
    const v16f a = p[2 * j], b = p[2 * j + 1];
    h1[j] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int j = 0; j < 4; ++j) {  // h2[j] = 4 partial sums of each of p[4j .. 4j+3]
    const v16f a = h1[2 * j], b = h1[2 * j + 1];
    h2[j] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int j = 0; j < 2; ++j) {  // h3[j] = 2 partial sums of each of p[8j .. 8j+7]
    const v16f a = h2[2 * j], b = h2[2 * j + 1];
    h3[j] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(h3[0], h3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(h3[0], h3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

}  // namespace medkernels

#endif
