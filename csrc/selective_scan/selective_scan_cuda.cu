// CUDA entry points of the selective scan (mamba_ssm's selective_scan_fn, real A): its checks, then the kernels
// of selective_scan_cuda.cuh (design notes there) with kSS2D = false.

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

Problem check_selective_scan(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D_skip,
                             const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias) {
  check_u(u, op, 3, "(B, D, L)");
  Problem pr;
  pr.batch = u.size(0);
  pr.channels = u.size(1);
  pr.rows = pr.channels;
  pr.L = u.size(2);
  const auto T = u.scalar_type();
  const auto S = state_dtype_of(T);
  check_operand(delta, op, "delta", u, u.sizes(), "(B, D, L)", T);
  MK_CHECK_VALUE(A.defined() && A.dim() == 2, op, ": expected A to be a 2-D tensor of shape (D, N)");
  pr.N = A.size(1);
  check_operand(A, op, "A", u, {pr.channels, pr.N}, "(D, N)", S);
  check_state_size(pr.N, op);
  MK_CHECK_VALUE(B.defined() && B.dim() == 4, op, ": expected B to be a 4-D tensor of shape (B, G, N, L)");
  pr.groups = B.size(1);
  MK_CHECK_VALUE(pr.groups >= 1 && pr.channels % pr.groups == 0, op, ": expected B's group count G = ",
                    pr.groups, " to divide D = ", pr.channels);
  check_operand(B, op, "B", u, {pr.batch, pr.groups, pr.N, pr.L}, "(B, G, N, L)", T);
  check_operand(C, op, "C", u, {pr.batch, pr.groups, pr.N, pr.L}, "(B, G, N, L)", T);
  if (D_skip.has_value() && D_skip->defined()) {
    check_operand(*D_skip, op, "D_skip", u, {pr.channels}, "(D,)", S);
  }
  if (z.has_value() && z->defined()) {
    check_operand(*z, op, "z", u, u.sizes(), "(B, D, L)", T);
  }
  if (delta_bias.has_value() && delta_bias->defined()) {
    check_operand(*delta_bias, op, "delta_bias", u, {pr.channels}, "(D,)", S);
  }
  return pr;
}

}  // namespace

std::vector<at::Tensor> selective_scan_fwd_cuda(MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS) {
  const char* op = "selective_scan_fwd_cuda";
  const Problem pr = check_selective_scan(op, u, delta, A, B, C, D_skip, z, delta_bias);
  const c10::cuda::CUDAGuard device_guard(u.device());
  const auto S = state_dtype_of(u.scalar_type());
  at::Tensor out = at::empty({pr.batch, pr.channels, pr.L}, u.options());
  at::Tensor last_state = at::zeros({pr.batch, pr.rows, pr.N}, u.options().dtype(S));
  if (pr.batch * pr.rows == 0 || pr.L == 0) {
    return {out, last_state};
  }
  const unsigned int blocks = grid_for(pr, op);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_params<scalar_t, acc_t>(pr, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus);
    p.out = out.data_ptr<scalar_t>();
    p.last_state = last_state.data_ptr<acc_t>();
    launch_fwd<scalar_t, acc_t, false>(p, blocks, stream);
  });
  return {out, last_state};
}

std::vector<at::Tensor> selective_scan_bwd_cuda(const at::Tensor& dout,
                                                const c10::optional<at::Tensor>& dlast_state,
                                                MEDKERNELS_SELECTIVE_SCAN_FWD_ARGS) {
  const char* op = "selective_scan_bwd_cuda";
  // The standard reaction under torch.use_deterministic_algorithms(True): an error (a warning with warn_only).
  at::globalContext().alertNotDeterministic("medkernels selective_scan_bwd_cuda (dB, dC, dA, dD and ddelta_bias are summed with atomicAdd)");
  const Problem pr = check_selective_scan(op, u, delta, A, B, C, D_skip, z, delta_bias);
  const auto T = u.scalar_type();
  const auto S = state_dtype_of(T);
  check_operand(dout, op, "dout", u, u.sizes(), "(B, D, L)", T);
  const at::Tensor* dlast = present(dlast_state);
  if (dlast != nullptr) {
    check_operand(*dlast, op, "dlast_state", u, {pr.batch, pr.rows, pr.N}, "(B, D, N)", S);
  }
  const c10::cuda::CUDAGuard device_guard(u.device());
  const auto acc_options = u.options().dtype(S);
  at::Tensor du = at::zeros_like(u);
  at::Tensor ddelta = at::zeros_like(delta);
  at::Tensor dA = at::zeros_like(A);
  at::Tensor dB_acc = at::zeros(B.sizes(), acc_options);
  at::Tensor dC_acc = at::zeros(C.sizes(), acc_options);
  const at::Tensor* D_t = present(D_skip);
  const at::Tensor* z_t = present(z);
  const at::Tensor* bias_t = present(delta_bias);
  at::Tensor dD = D_t != nullptr ? at::zeros_like(*D_t) : at::Tensor();
  at::Tensor dz = z_t != nullptr ? at::zeros_like(*z_t) : at::Tensor();
  at::Tensor dbias = bias_t != nullptr ? at::zeros_like(*bias_t) : at::Tensor();
  if (pr.batch * pr.rows != 0 && pr.L != 0) {
    const unsigned int blocks = grid_for(pr, op);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, "selective_scan_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto p = make_params<scalar_t, acc_t>(pr, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus);
      p.dout = dout.const_data_ptr<scalar_t>();
      p.dlast = dlast != nullptr ? dlast->const_data_ptr<acc_t>() : nullptr;
      p.du = du.data_ptr<scalar_t>();
      p.ddelta = ddelta.data_ptr<scalar_t>();
      p.dz = ptr_or_null<scalar_t>(dz);
      p.dA = dA.data_ptr<acc_t>();
      p.dB = dB_acc.data_ptr<acc_t>();
      p.dC = dC_acc.data_ptr<acc_t>();
      p.dD = ptr_or_null<acc_t>(dD);
      p.ddelta_bias = ptr_or_null<acc_t>(dbias);
      run_bwd<scalar_t, acc_t, false>(p, u, blocks, stream);
    });
  }
  return {du, ddelta, dA, dB_acc.to(T), dC_acc.to(T), dD, dz, dbias};
}

}  // namespace medkernels
