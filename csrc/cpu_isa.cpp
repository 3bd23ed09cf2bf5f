#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include "check_message.h"

namespace medkernels {
namespace {

const char* const kNames[] = {"baseline", "avx2", "avx512"};

bool parse(const std::string& name, CpuIsa& out) {
  for (int i = 0; i < 3; ++i) {
    if (name == kNames[i]) {
      out = static_cast<CpuIsa>(i);
      return true;
    }
  }
  return false;
}

std::atomic<int>& cap() {
  static std::atomic<int> value([] {
    const char* env = std::getenv("MEDKERNELS_CPU_ISA");
    CpuIsa isa = CpuIsa::kAvx512;
    if (env != nullptr && *env != '\0') {
      MK_CHECK_VALUE(parse(env, isa), "MEDKERNELS_CPU_ISA must be 'avx512', 'avx2' or 'baseline', got '", env,
                     "'");
    }
    return static_cast<int>(isa);
  }());
  return value;
}

}  // namespace

CpuIsa cpu_isa_cap() {
  return static_cast<CpuIsa>(cap().load(std::memory_order_relaxed));
}

void set_cpu_isa_cap(const std::string& name) {
  CpuIsa isa;
  MK_CHECK_VALUE(parse(name, isa), "set_cpu_isa_cap: expected 'avx512', 'avx2' or 'baseline', got '", name, "'");
  cap().store(static_cast<int>(isa), std::memory_order_relaxed);
}

std::string cpu_isa_cap_name() {
  return kNames[static_cast<int>(cpu_isa_cap())];
}

}  // namespace medkernels
