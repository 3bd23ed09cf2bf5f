// The shared MLP of the HFF channel gate on the pooled vectors, written with ATen ops on the small
// (B, 2, C) tensors so that the CPU and CUDA kernels run the same code (hff_channel_mlp.cpp).
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace medkernels {

// gate (B, C) = sigmoid(mlp(pooled[:, 0]) + mlp(pooled[:, 1])), mlp(v) = fc2 @ relu(fc1 @ v), from pooled
// (B, 2, C), fc1_weight (hidden, C) and fc2_weight (C, hidden), all of one floating dtype.
at::Tensor hff_channel_mlp_gate(const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                const at::Tensor& fc2_weight);

// Backward of hff_channel_mlp_gate from dgate (B, C) and the forward's gate: {dpooled (B, 2, C),
// dfc1_weight, dfc2_weight}.
std::vector<at::Tensor> hff_channel_mlp_backward(const at::Tensor& dgate, const at::Tensor& gate,
                                                 const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                                 const at::Tensor& fc2_weight);

}  // namespace medkernels
