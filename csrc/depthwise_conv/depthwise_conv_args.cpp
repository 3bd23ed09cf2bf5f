// Argument checks of the depthwise-convolution entry points (declared in depthwise_conv_args.h).

#include "common/check_message.h"
#include "depthwise_conv/depthwise_conv_args.h"

#include <c10/util/Exception.h>

namespace medkernels {
namespace dwconv {

ConvArgs check_conv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                         c10::DeviceType device) {
  MK_CHECK_VALUE(x.defined(), op, ": expected x to be a tensor, but got an undefined tensor");
  MK_CHECK_VALUE(x.dim() == 4, op, ": expected x to be a 4-D tensor of shape (B, C, H, W), but got shape ",
                    x.sizes());
  MK_CHECK_VALUE(x.device().type() == device, op, ": expected x to be a ",
                    c10::DeviceTypeName(device, /*lower_case=*/true), " tensor, but it is on ", x.device());
  const auto dt = x.scalar_type();
  MK_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, op,
                   ": expected x to have dtype float16, bfloat16, float32 or float64, but got ", dt);
  const int64_t C = x.size(1);
  MK_CHECK_VALUE(weight.defined() && weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3),
                    op, ": expected weight to have shape (C, 1, k, k) with C = ", C, ", but got ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  MK_CHECK_VALUE(weight.device() == x.device(), op, ": expected weight on x's device ", x.device(),
                    ", but it is on ", weight.device());
  MK_CHECK_TYPE(weight.scalar_type() == dt, op, ": expected weight to have x's dtype ", dt, ", but got ",
                   weight.scalar_type());
  MK_CHECK_VALUE(weight.is_contiguous(), op, ": expected weight to be contiguous");
  const int64_t k = weight.size(2);
  MK_CHECK_VALUE(k >= 1 && k <= kMaxKernel, op, ": expected the kernel size k to be in [1, ", kMaxKernel,
                    "], but got ", k);
  check_vector(op, "bias", bias, x, C);
  MK_CHECK_VALUE(stride >= 1, op, ": expected stride >= 1, but got ", stride);
  MK_CHECK_VALUE(padding >= 0, op, ": expected padding >= 0, but got ", padding);
  const int64_t H = x.size(2), W = x.size(3);
  MK_CHECK_VALUE(H + 2 * padding >= k && W + 2 * padding >= k, op, ": x's spatial size (", H, ", ", W,
                    ") with padding ", padding, " is smaller than the kernel size ", k);
  ConvArgs a;
  a.g.B = x.size(0);
  a.g.C = C;
  a.g.H = H;
  a.g.W = W;
  a.g.k = k;
  a.g.s = stride;
  a.g.p = padding;
  a.g.Ho = (H + 2 * padding - k) / stride + 1;
  a.g.Wo = (W + 2 * padding - k) / stride + 1;
  a.has_bias = present(bias);
  return a;
}

void check_vector(const char* op, const char* name, const c10::optional<at::Tensor>& v, const at::Tensor& x,
                  int64_t C) {
  if (!v.has_value() || !v->defined()) return;
  MK_CHECK_VALUE(v->dim() == 1 && v->size(0) == C, op, ": expected ", name, " to have shape (C,) = (", C,
                    ",), but got ", v->sizes());
  MK_CHECK_VALUE(v->device() == x.device(), op, ": expected ", name, " on x's device ", x.device(),
                    ", but it is on ", v->device());
  MK_CHECK_TYPE(v->scalar_type() == x.scalar_type(), op, ": expected ", name, " to have x's dtype ",
                   x.scalar_type(), ", but got ", v->scalar_type());
  MK_CHECK_VALUE(v->is_contiguous(), op, ": expected ", name, " to be contiguous");
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef shape,
                const char* layout) {
  MK_CHECK_VALUE(grad.defined(), op, ": expected grad to be a tensor, but got an undefined tensor");
  MK_CHECK_VALUE(grad.sizes() == shape, op, ": expected grad to have shape ", layout, " = ", shape,
                    ", but got ", grad.sizes());
  MK_CHECK_VALUE(grad.device() == x.device(), op, ": expected grad on x's device ", x.device(),
                    ", but it is on ", grad.device());
  MK_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": expected grad to have x's dtype ",
                   x.scalar_type(), ", but got ", grad.scalar_type());
}


DwAct parse_activation(const char* op, const std::string& name) {
  if (name == "none") return DwAct::kNone;
  if (name == "silu") return DwAct::kSilu;
  if (name == "gelu") return DwAct::kGelu;
  if (name == "relu") return DwAct::kRelu;
  MK_CHECK_VALUE(false, op, ": expected activation to be one of 'none', 'silu', 'gelu', 'relu', but got '",
                    name, "'");
  return DwAct::kNone;
}

}  // namespace dwconv
}  // namespace medkernels
