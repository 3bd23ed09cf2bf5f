// CPU kernels of cross_scan / cross_merge (MedMamba's four-direction scan).
// The index math lives in cross_scan.h and is shared with the CUDA kernels.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/check_message.h"
#include "common/checks.h"
#include "cross_scan/cross_scan.h"
#include "ops.h"

namespace medkernels {
namespace {

// Below this many elements per call the work runs on one thread: spawning the
// OpenMP team costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

// Both kernels walk the pixels of a (b, c) row in memory order (h, w) and
// scatter to / gather from the position each direction visits them at.

// x: B*C rows of L pixels; y: (B, 4, C, L).
template <typename scalar_t>
void cross_scan_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t B,
                       int64_t C, int64_t H, int64_t W) {
  const int64_t L = H * W;
  const int64_t rows = B * C;
  const bool parallel = rows > 1 && rows * L >= kParallelGrain;
  (void)parallel;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel) num_threads(at::get_num_threads())
#endif
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / C;
    const int64_t c = row % C;
    const scalar_t* src = x + row * L;
    scalar_t* dst[kCrossScanDirections];
    for (int k = 0; k < kCrossScanDirections; ++k) {
      dst[k] = y + ((b * kCrossScanDirections + k) * C + c) * L;
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t value = src[h * W + w];
#pragma GCC unroll 4
        for (int k = 0; k < kCrossScanDirections; ++k) {
          dst[k][cross_scan_position_hw(k, h, w, H, W)] = value;
        }
      }
    }
  }
}

// y: (B, 4, C, L); x: B*C rows of L pixels.  The four contributions are
// summed in opmath_t (float for float16/bfloat16) and rounded once.
template <typename scalar_t>
void cross_merge_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ x, int64_t B,
                        int64_t C, int64_t H, int64_t W) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t L = H * W;
  const int64_t rows = B * C;
  const bool parallel = rows > 1 && rows * L >= kParallelGrain;
  (void)parallel;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel) num_threads(at::get_num_threads())
#endif
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / C;
    const int64_t c = row % C;
    const scalar_t* src[kCrossScanDirections];
    for (int k = 0; k < kCrossScanDirections; ++k) {
      src[k] = y + ((b * kCrossScanDirections + k) * C + c) * L;
    }
    scalar_t* dst = x + row * L;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        opmath_t acc = opmath_t(0);
#pragma GCC unroll 4
        for (int k = 0; k < kCrossScanDirections; ++k) {
          acc += static_cast<opmath_t>(src[k][cross_scan_position_hw(k, h, w, H, W)]);
        }
        dst[h * W + w] = static_cast<scalar_t>(acc);
      }
    }
  }
}

}  // namespace

at::Tensor cross_scan_cpu(const at::Tensor& x) {
  check_cross_scan_input(x, "cross_scan_cpu", "x", 4, "(B, C, H, W)", c10::DeviceType::CPU);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({B, kCrossScanDirections, C, H * W}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_scan_cpu", [&] {
    cross_scan_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, C,
                                H, W);
  });
  return y;
}

at::Tensor cross_merge_cpu(const at::Tensor& y) {
  check_cross_scan_input(y, "cross_merge_cpu", "y", 5, "(B, 4, C, H, W)", c10::DeviceType::CPU);
  check_cross_merge_directions(y, "cross_merge_cpu");
  const int64_t B = y.size(0), C = y.size(2), H = y.size(3), W = y.size(4);
  at::Tensor x = at::empty({B, C, H * W}, y.options());
  if (x.numel() == 0) {
    return x;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "cross_merge_cpu", [&] {
    cross_merge_kernel<scalar_t>(y.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(), B, C,
                                 H, W);
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor> cross_scan_indices(int64_t H, int64_t W) {
  MK_CHECK_VALUE(H >= 0 && W >= 0, "cross_scan_indices: expected H >= 0 and W >= 0, but got H=", H,
                    ", W=", W);
  const int64_t L = H * W;
  at::Tensor pixel = at::empty({kCrossScanDirections, L}, at::TensorOptions().dtype(at::kLong));
  at::Tensor position = at::empty({kCrossScanDirections, L}, at::TensorOptions().dtype(at::kLong));
  int64_t* pixel_data = pixel.mutable_data_ptr<int64_t>();
  int64_t* position_data = position.mutable_data_ptr<int64_t>();
  for (int k = 0; k < kCrossScanDirections; ++k) {
    for (int64_t i = 0; i < L; ++i) {
      pixel_data[k * L + i] = cross_scan_pixel(k, i, H, W);
      position_data[k * L + i] = cross_scan_position(k, i, H, W);
    }
  }
  return {pixel, position};
}

}  // namespace medkernels
