// CUDA kernels of HiFuse's HFF spatial and channel gates. The per-element formulas are the __host__
// __device__ helpers of hff_attention_math.h that the CPU kernels use; this file adds the parallel structure.
//
// Spatial gate: one thread per pixel walks the channels in order for the max, first argmax and mean (the
// loads of a warp are consecutive pixels of one channel); one thread per pixel for the 7x7 convolution and
// the gate; the BatchNorm's statistics as per-block partial sums in double combined by one block in a
// fixed order; the multiply, d loss / d gate and dx in one pass each. The weight gradient is a
// (taps, chunks) grid of partial sums, combined in chunk order.
// Channel gate: one block per (b, c) row for the max, first argmax and mean (block trees); the MLP on the
// pooled (B, 2, C) values is hff_channel_mlp.cpp's ATen code, shared with the CPU kernels.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <limits>

#include "hff/hff_attention_checks.h"
#include "hff/hff_attention_math.h"
#include "hff/hff_channel_mlp.h"
#include "hff/hff_cuda_utils.cuh"
#include "ops.h"

namespace medkernels {
namespace {

using hff_cuda::block_sum;
using hff_cuda::elementwise_blocks;
using hff_cuda::kThreads;

constexpr int kMaxPartials = kThreads;  // at most this many blocks in the first stage of the map's sums
constexpr int64_t kChunk = 2048;        // elements per block of that stage, at least

// Elements per block of the first stage of the map's sums, so that at most kMaxPartials blocks cover n.
int64_t map_chunk(int64_t n) {
  const int64_t spread = (n + kMaxPartials - 1) / kMaxPartials;
  return spread > kChunk ? spread : kChunk;
}

// ---- spatial gate ------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void channel_pool_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t HW, int64_t pixels,
                                    acc_t* __restrict__ pooled, int64_t* __restrict__ argmax) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < pixels; e += stride) {
    const int64_t b = e / HW, p = e - b * HW;
    const scalar_t* src = x + b * C * HW + p;
    acc_t top = static_cast<acc_t>(src[0]), sum = top;
    int64_t arg = 0;
    for (int64_t c = 1; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(src[c * HW]);
      if (hff_takes_max(v, top)) {
        top = v;
        arg = c;
      }
      sum += v;
    }
    pooled[b * 2 * HW + p] = top;
    pooled[b * 2 * HW + HW + p] = sum / static_cast<acc_t>(C);
    argmax[e] = arg;
  }
}

template <typename acc_t>
__global__ void map_conv_kernel(const acc_t* __restrict__ pooled, const acc_t* __restrict__ weight, int64_t H,
                                int64_t W, int k, int64_t pixels, acc_t* __restrict__ z) {
  const int64_t HW = H * W;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < pixels; e += stride) {
    const int64_t b = e / HW, p = e - b * HW;
    z[e] = hff_conv_at(pooled + b * 2 * HW, weight, H, W, k, p / W, p % W);
  }
}

// First stage of the map's sums: partial[blk] = (sum of f0, sum of f1) over the block's chunk of pixels.
// Mode 0 (statistics): f0 = z, f1 = z * z. Mode 1 (BatchNorm backward): f0 = dy, f1 = dy * zhat, with
// dy = dgate * sigmoid'(gate) recomputed from z and params = {scale, shift, mean, rstd}.
template <typename acc_t>
__global__ void map_partial_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ dgate,
                                   const acc_t* __restrict__ params, int mode, int64_t n, int64_t chunk,
                                   double* __restrict__ partial) {
  __shared__ double smem[kThreads];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  double s0 = 0, s1 = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    if (mode == 0) {
      s0 += z[i];
      s1 += static_cast<double>(z[i]) * z[i];
    } else {
      const acc_t gate = hff_sigmoid<acc_t>(z[i] * params[0] + params[1]);
      const acc_t dy = dgate[i] * hff_sigmoid_grad<acc_t>(gate);
      s0 += dy;
      s1 += dy * ((z[i] - params[2]) * params[3]);
    }
  }
  s0 = block_sum(s0, smem);
  s1 = block_sum(s1, smem);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = s0;
    partial[2 * blockIdx.x + 1] = s1;
  }
}

// Second stage (one block): combines the partials in block order. Mode 0: params = {scale, shift, mean, rstd}
// of the BatchNorm (batch statistics when batch_stats, else the running ones) and the batch mean and
// unbiased variance. Mode 1: sums = {sum dy, sum dy * zhat} and the BatchNorm parameter gradients.
template <typename acc_t>
__global__ void map_finalize_kernel(const double* __restrict__ partial, int blocks, int mode, int64_t n,
                                    bool batch_stats, const acc_t* running_mean, const acc_t* running_var,
                                    const acc_t* bn_weight, const acc_t* bn_bias, acc_t eps,
                                    acc_t* __restrict__ out, acc_t* batch_mean, acc_t* batch_var,
                                    acc_t* dbn_weight, acc_t* dbn_bias) {
  __shared__ double smem[kThreads];
  const bool mine = threadIdx.x < blocks;
  const double s0 = block_sum(mine ? partial[2 * threadIdx.x] : 0.0, smem);
  const double s1 = block_sum(mine ? partial[2 * threadIdx.x + 1] : 0.0, smem);
  if (threadIdx.x != 0) return;
  if (mode == 1) {
    out[0] = static_cast<acc_t>(s0);
    out[1] = static_cast<acc_t>(s1);
    if (dbn_weight != nullptr) *dbn_weight = static_cast<acc_t>(s1);
    if (dbn_bias != nullptr) *dbn_bias = static_cast<acc_t>(s0);
    return;
  }
  acc_t mean = running_mean != nullptr ? *running_mean : acc_t(0);
  acc_t var = running_var != nullptr ? *running_var : acc_t(1);
  if (batch_stats) {
    const double mu = s0 / double(n);
    const double dev = s1 - s0 * mu;        // sum of squared deviations (NaN kept: NaN statistics, as torch)
    const double sq = dev < 0.0 ? 0.0 : dev;  // a rounding below zero clamped
    mean = static_cast<acc_t>(mu);
    var = static_cast<acc_t>(sq / double(n));
    // the backward recomputes the map without asking for the statistics (null)
    if (batch_mean != nullptr) *batch_mean = mean;
    if (batch_var != nullptr) *batch_var = static_cast<acc_t>(sq / double(n - 1));
  }
  const HffAffine<acc_t> a = hff_bn_affine<acc_t>(mean, var, eps, bn_weight != nullptr ? *bn_weight : acc_t(1),
                                                  bn_bias != nullptr ? *bn_bias : acc_t(0));
  out[0] = a.scale;
  out[1] = a.shift;
  out[2] = mean;
  out[3] = a.rstd;
}

template <typename acc_t>
__global__ void map_gate_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ params, int64_t n,
                                acc_t* __restrict__ gate) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    gate[i] = hff_sigmoid<acc_t>(z[i] * params[0] + params[1]);
  }
}

// dz of the map's BatchNorm from dgate, with params = {scale, shift, mean, rstd} and sums = {sum dy,
// sum dy * zhat}.
template <typename acc_t>
__global__ void map_dz_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ dgate,
                              const acc_t* __restrict__ params, const acc_t* __restrict__ sums, bool batch_stats,
                              int64_t n, acc_t* __restrict__ dz) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t gate = hff_sigmoid<acc_t>(z[i] * params[0] + params[1]);
    const acc_t dy = dgate[i] * hff_sigmoid_grad<acc_t>(gate);
    const acc_t zhat = (z[i] - params[2]) * params[3];
    dz[i] = hff_bn_input_grad<acc_t>(dy, zhat, params[0], batch_stats, sums[0], sums[1], inv_n);
  }
}

template <typename acc_t>
__global__ void map_conv_transpose_kernel(const acc_t* __restrict__ dz, const acc_t* __restrict__ weight,
                                          int64_t H, int64_t W, int k, int64_t total, acc_t* __restrict__ dpooled) {
  const int64_t HW = H * W;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t p = e % HW, bc = e / HW;  // dpooled is (B, 2, H, W)
    const int c = static_cast<int>(bc % 2);
    dpooled[e] = hff_conv_transpose_at(dz + (bc / 2) * HW, weight, H, W, k, c, p / W, p % W);
  }
}

// Grid (taps, chunks): part[tap, chunk] = sum over the chunk's pixels of dz * the tap's input.
template <typename acc_t>
__global__ void map_weight_grad_kernel(const acc_t* __restrict__ dz, const acc_t* __restrict__ pooled, int64_t H,
                                       int64_t W, int k, int64_t n, int64_t chunk, acc_t* __restrict__ part) {
  __shared__ acc_t smem[kThreads];
  const int tap = blockIdx.x;
  const int c = tap / (k * k), i = (tap / k) % k, j = tap % k;
  const int64_t HW = H * W;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  acc_t sum = acc_t(0);
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const int64_t b = e / HW, p = e - b * HW;
    sum += dz[e] * hff_conv_tap_input(pooled + b * 2 * HW, H, W, k, c, i, j, p / W, p % W);
  }
  sum = block_sum(sum, smem);
  if (threadIdx.x == 0) part[static_cast<int64_t>(tap) * gridDim.y + blockIdx.y] = sum;
}

template <typename scalar_t, typename acc_t>
__global__ void channel_dot_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, int64_t C,
                                   int64_t HW, int64_t pixels, acc_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < pixels; e += stride) {
    const int64_t b = e / HW, p = e - b * HW;
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = (b * C + c) * HW + p;
      sum += static_cast<acc_t>(grad[at]) * static_cast<acc_t>(x[at]);
    }
    out[e] = sum;
  }
}

// ---- channel gate ------------------------------------------------------------------------------

// One block per (b, c) row: max, first argmax and sum over the row's HW pixels.
template <typename scalar_t, typename acc_t>
__global__ void pixel_pool_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t HW,
                                  acc_t* __restrict__ pooled, int64_t* __restrict__ argmax) {
  __shared__ acc_t top_s[kThreads];
  __shared__ int64_t arg_s[kThreads];
  __shared__ acc_t sum_s[kThreads];
  const int64_t row = blockIdx.x;
  const scalar_t* src = x + row * HW;
  acc_t top = -std::numeric_limits<acc_t>::infinity(), sum = acc_t(0);
  int64_t arg = std::numeric_limits<int64_t>::max();
  for (int64_t p = threadIdx.x; p < HW; p += kThreads) {
    const acc_t v = static_cast<acc_t>(src[p]);
    if (arg == std::numeric_limits<int64_t>::max() || hff_takes_max(v, top)) {
      top = v;
      arg = p;
    }
    sum += v;
  }
  top_s[threadIdx.x] = top;
  arg_s[threadIdx.x] = arg;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s && hff_second_max_wins(top_s[threadIdx.x], arg_s[threadIdx.x], top_s[threadIdx.x + s],
                                               arg_s[threadIdx.x + s])) {
      top_s[threadIdx.x] = top_s[threadIdx.x + s];
      arg_s[threadIdx.x] = arg_s[threadIdx.x + s];
    }
    __syncthreads();
  }
  sum = block_sum(sum, sum_s);
  if (threadIdx.x == 0) {
    const int64_t b = row / C, c = row % C;
    pooled[b * 2 * C + c] = top_s[0];
    pooled[b * 2 * C + C + c] = sum / static_cast<acc_t>(HW);
    argmax[row] = arg_s[0];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pixel_dot_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, int64_t HW,
                                 acc_t* __restrict__ out) {
  __shared__ acc_t smem[kThreads];
  const int64_t row = blockIdx.x;
  acc_t sum = acc_t(0);
  for (int64_t p = threadIdx.x; p < HW; p += kThreads) {
    sum += static_cast<acc_t>(grad[row * HW + p]) * static_cast<acc_t>(x[row * HW + p]);
  }
  sum = block_sum(sum, smem);
  if (threadIdx.x == 0) out[row] = sum;
}

// ---- shared passes over x --------------------------------------------------------------------

// out = x * gate, the gate per (b, pixel) (per_pixel) or per (b, c) row.
template <typename scalar_t, typename acc_t>
__global__ void apply_gate_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ gate, int64_t C,
                                  int64_t HW, int64_t total, bool per_pixel, scalar_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t row = e / HW;
    const acc_t s = per_pixel ? gate[(row / C) * HW + (e - row * HW)] : gate[row];
    out[e] = static_cast<scalar_t>(static_cast<acc_t>(x[e]) * s);
  }
}

// dx (+)= grad * gate (unless grad is null) + d mean / count + d max where the element was the maximum, added
// to dx's values when accumulate. Spatial
// (per_pixel): pooled over channels, dpooled (B, 2, H, W), argmax (B, H, W) channels. Channel: pooled over
// pixels, dpooled (B, 2, C), argmax (B, C) pixels.
template <typename scalar_t, typename acc_t>
__global__ void gate_input_grad_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ gate,
                                       const acc_t* __restrict__ dpooled, const int64_t* __restrict__ argmax,
                                       int64_t C, int64_t HW, int64_t total, bool per_pixel, bool accumulate,
                                       scalar_t* __restrict__ dx) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t row = e / HW, p = e - row * HW, b = row / C, c = row - b * C;
    acc_t d, s;
    if (per_pixel) {
      const int64_t at = b * HW + p;
      d = dpooled[b * 2 * HW + HW + p] / static_cast<acc_t>(C) + (argmax[at] == c ? dpooled[b * 2 * HW + p] : acc_t(0));
      s = gate[at];
    } else {
      d = dpooled[b * 2 * C + C + c] / static_cast<acc_t>(HW) + (argmax[row] == p ? dpooled[b * 2 * C + c] : acc_t(0));
      s = gate[row];
    }
    if (grad != nullptr) d += static_cast<acc_t>(grad[e]) * s;
    if (accumulate) d += static_cast<acc_t>(dx[e]);
    dx[e] = static_cast<scalar_t>(d);
  }
}

template <typename acc_t>
const acc_t* optional_ptr(const c10::optional<at::Tensor>& t) {
  const at::Tensor* present = hff_present(t);
  return present != nullptr ? present->const_data_ptr<acc_t>() : nullptr;
}

// The map stage: z = conv(pooled), then the BatchNorm's affine into params = {scale, shift, mean, rstd}
// (and the batch mean and unbiased variance when batch_mean is given).
template <typename acc_t>
void map_forward(const at::Tensor& pooled, const at::Tensor& conv_weight, int k, bool use_batch_stats,
                 const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                 const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                 double eps, at::Tensor& z, at::Tensor& params, acc_t* batch_mean, acc_t* batch_var,
                 cudaStream_t stream) {
  const int64_t B = pooled.size(0), H = pooled.size(2), W = pooled.size(3), n = B * H * W;
  map_conv_kernel<acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
      pooled.const_data_ptr<acc_t>(), conv_weight.const_data_ptr<acc_t>(), H, W, k, n, z.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t chunk = map_chunk(n);
  const int blocks = static_cast<int>((n + chunk - 1) / chunk);
  at::Tensor partial = at::empty({2 * kMaxPartials}, pooled.options().dtype(at::kDouble));
  if (use_batch_stats) {
    map_partial_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(z.const_data_ptr<acc_t>(), nullptr, nullptr, 0, n,
                                                               chunk, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  map_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), use_batch_stats ? blocks : 0, 0, n, use_batch_stats,
      use_batch_stats ? nullptr : optional_ptr<acc_t>(running_mean),
      use_batch_stats ? nullptr : optional_ptr<acc_t>(running_var), optional_ptr<acc_t>(bn_weight),
      optional_ptr<acc_t>(bn_bias), static_cast<acc_t>(eps), params.mutable_data_ptr<acc_t>(), batch_mean,
      batch_var, nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------------

std::vector<at::Tensor> hff_spatial_gate_fwd_cuda(MEDKERNELS_HFF_SPATIAL_ARGS) {
  const char* op = "hff_spatial_gate_fwd_cuda";
  const int k = hff_check_spatial_gate(op, c10::DeviceType::CUDA, x, conv_weight, bn_weight, bn_bias,
                                       running_mean, running_var, use_batch_stats);
  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const auto acc_opts = x.options().dtype(hff_acc_dtype(x.scalar_type()));
  at::Tensor pooled = at::empty({B, 2, H, W}, acc_opts);
  at::Tensor argmax = at::empty({B, H, W}, x.options().dtype(at::kLong));
  at::Tensor z = at::empty({B, H, W}, acc_opts), params = at::empty({4}, acc_opts);
  at::Tensor gate = at::empty({B, 1, H, W}, acc_opts);
  at::Tensor batch_mean = at::empty({use_batch_stats ? 1 : 0}, acc_opts);
  at::Tensor batch_var = at::empty({use_batch_stats ? 1 : 0}, acc_opts);
  at::Tensor y = gate_only ? gate : at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_spatial_gate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_pool_kernel<scalar_t, acc_t><<<elementwise_blocks(B * HW), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), C, HW, B * HW, pooled.mutable_data_ptr<acc_t>(),
        argmax.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map_forward<acc_t>(pooled, conv_weight, k, use_batch_stats, bn_weight, bn_bias, running_mean, running_var, eps,
                       z, params, use_batch_stats ? batch_mean.mutable_data_ptr<acc_t>() : nullptr,
                       use_batch_stats ? batch_var.mutable_data_ptr<acc_t>() : nullptr, stream);
    map_gate_kernel<acc_t><<<elementwise_blocks(B * HW), kThreads, 0, stream>>>(
        z.const_data_ptr<acc_t>(), params.const_data_ptr<acc_t>(), B * HW, gate.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!gate_only) {
      apply_gate_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), C, HW, x.numel(), true,
          y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, batch_mean, batch_var, pooled, argmax};
}

std::vector<at::Tensor> hff_spatial_gate_bwd_cuda(const at::Tensor& grad, const at::Tensor& pooled,
                                                  const at::Tensor& argmax, MEDKERNELS_HFF_SPATIAL_ARGS,
                                                  const c10::optional<at::Tensor>& dx_accumulate) {
  const char* op = "hff_spatial_gate_bwd_cuda";
  const int k = hff_check_spatial_gate(op, c10::DeviceType::CUDA, x, conv_weight, bn_weight, bn_bias,
                                       running_mean, running_var, use_batch_stats);
  hff_check_spatial_saved(op, c10::DeviceType::CUDA, x, pooled, argmax);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W, n = B * HW;
  hff_check_gate_grad(op, c10::DeviceType::CUDA, grad, x, gate_only, {B, 1, H, W}, "(B, 1, H, W)");
  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = x.options().dtype(hff_acc_dtype(x.scalar_type()));
  const bool accumulate = hff_present(dx_accumulate) != nullptr;
  at::Tensor dx = hff_input_grad_buffer(op, c10::DeviceType::CUDA, x, dx_accumulate);
  at::Tensor z = at::empty({n}, acc_opts), gate = at::empty({n}, acc_opts), dz = at::empty({n}, acc_opts);
  at::Tensor params = at::empty({4}, acc_opts), sums = at::empty({2}, acc_opts);
  at::Tensor dpooled = at::empty_like(pooled);
  at::Tensor dbn_w = at::empty({1}, acc_opts), dbn_b = at::empty({1}, acc_opts);
  const int taps = 2 * k * k;
  const int64_t chunks = std::min<int64_t>(64, (n + kChunk - 1) / kChunk);
  const int64_t chunk = (n + chunks - 1) / chunks;
  at::Tensor dweight_part = at::empty({taps, chunks}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_spatial_gate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    map_forward<acc_t>(pooled, conv_weight, k, use_batch_stats, bn_weight, bn_bias, running_mean, running_var, eps,
                       z, params, nullptr, nullptr, stream);
    map_gate_kernel<acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        z.const_data_ptr<acc_t>(), params.const_data_ptr<acc_t>(), n, gate.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor dgate = gate_only ? grad : at::empty({n}, acc_opts);
    if (!gate_only) {
      channel_dot_kernel<scalar_t, acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), C, HW, n, dgate.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t sum_chunk = map_chunk(n);
    const int blocks = static_cast<int>((n + sum_chunk - 1) / sum_chunk);
    at::Tensor partial = at::empty({2 * kMaxPartials}, x.options().dtype(at::kDouble));
    map_partial_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(z.const_data_ptr<acc_t>(), dgate.const_data_ptr<acc_t>(),
                                                               params.const_data_ptr<acc_t>(), 1, n, sum_chunk,
                                                               partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), blocks, 1, n, use_batch_stats, nullptr, nullptr, nullptr, nullptr,
        acc_t(0), sums.mutable_data_ptr<acc_t>(), nullptr, nullptr,
        hff_present(bn_weight) != nullptr ? dbn_w.mutable_data_ptr<acc_t>() : nullptr,
        hff_present(bn_bias) != nullptr ? dbn_b.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map_dz_kernel<acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        z.const_data_ptr<acc_t>(), dgate.const_data_ptr<acc_t>(), params.const_data_ptr<acc_t>(),
        sums.const_data_ptr<acc_t>(), use_batch_stats, n, dz.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map_conv_transpose_kernel<acc_t><<<elementwise_blocks(2 * n), kThreads, 0, stream>>>(
        dz.const_data_ptr<acc_t>(), conv_weight.const_data_ptr<acc_t>(), H, W, k, 2 * n,
        dpooled.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map_weight_grad_kernel<acc_t><<<dim3(taps, static_cast<unsigned int>(chunks)), kThreads, 0, stream>>>(
        dz.const_data_ptr<acc_t>(), pooled.const_data_ptr<acc_t>(), H, W, k, n, chunk,
        dweight_part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gate_input_grad_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
        gate_only ? nullptr : grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(),
        dpooled.const_data_ptr<acc_t>(), argmax.const_data_ptr<int64_t>(), C, HW, x.numel(), true, accumulate,
        dx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor dconv = dweight_part.sum(1).view({1, 2, k, k});
  return {dx, dconv, hff_present(bn_weight) != nullptr ? dbn_w : at::Tensor(),
          hff_present(bn_bias) != nullptr ? dbn_b : at::Tensor()};
}

std::vector<at::Tensor> hff_channel_gate_fwd_cuda(MEDKERNELS_HFF_CHANNEL_ARGS) {
  const char* op = "hff_channel_gate_fwd_cuda";
  hff_check_channel_gate(op, c10::DeviceType::CUDA, x, fc1_weight, fc2_weight);
  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto acc_opts = x.options().dtype(hff_acc_dtype(x.scalar_type()));
  at::Tensor pooled = at::empty({B, 2, C}, acc_opts);
  at::Tensor argmax = at::empty({B, C}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_channel_gate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pixel_pool_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B * C), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), C, HW, pooled.mutable_data_ptr<acc_t>(), argmax.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor gate = hff_channel_mlp_gate(pooled, fc1_weight, fc2_weight).contiguous();
  if (gate_only) return {gate.view({B, C, 1, 1}), pooled, argmax};
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_channel_gate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_gate_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), C, HW, x.numel(), false,
        y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, pooled, argmax};
}

std::vector<at::Tensor> hff_channel_gate_bwd_cuda(const at::Tensor& grad, const at::Tensor& pooled,
                                                  const at::Tensor& argmax, MEDKERNELS_HFF_CHANNEL_ARGS,
                                                  const c10::optional<at::Tensor>& dx_accumulate) {
  const char* op = "hff_channel_gate_bwd_cuda";
  hff_check_channel_gate(op, c10::DeviceType::CUDA, x, fc1_weight, fc2_weight);
  hff_check_channel_saved(op, c10::DeviceType::CUDA, x, pooled, argmax);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  hff_check_gate_grad(op, c10::DeviceType::CUDA, grad, x, gate_only, {B, C, 1, 1}, "(B, C, 1, 1)");
  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dgate = gate_only ? grad.view({B, C}) : at::empty({B, C}, pooled.options());
  if (!gate_only) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_channel_gate_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      pixel_dot_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B * C), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), HW, dgate.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto mlp = hff_channel_mlp_backward(dgate, pooled, fc1_weight, fc2_weight);
  const at::Tensor& gate = mlp[3];
  const bool accumulate = hff_present(dx_accumulate) != nullptr;
  at::Tensor dx = hff_input_grad_buffer(op, c10::DeviceType::CUDA, x, dx_accumulate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hff_channel_gate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_input_grad_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
        gate_only ? nullptr : grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(),
        mlp[0].const_data_ptr<acc_t>(), argmax.const_data_ptr<int64_t>(), C, HW, x.numel(), false, accumulate,
        dx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, mlp[1], mlp[2]};
}

}  // namespace medkernels
