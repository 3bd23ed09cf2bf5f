// The shared MLP of the HFF channel gate on the small pooled (B, 2, C) tensors, called by the CPU and the
// CUDA kernels alike (hff_channel_mlp.cpp: plain loops for CPU tensors, ATen products for CUDA tensors).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace medkernels {

// gate (B, C) = sigmoid(mlp(pooled[:, 0]) + mlp(pooled[:, 1])), mlp(v) = fc2 @ relu(fc1 @ v), from pooled
// (B, 2, C), fc1_weight (hidden, C) and fc2_weight (C, hidden), all of one floating dtype.
at::Tensor hff_channel_mlp_gate(const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                const at::Tensor& fc2_weight);

// Backward of hff_channel_mlp_gate from dgate (B, C): {dpooled (B, 2, C), dfc1_weight, dfc2_weight, gate (B, C)},
// the gate recomputed on the way (the forward's value).
std::vector<at::Tensor> hff_channel_mlp_backward(const at::Tensor& dgate, const at::Tensor& pooled,
                                                 const at::Tensor& fc1_weight, const at::Tensor& fc2_weight);

}  // namespace medkernels
