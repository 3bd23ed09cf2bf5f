// Declarations of the operators exported by medkernels._C.
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

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

#ifdef MEDKERNELS_WITH_CUDA
at::Tensor cross_scan_cuda(const at::Tensor& x);
at::Tensor cross_merge_cuda(const at::Tensor& y);
// CUDA runtime version the .cu files were compiled against, e.g. "13.0".
std::string cuda_runtime_version_at_build();
#endif

}  // namespace medkernels
