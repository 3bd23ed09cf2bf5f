// The CPU selective scan engine shared by the plain scan (selective_scan_cpu.cpp) and the fused SS2D scan
// (ss2d_scan_cpu.cpp): the operand checks common to both and the two drivers, defined in
// selective_scan_cpu_kernels.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace medkernels {
namespace scan_cpu {

struct ScanShapes {
  int64_t batch, dim, groups, L, N, H, W;
};

// Argument checks (selective_scan_cpu.cpp).
void check_operand(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                   at::IntArrayRef shape, const char* layout);
void check_optional(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                    at::ScalarType dtype, at::IntArrayRef shape, const char* layout);
const at::Tensor* present(const c10::optional<at::Tensor>& t);
at::ScalarType state_dtype(at::ScalarType t);
// A (rows, N) in the state dtype; returns N.
int64_t check_A(const at::Tensor& A, const char* op, int64_t rows, const char* layout, at::ScalarType sdt);

// Runs the forward pass of either op into out (and last_state, the plain scan's, when given).
void scan_forward(bool ss2d, const ScanShapes& s, bool softplus, const at::Tensor& u, const at::Tensor& delta,
                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor* D_skip,
                  const at::Tensor* z, const at::Tensor* delta_bias, at::Tensor& out, at::Tensor* last_state);

// Runs the backward pass of either op into freshly allocated gradients:
// {du, ddelta, dA, dB, dC, dD, ddelta_bias, dz} (dz undefined unless z is given).
std::vector<at::Tensor> scan_backward(const char* op, bool ss2d, const ScanShapes& s,
                                      const at::Tensor& dout, const at::Tensor* dlast,
                                      const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor* D_skip,
                                      const at::Tensor* z, const at::Tensor* delta_bias,
                                      bool softplus);

}  // namespace scan_cpu
}  // namespace medkernels
