// The CPU kernels' shared SIMD layer: the x86 dispatch guard, the target attributes of the ISA variants,
// the always-inline macro and (opt-in) the libmvec vector-math declarations. Which variant runs is decided
// only by cpu_use_avx512() / cpu_use_avx2() (common/cpu_isa.h: CPU support and the cpu_isa_cap() cap).
//
//   MK_CPU_X86_DISPATCH    defined where the kernels compile AVX2 / AVX-512 variants next to the baseline
//                          one (GCC on x86-64; MEDKERNELS_CPU_FORCE_GENERIC turns it off).
//   MK_CPU_TARGET_AVX2     AVX2 + FMA.
//   MK_CPU_TARGET_AVX512   AVX-512 F/VL/DQ/BW (what cpu_use_avx512() checks) + AVX2 + FMA, loops vectorised
//                          at 512 bits (the scan, the HFF channel MLP).
//   MK_CPU_TARGET_AVX512F  AVX-512F + AVX2 + FMA at the default (256-bit) loop width: the depthwise
//                          kernels, whose GCC vector types carry the 64-byte width while their `omp simd`
//                          loops keep the 256-bit summation order and libmvec variants.
//   MK_CPU_INLINE          inline, forced where the compiler allows it.
//
// libmvec. glibc declares the SIMD variants of expf / exp / ... (libmvec, glibc >= 2.22; log1p's and erf's
// since 2.35, which libm.so pulls in as needed) only under -ffast-math. A kernel file that wants its
// `#pragma omp simd` loops to call the vector versions (a few ulp, as the scalar ones) without fast-math
// semantics anywhere else defines MK_CPU_LIBMVEC before including this header: the declarations below then
// add the `simd` attribute to expf, exp, log1pf, log1p, erff and erf. `const` (as under -fno-math-errno:
// errno is never read here) lets the vectoriser also turn conditional calls (softplus) into vector calls
// and a blend. Files that do not opt in keep the scalar library calls. MEDKERNELS_CPU_NO_LIBMVEC turns the
// declarations off.

#ifndef MEDKERNELS_COMMON_CPU_SIMD_H_
#define MEDKERNELS_COMMON_CPU_SIMD_H_

#include <cmath>

#include "common/cpu_isa.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MEDKERNELS_CPU_FORCE_GENERIC)
#define MK_CPU_X86_DISPATCH 1
#define MK_CPU_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MK_CPU_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")))
#define MK_CPU_TARGET_AVX512F __attribute__((target("avx512f,avx2,fma")))
#endif

#if defined(__GNUC__)
#define MK_CPU_INLINE inline __attribute__((always_inline))
#else
#define MK_CPU_INLINE inline
#endif

#endif  // MEDKERNELS_COMMON_CPU_SIMD_H_

// Outside the include guard: a file that defines MK_CPU_LIBMVEC gets the declarations even when a header
// of its own included this one first.
#if defined(MK_CPU_LIBMVEC) && !defined(MK_CPU_LIBMVEC_DECLARED) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__x86_64__) && defined(__GLIBC__) && !defined(MEDKERNELS_CPU_NO_LIBMVEC)
#define MK_CPU_LIBMVEC_DECLARED 1
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch"), const));
extern "C" double exp(double) noexcept __attribute__((simd("notinbranch"), const));
#if __GLIBC_PREREQ(2, 35)
extern "C" float log1pf(float) noexcept __attribute__((simd("notinbranch"), const));
extern "C" double log1p(double) noexcept __attribute__((simd("notinbranch"), const));
extern "C" float erff(float) noexcept __attribute__((simd("notinbranch"), const));
extern "C" double erf(double) noexcept __attribute__((simd("notinbranch"), const));
#endif
#endif
