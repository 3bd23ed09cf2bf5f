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

// Whether a CPU kernel may run its AVX-512 (F, VL, DQ, BW) or its AVX2 + FMA variant now: this CPU has the
// instructions and the cap allows them. Every CPU kernel with per-ISA variants dispatches through these two.
bool cpu_use_avx512();
bool cpu_use_avx2();

}  // namespace medkernels
