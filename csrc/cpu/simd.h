// What the CPU kernels that pick their code per CPU capability share: forced inlining and the target
// attributes of the AVX2 and AVX-512 copies of a loop (ATEN_CPU_CAPABILITY chooses among them at run time;
// at::vec compiles to its scalar fallback in an extension built without ATen's CPU_CAPABILITY macros).
#pragma once

#define KX_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define KX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif
