// Entry points of the CPU fused SS2D scan (MedMamba's four directions walked in place): its checks, then the
// shared engine of selective_scan_cpu.h (kernels in selective_scan_cpu_kernels.cpp).

#include <ATen/ATen.h>

#include <vector>

#include "common/check_message.h"
#include "common/checks.h"
#include "cross_scan/cross_scan.h"
#include "ops.h"
#include "selective_scan/selective_scan_cpu.h"

namespace medkernels {
namespace {

using namespace scan_cpu;

ScanShapes check_ss2d_scan(const char* op, MEDKERNELS_SS2D_SCAN_FWD_ARGS) {
  (void)delta_softplus;
  check_cross_scan_input(u, op, "u", 4, "(batch, dim, H, W)", c10::DeviceType::CPU);
  const auto dt = u.scalar_type();
  const auto sdt = state_dtype(dt);
  const int64_t batch = u.size(0), dim = u.size(1), H = u.size(2), W = u.size(3);
  const int64_t K = kCrossScanDirections;
  check_operand(delta, op, "delta", dt, {batch, K, dim, H, W}, "(batch, 4, dim, H, W)");
  const int64_t N = check_A(A, op, K * dim, "(4 * dim, N)", sdt);
  check_operand(B, op, "B", dt, {batch, K, N, H, W}, "(batch, 4, N, H, W)");
  check_operand(C, op, "C", dt, {batch, K, N, H, W}, "(batch, 4, N, H, W)");
  check_optional(D_skip, op, "D_skip", sdt, {K * dim}, "(4 * dim,)");
  check_optional(delta_bias, op, "delta_bias", sdt, {K * dim}, "(4 * dim,)");
  return {batch, dim, K, H * W, N, H, W};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Entry points

std::vector<at::Tensor> ss2d_scan_fwd_cpu(MEDKERNELS_SS2D_SCAN_FWD_ARGS) {
  const char* op = "ss2d_scan_fwd_cpu";
  const ScanShapes s = check_ss2d_scan(op, u, delta, A, B, C, D_skip, delta_bias, delta_softplus);
  at::Tensor out = at::empty({s.batch, s.dim, s.L}, u.options());
  if (out.numel() == 0) {
    return {out};
  }
  scan_forward(/*ss2d=*/true, s, delta_softplus, u, delta, A, B, C, present(D_skip), nullptr,
               present(delta_bias), out, nullptr);
  return {out};
}

std::vector<at::Tensor> ss2d_scan_bwd_cpu(const at::Tensor& dout, MEDKERNELS_SS2D_SCAN_FWD_ARGS) {
  const char* op = "ss2d_scan_bwd_cpu";
  const ScanShapes s = check_ss2d_scan(op, u, delta, A, B, C, D_skip, delta_bias, delta_softplus);
  MK_CHECK_VALUE(dout.defined(), op, ": expected dout to be a tensor, but got an undefined tensor");
  // dout may come as (batch, dim, H, W) or flattened (batch, dim, H * W).
  const bool flat = dout.dim() == 3;
  if (flat) {
    check_operand(dout, op, "dout", u.scalar_type(), {s.batch, s.dim, s.L}, "(batch, dim, H * W)");
  } else {
    check_operand(dout, op, "dout", u.scalar_type(), u.sizes(), "(batch, dim, H, W)");
  }
  auto g = scan_backward(op, /*ss2d=*/true, s, dout, nullptr, u, delta, A, B, C, present(D_skip),
                         nullptr, present(delta_bias), delta_softplus);
  // {du, ddelta, dA, dB, dC, dD, ddelta_bias}
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6]};
}

}  // namespace medkernels
