// Winograd F(4x4, 3x3): the transforms of a 3x3 "same" convolution computed on 4x4 output tiles from 6x6 input
// tiles (Lavin and Gray, 2016; interpolation points 0, +-1, +-2 and infinity). With d a 6x6 input tile, g a 3x3
// filter and dy a 4x4 tile of the output gradient,
//   y  = A^T [ (G g G^T) . (B^T d B) ] A          the 4x4 outputs (a correlation, as F.conv2d computes)
//   dg = G^T [ (A dy A^T) . (B^T d B) ] G          the filter gradient of that tile (the adjoint in g)
// where . is the elementwise product of 6x6 tiles. The 36 elementwise products summed over channels are 36
// independent matrix products, with 4x fewer multiplications than the direct convolution.
//
// Each function applies one 1-D transform to six (or four, three) values of any arithmetic type T: a float, or a
// GCC vector of floats (one value per channel of a channel block), so the same formulas serve every ISA width.
#pragma once

namespace medkernels {
namespace winograd {

// t = B^T d (6 -> 6)
template <typename T>
inline void input_1d(const T d[6], T t[6]) {
  t[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
  t[1] = -4.0f * (d[1] + d[2]) + d[3] + d[4];
  t[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
  t[3] = -2.0f * (d[1] - d[3]) - d[2] + d[4];
  t[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
  t[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

// y = A^T m (6 -> 4)
template <typename T>
inline void output_1d(const T m[6], T y[4]) {
  const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  y[0] = m[0] + s12 + s34;
  y[1] = d12 + 2.0f * d34;
  y[2] = s12 + 4.0f * s34;
  y[3] = d12 + 8.0f * d34 + m[5];
}

// u = G g (3 -> 6)
template <typename T>
inline void filter_1d(const T g[3], T u[6]) {
  const T even = g[0] + g[2];
  u[0] = 0.25f * g[0];
  u[1] = (-1.0f / 6.0f) * (even + g[1]);
  u[2] = (-1.0f / 6.0f) * (even - g[1]);
  const T q = (1.0f / 24.0f) * g[0] + (1.0f / 6.0f) * g[2];
  u[3] = q + (1.0f / 12.0f) * g[1];
  u[4] = q - (1.0f / 12.0f) * g[1];
  u[5] = g[2];
}

// z = A dy (4 -> 6): the adjoint of output_1d
template <typename T>
inline void grad_output_1d(const T dy[4], T z[6]) {
  const T even = dy[0] + dy[2], odd = dy[1] + dy[3];
  const T even4 = dy[0] + 4.0f * dy[2], odd8 = 2.0f * dy[1] + 8.0f * dy[3];
  z[0] = dy[0];
  z[1] = even + odd;
  z[2] = even - odd;
  z[3] = even4 + odd8;
  z[4] = even4 - odd8;
  z[5] = dy[3];
}

// dg = G^T m (6 -> 3): the adjoint of filter_1d
template <typename T>
inline void filter_grad_1d(const T m[6], T dg[3]) {
  const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  dg[0] = 0.25f * m[0] - (1.0f / 6.0f) * s12 + (1.0f / 24.0f) * s34;
  dg[1] = (-1.0f / 6.0f) * d12 + (1.0f / 12.0f) * d34;
  dg[2] = (-1.0f / 6.0f) * s12 + (1.0f / 6.0f) * s34 + m[5];
}

}  // namespace winograd
}  // namespace medkernels
