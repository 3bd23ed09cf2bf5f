// CUDA kernels of the HFF fusion tail (channels-first LayerNorm of cat[g * channel_gate, l * spatial_gate,
// x_f], formulas in hff_attention_math.h, shared with the CPU kernels).
//
// A block of kPixels x kGroups threads owns one image and a tile of kPixels pixels: thread (x, y) handles pixel
// x of the tile and the channels y, y + kGroups, ... (a warp reads kPixels consecutive pixels of one
// channel). Per-pixel sums over the channels are combined across the kGroups rows of the block in shared
// memory in a fixed order. The forward walks the channels three times (mean, centred variance, output; the
// re-reads of the block's tile come from the caches). The backward walks twice; the per-channel sums over the
// tile's pixels (parameter gradients, d loss / d channel_gate) are warp butterflies written as per-tile
// partials, summed over the tiles afterwards: all in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "common/check_message.h"
#include "hff/hff_attention_checks.h"
#include "hff/hff_attention_math.h"
#include "hff/hff_cuda_utils.cuh"
#include "ops.h"

namespace medkernels {
namespace {

constexpr int kPixels = 32;  // one warp across the pixels of a tile
constexpr int kGroups = 8;

template <typename scalar_t, typename acc_t>
struct TailArgs {
  const scalar_t *l, *g, *x_f;
  const acc_t *spatial_gate, *channel_gate, *weight, *bias;
  int64_t C1, C2, Ci, HW;
};

// Raw input value of concatenated channel c at pixel p of image b, and its gate.
template <typename scalar_t, typename acc_t>
__device__ inline acc_t tail_raw(const TailArgs<scalar_t, acc_t>& a, int64_t b, int64_t c, int64_t p, acc_t sg,
                                 acc_t* gate) {
  if (c < a.C2) {
    *gate = a.channel_gate[b * a.C2 + c];
    return static_cast<acc_t>(a.g[(b * a.C2 + c) * a.HW + p]);
  }
  if (c < a.C2 + a.C1) {
    *gate = sg;
    return static_cast<acc_t>(a.l[(b * a.C1 + c - a.C2) * a.HW + p]);
  }
  *gate = acc_t(1);
  return static_cast<acc_t>(a.x_f[(b * a.Ci + c - a.C2 - a.C1) * a.HW + p]);
}

// Sum of v over the kGroups rows of the block for each pixel column; every thread gets its column's sum.
template <typename acc_t>
__device__ inline acc_t column_sum(acc_t v, acc_t (*smem)[kPixels]) {
  smem[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  for (int y = 0; y < kGroups; ++y) total += smem[y][threadIdx.x];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixels * kGroups)
    tail_fwd_kernel(TailArgs<scalar_t, acc_t> a, acc_t eps, scalar_t* __restrict__ out, acc_t* __restrict__ mean,
                    acc_t* __restrict__ rstd) {
  __shared__ acc_t smem[kGroups][kPixels];
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const bool valid = p < a.HW;
  const int64_t CT = a.C1 + a.C2 + a.Ci;
  const acc_t sg = valid ? a.spatial_gate[b * a.HW + p] : acc_t(0);
  acc_t gate, sum = acc_t(0);
  for (int64_t c = threadIdx.y; c < CT && valid; c += kGroups) sum += tail_raw(a, b, c, p, sg, &gate) * gate;
  const acc_t mu = column_sum(sum, smem) / static_cast<acc_t>(CT);
  acc_t sq = acc_t(0);
  for (int64_t c = threadIdx.y; c < CT && valid; c += kGroups) {
    const acc_t d = tail_raw(a, b, c, p, sg, &gate) * gate - mu;
    sq += d * d;
  }
  const acc_t rs = acc_t(1) / sqrt(column_sum(sq, smem) / static_cast<acc_t>(CT) + eps);
  if (!valid) return;
  for (int64_t c = threadIdx.y; c < CT; c += kGroups) {
    const acc_t v = tail_raw(a, b, c, p, sg, &gate) * gate;
    out[(b * CT + c) * a.HW + p] = static_cast<scalar_t>(hff_ln_out<acc_t>(v, mu, rs, a.weight[c], a.bias[c]));
  }
  if (threadIdx.y == 0) {
    mean[b * a.HW + p] = mu;
    rstd[b * a.HW + p] = rs;
  }
}

template <typename scalar_t, typename acc_t>
struct TailGradArgs {
  const scalar_t* dout;
  const acc_t *mean, *rstd;
  scalar_t *dl, *dg, *dx_f;
  acc_t *dspatial_gate, *dweight_part, *dbias_part, *dchannel_gate_part;  // parts: one row per tile
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixels * kGroups)
    tail_bwd_kernel(TailArgs<scalar_t, acc_t> a, TailGradArgs<scalar_t, acc_t> G) {
  __shared__ acc_t smem[kGroups][kPixels];
  const int64_t b = blockIdx.y;
  const int64_t tile = b * gridDim.x + blockIdx.x;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const bool valid = p < a.HW;
  const int64_t CT = a.C1 + a.C2 + a.Ci;
  const acc_t sg = valid ? a.spatial_gate[b * a.HW + p] : acc_t(0);
  const acc_t mu = valid ? G.mean[b * a.HW + p] : acc_t(0);
  const acc_t rs = valid ? G.rstd[b * a.HW + p] : acc_t(0);
  acc_t gate, m1 = acc_t(0), m2 = acc_t(0);
  // every lane of a warp runs every iteration: the warp sums need all 32
  for (int64_t c = threadIdx.y; c < CT; c += kGroups) {
    acc_t xhat = acc_t(0), d = acc_t(0);
    if (valid) {
      xhat = (tail_raw(a, b, c, p, sg, &gate) * gate - mu) * rs;
      d = static_cast<acc_t>(G.dout[(b * CT + c) * a.HW + p]);
    }
    const acc_t dxhat = d * a.weight[c];
    m1 += dxhat;
    m2 += dxhat * xhat;
    const acc_t dw = hff_cuda::warp_sum(d * xhat), db = hff_cuda::warp_sum(d);
    if (threadIdx.x == 0) {
      G.dweight_part[tile * CT + c] = dw;
      G.dbias_part[tile * CT + c] = db;
    }
  }
  m1 = column_sum(m1, smem) / static_cast<acc_t>(CT);
  m2 = column_sum(m2, smem) / static_cast<acc_t>(CT);
  acc_t ds = acc_t(0);
  for (int64_t c = threadIdx.y; c < CT; c += kGroups) {
    acc_t dv = acc_t(0), raw = acc_t(0);
    if (valid) {
      raw = tail_raw(a, b, c, p, sg, &gate);
      const acc_t xhat = (raw * gate - mu) * rs;
      const acc_t d = static_cast<acc_t>(G.dout[(b * CT + c) * a.HW + p]);
      dv = hff_ln_input_grad<acc_t>(d * a.weight[c], xhat, rs, m1, m2);
    }
    if (c < a.C2) {
      const acc_t dcg = hff_cuda::warp_sum(dv * raw);
      if (threadIdx.x == 0) G.dchannel_gate_part[tile * a.C2 + c] = dcg;
      if (valid) G.dg[(b * a.C2 + c) * a.HW + p] = static_cast<scalar_t>(dv * a.channel_gate[b * a.C2 + c]);
    } else if (c < a.C2 + a.C1) {
      ds += dv * raw;
      if (valid) G.dl[(b * a.C1 + c - a.C2) * a.HW + p] = static_cast<scalar_t>(dv * sg);
    } else if (valid) {
      G.dx_f[(b * a.Ci + c - a.C2 - a.C1) * a.HW + p] = static_cast<scalar_t>(dv);
    }
  }
  ds = column_sum(ds, smem);
  if (valid && threadIdx.y == 0) G.dspatial_gate[b * a.HW + p] = ds;
}

template <typename scalar_t, typename acc_t>
TailArgs<scalar_t, acc_t> tail_args(const at::Tensor& l, const at::Tensor& g, const at::Tensor& x_f,
                                    const at::Tensor& spatial_gate, const at::Tensor& channel_gate,
                                    const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  return {l.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), x_f.const_data_ptr<scalar_t>(),
          spatial_gate.const_data_ptr<acc_t>(), channel_gate.const_data_ptr<acc_t>(),
          ln_weight.const_data_ptr<acc_t>(), ln_bias.const_data_ptr<acc_t>(),
          l.size(1), g.size(1), x_f.size(1), l.size(2) * l.size(3)};
}

dim3 tail_grid(int64_t B, int64_t HW) {
  MK_CHECK_VALUE(B <= 65535, "hff_fused_tail_cuda: batch size ", B, " is too large (at most 65535)");
  return dim3(static_cast<unsigned int>((HW + kPixels - 1) / kPixels), static_cast<unsigned int>(B));
}

}  // namespace

std::vector<at::Tensor> hff_fused_tail_fwd_cuda(MEDKERNELS_HFF_TAIL_ARGS, double eps) {
  const char* op = "hff_fused_tail_fwd_cuda";
  hff_check_fused_tail(op, c10::DeviceType::CUDA, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
  const c10::cuda::CUDAGuard device_guard(l.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = l.size(0), H = l.size(2), W = l.size(3);
  const int64_t CT = l.size(1) + g.size(1) + x_f.size(1);
  at::Tensor out = at::empty({B, CT, H, W}, l.options());
  const auto acc_opts = l.options().dtype(hff_acc_dtype(l.scalar_type()));
  at::Tensor mean = at::empty({B, H, W}, acc_opts), rstd = at::empty({B, H, W}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "hff_fused_tail_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = tail_args<scalar_t, acc_t>(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
    tail_fwd_kernel<scalar_t, acc_t><<<tail_grid(B, H * W), dim3(kPixels, kGroups), 0, stream>>>(
        a, static_cast<acc_t>(eps), out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::vector<at::Tensor> hff_fused_tail_bwd_cuda(const at::Tensor& dout, MEDKERNELS_HFF_TAIL_ARGS,
                                                const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "hff_fused_tail_bwd_cuda";
  hff_check_fused_tail(op, c10::DeviceType::CUDA, l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
  const int64_t B = l.size(0), C2 = g.size(1), H = l.size(2), W = l.size(3);
  const int64_t CT = l.size(1) + C2 + x_f.size(1);
  const auto acc = hff_acc_dtype(l.scalar_type());
  hff_check_operand(dout, op, "dout", l.scalar_type(), {B, CT, H, W}, "(B, C1 + C2 + Ci, H, W)",
                    c10::DeviceType::CUDA);
  hff_check_operand(mean, op, "mean", acc, {B, H, W}, "(B, H, W)", c10::DeviceType::CUDA);
  hff_check_operand(rstd, op, "rstd", acc, {B, H, W}, "(B, H, W)", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(l.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = l.options().dtype(acc);
  const dim3 grid = tail_grid(B, H * W);
  const int64_t tiles = grid.x;
  at::Tensor dl = at::empty_like(l), dg = at::empty_like(g), dx_f = at::empty_like(x_f);
  at::Tensor dsg = at::empty({B, 1, H, W}, acc_opts);
  at::Tensor dw_part = at::empty({B * tiles, CT}, acc_opts), db_part = at::empty({B * tiles, CT}, acc_opts);
  at::Tensor dcg_part = at::empty({B, tiles, C2}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "hff_fused_tail_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = tail_args<scalar_t, acc_t>(l, g, x_f, spatial_gate, channel_gate, ln_weight, ln_bias);
    TailGradArgs<scalar_t, acc_t> G{dout.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                                    rstd.const_data_ptr<acc_t>(), dl.mutable_data_ptr<scalar_t>(),
                                    dg.mutable_data_ptr<scalar_t>(), dx_f.mutable_data_ptr<scalar_t>(),
                                    dsg.mutable_data_ptr<acc_t>(), dw_part.mutable_data_ptr<acc_t>(),
                                    db_part.mutable_data_ptr<acc_t>(), dcg_part.mutable_data_ptr<acc_t>()};
    tail_bwd_kernel<scalar_t, acc_t><<<grid, dim3(kPixels, kGroups), 0, stream>>>(a, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dl, dg, dx_f, dsg, dcg_part.sum(1).view({B, C2, 1, 1}), dw_part.sum(0), db_part.sum(0)};
}

}  // namespace medkernels
