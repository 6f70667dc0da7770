// What the CPU kernels that pick their code per CPU capability share: forced inlining and the target
// attributes of the AVX2 and AVX-512 copies of a loop (ATEN_CPU_CAPABILITY chooses among them at run time;
// at::vec compiles to its scalar fallback in an extension built without ATen's CPU_CAPABILITY macros).
#pragma once
#include <ATen/Version.h>

#include <cstdint>
#include <string>


#define KX_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define KX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace kxops::cpu {

enum Isa { kDefault, kAvx2, kAvx512 };

// ATen's own choice (cpuinfo, capped by ATEN_CPU_CAPABILITY), so that every path can be tested.
inline Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef KX_TARGET_AVX2
    const std::string c = at::get_cpu_capability();
    if (c == "AVX512") return kAvx512;
    if (c == "AVX2") return kAvx2;
#endif
    return kDefault;
  }();
  return isa;
}

}  // namespace kxops::cpu

// A row function `NAME(const ARGS<T, St>&, int64_t begin, int64_t end)` compiled once per capability
// (NAME##_default, NAME##_avx2, NAME##_avx512) and NAME##_pick<T, St>(): the copy for cpu_isa().
#ifdef KX_TARGET_AVX2
#define KX_CLONES(NAME, ARGS)                                                                             \
  template <typename T, typename St>                                                                      \
  void NAME##_default(const ARGS<T, St>& a, int64_t b, int64_t e) { NAME(a, b, e); }                      \
  template <typename T, typename St>                                                                      \
  KX_TARGET_AVX2 void NAME##_avx2(const ARGS<T, St>& a, int64_t b, int64_t e) { NAME(a, b, e); }          \
  template <typename T, typename St>                                                                      \
  KX_TARGET_AVX512 void NAME##_avx512(const ARGS<T, St>& a, int64_t b, int64_t e) { NAME(a, b, e); }      \
  template <typename T, typename St>                                                                      \
  auto NAME##_pick() {                                                                                    \
    const ::kxops::cpu::Isa isa = ::kxops::cpu::cpu_isa();                                                \
    return isa == ::kxops::cpu::kAvx512 ? &NAME##_avx512<T, St>                                           \
           : isa == ::kxops::cpu::kAvx2 ? &NAME##_avx2<T, St>                                             \
                                        : &NAME##_default<T, St>;                                         \
  }
#else
#define KX_CLONES(NAME, ARGS)                                                                             \
  template <typename T, typename St>                                                                      \
  void NAME##_default(const ARGS<T, St>& a, int64_t b, int64_t e) { NAME(a, b, e); }                      \
  template <typename T, typename St>                                                                      \
  auto NAME##_pick() { return &NAME##_default<T, St>; }
#endif
