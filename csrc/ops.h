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

// ---- depthwise convolution ----
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
// The forward that also saves the activation's derivative for the backward (CPU only):
//   fwd_save -> {out, dact}: dact = act'(z) (B, C, Ho, Wo) T, empty_like(x), when the case allows it (SiLU
//               or GELU, float32/float64, stride 1, Ho = H and Wo = W, not the NCHW plane walk), else an empty
//               tensor (then use bwd); out equals fwd's
//   bwd_saved(grad, x, weight, bias, dact, stride, padding) -> {dx, dweight, dbias}, equal to bwd's: dx is
//               dact's storage, overwritten (dact is consumed)
std::vector<at::Tensor> depthwise_conv2d_fwd_save_cpu(MEDKERNELS_DEPTHWISE_CONV_ARGS, bool channels_last);
std::vector<at::Tensor> depthwise_conv2d_bwd_saved_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const c10::optional<at::Tensor>& bias, const at::Tensor& dact,
                                                       int64_t stride, int64_t padding);
at::Tensor depthwise_conv2d_layernorm_fwd_cpu(MEDKERNELS_DEPTHWISE_LN_ARGS);
std::vector<at::Tensor> depthwise_conv2d_layernorm_bwd_cpu(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_LN_ARGS);
// ---- end depthwise convolution ----
// ---- HFF attentions and fusion tail (hff_attention_math.h has the formulas) -------------------------
// acc = float32 for float16/bfloat16/float32 inputs, float64 for float64. Contiguous operands; small ones
// (weights, running statistics, gates) in acc. gate_only returns the gate instead of x * gate.
//
// Spatial gate of x (B, C, H, W) T: conv_weight (1, 2, k, k) acc (k odd); bn_weight, bn_bias (1,) acc or
// undefined; running_mean, running_var (1,) acc, used (and required) when !use_batch_stats.
//   fwd -> {y, batch_mean, batch_var, pooled, argmax}: y = x * gate (B, C, H, W) T, or the gate (B, 1, H, W)
//          acc; batch_mean and the unbiased batch_var of the map (1,) acc (empty (0,) without batch
//          statistics); pooled (B, 2, H, W) acc = [max, mean] over C and argmax (B, H, W) int64 (first max).
//   bwd -> {dx, dconv_weight, dbn_weight, dbn_bias} (dbn_* undefined when absent); grad is d loss / d y.
//          With dx_accumulate (x's shape and dtype), dx is added into it in place and it is returned as dx.
#define MEDKERNELS_HFF_SPATIAL_ARGS                                                                \
  const at::Tensor &x, const at::Tensor &conv_weight, const c10::optional<at::Tensor> &bn_weight, \
      const c10::optional<at::Tensor> &bn_bias, const c10::optional<at::Tensor> &running_mean,     \
      const c10::optional<at::Tensor> &running_var, bool use_batch_stats, double eps, bool gate_only
std::vector<at::Tensor> hff_spatial_gate_fwd_cpu(MEDKERNELS_HFF_SPATIAL_ARGS);
std::vector<at::Tensor> hff_spatial_gate_bwd_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                                 const at::Tensor& argmax, MEDKERNELS_HFF_SPATIAL_ARGS,
                                                 const c10::optional<at::Tensor>& dx_accumulate);
// Channel gate of x (B, C, H, W) T: fc1_weight (hidden, C), fc2_weight (C, hidden) acc, no biases.
//   fwd -> {y, pooled, argmax}: y = x * gate (B, C, H, W) T or the gate (B, C, 1, 1) acc; pooled (B, 2, C)
//          acc = [max, mean] over H * W and argmax (B, C) int64 (first max, as a flat pixel index).
//   bwd -> {dx, dfc1_weight, dfc2_weight}; dx_accumulate as for the spatial gate.
#define MEDKERNELS_HFF_CHANNEL_ARGS \
  const at::Tensor &x, const at::Tensor &fc1_weight, const at::Tensor &fc2_weight, bool gate_only
std::vector<at::Tensor> hff_channel_gate_fwd_cpu(MEDKERNELS_HFF_CHANNEL_ARGS);
std::vector<at::Tensor> hff_channel_gate_bwd_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                                 const at::Tensor& argmax, MEDKERNELS_HFF_CHANNEL_ARGS,
                                                 const c10::optional<at::Tensor>& dx_accumulate);
// Fusion tail: out = LayerNorm over channels of cat[g * channel_gate, l * spatial_gate, x_f].
// l (B, C1, H, W), g (B, C2, H, W), x_f (B, Ci, H, W) T; spatial_gate (B, 1, H, W), channel_gate
// (B, C2, 1, 1), ln_weight, ln_bias (C2 + C1 + Ci,) acc.
//   fwd -> {out (B, C2 + C1 + Ci, H, W) T, mean (B, H, W) acc, rstd (B, H, W) acc}
//   bwd -> {dl, dg, dx_f, dspatial_gate, dchannel_gate, dln_weight, dln_bias} from dout and the saved
//          mean and rstd.
#define MEDKERNELS_HFF_TAIL_ARGS                                                                   \
  const at::Tensor &l, const at::Tensor &g, const at::Tensor &x_f, const at::Tensor &spatial_gate, \
      const at::Tensor &channel_gate, const at::Tensor &ln_weight, const at::Tensor &ln_bias
std::vector<at::Tensor> hff_fused_tail_fwd_cpu(MEDKERNELS_HFF_TAIL_ARGS, double eps);
std::vector<at::Tensor> hff_fused_tail_bwd_cpu(const at::Tensor& dout, MEDKERNELS_HFF_TAIL_ARGS,
                                               const at::Tensor& mean, const at::Tensor& rstd);

// ---- 3x3 convolution: the transforms of Winograd F(4x4, 3x3) (csrc/conv3x3/winograd_f4x3.h) ----
// float32 CPU tensors. Maps are contiguous channels-last (batch, H, W, C); tile t = (b * tiles_h + i) * tiles_w + j
// covers the outputs [4i, 4i + 4) x [4j, 4j + 4), tiles_h = ceil(H / 4); a chunk of tiles [t0, t1) is transformed
// into (36, t1 - t0, C), slice e holding value e of every tile's 6x6 transform. Each function writes into a
// contiguous tensor the caller provides (a workspace), never allocating:
//   input:       x -> (B^T d B) of the 6x6 input tiles (padding 1)                  into v (36, t1 - t0, C)
//   grad_output: dy -> (A dy A^T) of the 4x4 gradient tiles                        into z (36, t1 - t0, C)
//   output:      the 36 products m[e] (t1 - t0, Cc) -> A^T M A                      into y[..., c0 : c0 + Cc]
//   filter:      w (out, in, 3, 3) -> G w G^T for out rows [r0, r1)                 into u (36, r1 - r0, in);
//                with flip_transpose, of w rotated by 180 degrees for in rows [r0, r1) into u (36, r1 - r0, out)
//   filter_grad: m (36, Cc, in) -> G^T m G                                           into dw[o0 : o0 + Cc]
void winograd_input_transform_cpu(const at::Tensor& x, int64_t t0, int64_t t1, const at::Tensor& v);
void winograd_grad_output_transform_cpu(const at::Tensor& dy, int64_t t0, int64_t t1, const at::Tensor& z);
void winograd_output_transform_cpu(const std::vector<at::Tensor>& m, const at::Tensor& y, int64_t t0, int64_t c0);
void winograd_filter_transform_cpu(const at::Tensor& w, bool flip_transpose, int64_t r0, int64_t r1,
                                   const at::Tensor& u);
void winograd_filter_grad_transform_cpu(const at::Tensor& m, const at::Tensor& dw, int64_t o0);

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
// ---- depthwise convolution ----
at::Tensor depthwise_conv2d_fwd_cuda(MEDKERNELS_DEPTHWISE_CONV_ARGS, bool channels_last);
std::vector<at::Tensor> depthwise_conv2d_bwd_cuda(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_CONV_ARGS);
at::Tensor depthwise_conv2d_layernorm_fwd_cuda(MEDKERNELS_DEPTHWISE_LN_ARGS);
std::vector<at::Tensor> depthwise_conv2d_layernorm_bwd_cuda(const at::Tensor& grad, MEDKERNELS_DEPTHWISE_LN_ARGS);
// ---- end depthwise convolution ----
std::vector<at::Tensor> hff_spatial_gate_fwd_cuda(MEDKERNELS_HFF_SPATIAL_ARGS);
std::vector<at::Tensor> hff_spatial_gate_bwd_cuda(const at::Tensor& grad, const at::Tensor& pooled,
                                                  const at::Tensor& argmax, MEDKERNELS_HFF_SPATIAL_ARGS,
                                                  const c10::optional<at::Tensor>& dx_accumulate);
std::vector<at::Tensor> hff_channel_gate_fwd_cuda(MEDKERNELS_HFF_CHANNEL_ARGS);
std::vector<at::Tensor> hff_channel_gate_bwd_cuda(const at::Tensor& grad, const at::Tensor& pooled,
                                                  const at::Tensor& argmax, MEDKERNELS_HFF_CHANNEL_ARGS,
                                                  const c10::optional<at::Tensor>& dx_accumulate);
std::vector<at::Tensor> hff_fused_tail_fwd_cuda(MEDKERNELS_HFF_TAIL_ARGS, double eps);
std::vector<at::Tensor> hff_fused_tail_bwd_cuda(const at::Tensor& dout, MEDKERNELS_HFF_TAIL_ARGS,
                                                const at::Tensor& mean, const at::Tensor& rstd);
#endif

}  // namespace medkernels
