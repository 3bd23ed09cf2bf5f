#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include "common/check_message.h"

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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool cpu_use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return has && cpu_isa_cap() >= CpuIsa::kAvx512;
}

bool cpu_use_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has && cpu_isa_cap() >= CpuIsa::kAvx2;
}
#else
bool cpu_use_avx512() { return false; }
bool cpu_use_avx2() { return false; }
#endif

}  // namespace medkernels
