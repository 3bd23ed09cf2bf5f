// CUDA entry points of the fused SS2D scan (four cross-scan directions walked in place): its checks, then the
// kernels of selective_scan_cuda.cuh (design notes there) with kSS2D = true.

#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "common/check_message.h"
#include "cross_scan/cross_scan.h"
#include "ops.h"
#include "selective_scan/selective_scan_cuda.cuh"

namespace medkernels {
namespace {

Problem check_ss2d_scan(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D_skip,
                        const c10::optional<at::Tensor>& delta_bias) {
  check_u(u, op, 4, "(B, D, H, W)");
  Problem pr;
  pr.batch = u.size(0);
  pr.channels = u.size(1);
  pr.H = u.size(2);
  pr.W = u.size(3);
  pr.L = pr.H * pr.W;
  pr.rows = kCrossScanDirections * pr.channels;
  pr.groups = kCrossScanDirections;
  const auto T = u.scalar_type();
  const auto S = state_dtype_of(T);
  check_operand(delta, op, "delta", u, {pr.batch, kCrossScanDirections, pr.channels, pr.H, pr.W},
                "(B, 4, D, H, W)", T);
  MK_CHECK_VALUE(A.defined() && A.dim() == 2, op, ": expected A to be a 2-D tensor of shape (4 * D, N)");
  pr.N = A.size(1);
  check_operand(A, op, "A", u, {pr.rows, pr.N}, "(4 * D, N)", S);
  check_state_size(pr.N, op);
  check_operand(B, op, "B", u, {pr.batch, kCrossScanDirections, pr.N, pr.H, pr.W}, "(B, 4, N, H, W)", T);
  check_operand(C, op, "C", u, {pr.batch, kCrossScanDirections, pr.N, pr.H, pr.W}, "(B, 4, N, H, W)", T);
  if (D_skip.has_value() && D_skip->defined()) {
    check_operand(*D_skip, op, "D_skip", u, {pr.rows}, "(4 * D,)", S);
  }
  if (delta_bias.has_value() && delta_bias->defined()) {
    check_operand(*delta_bias, op, "delta_bias", u, {pr.rows}, "(4 * D,)", S);
  }
  return pr;
}

}  // namespace

std::vector<at::Tensor> ss2d_scan_fwd_cuda(MEDKERNELS_SS2D_SCAN_FWD_ARGS) {
  const char* op = "ss2d_scan_fwd_cuda";
  at::globalContext().alertNotDeterministic("medkernels ss2d_scan_fwd_cuda (the four directions are summed with atomicAdd)");
  const Problem pr = check_ss2d_scan(op, u, delta, A, B, C, D_skip, delta_bias);
  const c10::cuda::CUDAGuard device_guard(u.device());
  const auto T = u.scalar_type();
  at::Tensor out_acc = at::zeros({pr.batch, pr.channels, pr.L}, u.options().dtype(state_dtype_of(T)));
  if (pr.batch * pr.rows != 0 && pr.L != 0) {
    const unsigned int blocks = grid_for(pr, op);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, "ss2d_scan_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto p = make_params<scalar_t, acc_t>(pr, u, delta, A, B, C, D_skip, std::nullopt, delta_bias,
                                            delta_softplus);
      p.out_acc = out_acc.data_ptr<acc_t>();
      launch_fwd<scalar_t, acc_t, true>(p, blocks, stream);
    });
  }
  return {out_acc.to(T)};
}

std::vector<at::Tensor> ss2d_scan_bwd_cuda(const at::Tensor& dout, MEDKERNELS_SS2D_SCAN_FWD_ARGS) {
  const char* op = "ss2d_scan_bwd_cuda";
  at::globalContext().alertNotDeterministic("medkernels ss2d_scan_bwd_cuda (du and the parameter gradients are summed with atomicAdd)");
  const Problem pr = check_ss2d_scan(op, u, delta, A, B, C, D_skip, delta_bias);
  const auto T = u.scalar_type();
  const auto S = state_dtype_of(T);
  // dout: the output's (B, D, H * W), or u's (B, D, H, W).
  MK_CHECK_VALUE(dout.defined(), op, ": expected dout to be a tensor, but got an undefined tensor");
  if (dout.dim() == 4) {
    check_operand(dout, op, "dout", u, u.sizes(), "(B, D, H, W)", T);
  } else {
    check_operand(dout, op, "dout", u, {pr.batch, pr.channels, pr.L}, "(B, D, H * W)", T);
  }
  const c10::cuda::CUDAGuard device_guard(u.device());
  const auto acc_options = u.options().dtype(S);
  at::Tensor du_acc = at::zeros(u.sizes(), acc_options);
  at::Tensor ddelta = at::zeros_like(delta);
  at::Tensor dA = at::zeros_like(A);
  at::Tensor dB_acc = at::zeros(B.sizes(), acc_options);
  at::Tensor dC_acc = at::zeros(C.sizes(), acc_options);
  const at::Tensor* D_t = present(D_skip);
  const at::Tensor* bias_t = present(delta_bias);
  at::Tensor dD = D_t != nullptr ? at::zeros_like(*D_t) : at::Tensor();
  at::Tensor dbias = bias_t != nullptr ? at::zeros_like(*bias_t) : at::Tensor();
  if (pr.batch * pr.rows != 0 && pr.L != 0) {
    const unsigned int blocks = grid_for(pr, op);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, "ss2d_scan_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto p = make_params<scalar_t, acc_t>(pr, u, delta, A, B, C, D_skip, std::nullopt, delta_bias,
                                            delta_softplus);
      p.dout = dout.const_data_ptr<scalar_t>();
      p.du_acc = du_acc.data_ptr<acc_t>();
      p.ddelta = ddelta.data_ptr<scalar_t>();
      p.dA = dA.data_ptr<acc_t>();
      p.dB = dB_acc.data_ptr<acc_t>();
      p.dC = dC_acc.data_ptr<acc_t>();
      p.dD = ptr_or_null<acc_t>(dD);
      p.ddelta_bias = ptr_or_null<acc_t>(dbias);
      run_bwd<scalar_t, acc_t, true>(p, u, blocks, stream);
    });
  }
  return {du_acc.to(T), ddelta, dA, dB_acc.to(T), dC_acc.to(T), dD, dbias};
}

}  // namespace medkernels
