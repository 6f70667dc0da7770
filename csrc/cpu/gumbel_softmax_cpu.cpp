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
// Perturb-max is float64 throughout, O(K N^2) per row with std::erfc (the contract's log Phi table),
// scalar: the branches of the table and erfc do not vectorise.
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

// ---- ISA clones (cpu::Isa, cpu::cpu_isa: simd.h) ----------------------------------------------------

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
    const Isa isa = cpu_isa();                                                                            \
    return isa == kAvx512 ? &NAME##_avx512<T, St> : isa == kAvx2 ? &NAME##_avx2<T, St> : &NAME##_default<T, St>; \
  }
#else
#define KX_CLONES(NAME, ARGS)                                                                             \
  template <typename T, typename St>                                                                      \
  void NAME##_default(const ARGS<T, St>& a, int64_t b, int64_t e) { NAME(a, b, e); }                      \
  template <typename T, typename St>                                                                      \
  auto NAME##_pick() { return &NAME##_default<T, St>; }
#endif
KX_CLONES(fwd_rows, FwdArgs)
KX_CLONES(bwd_rows, BwdArgs)
#undef KX_CLONES

// ---- ops 4 / 5: perturb-max (float64) ---------------------------------------------------------------

constexpr double kSqrtHalf = 0.70710678118654752440, kHalfLog2Pi = 0.91893853320467274178;

// L(d) = log Phi(d): the contract's table
KX_INLINE double log_phi(double d) {
  if (d > 38.0) return 0.0;  // Phi(38) == 1 in float64
  if (d >= -1.0) return std::log1p(-0.5 * std::erfc(d * kSqrtHalf));
  if (d > -37.5) return std::log(0.5 * std::erfc(-d * kSqrtHalf));
  return -0.5 * d * d - std::log(-d) - kHalfLog2Pi;
}

// r(d) = phi(d) / Phi(d) from L = L(d)
KX_INLINE double r_of(double d, double L) {
  if (d > 38.0) return 0.0;
  if (d <= -37.5) return -d;
  return std::exp(-0.5 * d * d - kHalfLog2Pi - L);
}

template <typename T>
struct PmArgs {
  const T* x;
  const T* dp;  // backward only
  const double* z;
  T* out;  // p or dx
  int64_t N, K;
};

// The finite entries of row x (compacted into xs, their positions in pos), e_ik = exp(S_ik) for them
// (nf x K, in e: the backward's workspace) and q_i = mean_k e_ik; returns Q = sum q. The pairs' differences
// are formed as the reference forms them, (x_i - x_j) + z_k.
template <typename T>
double pm_row_forward(const PmArgs<T>& a, const T* x, std::vector<double>& xs, std::vector<int64_t>& pos,
                      std::vector<double>& e, std::vector<double>& q) {
  const int64_t N = a.N, K = a.K;
  xs.clear(), pos.clear();
  for (int64_t i = 0; i < N; ++i) {
    const double xi = static_cast<double>(x[i]);
    if (xi > -std::numeric_limits<double>::infinity()) xs.push_back(xi), pos.push_back(i);
  }
  const int64_t nf = static_cast<int64_t>(xs.size());
  e.assign(nf * K, 0.0);
  q.assign(nf, 0.0);
  double Q = 0;
  for (int64_t i = 0; i < nf; ++i) {
    double* S = e.data() + i * K;  // S_ik accumulated in place, then exponentiated
    for (int64_t j = 0; j < nf; ++j) {
      if (j == i) continue;
      const double dij = xs[i] - xs[j];
      for (int64_t k = 0; k < K; ++k) S[k] += log_phi(dij + a.z[k]);
    }
    double qi = 0;
    for (int64_t k = 0; k < K; ++k) qi += (S[k] = std::exp(S[k]));
    q[i] = qi / static_cast<double>(K);
    Q += q[i];
  }
  return Q;
}

template <typename T>
void pm_fwd_rows(const PmArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  std::vector<double> xs, e, q;
  std::vector<int64_t> pos;
  for (int64_t r = begin; r < end; ++r) {
    T* p = a.out + r * N;
    const double Q = pm_row_forward(a, a.x + r * N, xs, pos, e, q);
    std::fill(p, p + N, T(0));
    if (!(Q > 0)) continue;  // no finite entry (or every q underflowed): p = 0, as the reference
    for (size_t i = 0; i < pos.size(); ++i) p[pos[i]] = static_cast<T>(q[i] / Q);
  }
}

// dx_m = sum_k W_mk T_mk - sum_{i != m} sum_k W_ik r(x_i - x_m + z_k), W_ik = h_i e_ik / K: one more pass
// over the pairs (i, j), r(x_i - x_j + z_k) being both a term of T_ik (to dx_i) and of the second sum of
// dx_j (so it is evaluated once per pair and node)
template <typename T>
void pm_bwd_rows(const PmArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N, K = a.K;
  std::vector<double> xs, e, q, dxf;
  std::vector<int64_t> pos;
  for (int64_t r = begin; r < end; ++r) {
    T* dx = a.out + r * N;
    const T* dp = a.dp + r * N;
    const double Q = pm_row_forward(a, a.x + r * N, xs, pos, e, q);
    std::fill(dx, dx + N, T(0));
    if (!(Q > 0)) continue;
    const int64_t nf = static_cast<int64_t>(xs.size());
    double sdp = 0;
    for (int64_t i = 0; i < nf; ++i) sdp += static_cast<double>(dp[pos[i]]) * (q[i] / Q);
    // e becomes W
    for (int64_t i = 0; i < nf; ++i) {
      const double h = (static_cast<double>(dp[pos[i]]) - sdp) / Q / static_cast<double>(K);
      for (int64_t k = 0; k < K; ++k) e[i * K + k] *= h;
    }
    dxf.assign(nf, 0.0);
    for (int64_t i = 0; i < nf; ++i) {
      const double* W = e.data() + i * K;
      double acc = 0;
      for (int64_t j = 0; j < nf; ++j) {
        if (j == i) continue;
        const double dij = xs[i] - xs[j];
        double t = 0;  // sum_k W_ik r(x_i - x_j + z_k)
        for (int64_t k = 0; k < K; ++k) {
          if (W[k] == 0.0) continue;  // e_ik underflowed (or h_i = 0): no contribution
          const double d = dij + a.z[k];
          t += W[k] * r_of(d, log_phi(d));
        }
        acc += t;
        dxf[j] -= t;
      }
      dxf[i] += acc;
    }
    for (int64_t i = 0; i < nf; ++i) dx[pos[i]] = static_cast<T>(dxf[i]);
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

// rows per task: the work is K N^2 erfc per row
int64_t pm_grain(int64_t N, int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K * N * N, 1)); }

Tensor perturb_max_cpu(const Tensor& x, const Tensor& nodes) {
  const char* op = "kxops::perturb_max (cpu)";
  check_rows(op, "x", x);
  check_nodes(op, nodes);
  const int64_t R = x.size(0), N = x.size(1), K = nodes.numel();
  Tensor p = at::empty_like(x);
  if (R == 0 || N == 0) return p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_perturb_max_cpu", [&] {
    PmArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), nullptr, nodes.const_data_ptr<double>(), p.data_ptr<scalar_t>(),
                       N, K};
    at::parallel_for(0, R, pm_grain(N, K), [&](int64_t b, int64_t e) { pm_fwd_rows(a, b, e); });
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
                       dx.data_ptr<scalar_t>(), N, K};
    at::parallel_for(0, R, pm_grain(N, K), [&](int64_t b, int64_t e) { pm_bwd_rows(a, b, e); });
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
