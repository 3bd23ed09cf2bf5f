// Per-element math of HiFuse's HFF attentions and fusion tail, shared by the C++ CPU kernels
// (hff_attention_cpu.cpp, hff_fused_tail_cpu.cpp) and the CUDA kernels (hff_attention_cuda.cu) so that
// the CPU tests exercise the formulas the GPU code runs. `acc_t` is float for float16/bfloat16/float32
// inputs and double for float64 inputs.
//
// Spatial gate of x (B, C, H, W), per pixel p of image b:
//   pooled = [max_c x, mean_c x]                       (B, 2, H, W), argmax_c kept for the backward
//   z      = conv2d(pooled, w (1, 2, k, k), padding k / 2)   (B, H, W), no bias
//   y      = z * a + c,  a = bn_w / sqrt(var + eps), c = bn_b - mean * a   (BatchNorm of the map)
//   gate   = sigmoid(y)
// Channel gate of x (B, C, H, W): pooled = [max_p x, mean_p x] per (b, c), an MLP on both, sigmoid.
// Fusion tail per pixel: v = [g * channel_gate, l * spatial_gate, x_f] over C2 + C1 + Ci channels, then the
// channels-first LayerNorm: out = (v - mu) * rstd * w + b (biased variance, eps inside the square root).
#pragma once

#include <cmath>
#include <cstdint>

#include "cross_scan/cross_scan.h"  // MK_HOST_DEVICE
#include "selective_scan/selective_scan_math.h"  // mk_exp

namespace medkernels {

template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + mk_exp<acc_t>(-v));
}

// d sigmoid / dv from the sigmoid's value s.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_sigmoid_grad(acc_t s) {
  return s * (acc_t(1) - s);
}

// Whether v replaces the running maximum m when scanning in index order: strictly larger (so the first
// of equal maxima is kept, as torch.max(dim)), or the first NaN (NaN propagates, as in torch).
template <typename acc_t>
MK_HOST_DEVICE inline bool hff_takes_max(acc_t v, acc_t m) {
  return (v > m) | ((v != v) & (m == m));  // bitwise: no branches, so that lane loops vectorise
}

// Combines two (maximum, index) candidates of one reduction: NaN wins (the lower index among NaNs), then the
// larger value, then the lower index among equal values, so that a tree reduction gives hff_takes_max's
// result (the first maximum in index order). Returns true when (v2, i2) wins.
template <typename acc_t>
MK_HOST_DEVICE inline bool hff_second_max_wins(acc_t v1, int64_t i1, acc_t v2, int64_t i2) {
  const bool nan1 = v1 != v1, nan2 = v2 != v2;
  if (nan1 || nan2) return nan2 && (!nan1 || i2 < i1);
  return v2 > v1 || (v2 == v1 && i2 < i1);
}

// The 2 -> 1 channel k x k cross-correlation with zero padding k / 2 at pixel (h, w) of one image:
// `map` holds the image's two planes of H * W values, `weight` the 2 * k * k taps.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_conv_at(const acc_t* map, const acc_t* weight, int64_t H, int64_t W,
                                        int k, int64_t h, int64_t w) {
  const int r = k / 2;
  acc_t sum = acc_t(0);
  for (int c = 0; c < 2; ++c) {
    const acc_t* plane = map + c * H * W;
    const acc_t* taps = weight + c * k * k;
    for (int i = 0; i < k; ++i) {
      const int64_t hh = h + i - r;
      if (hh < 0 || hh >= H) continue;
      for (int j = 0; j < k; ++j) {
        const int64_t ww = w + j - r;
        if (ww < 0 || ww >= W) continue;
        sum += taps[i * k + j] * plane[hh * W + ww];
      }
    }
  }
  return sum;
}

// The adjoint of hff_conv_at for input plane c: d loss / d pooled[c] at (h, w) from dz (H * W values of one
// image): sum over taps (i, j) of weight[c, i, j] * dz[h - i + r, w - j + r].
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_conv_transpose_at(const acc_t* dz, const acc_t* weight, int64_t H, int64_t W,
                                                  int k, int c, int64_t h, int64_t w) {
  const int r = k / 2;
  const acc_t* taps = weight + c * k * k;
  acc_t sum = acc_t(0);
  for (int i = 0; i < k; ++i) {
    const int64_t hh = h - i + r;
    if (hh < 0 || hh >= H) continue;
    for (int j = 0; j < k; ++j) {
      const int64_t ww = w - j + r;
      if (ww < 0 || ww >= W) continue;
      sum += taps[i * k + j] * dz[hh * W + ww];
    }
  }
  return sum;
}

// Product of tap (c, i, j) for output pixel (h, w): pooled[c, h + i - r, w + j - r] (0 outside), the term
// of d loss / d weight[c, i, j] = sum over images and pixels of dz * this.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_conv_tap_input(const acc_t* map, int64_t H, int64_t W, int k, int c, int i,
                                               int j, int64_t h, int64_t w) {
  const int64_t hh = h + i - k / 2, ww = w + j - k / 2;
  return (hh < 0 || hh >= H || ww < 0 || ww >= W) ? acc_t(0) : map[c * H * W + hh * W + ww];
}

// BatchNorm of the map folded into y = z * scale + shift: scale = w / sqrt(var + eps), shift = b - mean * scale.
template <typename acc_t>
struct HffAffine {
  acc_t scale, shift, rstd;
};

template <typename acc_t>
MK_HOST_DEVICE inline HffAffine<acc_t> hff_bn_affine(acc_t mean, acc_t var, acc_t eps, acc_t weight,
                                                    acc_t bias) {
  const acc_t rstd = acc_t(1) / sqrt(var + eps);
  return {weight * rstd, bias - mean * weight * rstd, rstd};
}

// d loss / d z of the map's BatchNorm, from dy = d loss / d y at one pixel and zhat = (z - mean) * rstd.
// With batch statistics the mean and variance depend on z: sum_dy and sum_dy_zhat are the sums of dy and
// dy * zhat over the n = B * H * W pixels (they are also d loss / d bias and d loss / d weight).
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_bn_input_grad(acc_t dy, acc_t zhat, acc_t scale, bool batch_stats,
                                              acc_t sum_dy, acc_t sum_dy_zhat, acc_t inv_n) {
  return batch_stats ? scale * (dy - (sum_dy + zhat * sum_dy_zhat) * inv_n) : scale * dy;
}

// LayerNorm output of one channel value.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_ln_out(acc_t v, acc_t mu, acc_t rstd, acc_t weight, acc_t bias) {
  return (v - mu) * rstd * weight + bias;
}

// d loss / d v of the LayerNorm from dout of one channel: dxhat = dout * weight, and the per-pixel means
// over the channels mean_dxhat and mean_dxhat_xhat.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t hff_ln_input_grad(acc_t dxhat, acc_t xhat, acc_t rstd, acc_t mean_dxhat,
                                              acc_t mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

}  // namespace medkernels
