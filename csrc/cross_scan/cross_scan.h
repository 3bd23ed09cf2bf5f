// Index math of MedMamba's four-direction "cross scan" layout, shared by the
// C++ CPU kernels (cross_scan_cpu.cpp) and the CUDA kernels
// (cross_scan_cuda.cu), so that the CPU tests exercise the very formulas the
// GPU code runs.
//
// An image row (b, c) holds L = H * W pixels, pixel p = h * W + w.  Each of
// the four scan directions k visits all L pixels in its own order; position i
// of direction k reads pixel `cross_scan_pixel(k, i, H, W)`:
//
//   k = 0  row-major               i            -> pixel i
//   k = 1  column-major            i            -> pixel (i % H) * W + i / H
//   k = 2  reversed row-major      i            -> pixel L - 1 - i
//   k = 3  reversed column-major   i            -> pixel of k = 1 at L - 1 - i
//
// `cross_scan_position(k, p, H, W)` (or `cross_scan_position_hw(k, h, w, H, W)`)
// is the inverse: the position at which direction k visits pixel p.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MK_HOST_DEVICE __host__ __device__
#else
#define MK_HOST_DEVICE
#endif

namespace medkernels {

// Number of scan directions.
constexpr int kCrossScanDirections = 4;

// Pixel visited at position `i` (0 <= i < H*W) of the column-major scan.
MK_HOST_DEVICE inline int64_t cross_scan_colmajor_pixel(int64_t i, int64_t H, int64_t W) {
  return (i % H) * W + i / H;
}

// Pixel read at position `i` of scan direction `k` (0..3).
MK_HOST_DEVICE inline int64_t cross_scan_pixel(int k, int64_t i, int64_t H, int64_t W) {
  const int64_t L = H * W;
  switch (k) {
    case 0:
      return i;
    case 1:
      return cross_scan_colmajor_pixel(i, H, W);
    case 2:
      return L - 1 - i;
    default:
      return cross_scan_colmajor_pixel(L - 1 - i, H, W);
  }
}

// Position at which scan direction `k` (0..3) visits the pixel in row `h`,
// column `w` (pixel p = h * W + w).
MK_HOST_DEVICE inline int64_t cross_scan_position_hw(int k, int64_t h, int64_t w, int64_t H,
                                                     int64_t W) {
  const int64_t L = H * W;
  switch (k) {
    case 0:
      return h * W + w;
    case 1:
      return w * H + h;
    case 2:
      return L - 1 - (h * W + w);
    default:
      return L - 1 - (w * H + h);
  }
}

// Position at which scan direction `k` (0..3) visits pixel `p`.
MK_HOST_DEVICE inline int64_t cross_scan_position(int k, int64_t p, int64_t H, int64_t W) {
  return cross_scan_position_hw(k, p / W, p % W, H, W);
}

}  // namespace medkernels
