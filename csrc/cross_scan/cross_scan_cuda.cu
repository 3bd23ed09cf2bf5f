// CUDA kernels of cross_scan / cross_merge (MedMamba's four-direction scan).
// One thread per output element in a grid-stride loop with 64-bit indices; the
// index math is the __host__ __device__ code of cross_scan.h that the CPU
// kernels use too.

#include <string>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "common/checks.h"
#include "cross_scan/cross_scan.h"
#include "ops.h"

namespace medkernels {
namespace {

constexpr int kThreadsPerBlock = 256;

// Enough blocks to cover `n` elements, capped at a few waves of the current
// device; the grid-stride loops cover the rest.
unsigned int grid_size_for(int64_t n) {
  const int64_t wanted = (n + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<unsigned int>(wanted < cap ? wanted : cap);
}

// y has shape (B, 4, C, L); element n = ((b * 4 + k) * C + c) * L + i.
template <typename scalar_t>
__global__ void cross_scan_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  int64_t C, int64_t H, int64_t W, int64_t total) {
  const int64_t L = H * W;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < total;
       n += stride) {
    const int64_t i = n % L;
    int64_t r = n / L;
    const int64_t c = r % C;
    r /= C;
    const int k = static_cast<int>(r % kCrossScanDirections);
    const int64_t b = r / kCrossScanDirections;
    y[n] = x[(b * C + c) * L + cross_scan_pixel(k, i, H, W)];
  }
}

// x has shape (B, C, L); element n = (b * C + c) * L + p.
template <typename scalar_t>
__global__ void cross_merge_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ x,
                                   int64_t C, int64_t H, int64_t W, int64_t total) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t L = H * W;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < total;
       n += stride) {
    const int64_t p = n % L;
    const int64_t row = n / L;
    const int64_t b = row / C;
    const int64_t c = row % C;
    opmath_t acc = opmath_t(0);
#pragma unroll
    for (int k = 0; k < kCrossScanDirections; ++k) {
      const int64_t base = ((b * kCrossScanDirections + k) * C + c) * L;
      acc += static_cast<opmath_t>(y[base + cross_scan_position(k, p, H, W)]);
    }
    x[n] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

at::Tensor cross_scan_cuda(const at::Tensor& x) {
  check_cross_scan_input(x, "cross_scan_cuda", "x", 4, "(B, C, H, W)", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty({B, kCrossScanDirections, C, H * W}, x.options());
  const int64_t total = y.numel();
  if (total == 0) {
    return y;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_size_for(total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_scan_cuda", [&] {
    cross_scan_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), C, H, W, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor cross_merge_cuda(const at::Tensor& y) {
  check_cross_scan_input(y, "cross_merge_cuda", "y", 5, "(B, 4, C, H, W)", c10::DeviceType::CUDA);
  check_cross_merge_directions(y, "cross_merge_cuda");
  const c10::cuda::CUDAGuard device_guard(y.device());
  const int64_t B = y.size(0), C = y.size(2), H = y.size(3), W = y.size(4);
  at::Tensor x = at::empty({B, C, H * W}, y.options());
  const int64_t total = x.numel();
  if (total == 0) {
    return x;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_size_for(total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "cross_merge_cuda", [&] {
    cross_merge_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(), C, H, W, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return x;
}

std::string cuda_runtime_version_at_build() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace medkernels
