// Argument checks shared by the CPU and CUDA entry points.  Every message
// names the operator and the argument so that a failing call from Python is
// easy to trace.  Wrong dtypes raise TypeError in Python, anything else
// (rank, size, device, layout) ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/check_message.h"

namespace medkernels {

// Checks that `t` (called `arg` in the messages of operator `op`) has rank
// `rank` (described by `layout`, e.g. "(B, C, H, W)"), is contiguous, lives on
// a device of type `device`, and has one of the floating dtypes the kernels
// are instantiated for.
inline void check_cross_scan_input(const at::Tensor& t, const char* op, const char* arg,
                                   int64_t rank, const char* layout, c10::DeviceType device) {
  MK_CHECK_VALUE(t.defined(), op, ": expected ", arg, " to be a tensor, but got an undefined tensor");
  MK_CHECK_VALUE(t.dim() == rank, op, ": expected ", arg, " to be a ", rank, "-D tensor of shape ",
              layout, ", but got a ", t.dim(), "-D tensor of shape ", t.sizes());
  MK_CHECK_VALUE(t.device().type() == device, op, ": expected ", arg, " to be a ",
              c10::DeviceTypeName(device, /*lower_case=*/true), " tensor, but it is on ",
              t.device());
  const auto dtype = t.scalar_type();
  MK_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": expected ", arg,
              " to have dtype float16, bfloat16, float32 or float64, but got ", dtype);
  MK_CHECK_VALUE(t.is_contiguous(), op, ": expected ", arg,
              " to be contiguous (call .contiguous() first); got shape ", t.sizes(),
              " with strides ", t.strides());
}

// Checks specific to cross_merge's input y of shape (B, 4, C, H, W).
inline void check_cross_merge_directions(const at::Tensor& y, const char* op) {
  MK_CHECK_VALUE(y.size(1) == 4, op,
              ": expected y.size(1) == 4 (one slice per scan direction) for y of shape "
              "(B, 4, C, H, W), but got shape ",
              y.sizes());
}

}  // namespace medkernels
