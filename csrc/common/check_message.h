// Argument-check macros whose messages are built without C++ streams.
//
// TORCH_CHECK_* format their messages through std::ostringstream. On one GPU machine's toolchain (gcc 13,
// torch 2.11, 2026-11) the extension carried its own copy of libstdc++'s stream code, and formatting any
// integer through it crashed the process (SIGSEGV in std::ostream::_M_insert<long>, seen with cuda-gdb), so
// a bad argument killed Python instead of raising. Here numbers go through std::to_string / snprintf (the C
// library) and the finished std::string is handed to the Torch macro, which passes a single string through
// unformatted.
#pragma once

#include <cstdio>
#include <string>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace medkernels {
namespace check_message {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
inline void put(std::string& s, c10::DeviceType v) { s += c10::DeviceTypeName(v, /*lower_case=*/true); }

template <typename T, std::enable_if_t<std::is_integral<T>::value && !std::is_same<T, bool>::value, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename T, std::enable_if_t<std::is_floating_point<T>::value, int> = 0>
inline void put(std::string& s, T v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s += buf;
}

inline void put(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}

template <typename... Args>
std::string text(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

}  // namespace check_message
}  // namespace medkernels

#define MK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::medkernels::check_message::text(__VA_ARGS__))
#define MK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::medkernels::check_message::text(__VA_ARGS__))
