// Python bindings of medkernels._C.

#include <string>

#include <torch/extension.h>

#include "common/cpu_isa.h"
#include "ops.h"

// Compile-time facts passed by setup.py; defaults keep a hand-made build working.
#ifndef MEDKERNELS_CXX_FLAGS
#define MEDKERNELS_CXX_FLAGS ""
#endif
#ifndef MEDKERNELS_CUDA_ARCH_LIST
#define MEDKERNELS_CUDA_ARCH_LIST ""
#endif
#ifndef MEDKERNELS_TORCH_VERSION
#define MEDKERNELS_TORCH_VERSION ""
#endif

namespace {

// The kernels do not touch Python objects: let other Python threads run.
using ReleaseGil = pybind11::call_guard<pybind11::gil_scoped_release>;

std::string compiler_description() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return std::string("msvc ") + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef MEDKERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = medkernels::cuda_runtime_version_at_build();
  info["cuda_arch_list"] = std::string(MEDKERNELS_CUDA_ARCH_LIST);
#else
  info["cuda"] = false;
  info["cuda_version"] = std::string();
  info["cuda_arch_list"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = compiler_description();
  info["cxx_flags"] = std::string(MEDKERNELS_CXX_FLAGS);
  info["torch_version_at_build"] = std::string(MEDKERNELS_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "medkernels compiled kernels (C++ CPU kernels, and CUDA kernels when built with CUDA)";

  m.def("cross_scan_cpu", &medkernels::cross_scan_cpu, pybind11::arg("x"), ReleaseGil(),
        "cross_scan on CPU: contiguous x (B, C, H, W) -> y (B, 4, C, H*W) in MedMamba's four "
        "scan orders (row-major, column-major and both reversed).");
  m.def("cross_merge_cpu", &medkernels::cross_merge_cpu, pybind11::arg("y"), ReleaseGil(),
        "cross_merge on CPU: contiguous y (B, 4, C, H, W) -> x (B, C, H*W), the sum over the "
        "four scan directions mapped back to pixel order (the adjoint of cross_scan).");
  m.def("cross_scan_indices", &medkernels::cross_scan_indices, pybind11::arg("H"),
        pybind11::arg("W"),
        "The cross-scan index tables for an H x W image, as int64 tensors (pixel, position) of "
        "shape (4, H*W): pixel[k, i] is the pixel read at position i of direction k, "
        "position[k, p] the position at which direction k visits pixel p (the formulas of "
        "csrc/cross_scan.h that the CPU and CUDA kernels share).");
  m.def("selective_scan_fwd_cpu", &medkernels::selective_scan_fwd_cpu, ReleaseGil(),
        "Selective scan forward on CPU (see csrc/ops.h): -> [out, last_state].");
  m.def("selective_scan_bwd_cpu", &medkernels::selective_scan_bwd_cpu, ReleaseGil(),
        "Selective scan backward on CPU: -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias].");
  m.def("ss2d_scan_fwd_cpu", &medkernels::ss2d_scan_fwd_cpu, ReleaseGil(),
        "Fused four-direction SS2D scan forward on CPU: -> [out].");
  m.def("ss2d_scan_bwd_cpu", &medkernels::ss2d_scan_bwd_cpu, ReleaseGil(),
        "Fused SS2D scan backward on CPU: -> [du, ddelta, dA, dB, dC, dD, ddelta_bias].");
  m.def("set_cpu_isa_cap", &medkernels::set_cpu_isa_cap,
        "Cap the SIMD level of the CPU kernels for the calls that follow: 'avx512', 'avx2' or 'baseline' "
        "(initially $MEDKERNELS_CPU_ISA, else no cap); each kernel uses the best level the CPU has within it.");
  m.def("cpu_isa_cap", &medkernels::cpu_isa_cap_name, "The SIMD cap of the CPU kernels (see set_cpu_isa_cap).");
  // ---- depthwise convolution ----
  m.def("depthwise_conv2d_fwd_cpu", &medkernels::depthwise_conv2d_fwd_cpu, ReleaseGil(),
        "Depthwise conv2d + bias + activation on CPU (see csrc/ops.h): "
        "(x, weight, bias, stride, padding, activation, channels_last) -> out.");
  m.def("depthwise_conv2d_bwd_cpu", &medkernels::depthwise_conv2d_bwd_cpu, ReleaseGil(),
        "Backward of depthwise_conv2d_fwd_cpu: (grad, x, weight, bias, stride, padding, activation) "
        "-> [dx, dweight, dbias].");
  m.def("depthwise_conv2d_fwd_save_cpu", &medkernels::depthwise_conv2d_fwd_save_cpu, ReleaseGil(),
        "depthwise_conv2d_fwd_cpu that also returns act'(z) for depthwise_conv2d_bwd_saved_cpu (see csrc/ops.h): "
        "(x, weight, bias, stride, padding, activation, channels_last) -> [out, dact] (dact empty when the case "
        "does not allow saving).");
  m.def("depthwise_conv2d_bwd_saved_cpu", &medkernels::depthwise_conv2d_bwd_saved_cpu, ReleaseGil(),
        "Backward from a saved act'(z): (grad, x, weight, bias, dact, stride, padding) -> [dx, dweight, dbias]; "
        "dx is written over dact.");
  m.def("depthwise_conv2d_layernorm_fwd_cpu", &medkernels::depthwise_conv2d_layernorm_fwd_cpu, ReleaseGil(),
        "Depthwise conv2d + bias, then LayerNorm over channels, channels-last out (B, Ho, Wo, C), on CPU: "
        "(x, weight, bias, ln_weight, ln_bias, stride, padding, eps) -> out.");
  m.def("depthwise_conv2d_layernorm_bwd_cpu", &medkernels::depthwise_conv2d_layernorm_bwd_cpu, ReleaseGil(),
        "Backward of depthwise_conv2d_layernorm_fwd_cpu: (grad, x, weight, bias, ln_weight, ln_bias, stride, "
        "padding, eps) -> [dx, dweight, dbias, dln_weight, dln_bias].");
  // ---- end depthwise convolution ----
  m.def("hff_spatial_gate_fwd_cpu", &medkernels::hff_spatial_gate_fwd_cpu, ReleaseGil(),
        "HFF spatial gate (or x * gate) forward on CPU (see csrc/ops.h): -> [y, batch_mean, batch_var, "
        "pooled, argmax].");
  m.def("hff_spatial_gate_bwd_cpu", &medkernels::hff_spatial_gate_bwd_cpu, ReleaseGil(),
        "HFF spatial gate backward on CPU (dx added into dx_accumulate when given): -> [dx, dconv_weight, "
        "dbn_weight, dbn_bias].");
  m.def("hff_channel_gate_fwd_cpu", &medkernels::hff_channel_gate_fwd_cpu, ReleaseGil(),
        "HFF channel gate (or x * gate) forward on CPU: -> [y, pooled, argmax].");
  m.def("hff_channel_gate_bwd_cpu", &medkernels::hff_channel_gate_bwd_cpu, ReleaseGil(),
        "HFF channel gate backward on CPU (dx added into dx_accumulate when given): -> [dx, dfc1_weight, "
        "dfc2_weight].");
  m.def("hff_fused_tail_fwd_cpu", &medkernels::hff_fused_tail_fwd_cpu, ReleaseGil(),
        "HFF fusion tail (gates, concatenation, channels-first LayerNorm) forward on CPU: -> [out, mean, rstd].");
  m.def("hff_fused_tail_bwd_cpu", &medkernels::hff_fused_tail_bwd_cpu, ReleaseGil(),
        "HFF fusion tail backward on CPU: -> [dl, dg, dx_f, dspatial_gate, dchannel_gate, dln_weight, dln_bias].");
  m.def("winograd_input_transform_cpu", &medkernels::winograd_input_transform_cpu, pybind11::arg("x"),
        pybind11::arg("t0"), pybind11::arg("t1"), pybind11::arg("out"), ReleaseGil(),
        "Winograd F(4x4, 3x3) input transform on CPU: channels-last x (B, H, W, C) into out (36, t1 - t0, C) for "
        "the tiles [t0, t1) (csrc/ops.h).");
  m.def("winograd_grad_output_transform_cpu", &medkernels::winograd_grad_output_transform_cpu, pybind11::arg("dy"),
        pybind11::arg("t0"), pybind11::arg("t1"), pybind11::arg("out"), ReleaseGil(),
        "Winograd F(4x4, 3x3) output-gradient transform on CPU: dy (B, H, W, C) into out (36, t1 - t0, C).");
  m.def("winograd_output_transform_cpu", &medkernels::winograd_output_transform_cpu, pybind11::arg("m"),
        pybind11::arg("y"), pybind11::arg("t0"), pybind11::arg("c0"), ReleaseGil(),
        "Winograd F(4x4, 3x3) output transform on CPU: the 36 tile products m[e] (tiles, Cc) into y[..., c0:c0+Cc].");
  m.def("winograd_filter_transform_cpu", &medkernels::winograd_filter_transform_cpu, pybind11::arg("w"),
        pybind11::arg("flip_transpose"), pybind11::arg("r0"), pybind11::arg("r1"), pybind11::arg("out"), ReleaseGil(),
        "Winograd F(4x4, 3x3) filter transform on CPU: w (out, in, 3, 3) into out (36, r1 - r0, in), or flipped "
        "and transposed into out (36, r1 - r0, out).");
  m.def("winograd_filter_grad_transform_cpu", &medkernels::winograd_filter_grad_transform_cpu, pybind11::arg("m"),
        pybind11::arg("dw"), pybind11::arg("o0"), ReleaseGil(),
        "Winograd F(4x4, 3x3) filter-gradient transform on CPU: m (36, Cc, in) into dw[o0:o0+Cc] (out, in, 3, 3).");
#ifdef MEDKERNELS_WITH_CUDA
  m.def("selective_scan_fwd_cuda", &medkernels::selective_scan_fwd_cuda, ReleaseGil(),
        "Selective scan forward on CUDA: -> [out, last_state].");
  m.def("selective_scan_bwd_cuda", &medkernels::selective_scan_bwd_cuda, ReleaseGil(),
        "Selective scan backward on CUDA: -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias].");
  m.def("ss2d_scan_fwd_cuda", &medkernels::ss2d_scan_fwd_cuda, ReleaseGil(),
        "Fused four-direction SS2D scan forward on CUDA: -> [out].");
  m.def("ss2d_scan_bwd_cuda", &medkernels::ss2d_scan_bwd_cuda, ReleaseGil(),
        "Fused SS2D scan backward on CUDA: -> [du, ddelta, dA, dB, dC, dD, ddelta_bias].");
  m.def("cross_scan_cuda", &medkernels::cross_scan_cuda, pybind11::arg("x"), ReleaseGil(),
        "cross_scan on CUDA: contiguous x (B, C, H, W) -> y (B, 4, C, H*W).");
  m.def("cross_merge_cuda", &medkernels::cross_merge_cuda, pybind11::arg("y"), ReleaseGil(),
        "cross_merge on CUDA: contiguous y (B, 4, C, H, W) -> x (B, C, H*W).");
  // ---- depthwise convolution ----
  m.def("depthwise_conv2d_fwd_cuda", &medkernels::depthwise_conv2d_fwd_cuda, ReleaseGil(),
        "Depthwise conv2d + bias + activation on CUDA: -> out.");
  m.def("depthwise_conv2d_bwd_cuda", &medkernels::depthwise_conv2d_bwd_cuda, ReleaseGil(),
        "Backward of depthwise_conv2d_fwd_cuda: -> [dx, dweight, dbias].");
  m.def("depthwise_conv2d_layernorm_fwd_cuda", &medkernels::depthwise_conv2d_layernorm_fwd_cuda, ReleaseGil(),
        "Depthwise conv2d + bias + LayerNorm over channels on CUDA: -> out (B, Ho, Wo, C).");
  m.def("depthwise_conv2d_layernorm_bwd_cuda", &medkernels::depthwise_conv2d_layernorm_bwd_cuda, ReleaseGil(),
        "Backward of depthwise_conv2d_layernorm_fwd_cuda: -> [dx, dweight, dbias, dln_weight, dln_bias].");
  // ---- end depthwise convolution ----
  m.def("hff_spatial_gate_fwd_cuda", &medkernels::hff_spatial_gate_fwd_cuda, ReleaseGil(),
        "HFF spatial gate (or x * gate) forward on CUDA: -> [y, batch_mean, batch_var, pooled, argmax].");
  m.def("hff_spatial_gate_bwd_cuda", &medkernels::hff_spatial_gate_bwd_cuda, ReleaseGil(),
        "HFF spatial gate backward on CUDA: -> [dx, dconv_weight, dbn_weight, dbn_bias].");
  m.def("hff_channel_gate_fwd_cuda", &medkernels::hff_channel_gate_fwd_cuda, ReleaseGil(),
        "HFF channel gate (or x * gate) forward on CUDA: -> [y, pooled, argmax].");
  m.def("hff_channel_gate_bwd_cuda", &medkernels::hff_channel_gate_bwd_cuda, ReleaseGil(),
        "HFF channel gate backward on CUDA: -> [dx, dfc1_weight, dfc2_weight].");
  m.def("hff_fused_tail_fwd_cuda", &medkernels::hff_fused_tail_fwd_cuda, ReleaseGil(),
        "HFF fusion tail forward on CUDA: -> [out, mean, rstd].");
  m.def("hff_fused_tail_bwd_cuda", &medkernels::hff_fused_tail_bwd_cuda, ReleaseGil(),
        "HFF fusion tail backward on CUDA: -> [dl, dg, dx_f, dspatial_gate, dchannel_gate, dln_weight, dln_bias].");
#endif
  m.def("build_info", &build_info,
        "How this extension was built: a dict with keys cuda, cuda_version, cuda_arch_list, "
        "openmp, compiler, cxx_flags and torch_version_at_build.");
}
