// The channel gate's MLP (see hff_channel_mlp.h): a few tiny matrix products, left to ATen.

#include "hff_channel_mlp.h"

#include <ATen/ATen.h>

namespace medkernels {

at::Tensor hff_channel_mlp_gate(const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                const at::Tensor& fc2_weight) {
  const at::Tensor hidden = at::relu(at::matmul(pooled, fc1_weight.t())).sum(1);  // (B, hidden)
  return at::sigmoid(at::matmul(hidden, fc2_weight.t()));
}

std::vector<at::Tensor> hff_channel_mlp_backward(const at::Tensor& dgate, const at::Tensor& gate,
                                                 const at::Tensor& pooled, const at::Tensor& fc1_weight,
                                                 const at::Tensor& fc2_weight) {
  const int64_t batch = pooled.size(0), channels = pooled.size(2);
  const at::Tensor pre = at::matmul(pooled, fc1_weight.t());                // (B, 2, hidden)
  const at::Tensor hidden = at::relu(pre).sum(1);                            // (B, hidden)
  const at::Tensor dlogit = dgate * gate * (1 - gate);                       // (B, C)
  const at::Tensor dfc2 = at::matmul(dlogit.t(), hidden);                   // (C, hidden)
  const at::Tensor dpre = at::matmul(dlogit, fc2_weight).unsqueeze(1) * (pre > 0);  // (B, 2, hidden)
  const at::Tensor dfc1 = at::matmul(dpre.reshape({2 * batch, -1}).t(), pooled.reshape({2 * batch, channels}));
  const at::Tensor dpooled = at::matmul(dpre, fc1_weight);                  // (B, 2, C)
  return {dpooled.contiguous(), dfc1, dfc2};
}

}  // namespace medkernels
