// Argument checks of the HFF attention and fusion-tail kernels, shared by the CPU and CUDA entry points
// (the operand contracts are in ops.h). Messages name the operator and the argument; wrong dtypes raise
// TypeError in Python, anything else ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>

#include "common/check_message.h"
#include "common/checks.h"

namespace medkernels {

// float for float16/bfloat16/float32 inputs, double for float64: the dtype of statistics, gates and the
// small operands (weights, running statistics).
inline at::ScalarType hff_acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void hff_check_operand(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                              at::IntArrayRef shape, const char* layout, c10::DeviceType device) {
  MK_CHECK_VALUE(t.defined(), op, ": expected ", name, " to be a tensor, but got an undefined tensor");
  MK_CHECK_VALUE(t.device().type() == device, op, ": expected ", name, " to be a ",
                    c10::DeviceTypeName(device, /*lower_case=*/true), " tensor, but it is on ", t.device());
  MK_CHECK_TYPE(t.scalar_type() == dtype, op, ": expected ", name, " to have dtype ", dtype, ", but got ",
                   t.scalar_type());
  MK_CHECK_VALUE(t.sizes() == shape, op, ": expected ", name, " to have shape ", layout, " = ", shape,
                    ", but got shape ", t.sizes());
  MK_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name,
                    " to be contiguous (call .contiguous() first); got shape ", t.sizes(), " with strides ",
                    t.strides());
}

inline const at::Tensor* hff_present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

inline void hff_check_optional(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                               at::ScalarType dtype, at::IntArrayRef shape, const char* layout,
                               c10::DeviceType device) {
  if (hff_present(t) != nullptr) hff_check_operand(*t, op, name, dtype, shape, layout, device);
}

// x (B, C, H, W) with C >= 1 and H * W >= 1; B >= 1 on CUDA (whose launch grids would be empty: the
// medkernels.ops functions compute an empty batch without the kernels).
inline void hff_check_feature(const at::Tensor& x, const char* op, const char* name, c10::DeviceType device) {
  check_cross_scan_input(x, op, name, 4, "(B, C, H, W)", device);
  MK_CHECK_VALUE(x.size(1) >= 1 && x.size(2) * x.size(3) >= 1, op, ": expected ", name,
                    " to have at least one channel and one pixel, but got shape ", x.sizes());
  MK_CHECK_VALUE(device != c10::DeviceType::CUDA || x.size(0) >= 1, op, ": expected ", name,
                    " to hold at least one image, but got shape ", x.sizes());
}

// Checks of the spatial gate's operands; returns the kernel size k.
inline int hff_check_spatial_gate(const char* op, c10::DeviceType device, const at::Tensor& x,
                                  const at::Tensor& conv_weight, const c10::optional<at::Tensor>& bn_weight,
                                  const c10::optional<at::Tensor>& bn_bias,
                                  const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var, bool use_batch_stats) {
  hff_check_feature(x, op, "x", device);
  MK_CHECK_VALUE(x.size(1) <= std::numeric_limits<int32_t>::max(), op, ": x has too many channels: ", x.size(1));
  const auto acc = hff_acc_dtype(x.scalar_type());
  MK_CHECK_VALUE(conv_weight.defined() && conv_weight.dim() == 4, op,
                    ": expected conv_weight to be a 4-D tensor of shape (1, 2, k, k)");
  const int64_t k = conv_weight.size(3);
  MK_CHECK_VALUE(k % 2 == 1 && k <= 31, op, ": expected an odd kernel size k <= 31, but conv_weight has shape ",
                    conv_weight.sizes());
  hff_check_operand(conv_weight, op, "conv_weight", acc, {1, 2, k, k}, "(1, 2, k, k)", device);
  hff_check_optional(bn_weight, op, "bn_weight", acc, {1}, "(1,)", device);
  hff_check_optional(bn_bias, op, "bn_bias", acc, {1}, "(1,)", device);
  if (use_batch_stats) {
    MK_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) >= 2, op,
                      ": batch statistics need more than one value of the map, but x has shape ", x.sizes());
  } else {
    MK_CHECK_VALUE(hff_present(running_mean) && hff_present(running_var), op,
                      ": running_mean and running_var are required without batch statistics");
    hff_check_optional(running_mean, op, "running_mean", acc, {1}, "(1,)", device);
    hff_check_optional(running_var, op, "running_var", acc, {1}, "(1,)", device);
  }
  return static_cast<int>(k);
}

// pooled (B, 2, H, W) in the accumulation dtype and argmax (B, H, W) int64 saved by the spatial forward.
inline void hff_check_spatial_saved(const char* op, c10::DeviceType device, const at::Tensor& x,
                                    const at::Tensor& pooled, const at::Tensor& argmax) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  hff_check_operand(pooled, op, "pooled", hff_acc_dtype(x.scalar_type()), {B, 2, H, W}, "(B, 2, H, W)", device);
  hff_check_operand(argmax, op, "argmax", at::kLong, {B, H, W}, "(B, H, W)", device);
}

// Checks of the channel gate's operands: fc1_weight (hidden, C), fc2_weight (C, hidden).
inline void hff_check_channel_gate(const char* op, c10::DeviceType device, const at::Tensor& x,
                                   const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  hff_check_feature(x, op, "x", device);
  const auto acc = hff_acc_dtype(x.scalar_type());
  const int64_t C = x.size(1);
  MK_CHECK_VALUE(fc1_weight.defined() && fc1_weight.dim() == 2, op,
                    ": expected fc1_weight to be a 2-D tensor of shape (hidden, C)");
  const int64_t hidden = fc1_weight.size(0);
  hff_check_operand(fc1_weight, op, "fc1_weight", acc, {hidden, C}, "(hidden, C)", device);
  hff_check_operand(fc2_weight, op, "fc2_weight", acc, {C, hidden}, "(C, hidden)", device);
}

inline void hff_check_channel_saved(const char* op, c10::DeviceType device, const at::Tensor& x,
                                    const at::Tensor& pooled, const at::Tensor& argmax) {
  const int64_t B = x.size(0), C = x.size(1);
  hff_check_operand(pooled, op, "pooled", hff_acc_dtype(x.scalar_type()), {B, 2, C}, "(B, 2, C)", device);
  hff_check_operand(argmax, op, "argmax", at::kLong, {B, C}, "(B, C)", device);
}

// The operand of the gate-only backward (B, 1, H, W) / (B, C, 1, 1) in the accumulation dtype, or of the
// attention backward: x's shape and dtype.
inline void hff_check_gate_grad(const char* op, c10::DeviceType device, const at::Tensor& grad,
                                const at::Tensor& x, bool gate_only, at::IntArrayRef gate_shape,
                                const char* gate_layout) {
  if (gate_only) {
    hff_check_operand(grad, op, "grad", hff_acc_dtype(x.scalar_type()), gate_shape, gate_layout, device);
  } else {
    hff_check_operand(grad, op, "grad", x.scalar_type(), x.sizes(), "(B, C, H, W)", device);
  }
}

// The gradient buffer the gates' backward adds dx into, when given: x's shape and dtype, contiguous. Returns
// it, or a new tensor like x to write dx into.
inline at::Tensor hff_input_grad_buffer(const char* op, c10::DeviceType device, const at::Tensor& x,
                                        const c10::optional<at::Tensor>& dx_accumulate) {
  if (hff_present(dx_accumulate) == nullptr) return at::empty_like(x, at::MemoryFormat::Contiguous);
  hff_check_operand(*dx_accumulate, op, "dx_accumulate", x.scalar_type(), x.sizes(), "(B, C, H, W)", device);
  return *dx_accumulate;
}

// Checks of the fusion tail's operands: l (B, C1, H, W), g (B, C2, H, W), x_f (B, Ci, H, W) of one dtype,
// spatial_gate (B, 1, H, W), channel_gate (B, C2, 1, 1), ln_weight and ln_bias (C2 + C1 + Ci,) in the
// accumulation dtype.
inline void hff_check_fused_tail(const char* op, c10::DeviceType device, const at::Tensor& l,
                                 const at::Tensor& g, const at::Tensor& x_f, const at::Tensor& spatial_gate,
                                 const at::Tensor& channel_gate, const at::Tensor& ln_weight,
                                 const at::Tensor& ln_bias) {
  hff_check_feature(l, op, "l", device);
  const int64_t B = l.size(0), H = l.size(2), W = l.size(3);
  const auto dt = l.scalar_type();
  const auto acc = hff_acc_dtype(dt);
  MK_CHECK_VALUE(g.defined() && g.dim() == 4 && x_f.defined() && x_f.dim() == 4, op,
                    ": expected g and x_f to be 4-D tensors of shape (B, C, H, W)");
  hff_check_operand(g, op, "g", dt, {B, g.size(1), H, W}, "(B, C2, H, W)", device);
  hff_check_operand(x_f, op, "x_f", dt, {B, x_f.size(1), H, W}, "(B, Ci, H, W)", device);
  const int64_t C2 = g.size(1), total = l.size(1) + C2 + x_f.size(1);
  hff_check_operand(spatial_gate, op, "spatial_gate", acc, {B, 1, H, W}, "(B, 1, H, W)", device);
  hff_check_operand(channel_gate, op, "channel_gate", acc, {B, C2, 1, 1}, "(B, C2, 1, 1)", device);
  hff_check_operand(ln_weight, op, "ln_weight", acc, {total}, "(C1 + C2 + Ci,)", device);
  hff_check_operand(ln_bias, op, "ln_bias", acc, {total}, "(C1 + C2 + Ci,)", device);
}

}  // namespace medkernels
