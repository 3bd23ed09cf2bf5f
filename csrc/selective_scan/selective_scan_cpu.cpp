// Entry points of the CPU selective scan (mamba_ssm's selective_scan_fn, real A) and the argument checks
// shared with the SS2D scan (ss2d_scan_cpu.cpp); the kernels are in selective_scan_cpu_kernels.cpp.

#include <ATen/ATen.h>

#include <vector>

#include "common/check_message.h"
#include "common/checks.h"
#include "ops.h"
#include "selective_scan/selective_scan_cpu.h"

namespace medkernels {

namespace scan_cpu {

// ---------------------------------------------------------------------------------------------------
// Argument checks

void check_operand(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                   at::IntArrayRef shape, const char* layout) {
  MK_CHECK_VALUE(t.defined(), op, ": expected ", name, " to be a tensor, but got an undefined tensor");
  MK_CHECK_VALUE(t.device().is_cpu(), op, ": expected ", name, " to be a cpu tensor, but it is on ",
                    t.device());
  MK_CHECK_TYPE(t.scalar_type() == dtype, op, ": expected ", name, " to have dtype ", dtype,
                   ", but got ", t.scalar_type());
  MK_CHECK_VALUE(t.sizes() == shape, op, ": expected ", name, " to have shape ", layout, " = ", shape,
                    ", but got shape ", t.sizes());
  MK_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name,
                    " to be contiguous (call .contiguous() first); got shape ", t.sizes(),
                    " with strides ", t.strides());
}

void check_optional(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                    at::ScalarType dtype, at::IntArrayRef shape, const char* layout) {
  if (t.has_value() && t->defined()) check_operand(*t, op, name, dtype, shape, layout);
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

at::ScalarType state_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A (rows, N) in the state dtype; returns N.
int64_t check_A(const at::Tensor& A, const char* op, int64_t rows, const char* layout,
                at::ScalarType sdt) {
  MK_CHECK_VALUE(A.defined(), op, ": expected A to be a tensor, but got an undefined tensor");
  MK_CHECK_VALUE(A.dim() == 2, op, ": expected A to be a 2-D tensor of shape ", layout, ", but got a ",
                    A.dim(), "-D tensor of shape ", A.sizes());
  MK_CHECK_VALUE(A.size(1) >= 1, op, ": expected A's state size N = A.size(1) >= 1, but got shape ",
                    A.sizes());
  check_operand(A, op, "A", sdt, {rows, A.size(1)}, layout);
  return A.size(1);
}

}  // namespace scan_cpu

namespace {

using namespace scan_cpu;

// Checks of the plain selective scan's operands; returns the sizes.
ScanShapes check_selective_scan(const char* op, MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS) {
  (void)delta_softplus;
  check_cross_scan_input(u, op, "u", 3, "(batch, dim, L)", c10::DeviceType::CPU);
  const auto dt = u.scalar_type();
  const auto sdt = state_dtype(dt);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  check_operand(delta, op, "delta", dt, u.sizes(), "(batch, dim, L)");
  const int64_t N = check_A(A, op, dim, "(dim, N)", sdt);
  MK_CHECK_VALUE(B.defined() && B.dim() == 4, op,
                    ": expected B to be a 4-D tensor of shape (batch, G, N, L), but got ",
                    B.defined() ? B.sizes() : at::IntArrayRef{});
  const int64_t groups = B.size(1);
  MK_CHECK_VALUE(groups >= 1 && dim % groups == 0, op, ": expected B's group count G = ", groups,
                    " to be >= 1 and divide dim = ", dim);
  check_operand(B, op, "B", dt, {batch, groups, N, L}, "(batch, G, N, L)");
  check_operand(C, op, "C", dt, {batch, groups, N, L}, "(batch, G, N, L)");
  check_optional(D_skip, op, "D_skip", sdt, {dim}, "(dim,)");
  check_optional(z, op, "z", dt, u.sizes(), "(batch, dim, L)");
  check_optional(delta_bias, op, "delta_bias", sdt, {dim}, "(dim,)");
  return {batch, dim, groups, L, N, 0, 0};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Entry points

std::vector<at::Tensor> selective_scan_fwd_cpu(MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS) {
  const char* op = "selective_scan_fwd_cpu";
  const ScanShapes s = check_selective_scan(op, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus);
  at::Tensor out = at::empty_like(u);
  at::Tensor last_state = at::zeros({s.batch, s.dim, s.N}, A.options());
  if (s.L == 0 || s.batch == 0 || s.dim == 0) {
    return {out, last_state};
  }
  scan_forward(/*ss2d=*/false, s, delta_softplus, u, delta, A, B, C, present(D_skip), present(z),
               present(delta_bias), out, &last_state);
  return {out, last_state};
}

std::vector<at::Tensor> selective_scan_bwd_cpu(const at::Tensor& dout,
                                               const c10::optional<at::Tensor>& dlast_state,
                                               MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS) {
  const char* op = "selective_scan_bwd_cpu";
  const ScanShapes s = check_selective_scan(op, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus);
  check_operand(dout, op, "dout", u.scalar_type(), u.sizes(), "(batch, dim, L)");
  check_optional(dlast_state, op, "dlast_state", A.scalar_type(), {s.batch, s.dim, s.N},
                 "(batch, dim, N)");
  auto g = scan_backward(op, /*ss2d=*/false, s, dout, present(dlast_state), u, delta, A, B, C,
                         present(D_skip), present(z), present(delta_bias), delta_softplus);
  // {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias}
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[7], g[6]};
}

}  // namespace medkernels
