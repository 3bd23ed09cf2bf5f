// The SIMD level the CPU kernels may use. The kernels compiled for several instruction sets (the depthwise
// row kernels, the HFF tiles and channel MLP) each take the best one that both the CPU supports and this cap
// allows. The cap starts from $MEDKERNELS_CPU_ISA ("avx512", "avx2" or "baseline"; unset or empty: no cap)
// and set_cpu_isa_cap changes it for the calls that follow, so that one machine can run (and the tests check)
// every compiled variant.
#pragma once

#include <string>

namespace medkernels {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa cpu_isa_cap();
// name: "avx512", "avx2" or "baseline"; anything else raises a ValueError naming the choices.
void set_cpu_isa_cap(const std::string& name);
std::string cpu_isa_cap_name();

}  // namespace medkernels
