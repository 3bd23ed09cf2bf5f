// CUDA kernels of depthwise_conv2d (bias + activation fused) and depthwise_conv2d_layernorm (bias, then
// LayerNorm over channels, channels-last out). The per-element formulas are the __host__ __device__ helpers
// of depthwise_conv_math.h that the CPU kernels use too; the argument checks are depthwise_conv_args.h's.
//
// Design. Tensors are read through their strides (NCHW, channels_last, slices). Elementwise kernels walk
// their output in its memory order (channels innermost for channels-last tensors, columns innermost for
// NCHW), so consecutive threads write consecutive addresses.
// * Forward: one thread per output element, looping over the k x k taps (zero padding by bounds checks).
// * LayerNorm forward: one warp per output pixel; its lanes take the channels c = lane, lane + 32, ...,
//   keep z in shared memory and reduce mean and variance with warp shuffles.
// * Backward: (1) d loss / d z into a float buffer (recomputing z; skipped without an activation, where it
//   is the incoming gradient; for the LayerNorm one warp per pixel, which also sums its pixels' d gamma and
//   d beta into a per-warp partial); (2) the weight and bias gradients: a block per (channel tile, chunk of
//   pixels over the batch) sums its chunk per channel and tap through a fixed-order shared-memory
//   reduction into a partial per chunk; (3) the input gradient, one thread per input element gathering
//   d loss / d z through the taps that reach it. The partials are summed with at::sum: deterministic,
//   no atomics.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "common/check_message.h"
#include "depthwise_conv/depthwise_conv_args.h"
#include "depthwise_conv/depthwise_conv_math.h"
#include "ops.h"

namespace medkernels {
namespace {

using dwconv::ceil_div;
using dwconv::Geometry;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Shared memory a LayerNorm block may take.
constexpr int64_t kLnSharedBytes = 48 * 1024;

// Element (b, c, h, w) at b * b_ + c * c_ + h * h_ + w * w_.
struct Str4 {
  int64_t b, c, h, w;
};

Str4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Strides of a (B, Ho, Wo, C) tensor seen as (B, C, Ho, Wo).
Str4 bhwc_strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(3), t.stride(1), t.stride(2)};
}

// Whether to walk a (B, C, *, *) tensor channels innermost.
bool walks_channels_last(const Str4& s, int64_t W) {
  return s.c == 1 && !(s.w == 1 && W > 1);
}

// (b, c, h, w) of step e of a walk over (B, C, H, W): channels innermost, or columns innermost.
template <bool kCL>
__device__ __forceinline__ void decode(int64_t e, int64_t C, int64_t H, int64_t W, int64_t& b, int64_t& c,
                                       int64_t& h, int64_t& w) {
  if (kCL) {
    c = e % C;
    e /= C;
    w = e % W;
    e /= W;
    h = e % H;
    b = e / H;
  } else {
    w = e % W;
    e /= W;
    h = e % H;
    e /= H;
    c = e % C;
    b = e / C;
  }
}

// z + sum over the taps of w[c, i, j] * x[b, c, oh * s - p + i, ow * s - p + j].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t conv_point(const scalar_t* __restrict__ x, const Str4& xs,
                                            const scalar_t* __restrict__ w, acc_t z, const Geometry& g, int64_t b,
                                            int64_t c, int64_t oh, int64_t ow) {
  const scalar_t* xp = x + b * xs.b + c * xs.c;
  const scalar_t* wp = w + c * g.k * g.k;
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t ih = oh * g.s - g.p + i;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t iw = ow * g.s - g.p + j;
      if (iw < 0 || iw >= g.W) continue;
      z += static_cast<acc_t>(xp[ih * xs.h + iw * xs.w]) * static_cast<acc_t>(wp[i * g.k + j]);
    }
  }
  return z;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bias_at(const scalar_t* bias, int64_t c) {
  return bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels

template <typename scalar_t, typename acc_t, DwAct A, bool kCL>
__global__ void forward_kernel(const scalar_t* __restrict__ x, Str4 xs, const scalar_t* __restrict__ w,
                               const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, Str4 os, Geometry g,
                               int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, oh, ow;
    decode<kCL>(e, g.C, g.Ho, g.Wo, b, c, oh, ow);
    const acc_t z = conv_point(x, xs, w, bias_at<scalar_t, acc_t>(bias, c), g, b, c, oh, ow);
    out[b * os.b + c * os.c + oh * os.h + ow * os.w] = static_cast<scalar_t>(dw_activation<A, acc_t>(z));
  }
}

// gz[b, c, oh, ow] (a buffer walked like grad) = grad * act'(z).
template <typename scalar_t, typename acc_t, DwAct A, bool kCL>
__global__ void grad_z_kernel(const scalar_t* __restrict__ x, Str4 xs, const scalar_t* __restrict__ w,
                              const scalar_t* __restrict__ bias, const scalar_t* __restrict__ grad, Str4 gs,
                              acc_t* __restrict__ gz, Str4 zs, Geometry g, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, oh, ow;
    decode<kCL>(e, g.C, g.Ho, g.Wo, b, c, oh, ow);
    const acc_t z = conv_point(x, xs, w, bias_at<scalar_t, acc_t>(bias, c), g, b, c, oh, ow);
    const acc_t gv = static_cast<acc_t>(grad[b * gs.b + c * gs.c + oh * gs.h + ow * gs.w]);
    gz[b * zs.b + c * zs.c + oh * zs.h + ow * zs.w] = gv * dw_activation_grad<A, acc_t>(z);
  }
}

// part[chunk, c, t] = sum over the chunk's pixels of gz * x_tap(t) for t < k * k, and of gz for t = k * k.
// Block (32, 8): channels-last walks put the 32 along channels, NCHW walks along pixels. Grid (channel
// tiles, chunks); a chunk is `chunk` consecutive pixels of the flattened (B, Ho, Wo).
template <typename scalar_t, typename acc_t, typename gz_t, bool kCL>
__global__ void param_grads_kernel(const scalar_t* __restrict__ x, Str4 xs, const gz_t* __restrict__ gz, Str4 zs,
                                   acc_t* __restrict__ part, Geometry g, int64_t chunk) {
  constexpr int nc = kCL ? 32 : 8, np = kCL ? 8 : 32;
  __shared__ acc_t red[nc * np];
  const int tc = kCL ? threadIdx.x : threadIdx.y;
  const int tp = kCL ? threadIdx.y : threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * nc + tc;
  const int64_t hw = g.Ho * g.Wo, kk = g.k * g.k;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t p1 = p0 + chunk < g.B * hw ? p0 + chunk : g.B * hw;
  for (int64_t t = 0; t <= kk; ++t) {
    const int64_t i = t / g.k, j = t % g.k;
    acc_t acc = 0;
    if (c < g.C) {
      for (int64_t p = p0 + tp; p < p1; p += np) {
        const int64_t b = p / hw, oh = (p % hw) / g.Wo, ow = p % g.Wo;
        const acc_t gv = static_cast<acc_t>(gz[b * zs.b + c * zs.c + oh * zs.h + ow * zs.w]);
        if (t == kk) {
          acc += gv;
          continue;
        }
        const int64_t ih = oh * g.s - g.p + i, iw = ow * g.s - g.p + j;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
          acc += gv * static_cast<acc_t>(x[b * xs.b + c * xs.c + ih * xs.h + iw * xs.w]);
        }
      }
    }
    red[tp * nc + tc] = acc;
    __syncthreads();
    if (tp == 0 && c < g.C) {
      acc_t sum = 0;
      for (int q = 0; q < np; ++q) sum += red[q * nc + tc];
      part[(static_cast<int64_t>(blockIdx.y) * g.C + c) * (kk + 1) + t] = sum;
    }
    __syncthreads();
  }
}

// dx[b, c, ih, iw] = sum over the taps (i, j) with oh * s = ih + p - i, ow * s = iw + p - j of w * gz.
template <typename scalar_t, typename acc_t, typename gz_t, bool kCL>
__global__ void input_grad_kernel(const gz_t* __restrict__ gz, Str4 zs, const scalar_t* __restrict__ w,
                                  scalar_t* __restrict__ gx, Str4 gxs, Geometry g, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, ih, iw;
    decode<kCL>(e, g.C, g.H, g.W, b, c, ih, iw);
    const scalar_t* wp = w + c * g.k * g.k;
    const gz_t* zp = gz + b * zs.b + c * zs.c;
    acc_t acc = 0;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t t = ih + g.p - i;
      if (t < 0 || t % g.s != 0 || t / g.s >= g.Ho) continue;
      const int64_t oh = t / g.s;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t u = iw + g.p - j;
        if (u < 0 || u % g.s != 0 || u / g.s >= g.Wo) continue;
        acc += static_cast<acc_t>(zp[oh * zs.h + (u / g.s) * zs.w]) * static_cast<acc_t>(wp[i * g.k + j]);
      }
    }
    gx[b * gxs.b + c * gxs.c + ih * gxs.h + iw * gxs.w] = static_cast<scalar_t>(acc);
  }
}

struct LnParams {
  const void* gamma;  // (C,) or null
  const void* beta;   // (C,) or null
  double eps;
};

// One warp per output pixel (grid-stride); z of the warp's pixel in shared memory (C per warp).
template <typename scalar_t, typename acc_t>
__global__ void ln_forward_kernel(const scalar_t* __restrict__ x, Str4 xs, const scalar_t* __restrict__ w,
                                  const scalar_t* __restrict__ bias, LnParams ln, scalar_t* __restrict__ out,
                                  Geometry g, int64_t npix) {
  extern __shared__ unsigned char ln_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, wpb = blockDim.x / kWarp;
  acc_t* zbuf = reinterpret_cast<acc_t*>(ln_smem) + warp * g.C;
  const auto* gamma = static_cast<const scalar_t*>(ln.gamma);
  const auto* beta = static_cast<const scalar_t*>(ln.beta);
  const int64_t hw = g.Ho * g.Wo;
  for (int64_t pix = static_cast<int64_t>(blockIdx.x) * wpb + warp; pix < npix;
       pix += static_cast<int64_t>(gridDim.x) * wpb) {
    const int64_t b = pix / hw, oh = (pix % hw) / g.Wo, ow = pix % g.Wo;
    acc_t sum = 0;
    for (int64_t c = lane; c < g.C; c += kWarp) {
      const acc_t z = conv_point(x, xs, w, bias_at<scalar_t, acc_t>(bias, c), g, b, c, oh, ow);
      zbuf[c] = z;
      sum += z;
    }
    const acc_t mean = warp_sum(sum) / static_cast<acc_t>(g.C);
    acc_t sq = 0;
    for (int64_t c = lane; c < g.C; c += kWarp) sq += (zbuf[c] - mean) * (zbuf[c] - mean);
    const acc_t rstd = dw_ln_rstd<acc_t>(warp_sum(sq) / static_cast<acc_t>(g.C), static_cast<acc_t>(ln.eps));
    for (int64_t c = lane; c < g.C; c += kWarp) {
      acc_t y = (zbuf[c] - mean) * rstd;
      if (gamma != nullptr) y *= static_cast<acc_t>(gamma[c]);
      if (beta != nullptr) y += static_cast<acc_t>(beta[c]);
      out[pix * g.C + c] = static_cast<scalar_t>(y);
    }
  }
}

// One warp per pixel (a fixed assignment: warp q takes pixels q, q + warps, ...): gz (B, Ho, Wo, C) acc_t and
// the warp's d gamma, d beta partial sums, written to gln_part[q] (2, C). Shared memory: 3 C per warp.
template <typename scalar_t, typename acc_t>
__global__ void ln_grad_z_kernel(const scalar_t* __restrict__ x, Str4 xs, const scalar_t* __restrict__ w,
                                 const scalar_t* __restrict__ bias, LnParams ln, const scalar_t* __restrict__ grad,
                                 Str4 gs, acc_t* __restrict__ gz, acc_t* __restrict__ gln_part, Geometry g,
                                 int64_t npix) {
  extern __shared__ unsigned char ln_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, wpb = blockDim.x / kWarp;
  acc_t* zbuf = reinterpret_cast<acc_t*>(ln_smem) + warp * 3 * g.C;
  acc_t* dgamma = zbuf + g.C;
  acc_t* dbeta = dgamma + g.C;
  const auto* gamma = static_cast<const scalar_t*>(ln.gamma);
  const int64_t hw = g.Ho * g.Wo;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * wpb + warp;
  for (int64_t c = lane; c < g.C; c += kWarp) dgamma[c] = dbeta[c] = 0;
  for (int64_t pix = q; pix < npix; pix += static_cast<int64_t>(gridDim.x) * wpb) {
    const int64_t b = pix / hw, oh = (pix % hw) / g.Wo, ow = pix % g.Wo;
    acc_t sum = 0;
    for (int64_t c = lane; c < g.C; c += kWarp) {
      const acc_t z = conv_point(x, xs, w, bias_at<scalar_t, acc_t>(bias, c), g, b, c, oh, ow);
      zbuf[c] = z;
      sum += z;
    }
    const acc_t mean = warp_sum(sum) / static_cast<acc_t>(g.C);
    acc_t sq = 0;
    for (int64_t c = lane; c < g.C; c += kWarp) sq += (zbuf[c] - mean) * (zbuf[c] - mean);
    const acc_t rstd = dw_ln_rstd<acc_t>(warp_sum(sq) / static_cast<acc_t>(g.C), static_cast<acc_t>(ln.eps));
    acc_t sum_g = 0, sum_gx = 0;
    for (int64_t c = lane; c < g.C; c += kWarp) {
      const acc_t gy = static_cast<acc_t>(grad[b * gs.b + c * gs.c + oh * gs.h + ow * gs.w]);
      const acc_t gv = gamma != nullptr ? gy * static_cast<acc_t>(gamma[c]) : gy;
      const acc_t xhat = (zbuf[c] - mean) * rstd;
      sum_g += gv;
      sum_gx += gv * xhat;
      dgamma[c] += gy * xhat;
      dbeta[c] += gy;
    }
    const acc_t mean_g = warp_sum(sum_g) / static_cast<acc_t>(g.C);
    const acc_t mean_gx = warp_sum(sum_gx) / static_cast<acc_t>(g.C);
    for (int64_t c = lane; c < g.C; c += kWarp) {
      const acc_t gy = static_cast<acc_t>(grad[b * gs.b + c * gs.c + oh * gs.h + ow * gs.w]);
      const acc_t gv = gamma != nullptr ? gy * static_cast<acc_t>(gamma[c]) : gy;
      gz[pix * g.C + c] = dw_ln_input_grad<acc_t>(gv, (zbuf[c] - mean) * rstd, rstd, mean_g, mean_gx);
    }
  }
  for (int64_t c = lane; c < g.C; c += kWarp) {
    gln_part[q * 2 * g.C + c] = dgamma[c];
    gln_part[q * 2 * g.C + g.C + c] = dbeta[c];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launch helpers

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 65535 * 8));
}

template <typename Fn>
void with_activation(DwAct act, const Fn& fn) {
  switch (act) {
    case DwAct::kSilu:
      fn(std::integral_constant<DwAct, DwAct::kSilu>{});
      break;
    case DwAct::kGelu:
      fn(std::integral_constant<DwAct, DwAct::kGelu>{});
      break;
    case DwAct::kRelu:
      fn(std::integral_constant<DwAct, DwAct::kRelu>{});
      break;
    default:
      fn(std::integral_constant<DwAct, DwAct::kNone>{});
  }
}

template <typename Fn>
void with_layout(bool channels_last, const Fn& fn) {
  if (channels_last) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

template <typename scalar_t>
const scalar_t* data_or_null(const c10::optional<at::Tensor>& t) {
  return dwconv::present(t) ? t->const_data_ptr<scalar_t>() : nullptr;
}

// The weight and bias gradients from d loss / d z (gz of element type gz_t, read through zs), into gw, gb.
template <typename scalar_t, typename acc_t, typename gz_t>
void launch_param_grads(const at::Tensor& x, const gz_t* gz, const Str4& zs, bool zs_channels_last,
                        const Geometry& g, at::Tensor& gw, at::Tensor* gb, cudaStream_t stream) {
  const int64_t kk = g.k * g.k, pixels = g.B * g.Ho * g.Wo;
  const int64_t nc = zs_channels_last ? 32 : 8;
  const int64_t ctiles = ceil_div(g.C, nc);
  // enough blocks to fill the GPU, chunks of at least 64 pixels; the split depends on the shape only
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(pixels, 64), ceil_div(2048, ctiles)));
  const int64_t chunk = ceil_div(pixels, chunks);
  MK_CHECK_VALUE(ctiles <= 65535 * 32 && chunks <= 65535, "depthwise_conv2d: too many channels for one launch");
  at::Tensor part = at::empty({chunks, g.C, kk + 1}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  with_layout(zs_channels_last, [&](auto cl) {
    constexpr bool kCL = decltype(cl)::value;
    const dim3 block(32, 8);
    const dim3 grid(static_cast<unsigned>(ctiles), static_cast<unsigned>(chunks));
    param_grads_kernel<scalar_t, acc_t, gz_t, kCL><<<grid, block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), gz, zs, part.mutable_data_ptr<acc_t>(), g, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor sums = part.sum(0);  // (C, k * k + 1)
  gw.copy_(sums.narrow(1, 0, kk).reshape(gw.sizes()));
  if (gb != nullptr) gb->copy_(sums.select(1, kk));
}

template <typename scalar_t, typename acc_t, typename gz_t>
void launch_input_grad(const gz_t* gz, const Str4& zs, const at::Tensor& weight, at::Tensor& gx, const Geometry& g,
                       cudaStream_t stream) {
  const int64_t n = gx.numel();
  if (n == 0) return;
  const Str4 gxs = strides_of(gx);
  with_layout(walks_channels_last(gxs, g.W), [&](auto cl) {
    constexpr bool kCL = decltype(cl)::value;
    input_grad_kernel<scalar_t, acc_t, gz_t, kCL><<<blocks_for(n), kThreads, 0, stream>>>(
        gz, zs, weight.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), gxs, g, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Warps per LayerNorm block so that `per_warp` bytes each fit in the shared memory budget.
int ln_warps_per_block(const char* op, int64_t per_warp) {
  MK_CHECK_VALUE(per_warp <= kLnSharedBytes, op, ": too many channels for the CUDA LayerNorm kernels (",
                    per_warp, " bytes of shared memory per pixel, at most ", kLnSharedBytes, ")");
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, kLnSharedBytes / per_warp)));
}

struct LnChecked {
  dwconv::ConvArgs conv;
  LnParams params;
};

LnChecked check_ln(const char* op, const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& ln_weight,
                   const c10::optional<at::Tensor>& ln_bias, int64_t stride, int64_t padding, double eps) {
  LnChecked r;
  r.conv = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CUDA);
  dwconv::check_vector(op, "ln_weight", ln_weight, x, r.conv.g.C);
  dwconv::check_vector(op, "ln_bias", ln_bias, x, r.conv.g.C);
  MK_CHECK_VALUE(eps >= 0, op, ": expected eps >= 0, but got ", eps);
  r.params = {dwconv::present(ln_weight) ? ln_weight->const_data_ptr() : nullptr,
              dwconv::present(ln_bias) ? ln_bias->const_data_ptr() : nullptr, eps};
  return r;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Entry points

at::Tensor depthwise_conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                                     const std::string& activation, bool channels_last) {
  const char* op = "depthwise_conv2d_fwd_cuda";
  const dwconv::ConvArgs a = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CUDA);
  const DwAct act = dwconv::parse_activation(op, activation);
  const Geometry& g = a.g;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options().memory_format(format));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_activation(act, [&](auto a_const) {
      constexpr DwAct A = decltype(a_const)::value;
      with_layout(channels_last, [&](auto cl) {
        constexpr bool kCL = decltype(cl)::value;
        forward_kernel<scalar_t, acc_t, A, kCL><<<blocks_for(n), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), strides_of(x), weight.const_data_ptr<scalar_t>(),
            data_or_null<scalar_t>(bias), out.mutable_data_ptr<scalar_t>(), strides_of(out), g, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::vector<at::Tensor> depthwise_conv2d_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                  int64_t stride, int64_t padding, const std::string& activation) {
  const char* op = "depthwise_conv2d_bwd_cuda";
  const dwconv::ConvArgs a = dwconv::check_conv_args(op, x, weight, bias, stride, padding, c10::DeviceType::CUDA);
  const DwAct act = dwconv::parse_activation(op, activation);
  const Geometry& g = a.g;
  dwconv::check_grad(op, grad, x, {g.B, g.C, g.Ho, g.Wo}, "(B, C, Ho, Wo)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(weight);
  at::Tensor gb = a.has_bias ? at::empty_like(*bias) : at::Tensor();
  if (grad.numel() == 0) {
    gx.zero_();
    gw.zero_();
    if (a.has_bias) gb.zero_();
    return {gx, gw, gb};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Str4 gs = strides_of(grad);
  const bool grad_cl = walks_channels_last(gs, g.Wo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (act == DwAct::kNone) {
      // d loss / d z is grad itself
      launch_param_grads<scalar_t, acc_t, scalar_t>(x, grad.const_data_ptr<scalar_t>(), gs, grad_cl, g, gw,
                                                    a.has_bias ? &gb : nullptr, stream);
      launch_input_grad<scalar_t, acc_t, scalar_t>(grad.const_data_ptr<scalar_t>(), gs, weight, gx, g, stream);
      return;
    }
    const auto format = grad_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    at::Tensor gz = at::empty({g.B, g.C, g.Ho, g.Wo},
                              x.options().dtype(c10::CppTypeToScalarType<acc_t>::value).memory_format(format));
    const Str4 zs = strides_of(gz);
    const int64_t n = gz.numel();
    with_activation(act, [&](auto a_const) {
      constexpr DwAct A = decltype(a_const)::value;
      with_layout(grad_cl, [&](auto cl) {
        constexpr bool kCL = decltype(cl)::value;
        grad_z_kernel<scalar_t, acc_t, A, kCL><<<blocks_for(n), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), strides_of(x), weight.const_data_ptr<scalar_t>(),
            data_or_null<scalar_t>(bias), grad.const_data_ptr<scalar_t>(), gs, gz.mutable_data_ptr<acc_t>(), zs, g,
            n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    launch_param_grads<scalar_t, acc_t, acc_t>(x, gz.const_data_ptr<acc_t>(), zs, grad_cl, g, gw,
                                               a.has_bias ? &gb : nullptr, stream);
    launch_input_grad<scalar_t, acc_t, acc_t>(gz.const_data_ptr<acc_t>(), zs, weight, gx, g, stream);
  });
  return {gx, gw, gb};
}

at::Tensor depthwise_conv2d_layernorm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias,
                                               const c10::optional<at::Tensor>& ln_weight,
                                               const c10::optional<at::Tensor>& ln_bias, int64_t stride,
                                               int64_t padding, double eps) {
  const char* op = "depthwise_conv2d_layernorm_fwd_cuda";
  const LnChecked a = check_ln(op, x, weight, bias, ln_weight, ln_bias, stride, padding, eps);
  const Geometry& g = a.conv.g;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.B, g.Ho, g.Wo, g.C}, x.options());
  const int64_t npix = g.B * g.Ho * g.Wo;
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_layernorm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_warp = g.C * static_cast<int64_t>(sizeof(acc_t));
    const int wpb = ln_warps_per_block(op, per_warp);
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(npix, wpb), 65535 * 8));
    ln_forward_kernel<scalar_t, acc_t><<<blocks, wpb * kWarp, wpb * per_warp, stream>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), weight.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(bias),
        a.params, out.mutable_data_ptr<scalar_t>(), g, npix);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> depthwise_conv2d_layernorm_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& weight,
                                                            const c10::optional<at::Tensor>& bias,
                                                            const c10::optional<at::Tensor>& ln_weight,
                                                            const c10::optional<at::Tensor>& ln_bias,
                                                            int64_t stride, int64_t padding, double eps) {
  const char* op = "depthwise_conv2d_layernorm_bwd_cuda";
  const LnChecked a = check_ln(op, x, weight, bias, ln_weight, ln_bias, stride, padding, eps);
  const Geometry& g = a.conv.g;
  dwconv::check_grad(op, grad, x, {g.B, g.Ho, g.Wo, g.C}, "(B, Ho, Wo, C)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(weight);
  at::Tensor gb = a.conv.has_bias ? at::empty_like(*bias) : at::Tensor();
  at::Tensor ggamma = dwconv::present(ln_weight) ? at::empty_like(*ln_weight) : at::Tensor();
  at::Tensor gbeta = dwconv::present(ln_bias) ? at::empty_like(*ln_bias) : at::Tensor();
  const int64_t npix = g.B * g.Ho * g.Wo;
  if (grad.numel() == 0) {
    for (at::Tensor* t : {&gx, &gw, &gb, &ggamma, &gbeta}) {
      if (t->defined()) t->zero_();
    }
    return {gx, gw, gb, ggamma, gbeta};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d_layernorm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t per_warp = 3 * g.C * static_cast<int64_t>(sizeof(acc_t));
    const int wpb = ln_warps_per_block(op, per_warp);
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(npix, wpb), 1024));
    at::Tensor gz = at::empty({g.B, g.Ho, g.Wo, g.C}, acc_options);
    at::Tensor gln_part = at::empty({blocks * wpb, 2, g.C}, acc_options);
    ln_grad_z_kernel<scalar_t, acc_t><<<blocks, wpb * kWarp, wpb * per_warp, stream>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), weight.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(bias),
        a.params, grad.const_data_ptr<scalar_t>(), bhwc_strides_of(grad), gz.mutable_data_ptr<acc_t>(),
        gln_part.mutable_data_ptr<acc_t>(), g, npix);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Str4 zs = bhwc_strides_of(gz);
    launch_param_grads<scalar_t, acc_t, acc_t>(x, gz.const_data_ptr<acc_t>(), zs, true, g, gw,
                                               a.conv.has_bias ? &gb : nullptr, stream);
    launch_input_grad<scalar_t, acc_t, acc_t>(gz.const_data_ptr<acc_t>(), zs, weight, gx, g, stream);
    const at::Tensor gln = gln_part.sum(0);  // (2, C)
    if (ggamma.defined()) ggamma.copy_(gln.select(0, 0));
    if (gbeta.defined()) gbeta.copy_(gln.select(0, 1));
  });
  return {gx, gw, gb, ggamma, gbeta};
}

}  // namespace medkernels
