// Geometry and argument checks of the depthwise-convolution entry points, shared by the CPU
// (depthwise_conv_cpu.cpp, depthwise_conv2d_layernorm_cpu.cpp) and CUDA (depthwise_conv_cuda.cu) files; defined
// in depthwise_conv_args.cpp. Every message names the operator and the argument; wrong dtypes raise
// TypeError in Python, anything else ValueError.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Optional.h>

#include "depthwise_conv/depthwise_conv_math.h"

namespace medkernels {
namespace dwconv {

// Largest kernel size the kernels take.
constexpr int64_t kMaxKernel = 31;

inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
inline int64_t ceil_div(int64_t a, int64_t b) {
  return -floor_div(-a, b);
}

struct Geometry {
  int64_t B = 0, C = 0, H = 0, W = 0, Ho = 0, Wo = 0, k = 0, s = 1, p = 0;
  // Padded input columns / rows the output reads: (Wo - 1) * s + k (at most W + 2p).
  int64_t padded_cols() const { return (Wo - 1) * s + k; }
  int64_t padded_rows() const { return (Ho - 1) * s + k; }
  // Columns / rows of the dilated, zero-padded d loss / d z of the CPU backward (depthwise_conv_cpu.h):
  // room for the output positions and for every read of the flipped convolution at offset p.
  int64_t dilated_cols() const { return std::max((Wo - 1) * s + 2 * k - 1, W + p + k - 1); }
  int64_t dilated_rows() const { return std::max((Ho - 1) * s + 2 * k - 1, H + p + k - 1); }
  // Output rows whose taps reach input row ih: [first_out_row(ih), last_out_row(ih)] (may be empty).
  int64_t first_out_row(int64_t ih) const { return std::max<int64_t>(0, ceil_div(ih + p - k + 1, s)); }
  int64_t last_out_row(int64_t ih) const { return std::min<int64_t>(Ho - 1, floor_div(ih + p, s)); }
};

struct ConvArgs {
  Geometry g;
  bool has_bias = false;
};

// x (B, C, H, W) floating on a `device` device, any strides; weight (C, 1, k, k) contiguous, k <= 31;
// bias (C,) or absent; x, weight, bias of one dtype and device; stride >= 1, padding >= 0, H + 2p >= k.
ConvArgs check_conv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                         c10::DeviceType device);
// grad of the given shape, x's dtype and device, any strides.
void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef shape,
                const char* layout);
// An optional (C,) vector of x's dtype and device, contiguous.
void check_vector(const char* op, const char* name, const c10::optional<at::Tensor>& v, const at::Tensor& x,
                  int64_t C);
DwAct parse_activation(const char* op, const std::string& name);
// Whether an optional tensor is given.
inline bool present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

}  // namespace dwconv
}  // namespace medkernels
