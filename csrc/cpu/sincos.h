// Vectorisable cos/sin tables of rotary angles, shared by the CPU kernels (rope_cpu.cpp,
// linear_attention_cpu.cpp). Static and always inlined: every caller, AVX2 and AVX-512 clones
// included, gets it vectorised for its own target, and rope_cpu.cpp compiles to the same code as
// when the table lived there.
#pragma once
#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>

#if defined(__GNUC__)
#define KX_SINCOS_INLINE inline __attribute__((always_inline))
#else
#define KX_SINCOS_INLINE inline
#endif

namespace kxops::cpu {

// c[i] = cos(theta[i]), s[i] = sin(theta[i]) (negated when conjugate).
// float: evaluated in double (Cody-Waite reduction by pi/2 with fdlibm's 33 + 53-bit split of pi/2,
// fdlibm's kernel polynomials, k_sin.c / k_cos.c: "Copyright (C) 1993 by Sun Microsystems, Inc. All
// rights reserved. Developed at SunPro, a Sun Microsystems, Inc. business. Permission to use, copy,
// modify, and distribute this software is freely granted, provided that this notice is preserved.") and rounded once to float: within 0.5 ulp + ~2^-30 ulp of the exact
// value (glibc's sinf/cosf: 0.56 ulp) in a loop that vectorises, unlike calls to sincosf.
// |theta| > 1e6 (where k * kPio2Hi stops being exact), inf and NaN are redone with std::cos/sin.
static KX_SINCOS_INLINE void sincos_table(const float* theta, float* c, float* s, int64_t n, bool conjugate) {
  constexpr double kInvPio2 = 6.36619772367581382433e-01;
  constexpr double kPio2Hi = 1.57079632673412561417e+00;  // first 33 bits of pi/2
  constexpr double kPio2Lo = 6.07710050650619224932e-11;  // pi/2 - kPio2Hi
  constexpr double kShift = 0x1.8p52;                     // y + kShift - kShift: y rounded to an integer
  constexpr double S1 = -1.66666666666666324348e-01, S2 = 8.33333333332248946124e-03,
                   S3 = -1.98412698298579493134e-04, S4 = 2.75573137070700676789e-06,
                   S5 = -2.50507602534068634195e-08, S6 = 1.58969099521155010221e-10;
  constexpr double C1 = 4.16666666666666019037e-02, C2 = -1.38888888888741095749e-03,
                   C3 = 2.48015872894767294178e-05, C4 = -2.75573143513906633035e-07,
                   C5 = 2.08757232129817482790e-09, C6 = -1.13596475577881948265e-11;
  // Quadrant fix-ups as bit operations: GCC does not if-convert the equivalent selects.
  const uint64_t conj_bit = conjugate ? (uint64_t{1} << 63) : 0;
  int wide = 0;
#pragma omp simd reduction(| : wide)
  for (int64_t i = 0; i < n; ++i) {
    const double x = theta[i];
    wide |= static_cast<int>(!(std::fabs(x) <= 1e6));
    const double kk = x * kInvPio2 + kShift;
    const double k = kk - kShift;
    const uint64_t q = c10::bit_cast<uint64_t>(kk);  // low bits: k mod 4
    const double r = (x - k * kPio2Hi) - k * kPio2Lo;  // the first difference is exact
    const double z = r * r;
    const double sr = r + r * z * (S1 + z * (S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))));
    const double cr = 1.0 - (0.5 * z - z * z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6))))));
    // theta = k pi/2 + r: odd k swaps sin and cos; bit 1 of k (of k + 1) flips the sign of sin (cos)
    const uint64_t odd = uint64_t{0} - (q & 1);
    const uint64_t bs = c10::bit_cast<uint64_t>(sr), bc = c10::bit_cast<uint64_t>(cr);
    const uint64_t sv = ((bc & odd) | (bs & ~odd)) ^ ((q & 2) << 62) ^ conj_bit;
    const uint64_t cv = ((bs & odd) | (bc & ~odd)) ^ (((q + 1) & 2) << 62);
    c[i] = static_cast<float>(c10::bit_cast<double>(cv));
    s[i] = static_cast<float>(c10::bit_cast<double>(sv));
  }
  if (wide) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::fabs(theta[i]) <= 1e6f) continue;
      c[i] = std::cos(theta[i]);
      s[i] = conjugate ? -std::sin(theta[i]) : std::sin(theta[i]);
    }
  }
}

static KX_SINCOS_INLINE void sincos_table(const double* theta, double* c, double* s, int64_t n, bool conjugate) {
  for (int64_t i = 0; i < n; ++i) {
    c[i] = std::cos(theta[i]);
    s[i] = conjugate ? -std::sin(theta[i]) : std::sin(theta[i]);
  }
}

}  // namespace kxops::cpu
