// Declarations of the operators exported by medkernels._C.
#pragma once

#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace medkernels {

// (B, C, H, W) contiguous -> (B, 4, C, H*W): y[b,k,c,i] = x[b,c,pixel_k(i)].
at::Tensor cross_scan_cpu(const at::Tensor& x);
// (B, 4, C, H, W) contiguous -> (B, C, H*W): x[b,c,p] = sum_k y[b,k,c,position_k(p)].
at::Tensor cross_merge_cpu(const at::Tensor& y);

// The index tables of the shared index math (cross_scan.h) for an H x W image,
// both int64 (4, H*W): pixel[k][i] = pixel read at position i of direction k,
// position[k][p] = position at which direction k visits pixel p.  Lets CPU
// tests check the exact formulas the CUDA kernels use.
std::tuple<at::Tensor, at::Tensor> cross_scan_indices(int64_t H, int64_t W);

// Selective scan (selective_scan_math.h has the formulas). The Python layer passes contiguous tensors:
// u, delta, z (B, D, L) of one dtype T (float16/bfloat16/float32/float64); A (D, N) and D_skip,
// delta_bias (D,) in the state dtype S (float32, or float64 when T is float64); B, C (B, G, N, L) of
// dtype T, G dividing D (channel d uses group d / (D / G)). Absent optionals are undefined tensors.
//   fwd -> {out (B, D, L) T, last_state (B, D, N) S}
//   bwd -> {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias} (shapes and dtypes of the inputs; undefined for
//          absent inputs); dlast_state (B, D, N) S may be undefined.
#define MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS                                                            \
  const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B,             \
      const at::Tensor &C, const c10::optional<at::Tensor> &D_skip, const c10::optional<at::Tensor> &z, \
      const c10::optional<at::Tensor> &delta_bias, bool delta_softplus
std::vector<at::Tensor> selective_scan_fwd_cpu(MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS);
std::vector<at::Tensor> selective_scan_bwd_cpu(const at::Tensor& dout,
                                               const c10::optional<at::Tensor>& dlast_state,
                                               MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS);

// Fused SS2D scan: the four directions of MedMamba's cross-scan walked in place, inputs and output in
// pixel order (p = h * W + w; direction k visits pixels in the order of cross_scan.h). Contiguous:
// u (B, D, H, W) T, shared by the four directions; delta (B, 4, D, H, W) T; A (4 * D, N) S (row k * D + d
// for direction k, channel d); B, C (B, 4, N, H, W) T (direction k's B and C); D_skip, delta_bias
// (4 * D,) S or undefined.
//   fwd -> {out (B, D, H * W) T}: the four directions' outputs summed per pixel.
//   bwd -> {du, ddelta, dA, dB, dC, dD, ddelta_bias} (shapes and dtypes of the inputs; undefined for
//          absent inputs).
#define MEDKERNELS_SS2D_SCAN_FWD_ARGS                                                          \
  const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B,      \
      const at::Tensor &C, const c10::optional<at::Tensor> &D_skip,                            \
      const c10::optional<at::Tensor> &delta_bias, bool delta_softplus
std::vector<at::Tensor> ss2d_scan_fwd_cpu(MEDKERNELS_SS2D_SCAN_FWD_ARGS);
std::vector<at::Tensor> ss2d_scan_bwd_cpu(const at::Tensor& dout, MEDKERNELS_SS2D_SCAN_FWD_ARGS);

// ---- depthwise convolution (issue 4) ----
// Depthwise conv2d with the bias and activation fused: out = act(conv2d(x, weight, bias, stride, padding,
// groups=C)). x (B, C, H, W) of dtype T (float16/bfloat16/float32/float64), any strides; weight
// (C, 1, k, k) T contiguous, k <= 31; bias (C,) T contiguous or undefined; activation "none", "silu",
// "gelu" or "relu"; Ho = (H + 2 padding - k) / stride + 1, likewise Wo.
//   fwd -> out (B, C, Ho, Wo) T, channels_last or contiguous as asked
//   bwd -> {dx (x's shape, empty_like(x)), dweight, dbias (undefined without bias)}; grad (B, C, Ho, Wo) T,
//          any strides
#define MEDKERNELS_DEPTHWISE_CONV_ARGS                                                           \
  const at::Tensor &x, const at::Tensor &weight, const c10::optional<at::Tensor> &bias, int64_t stride, \
      int64_t padding, const std::string &activation
// Depthwise conv2d + bias, then LayerNorm over the channels (biased variance, eps inside the square root,
// affine ln_weight / ln_bias (C,) T or undefined), written channels-last: out (B, Ho, Wo, C) T contiguous.
//   bwd -> {dx, dweight, dbias, dln_weight, dln_bias} (undefined for absent inputs); grad (B, Ho, Wo, C) T
#define MEDKERNELS_DEPTHWISE_LN_ARGS                                                                 \
  const at::Tensor &x, const at::Tensor &weight, const c10::optional<at::Tensor> &bias,              \
      const c10::optional<at::Tensor> &ln_weight, const c10::optional<at::Tensor> &ln_bias, int64_t stride, \
      int64_t padding, double eps
at::Tensor depthwise_conv2d_fwd_cpu(MEDKERNELS_DEPTHWISE_CONV_ARGS, bool channels_last);
std::vector<at::Tensor> depthwise_conv2d_bwd_cpu(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_CONV_ARGS);
at::Tensor depthwise_conv2d_layernorm_fwd_cpu(MEDKERNELS_DEPTHWISE_LN_ARGS);
std::vector<at::Tensor> depthwise_conv2d_layernorm_bwd_cpu(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_LN_ARGS);
// ---- end depthwise convolution ----

#ifdef MEDKERNELS_WITH_CUDA
std::vector<at::Tensor> selective_scan_fwd_cuda(MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS);
std::vector<at::Tensor> selective_scan_bwd_cuda(const at::Tensor& dout,
                                                const c10::optional<at::Tensor>& dlast_state,
                                                MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS);
std::vector<at::Tensor> ss2d_scan_fwd_cuda(MEDKERNELS_SS2D_SCAN_FWD_ARGS);
std::vector<at::Tensor> ss2d_scan_bwd_cuda(const at::Tensor& dout, MEDKERNELS_SS2D_SCAN_FWD_ARGS);
at::Tensor cross_scan_cuda(const at::Tensor& x);
at::Tensor cross_merge_cuda(const at::Tensor& y);
// CUDA runtime version the .cu files were compiled against, e.g. "13.0".
std::string cuda_runtime_version_at_build();
// ---- depthwise convolution (issue 4) ----
at::Tensor depthwise_conv2d_fwd_cuda(MEDKERNELS_DEPTHWISE_CONV_ARGS, bool channels_last);
std::vector<at::Tensor> depthwise_conv2d_bwd_cuda(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_CONV_ARGS);
at::Tensor depthwise_conv2d_layernorm_fwd_cuda(MEDKERNELS_DEPTHWISE_LN_ARGS);
std::vector<at::Tensor> depthwise_conv2d_layernorm_bwd_cuda(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_LN_ARGS);
// ---- end depthwise convolution ----
#endif

}  // namespace medkernels
