// Gumbel / perturb-max softmaxes on CPU: kxops::gumbel_softmax, gumbel_softmax_backward, gumbel_max,
// perturb_max and perturb_max_backward. Semantics, the random bits and the formulas (the same on every
// backend): docs/gumbel_softmax_kernel_contract.md; reference: pyext/reference/gumbel_softmax.py.
//
// Work items are rows (at::parallel_for, several short rows per task), each in a few passes over per-task
// scratch rows that stay in L2 (32768 entries: 128 KB of v, 256 KB of exponentials):
//   noise    one Philox4x32-10 block per 4 entries (counter r * ceil(N/4) + i/4), g = -log(-log u) into v
//   v        v = x + g and its max
//   exp      e = exp((v - m) / tau) (kept in double), their sum, and the first i with v == m (the index)
//   out      y (or soft) = e / sum, rounded once; hard: y = the exact one-hot of the index
// gumbel_max stops after v (plus a vectorised first-max scan). The backward is two passes (sum dy y, dx).
//
// Arithmetic: the state type (float for fp16 / bf16 / fp32, double for fp64) where the contract fixes the
// bits: u (exact), t = -log u and g = -log t each rounded to the state type, v = x + g, m and v - m, so
// that v, and hence the index, are the reference's wherever our g is. Beyond that everything is double
// and rounded once at the end: (v - m) / tau, exp, the sums, e / sum, dx.
//
// Vectorisation: Philox and the float path's logs and exponentials are written to vectorise under
// `#pragma omp simd` (calls to std::log / std::exp do not vectorise without -ffast-math, and the noise
// costs two logs per entry): Philox in 64-bit lanes (bit-identical to at::philox_engine: checked over
// carries of the 64-bit counter and random keys), log by fdlibm's e_log.c and exp by a Taylor polynomial,
// both in double (see log_pos / exp_nonpos: errors far below float's rounding). So the float t and g are
// the correctly rounded ones (checked on all 2^23 uniforms, every clone); torch's float32 log (the
// reference's; SLEEF, 1 ulp) is not on 0.1% of them, where g differs from the reference's by an ulp: the
// index can then differ only if the top two v are within that ulp (not seen in the tests). Every kernel is
// compiled for baseline x86-64, AVX2+FMA and AVX-512 and picked as ATen picks its own kernels
// (ATEN_CPU_CAPABILITY), as sparse_softmax_cpu.cpp does; the FMA clones may contract the polynomials,
// which moves the double results by an ulp at most, below what the rounding to float can see but for
// double-rounding ties (none among the 2^23 uniforms). The float64 path uses std::log / std::exp (scalar,
// correctly rounded in practice; fp64 is not the fast path).
//
// Perturb-max is float64 throughout, O(K N^2) per row: log Phi and its derivative by the contract's table
// written branch-free (Cephes' erf / erfc rationals, log_pos, exp_hl) and vectorised over the nodes k;
// L within ~1.5e-15 relative of log Phi for -37.5 < d <= 38 (normal results), r within ~1.5e-15. The
// backward evaluates L and r in one pass (rows up to kFusedMax finite entries). Rows among threads, or, for
// fewer than 2 rows per thread, each row's i among threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>  // the engine philox_block reproduces
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace kxops {
namespace {

using at::Tensor;
using c10::bit_cast;
using cpu::Isa;
using cpu::cpu_isa;
using cpu::kAvx2;
using cpu::kAvx512;
using cpu::kDefault;
using std::optional;

template <typename T>
using state_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- Philox4x32-10 ----------------------------------------------------------------------------------

// The block of counter (c_lo, c_hi, 0, 0) under key (k0, k1): at::philox_engine(key, 0, c)'s four words.
// Written out (rather than calling the engine) so that a loop over blocks vectorises: the engine keeps
// its state in arrays and branches on it. The 32-bit words live in 64-bit lanes, so that every 32 x 32 ->
// 64-bit product is one vpmuludq and the lanes match the double lanes of the logs that follow (25% faster
// than 32-bit lanes, which need the products of odd lanes shuffled). Rounds unrolled; the Weyl key bumps
// fold into constants. The constants are the engine's (private there) and Random123's.
KX_INLINE void philox_block(uint32_t k0, uint32_t k1, uint64_t c, uint32_t& o0, uint32_t& o1, uint32_t& o2,
                            uint32_t& o3) {
  constexpr uint64_t kSA = 0xD2511F53, kSB = 0xCD9E8D57;  // multipliers
  constexpr uint64_t kKA = 0x9E3779B9, kKB = 0xBB67AE85;  // Weyl key bumps
  constexpr uint64_t kLo = 0xFFFFFFFF;
  uint64_t x0 = c & kLo, x1 = c >> 32, x2 = 0, x3 = 0;
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = kSA * x0, p1 = kSB * x2;  // x0, x2 < 2^32: exact
    const uint64_t y0 = (p1 >> 32) ^ x1 ^ ((k0 + r * kKA) & kLo);
    const uint64_t y2 = (p0 >> 32) ^ x3 ^ ((k1 + r * kKB) & kLo);
    x0 = y0, x1 = p1 & kLo, x2 = y2, x3 = p0 & kLo;
  }
  o0 = static_cast<uint32_t>(x0), o1 = static_cast<uint32_t>(x1), o2 = static_cast<uint32_t>(x2),
  o3 = static_cast<uint32_t>(x3);
}

// ---- vectorisable log / exp in double ---------------------------------------------------------------

// log a for a positive normal double: fdlibm's e_log.c ("Copyright (C) 1993 by Sun Microsystems, Inc. All
// rights reserved. Developed at SunPro, a Sun Microsystems, Inc. business. Permission to use, copy,
// modify, and distribute this software is freely granted, provided that this notice is preserved."):
// a = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f), log(1 + f) = f - f^2/2 + s (f^2/2
// + R(s^2)) with its minimax R (error < 2^-58.45). Under 1 double ulp: the float t and g rounded from it
// are correctly rounded but for double-rounding ties (measured: equal to the correctly rounded float
// log on all 2^23 uniforms). The selects of fdlibm's special cases (0, subnormals, inf, NaN) are left
// out: every argument here is a float uniform in [2^-24, 1) or a float t = -log u in [2^-24, 17).
KX_INLINE double log_pos(double a) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  constexpr double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01, Lg3 = 2.857142874366239149e-01,
                   Lg4 = 2.222219843214978396e-01, Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01,
                   Lg7 = 1.479819860511658591e-01;
  constexpr uint64_t kSqrtHalf = 0x3FE6A09E667F3BCDull;  // the bits of sqrt(1/2)
  const uint64_t b = bit_cast<uint64_t>(a);
  const int64_t k = static_cast<int64_t>(b - kSqrtHalf) >> 52;  // m = a 2^-k in [sqrt(1/2), sqrt(2))
  const double f = bit_cast<double>(b - (static_cast<uint64_t>(k) << 52)) - 1.0;
  const double s = f / (2.0 + f), z = s * s, w = z * z;
  const double R = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7))) + w * (Lg2 + w * (Lg4 + w * Lg6));
  const double hfsq = 0.5 * f * f, dk = static_cast<double>(k);
  return dk * kLn2Hi - ((hfsq - (s * (hfsq + R) + dk * kLn2Lo)) - f);
}

// exp x for x <= 0 (-inf included: 0): 2^k times the degree-11 Taylor polynomial of exp r, r = x - k ln2
// (Cody-Waite, |r| <= ln2/2): relative error < 1e-14. x < -708 gives 0 (exp is below 2^-1021 there, and
// every use divides by a sum >= 1 and rounds to at most float, or is the float64 path, which does not
// come here). The selects are bit masks: GCC vectorises them where it keeps some ternaries as branches.
KX_INLINE double exp_nonpos(double x) {
  constexpr double kLog2e = 1.4426950408889634074, kLn2Hi = 6.93147180369123816490e-01,
                   kLn2Lo = 1.90821492927058770002e-10, kShift = 0x1.8p52;
  const bool on = x >= -708.0;
  const double xc = on ? x : -708.0;
  const double kk = xc * kLog2e + kShift;  // k = round(x / ln2) in the low bits
  const double k = kk - kShift;
  const double r = (xc - k * kLn2Hi) - k * kLn2Lo;
  const double p =
      1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 +
      r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800 + r * (1.0 / 39916800)))))))))));
  const uint64_t ki = bit_cast<uint64_t>(kk) - bit_cast<uint64_t>(kShift);  // k in two's complement, >= -1022
  const uint64_t e = bit_cast<uint64_t>(p * bit_cast<double>((ki + 1023) << 52));
  return bit_cast<double>(e & (uint64_t{0} - static_cast<uint64_t>(on)));
}

// ---- the noise --------------------------------------------------------------------------------------

// g = -log(-log u) of word w, u = (2 (w >> 9) + 1) 2^-24 (exact in float), each log rounded to St as the
// reference's torch.log is
template <typename St>
KX_INLINE St gumbel_of(uint32_t w) {
  const int32_t odd = static_cast<int32_t>(w >> 9) * 2 + 1;  // < 2^24: exact in float; signed converts faster
  if constexpr (std::is_same_v<St, float>) {
    const float u = static_cast<float>(odd) * 0x1p-24f;
    const float t = static_cast<float>(-log_pos(static_cast<double>(u)));
    return static_cast<float>(-log_pos(static_cast<double>(t)));
  } else {
    const double u = static_cast<double>(odd) * 0x1p-24;
    return -std::log(-std::log(u));
  }
}

// g of entries [0, 4 nb) of the row whose first block has counter c0 (the tail of the last block is
// computed and not used: buffers hold 4 ceil(N / 4) entries)
template <typename St>
KX_INLINE void noise_row(uint32_t k0, uint32_t k1, uint64_t c0, int64_t nb, St* g) {
#pragma omp simd
  for (int64_t j = 0; j < nb; ++j) {
    uint32_t w0, w1, w2, w3;
    philox_block(k0, k1, c0 + static_cast<uint64_t>(j), w0, w1, w2, w3);
    g[4 * j] = gumbel_of<St>(w0);
    g[4 * j + 1] = gumbel_of<St>(w1);
    g[4 * j + 2] = gumbel_of<St>(w2);
    g[4 * j + 3] = gumbel_of<St>(w3);
  }
}

template <typename T, typename St>
KX_INLINE St load(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bit_cast<float>(static_cast<uint32_t>(v.x) << 16);  // exact, and a shift that vectorises
  } else {
    return static_cast<St>(v);
  }
}

// v = x + g (g = 0 without noise) into v (holding g on entry), returning max v. Noise in chunks of
// kChunk entries, each added to x while it is still in L1.
constexpr int64_t kChunk = 1024;  // a multiple of 4

template <typename T, typename St>
KX_INLINE St v_row(const T* x, int64_t n, bool noise, uint32_t k0, uint32_t k1, uint64_t c0, St* v) {
  St m = -std::numeric_limits<St>::infinity();
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    if (noise) {
      noise_row(k0, k1, c0 + static_cast<uint64_t>(i0 / 4), (i1 - i0 + 3) / 4, v + i0);
#pragma omp simd reduction(max : m)
      for (int64_t i = i0; i < i1; ++i) {
        const St vi = load<T, St>(x[i]) + v[i];
        v[i] = vi;
        m = vi > m ? vi : m;
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t i = i0; i < i1; ++i) {
        const St vi = load<T, St>(x[i]);
        v[i] = vi;
        m = vi > m ? vi : m;
      }
    }
  }
  return m;
}

// the lowest i with v_i == m (m finite: v_i - m == 0 exactly when v_i == m), a min-reduction that vectorises
template <typename St>
KX_INLINE int64_t first_max(const St* v, int64_t n, St m) {
  int64_t first = n;
#pragma omp simd reduction(min : first)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = v[i] == m ? i : n;
    first = c < first ? c : first;
  }
  return first;
}

// ---- op 1 / op 3: forward rows ----------------------------------------------------------------------

template <typename T, typename St>
struct FwdArgs {
  const T* x;
  T* y;
  T* soft;         // hard only
  int64_t* index;  // (R,)
  int64_t N;
  uint32_t k0, k1;
  bool noise, hard, index_only;  // index_only: gumbel_max
  double tau;
};

template <typename T>
KX_INLINE void fill_row(T* dst, int64_t n, T v) {
  std::fill(dst, dst + n, v);
}

template <typename T, typename St>
KX_INLINE void fwd_rows(const FwdArgs<T, St>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N, G = (N + 3) / 4;
  std::vector<St> vbuf(4 * G);
  std::vector<double> ebuf(a.index_only ? 0 : N);
  St* v = vbuf.data();
  double* e = ebuf.data();
  const double inv_tau = 1.0 / a.tau;
  for (int64_t r = begin; r < end; ++r) {
    const St m = v_row(a.x + r * N, N, a.noise, a.k0, a.k1, static_cast<uint64_t>(r) * static_cast<uint64_t>(G), v);
    if (a.index_only) {
      a.index[r] = m == -std::numeric_limits<St>::infinity() ? -1 : first_max(v, N, m);
      continue;
    }
    T* y = a.y + r * N;
    T* soft = a.hard ? a.soft + r * N : nullptr;
    if (m == -std::numeric_limits<St>::infinity()) {  // all -inf: y = soft = 0, index -1
      a.index[r] = -1;
      fill_row(y, N, T(0));
      if (soft) fill_row(soft, N, T(0));
      continue;
    }
    // e = exp((v - m) / tau): v - m in St as the reference forms it, the rest in double (-inf: e = 0)
    double S = 0;
    int64_t first = N;
    if constexpr (std::is_same_v<St, float>) {
#pragma omp simd reduction(+ : S) reduction(min : first)
      for (int64_t i = 0; i < N; ++i) {
        const float d = v[i] - m;
        const double ei = exp_nonpos(static_cast<double>(d) * inv_tau);
        e[i] = ei;
        S += ei;
        const int64_t c = d == 0.0f ? i : N;
        first = c < first ? c : first;
      }
    } else {
      for (int64_t i = 0; i < N; ++i) {
        const double d = v[i] - m;
        const double ei = std::exp(d / a.tau);
        e[i] = ei;
        S += ei;
        first = d == 0.0 && i < first ? i : first;
      }
    }
    a.index[r] = first;
    const double inv = 1.0 / S;  // S >= 1: the max entry contributes exp(0)
    T* out = soft ? soft : y;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) out[i] = static_cast<T>(static_cast<St>(e[i] * inv));
    if (soft) {
      fill_row(y, N, T(0));
      y[first] = T(1);
    }
  }
}

// ---- op 2: backward rows ----------------------------------------------------------------------------

template <typename T, typename St>
struct BwdArgs {
  const T* dy;
  const T* y;
  T* dx;
  int64_t N;
  double tau;
};

// dx = y (dy - sum dy y) / tau: the sum and every dx in double, rounded once
template <typename T, typename St>
KX_INLINE void bwd_rows(const BwdArgs<T, St>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  const double inv_tau = 1.0 / a.tau;
  for (int64_t r = begin; r < end; ++r) {
    const T* dy = a.dy + r * N;
    const T* y = a.y + r * N;
    T* dx = a.dx + r * N;
    double S = 0;
#pragma omp simd reduction(+ : S)
    for (int64_t i = 0; i < N; ++i)
      S += static_cast<double>(load<T, St>(dy[i])) * static_cast<double>(load<T, St>(y[i]));
    if constexpr (std::is_same_v<St, float>) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        const double yi = load<T, St>(y[i]), gi = load<T, St>(dy[i]);
        dx[i] = static_cast<T>(static_cast<float>(yi * (gi - S) * inv_tau));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) dx[i] = static_cast<T>(y[i] * (dy[i] - S) / a.tau);
    }
  }
}

// ---- ISA clones (KX_CLONES: simd.h) ----------------------------------------------------------------

KX_CLONES(fwd_rows, FwdArgs)
KX_CLONES(bwd_rows, BwdArgs)

// ---- ops 4 / 5: perturb-max (float64) ---------------------------------------------------------------
//
// L(d) = log Phi(d) and r(d) = phi(d) / Phi(d) (the contract's table) written to vectorise under `#pragma
// omp simd` over the nodes k: every branch is computed and selected, erf / erfc(t) exp(t^2) from Cephes'
// ndtr.c rational approximations (one division for the three), log by log_pos, exp by exp_hl (below). The
// forward needs L only, the backward's second pass r only (no log there), so L and r are two functions
// sharing the rational part.

constexpr double kSqrtHalf = 0.70710678118654752440, kHalfLog2Pi = 0.91893853320467274178,
                 kInvSqrt2Pi = 0.39894228040143267794, kSqrt2OverPi = 0.79788456080286535588;

// exp(h + l) for h <= 0 (h < -746, -inf included: 0) and |l| < 2^-10: Cody-Waite reduction r = h + l - k ln2
// (h - k ln2hi exact: h is a multiple of 2^-43 there), the degree-13 Taylor polynomial of exp r (truncation
// < 1e-17 relative) and 2^k applied as 2^k1 2^k2 so that results in the subnormal range round once.
// Branch-free selects (GCC keeps some ternaries as branches, which stops the vectoriser): m all ones or 0
KX_INLINE uint64_t mask_of(bool c) { return uint64_t{0} - static_cast<uint64_t>(c); }
KX_INLINE double sel(uint64_t m, double a, double b) {
  return bit_cast<double>((bit_cast<uint64_t>(a) & m) | (bit_cast<uint64_t>(b) & ~m));
}

KX_INLINE double exp_hl(double h, double l) {
  constexpr double kLog2e = 1.4426950408889634074, kLn2Hi = 6.93147180369123816490e-01,
                   kLn2Lo = 1.90821492927058770002e-10, kShift = 0x1.8p52;
  const uint64_t low = mask_of(h < -746.0);
  const double hc = sel(low, -746.0, h), lc = sel(low, 0.0, l);
  const double kk = hc * kLog2e + kShift;  // k = round(h / ln2) in the low bits, in [-1077, 0]
  const double k = kk - kShift;
  const double r = (hc - k * kLn2Hi) + (lc - k * kLn2Lo);
  const double p =
      1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 +
      r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800 + r * (1.0 / 39916800 +
      r * (1.0 / 479001600 + r * (1.0 / 6227020800.0)))))))))))));
  const double kk1 = k * 0.5 + kShift;  // k1 = round(k / 2), k2 = k - k1: both in [-539, 0]
  const uint64_t i1 = bit_cast<uint64_t>(kk1) - bit_cast<uint64_t>(kShift);
  const uint64_t i2 = (bit_cast<uint64_t>(kk) - bit_cast<uint64_t>(kShift)) - i1;
  return (p * bit_cast<double>((i1 + 1023) << 52)) * bit_cast<double>((i2 + 1023) << 52);
}

// The shared part of L(d) and r(d). a = |d| / sqrt 2; mid: a < 1, where ratio = erf(d / sqrt 2) (Cephes' erf:
// t T(t^2) / U(t^2)); else ratio = erfc(a) exp(a^2) (Cephes' erfc: P(a) / Q(a) for a < 8, R(a) / S(a) beyond).
// g = exp(-d^2 / 2), with d^2 split exactly into dh^2 (dh: d's top 26 bits) and the rest, so that g is
// accurate to a few ulps up to d = 38 (the term -d^2/2 rounded would cost d^2/2 ulps).
struct PhiParts {
  double ratio, g;
  uint64_t mid, neg;  // masks
};

KX_INLINE PhiParts phi_parts(double d) {
  const double a = std::fabs(d) * kSqrtHalf;
  const uint64_t mid = mask_of(a < 1.0);
  // erf for a < 1
  const double t = sel(mid, d * kSqrtHalf, 0.0), z = t * t;
  const double tn = t * ((((9.60497373987051638749E0 * z + 9.00260197203842689217E1) * z + 2.23200534594684319226E3) * z +
                          7.00332514112805075473E3) * z + 5.55923013010394962768E4);
  const double td = ((((z + 3.35617141647503099647E1) * z + 5.21357949780152679795E2) * z + 4.59432382970980127987E3) * z +
                     2.26290000613890934246E4) * z + 4.92673942608635921086E4;
  // erfc(a) exp(a^2) for 1 <= a < 8, and a >= 8 (a clamped: the selects drop the unused ones)
  const double u = std::min(std::max(a, 1.0), 64.0);
  const double pn = ((((((((2.46196981473530512524E-10 * u + 5.64189564831068821977E-1) * u + 7.46321056442269912687E0) * u +
                          4.86371970985681366614E1) * u + 1.96520832956077098242E2) * u + 5.26445194995477358631E2) * u +
                       9.34528527171957607540E2) * u + 1.02755188689515710272E3) * u + 5.57535335369399327526E2);
  const double pd = (((((((u + 1.32281951154744992508E1) * u + 8.67072140885989742329E1) * u + 3.54937778887819891062E2) * u +
                         9.75708501743205489753E2) * u + 1.82390916687909736289E3) * u + 2.24633760818710981792E3) * u +
                      1.65666309194161350182E3) * u + 5.57535340817727675546E2;
  const double rn = ((((5.64189583547755073984E-1 * u + 1.27536670759978104416E0) * u + 5.01905042251180477414E0) * u +
                      6.16021097993053585195E0) * u + 7.40974269950448939160E0) * u + 2.97886665372100240670E0;
  const double rd = (((((u + 2.26052863220117276590E0) * u + 9.39603524938001434673E0) * u + 1.20489539808096656605E1) * u +
                      1.70814450747565897222E1) * u + 9.60896809063285878198E0) * u + 3.36907645100081516050E0;
  const uint64_t near = mask_of(a < 8.0);
  const double num = sel(mid, tn, sel(near, pn, rn)), den = sel(mid, td, sel(near, pd, rd));
  // g = exp(-d^2 / 2)
  const double dh = bit_cast<double>(bit_cast<uint64_t>(d) & ~((uint64_t{1} << 27) - 1));
  const double g = exp_hl(-0.5 * (dh * dh), -0.5 * ((d - dh) * (d + dh)));
  return {num / den, g, mid, mask_of(d < 0.0)};
}

// L(d) = log Phi(d):
//   d > 38: 0;  d <= -37.5: -d^2/2 - log(-d) - log(2 pi)/2
//   |d| < sqrt 2: log((1 + erf(d / sqrt 2)) / 2)
//   d <= -sqrt 2: log(ratio / 2) - d^2/2
//   d >= sqrt 2: log1p(-c), c = g ratio / 2 = erfc(d / sqrt 2) / 2, as log(1 - c) + ((1 - (1 - c)) - c) (1 + c)
//                (the correction of the rounded 1 - c, divided by 1 - c to its first order: under 2^-53 c)
KX_INLINE double log_phi_v(double d) {
  const PhiParts s = phi_parts(d);
  const double c = 0.5 * s.g * s.ratio, um = 1.0 - c;
  const uint64_t far = mask_of(d <= -37.5);
  const double arg = sel(far, -d, sel(s.mid, 0.5 + 0.5 * s.ratio, sel(s.neg, 0.5 * s.ratio, um)));
  const double lg = log_pos(arg), h = -0.5 * d * d;
  const double L = sel(far, (h - lg) - kHalfLog2Pi, sel(s.mid, lg, sel(s.neg, lg + h, lg + ((1.0 - um) - c) * (1.0 + c))));
  return sel(mask_of(d > 38.0), 0.0, L);
}

// r(d) = phi(d) / Phi(d) (the derivative of L): d > 38: 0;  d <= -37.5: -d;  d <= -sqrt 2: sqrt(2/pi) / ratio;
// else g / sqrt(2 pi) / Phi, Phi = (1 + erf) / 2 for |d| < sqrt 2, 1 - c beyond
KX_INLINE double r_phi_v(double d) {
  const PhiParts s = phi_parts(d);
  const uint64_t tail = ~s.mid & s.neg;
  const double Phi = sel(s.mid, 0.5 + 0.5 * s.ratio, 1.0 - 0.5 * s.g * s.ratio);
  const double r = sel(tail, kSqrt2OverPi, s.g * kInvSqrt2Pi) / sel(tail, s.ratio, Phi);
  return sel(mask_of(d > 38.0), 0.0, sel(mask_of(d <= -37.5), -d, r));
}

// both, from one phi_parts
KX_INLINE void log_phi_r_v(double d, double& Lo, double& ro) {
  const PhiParts s = phi_parts(d);
  const double c = 0.5 * s.g * s.ratio, um = 1.0 - c;
  const uint64_t far = mask_of(d <= -37.5), top = mask_of(d > 38.0), tail = ~s.mid & s.neg;
  const double Phi = sel(s.mid, 0.5 + 0.5 * s.ratio, sel(s.neg, 0.5 * s.ratio, um));
  const double lg = log_pos(sel(far, -d, Phi)), h = -0.5 * d * d;
  const double L = sel(far, (h - lg) - kHalfLog2Pi, sel(s.mid, lg, sel(s.neg, lg + h, lg + ((1.0 - um) - c) * (1.0 + c))));
  const double r = sel(tail, kSqrt2OverPi, s.g * kInvSqrt2Pi) / sel(tail, s.ratio, Phi);
  Lo = sel(top, 0.0, L);
  ro = sel(top, 0.0, sel(far, -d, r));
}

// One row's compacted finite entries xs (nf of them), the nodes z (K; sorted: the loops over k stop where
// x_i - x_j + z_k > 38, whose terms are 0), e (nf x K: exp(S), then W in the backward) and q (nf).
struct PmRow {
  const double* xs;
  int64_t nf;
  const double* z;
  int64_t K;
  bool sorted;
  double* e;
  double* q;
};

// the k with (x_i - x_j) + z_k <= 38 are [0, kend) when z is sorted (the rounded sum is monotone in z_k)
KX_INLINE int64_t k_end(const PmRow& a, double dij) {
  if (!a.sorted) return a.K;
  return std::partition_point(a.z, a.z + a.K, [dij](double zk) { return dij + zk <= 38.0; }) - a.z;
}

// e_ik = exp(S_ik) and q_i for i in [i0, i1)
KX_INLINE void pm_fwd_i(const PmRow& a, int64_t i0, int64_t i1) {
  const int64_t nf = a.nf, K = a.K;
  const double* __restrict z = a.z;
  for (int64_t i = i0; i < i1; ++i) {
    double* __restrict S = a.e + i * K;  // S_ik accumulated in place, then exponentiated
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) S[k] = 0.0;
    for (int64_t j = 0; j < nf; ++j) {
      if (j == i) continue;
      const double dij = a.xs[i] - a.xs[j];
      const int64_t kend = k_end(a, dij);
#pragma omp simd
      for (int64_t k = 0; k < kend; ++k) S[k] += log_phi_v(dij + z[k]);
    }
    double qi = 0;
#pragma omp simd reduction(+ : qi)
    for (int64_t k = 0; k < K; ++k) {
      const double ek = exp_hl(S[k], 0.0);
      S[k] = ek;
      qi += ek;
    }
    a.q[i] = qi / static_cast<double>(K);
  }
}

// the pairs (i, j), i in [i0, i1), with e holding W: t_ij = sum_k W_ik r(x_i - x_j + z_k) to dxf[i] (+) and
// dxf[j] (-); the k where W_ik = 0 (e_ik underflowed, or h_i = 0) are skipped at both ends
KX_INLINE void pm_bwd_i(const PmRow& a, int64_t i0, int64_t i1, double* dxf) {
  const int64_t nf = a.nf, K = a.K;
  const double* __restrict z = a.z;
  for (int64_t i = i0; i < i1; ++i) {
    const double* __restrict W = a.e + i * K;
    int64_t kb = 0, ke = K;
    while (kb < K && W[kb] == 0.0) ++kb;
    if (kb == K) continue;
    while (W[ke - 1] == 0.0) --ke;
    double acc = 0;
    for (int64_t j = 0; j < nf; ++j) {
      if (j == i) continue;
      const double dij = a.xs[i] - a.xs[j];
      const int64_t kend = std::min(ke, k_end(a, dij));
      double t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t k = kb; k < kend; ++k) t += W[k] * r_phi_v(dij + z[k]);
      acc += t;
      dxf[j] -= t;
    }
    dxf[i] += acc;
  }
}

// The backward's fused pass, for i in [i0, i1): the forward's e_i and q_i, with r(x_i - x_j + z_k) kept in rb
// (nf x K; the k >= kend_j not written, kend_j in ke) until e_i is known, then u_ij = sum_k e_ik r_ijk into
// u (nf x nf): the pairs' terms of dx are t_ij = h_i u_ij / K, h_i known only once every q is
KX_INLINE void pm_fused_i(const PmRow& a, int64_t i0, int64_t i1, double* rb, int64_t* ke, double* u) {
  const int64_t nf = a.nf, K = a.K;
  const double* __restrict z = a.z;
  for (int64_t i = i0; i < i1; ++i) {
    double* __restrict S = a.e + i * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) S[k] = 0.0;
    for (int64_t j = 0; j < nf; ++j) {
      if (j == i) continue;
      const double dij = a.xs[i] - a.xs[j];
      const int64_t kend = k_end(a, dij);
      ke[j] = kend;
      double* __restrict rj = rb + j * K;
#pragma omp simd
      for (int64_t k = 0; k < kend; ++k) {
        double L, r;
        log_phi_r_v(dij + z[k], L, r);
        S[k] += L;
        rj[k] = r;
      }
    }
    double qi = 0;
#pragma omp simd reduction(+ : qi)
    for (int64_t k = 0; k < K; ++k) {
      const double ek = exp_hl(S[k], 0.0);
      S[k] = ek;
      qi += ek;
    }
    a.q[i] = qi / static_cast<double>(K);
    double* ui = u + i * nf;
    ui[i] = 0.0;
    for (int64_t j = 0; j < nf; ++j) {
      if (j == i) continue;
      const double* __restrict rj = rb + j * K;
      double t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t k = 0; k < ke[j]; ++k) t += S[k] * rj[k];
      ui[j] = t;
    }
  }
}

#ifdef KX_TARGET_AVX2
void pm_fwd_i_default(const PmRow& a, int64_t b, int64_t e) { pm_fwd_i(a, b, e); }
KX_TARGET_AVX2 void pm_fwd_i_avx2(const PmRow& a, int64_t b, int64_t e) { pm_fwd_i(a, b, e); }
KX_TARGET_AVX512 void pm_fwd_i_avx512(const PmRow& a, int64_t b, int64_t e) { pm_fwd_i(a, b, e); }
void pm_bwd_i_default(const PmRow& a, int64_t b, int64_t e, double* d) { pm_bwd_i(a, b, e, d); }
KX_TARGET_AVX2 void pm_bwd_i_avx2(const PmRow& a, int64_t b, int64_t e, double* d) { pm_bwd_i(a, b, e, d); }
KX_TARGET_AVX512 void pm_bwd_i_avx512(const PmRow& a, int64_t b, int64_t e, double* d) { pm_bwd_i(a, b, e, d); }
auto pm_fwd_i_pick() {
  const Isa isa = cpu_isa();
  return isa == kAvx512 ? &pm_fwd_i_avx512 : isa == kAvx2 ? &pm_fwd_i_avx2 : &pm_fwd_i_default;
}
auto pm_bwd_i_pick() {
  const Isa isa = cpu_isa();
  return isa == kAvx512 ? &pm_bwd_i_avx512 : isa == kAvx2 ? &pm_bwd_i_avx2 : &pm_bwd_i_default;
}
void pm_fused_i_default(const PmRow& a, int64_t b, int64_t e, double* rb, int64_t* ke, double* u) { pm_fused_i(a, b, e, rb, ke, u); }
KX_TARGET_AVX2 void pm_fused_i_avx2(const PmRow& a, int64_t b, int64_t e, double* rb, int64_t* ke, double* u) {
  pm_fused_i(a, b, e, rb, ke, u);
}
KX_TARGET_AVX512 void pm_fused_i_avx512(const PmRow& a, int64_t b, int64_t e, double* rb, int64_t* ke, double* u) {
  pm_fused_i(a, b, e, rb, ke, u);
}
auto pm_fused_i_pick() {
  const Isa isa = cpu_isa();
  return isa == kAvx512 ? &pm_fused_i_avx512 : isa == kAvx2 ? &pm_fused_i_avx2 : &pm_fused_i_default;
}
#else
void pm_fused_i_default(const PmRow& a, int64_t b, int64_t e, double* rb, int64_t* ke, double* u) { pm_fused_i(a, b, e, rb, ke, u); }
auto pm_fused_i_pick() { return &pm_fused_i_default; }
void pm_fwd_i_default(const PmRow& a, int64_t b, int64_t e) { pm_fwd_i(a, b, e); }
void pm_bwd_i_default(const PmRow& a, int64_t b, int64_t e, double* d) { pm_bwd_i(a, b, e, d); }
auto pm_fwd_i_pick() { return &pm_fwd_i_default; }
auto pm_bwd_i_pick() { return &pm_bwd_i_default; }
#endif

template <typename T>
struct PmArgs {
  const T* x;
  const T* dp;  // backward only
  const double* z;
  T* out;  // p or dx
  int64_t N, K;
  bool sorted;
};

// i per task when a row's i are split among threads: ~2^15 evaluations of L
int64_t pm_i_grain(int64_t nf, int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(K * nf, 1)); }

// Per-row scratch, and the forward of one row: the finite entries of row x (compacted into xs, their
// positions in pos), e_ik = exp(S_ik) (nf x K: the backward's workspace) and q_i = mean_k e_ik; returns
// Q = sum q (in i's order whatever the threads). par: the row's i split among threads (few rows). The
// pairs' differences are formed as the reference forms them, (x_i - x_j) + z_k.
struct PmScratch {
  std::vector<double> xs, e, q, dxf, rb, u;
  std::vector<int64_t> pos, ke;
};

template <typename T>
int64_t pm_compact(const T* x, int64_t N, PmScratch& s) {
  s.xs.clear(), s.pos.clear();
  for (int64_t i = 0; i < N; ++i) {
    const double xi = static_cast<double>(x[i]);
    if (xi > -std::numeric_limits<double>::infinity()) s.xs.push_back(xi), s.pos.push_back(i);
  }
  return static_cast<int64_t>(s.xs.size());
}

template <typename T>
double pm_row_forward(const PmArgs<T>& a, const T* x, PmScratch& s, bool par) {
  const int64_t K = a.K;
  const int64_t nf = pm_compact(x, a.N, s);
  s.e.resize(nf * K);
  s.q.assign(nf, 0.0);
  const PmRow row{s.xs.data(), nf, a.z, K, a.sorted, s.e.data(), s.q.data()};
  const auto fn = pm_fwd_i_pick();
  if (par) {
    at::parallel_for(0, nf, pm_i_grain(nf, K), [&](int64_t b, int64_t e) { fn(row, b, e); });
  } else {
    fn(row, 0, nf);
  }
  double Q = 0;
  for (int64_t i = 0; i < nf; ++i) Q += s.q[i];
  return Q;
}

template <typename T>
void pm_fwd_rows(const PmArgs<T>& a, int64_t begin, int64_t end, bool par) {
  const int64_t N = a.N;
  PmScratch s;
  for (int64_t r = begin; r < end; ++r) {
    T* p = a.out + r * N;
    const double Q = pm_row_forward(a, a.x + r * N, s, par);
    std::fill(p, p + N, T(0));
    if (!(Q > 0)) continue;  // no finite entry (or every q underflowed): p = 0, as the reference
    for (size_t i = 0; i < s.pos.size(); ++i) p[s.pos[i]] = static_cast<T>(s.q[i] / Q);
  }
}

// dx_m = sum_k W_mk T_mk - sum_{i != m} sum_k W_ik r(x_i - x_m + z_k), W_ik = h_i e_ik / K.
// Fused (nf <= kFusedMax): one pass over the pairs evaluating L and r together (pm_fused_i), u_ij =
// sum_k e_ik r_ijk kept (nf x nf), then dx_m = (h_m sum_j u_mj - sum_i h_i u_im) / K.
// Else two passes: the forward, then the pairs (i, j) again for r only, r(x_i - x_j + z_k) being both a
// term of T_ik (to dx_i) and of the second sum of dx_j (so it is evaluated once per pair and node).
// par: the i split among threads (each with its own r rows, or dx row summed in thread order).
constexpr int64_t kFusedMax = 2048;  // u: 32 MB

template <typename T>
void pm_bwd_rows(const PmArgs<T>& a, int64_t begin, int64_t end, bool par) {
  const int64_t N = a.N, K = a.K;
  PmScratch s;
  const int64_t nthreads = par ? at::get_num_threads() : 1;
  for (int64_t r = begin; r < end; ++r) {
    T* dx = a.out + r * N;
    const T* dp = a.dp + r * N;
    const T* x = a.x + r * N;
    std::fill(dx, dx + N, T(0));
    const int64_t nf0 = pm_compact(x, N, s);
    double Q;
    if (nf0 <= kFusedMax) {
      const int64_t nf = nf0;
      s.e.resize(nf * K);
      s.q.assign(nf, 0.0);
      s.u.resize(nf * nf);
      s.rb.resize(nthreads * nf * K);
      s.ke.resize(nthreads * nf);
      const PmRow row{s.xs.data(), nf, a.z, K, a.sorted, s.e.data(), s.q.data()};
      const auto fn = pm_fused_i_pick();
      if (par) {
        at::parallel_for(0, nf, pm_i_grain(nf, K), [&](int64_t b, int64_t e) {
          const int64_t t = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
          fn(row, b, e, s.rb.data() + t * nf * K, s.ke.data() + t * nf, s.u.data());
        });
      } else {
        fn(row, 0, nf, s.rb.data(), s.ke.data(), s.u.data());
      }
      Q = 0;
      for (int64_t i = 0; i < nf; ++i) Q += s.q[i];
      if (!(Q > 0)) continue;
      double sdp = 0;
      for (int64_t i = 0; i < nf; ++i) sdp += static_cast<double>(dp[s.pos[i]]) * (s.q[i] / Q);
      // dxf_m = (h_m sum_j u_mj - sum_i h_i u_im) / K, h_i = (dp_i - sdp) / Q
      s.dxf.assign(2 * nf, 0.0);
      double* h = s.dxf.data() + nf;
      for (int64_t i = 0; i < nf; ++i) h[i] = (static_cast<double>(dp[s.pos[i]]) - sdp) / Q;
      for (int64_t i = 0; i < nf; ++i) {
        const double* ui = s.u.data() + i * nf;
        const double hi = h[i];
        double rs = 0;
#pragma omp simd reduction(+ : rs)
        for (int64_t m = 0; m < nf; ++m) rs += ui[m];
        s.dxf[i] += hi * rs;
        double* __restrict dxf = s.dxf.data();
#pragma omp simd
        for (int64_t m = 0; m < nf; ++m) dxf[m] -= hi * ui[m];
      }
      for (int64_t i = 0; i < nf; ++i) dx[s.pos[i]] = static_cast<T>(s.dxf[i] / static_cast<double>(K));
      continue;
    }
    Q = pm_row_forward(a, x, s, par);
    if (!(Q > 0)) continue;
    const int64_t nf = static_cast<int64_t>(s.xs.size());
    double sdp = 0;
    for (int64_t i = 0; i < nf; ++i) sdp += static_cast<double>(dp[s.pos[i]]) * (s.q[i] / Q);
    // e becomes W
    for (int64_t i = 0; i < nf; ++i) {
      const double h = (static_cast<double>(dp[s.pos[i]]) - sdp) / Q / static_cast<double>(K);
      for (int64_t k = 0; k < K; ++k) s.e[i * K + k] *= h;
    }
    const PmRow row{s.xs.data(), nf, a.z, K, a.sorted, s.e.data(), s.q.data()};
    const auto fn = pm_bwd_i_pick();
    s.dxf.assign(nthreads * nf, 0.0);
    if (par) {
      at::parallel_for(0, nf, pm_i_grain(nf, K), [&](int64_t b, int64_t e) {
        fn(row, b, e, s.dxf.data() + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * nf);
      });
      for (int64_t t = 1; t < nthreads; ++t)
        for (int64_t i = 0; i < nf; ++i) s.dxf[i] += s.dxf[t * nf + i];
    } else {
      fn(row, 0, nf, s.dxf.data());
    }
    for (int64_t i = 0; i < nf; ++i) dx[s.pos[i]] = static_cast<T>(s.dxf[i]);
  }
}

// ---- ops ----------------------------------------------------------------------------------------------

void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous (R, N) tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating");
}

// the seed tensor's 64 bits as the Philox key
std::pair<uint32_t, uint32_t> philox_key(const char* op, const Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a one-element int64 CPU tensor");
  const uint64_t key = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  return {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)};
}

// rows per task: about 16K entries (the noise costs ~100 cycles per 4 entries), at least one row
int64_t grain(int64_t N) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(N, 1)); }

Tensor gumbel_rows(const char* op, const Tensor& x, const optional<Tensor>& seed, double tau, bool hard,
                   bool index_only, Tensor* y, Tensor* soft) {
  check_rows(op, "x", x);
  const int64_t R = x.size(0), N = x.size(1);
  uint32_t k0 = 0, k1 = 0;
  if (seed) std::tie(k0, k1) = philox_key(op, *seed);
  Tensor index = at::empty({R}, x.options().dtype(at::kLong));
  if (!index_only) {
    TORCH_CHECK(tau > 0, op, ": tau must be positive, got ", tau);
    *y = at::empty_like(x);
    *soft = hard ? at::empty_like(x) : at::empty({0}, x.options());
  }
  if (R == 0) return index;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_gumbel_softmax_cpu", [&] {
    using St = state_t<scalar_t>;
    FwdArgs<scalar_t, St> a{x.const_data_ptr<scalar_t>(),
                            index_only ? nullptr : y->data_ptr<scalar_t>(),
                            hard && !index_only ? soft->data_ptr<scalar_t>() : nullptr,
                            index.data_ptr<int64_t>(),
                            N,
                            k0,
                            k1,
                            seed.has_value(),
                            hard && !index_only,
                            index_only,
                            tau};
    const auto fn = fwd_rows_pick<scalar_t, St>();
    at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return index;
}

std::tuple<Tensor, Tensor, Tensor> gumbel_softmax_cpu(const Tensor& x, const optional<Tensor>& seed, double tau,
                                                      bool hard) {
  Tensor y, soft;
  Tensor index = gumbel_rows("kxops::gumbel_softmax (cpu)", x, seed, tau, hard, false, &y, &soft);
  return {y, soft, index};
}

Tensor gumbel_max_cpu(const Tensor& x, const Tensor& seed) {
  return gumbel_rows("kxops::gumbel_max (cpu)", x, seed, 1.0, false, true, nullptr, nullptr);
}

Tensor gumbel_softmax_backward_cpu(const Tensor& dy_in, const Tensor& y_in, double tau) {
  const char* op = "kxops::gumbel_softmax_backward (cpu)";
  const Tensor y = y_in.contiguous();
  check_rows(op, "y", y);
  TORCH_CHECK(dy_in.sizes() == y.sizes(), op, ": dy must have y's shape");
  TORCH_CHECK(tau > 0, op, ": tau must be positive, got ", tau);
  const Tensor dy = dy_in.to(y.scalar_type()).contiguous();  // autograd may hand any strides
  const int64_t R = y.size(0), N = y.size(1);
  Tensor dx = at::empty_like(y);
  if (R == 0 || N == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "kxops_gumbel_softmax_backward_cpu", [&] {
    using St = state_t<scalar_t>;
    BwdArgs<scalar_t, St> a{dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), N,
                            tau};
    const auto fn = bwd_rows_pick<scalar_t, St>();
    at::parallel_for(0, R, std::max<int64_t>(1, (int64_t{1} << 16) / N), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return dx;
}

void check_nodes(const char* op, const Tensor& nodes) {
  TORCH_CHECK(nodes.dim() == 1 && nodes.numel() >= 1 && nodes.is_contiguous() && nodes.scalar_type() == at::kDouble &&
                  nodes.device().is_cpu(),
              op, ": nodes must be a contiguous float64 (K,) CPU tensor");
}

// rows per task: the work is K N^2 evaluations of L per row
int64_t pm_grain(int64_t N, int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K * N * N, 1)); }

// Rows among threads when there are enough of them, else each row's i among threads (one long row uses
// every core). Whether nodes are sorted (they are as the front builds them) decides if loops stop at d > 38.
template <typename F>
void pm_launch(int64_t R, int64_t N, int64_t K, F&& rows) {
  if (R >= 2 * at::get_num_threads()) {
    at::parallel_for(0, R, pm_grain(N, K), [&](int64_t b, int64_t e) { rows(b, e, false); });
  } else {
    rows(0, R, true);
  }
}

bool pm_sorted(const Tensor& nodes) {
  const double* z = nodes.const_data_ptr<double>();
  return std::is_sorted(z, z + nodes.numel());
}

Tensor perturb_max_cpu(const Tensor& x, const Tensor& nodes) {
  const char* op = "kxops::perturb_max (cpu)";
  check_rows(op, "x", x);
  check_nodes(op, nodes);
  const int64_t R = x.size(0), N = x.size(1), K = nodes.numel();
  Tensor p = at::empty_like(x);
  if (R == 0 || N == 0) return p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_perturb_max_cpu", [&] {
    PmArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), nullptr, nodes.const_data_ptr<double>(), p.data_ptr<scalar_t>(),
                       N, K, pm_sorted(nodes)};
    pm_launch(R, N, K, [&](int64_t b, int64_t e, bool par) { pm_fwd_rows(a, b, e, par); });
  });
  return p;
}

Tensor perturb_max_backward_cpu(const Tensor& dp_in, const Tensor& x, const Tensor& nodes) {
  const char* op = "kxops::perturb_max_backward (cpu)";
  check_rows(op, "x", x);
  check_nodes(op, nodes);
  TORCH_CHECK(dp_in.sizes() == x.sizes(), op, ": dp must have x's shape");
  const Tensor dp = dp_in.to(x.scalar_type()).contiguous();
  const int64_t R = x.size(0), N = x.size(1), K = nodes.numel();
  Tensor dx = at::empty_like(x);
  if (R == 0 || N == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_perturb_max_backward_cpu", [&] {
    PmArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), dp.const_data_ptr<scalar_t>(), nodes.const_data_ptr<double>(),
                       dx.data_ptr<scalar_t>(), N, K, pm_sorted(nodes)};
    pm_launch(R, N, K, [&](int64_t b, int64_t e, bool par) { pm_bwd_rows(a, b, e, par); });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("gumbel_softmax", &gumbel_softmax_cpu);
  m.impl("gumbel_softmax_backward", &gumbel_softmax_backward_cpu);
  m.impl("gumbel_max", &gumbel_max_cpu);
  m.impl("perturb_max", &perturb_max_cpu);
  m.impl("perturb_max_backward", &perturb_max_backward_cpu);
}

}  // namespace kxops
