// Sparse softmaxes on CPU: kxops::entmax (sparsemax, entmax15, alpha-entmax by bisection, and the
// sparsemax / entmax15 losses), kxops::entmax_backward and kxops::topk_softmax. Semantics and the
// algorithms (the same on every backend): docs/sparse_softmax_kernel_contract.md.
//
// Work items are rows (at::parallel_for, several short rows per task). A row stays in L2 between its
// passes (32768 floats are 128 KB):
//   sparsemax / entmax15  max, keeping the max of every block of 64 entries; the candidates {z > -1}
//                         compacted from the blocks that reach past -1 (t starts at -1 and only grows,
//                         so every support visited is a subset); the safeguarded Newton passes, each
//                         summing cnt, s1, s2 and zmin over {z > t} of the candidates; then one pass
//                         that writes p (and sums the loss terms), blocks left of tau written as zeros
//   alpha-entmax          max; the entries that can ever be in the support (z > -1) copied once to a
//                         candidate list, which bisection shrinks to {z > lo} each time lo moves up;
//                         then one pass that writes p
//   top-k softmax         max; a radix select (8 bits a pass) of the k-th largest order-preserving key
//                         on a key list that each pass shrinks to the entries sharing the prefix; then
//                         one pass of exponentials over the selected set and one that normalises
//   backward              two passes: the sums over the support, then dx
// 16-bit rows are converted to a float scratch row once (per task buffers), so that every pass reads
// floats, and outputs are written to the scratch row and converted once.
//
// Arithmetic: the state dtype (float for fp16 / bf16 / fp32, double for fp64) for z = c (x - m), the
// bisection's interval and powers, the exponentials; every per-pass sum is accumulated in double (cheap:
// the float lanes widen to doubles in the same vector loop), and the threshold formulas run in double, so
// the float threshold is as good as the float64 one up to the rounding of z (the reference's float cumsum
// is double-accumulated too, and the tolerance is twice its error). p = relu(z - tau)^E is formed in
// double from the float z and rounded once; p > 0 exactly on {z > tau}.
//
// Vectorisation: each pass is a branch-free loop of selects under `#pragma omp simd` with its reductions
// declared (sum, min, max), which GCC vectorises; every kernel is compiled for baseline x86-64, AVX2+FMA
// and AVX-512 and picked as ATen picks its own kernels (ATEN_CPU_CAPABILITY), as linear_attention_cpu.cpp
// does. (at::vec::Vectorized is only its scalar fallback in an extension compiled without the
// CPU_CAPABILITY_* macros, and GCC 12 scalarised the 512-bit mask selects of hand-written vector-extension
// code; selects of a second loaded array go through keep(), see there.) Left scalar: the candidate
// gathering (branch-free, on the blocks that reach past -1 only), powers and exponentials (bisection,
// top-k: on the candidates / selected set only) and entmax15's backward sqrt(p) (on the blocks holding
// support only: GCC vectorises no sqrt that may set errno).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace kxops {
namespace {

using at::Tensor;
using cpu::Isa;
using cpu::cpu_isa;
using cpu::kAvx2;
using cpu::kAvx512;
using cpu::kDefault;
using std::optional;

constexpr int kSparsemax = 0, kEntmax15 = 1, kBisect = 2, kSoftmax = 3;
constexpr int kMaxPasses = 100;
constexpr int64_t kBlock = 64;  // entries per block of the block maxima
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- passes ------------------------------------------------------------------------------------------

// Every pass is a loop of selects (no branches) under `omp simd` with its reductions declared, which GCC
// vectorises at the clone's width, a float pack widening to doubles for the sums.
template <typename St>
KX_INLINE St row_max(const St* x, int64_t n) {
  St m = -std::numeric_limits<St>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// ---- rows in the state dtype -------------------------------------------------------------------------

template <typename T>
using state_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The row as St: the tensor's own memory for float / double, else converted into buf.
template <typename T, typename St>
KX_INLINE const St* row_in(const T* src, int64_t n, St* buf) {
  if constexpr (std::is_same_v<T, St>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<St>(src[i]);
    return buf;
  }
}
template <typename T, typename St>
KX_INLINE St* row_out(T* dst, St* buf) {
  if constexpr (std::is_same_v<T, St>) {
    return dst;
  } else {
    return buf;
  }
}
template <typename T, typename St>
KX_INLINE void row_flush(T* dst, const St* buf, int64_t n) {
  if constexpr (!std::is_same_v<T, St>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}
template <typename T, typename St>
KX_INLINE void row_zero(T* dst, int64_t n) {
  std::fill(dst, dst + n, static_cast<T>(0));
}

// relu(u)^e for u > 0, as the contract writes it (the same on every backend)
template <typename St>
KX_INLINE St pow_pos(St u, St e) {
  return std::exp2(e * std::log2(u));
}

// ---- sparsemax / entmax15 forward --------------------------------------------------------------------

// m = max x, and the max of every block of kBlock entries (bm), from which later passes skip the blocks
// that cannot reach the support
template <typename St>
KX_INLINE St row_max_blocks(const St* x, int64_t n, St* bm) {
  St m = -std::numeric_limits<St>::infinity();
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    St mb = -std::numeric_limits<St>::infinity();
#pragma omp simd reduction(max : mb)
    for (int64_t i = i0; i < i1; ++i) mb = x[i] > mb ? x[i] : mb;
    bm[b] = mb;
    m = mb > m ? mb : m;
  }
  return m;
}

// v where on, +0.0 elsewhere (NaN and inf included), by masking the bits: a select that GCC cannot turn
// into a branch around the load of v, which would keep the loop from being vectorised
KX_INLINE double keep(double v, bool on) {
  return std::bit_cast<double>(std::bit_cast<uint64_t>(v) & (uint64_t(0) - uint64_t(on)));
}

// z = c (x - m) in St (c = 1 or 1/2, an exact scaling), widened
template <int kKind, typename St>
KX_INLINE double z_of(St v, St m) {
  return static_cast<double>(kKind == kEntmax15 ? (v - m) * St(0.5) : v - m);
}

// One pass's sums over {z > t}, in double
struct Sums {
  double cnt = 0, s1 = 0, s2 = 0, zmin = kInf;
};

// ... over a compacted candidate list
template <int kKind>
KX_INLINE Sums cand_sums(const double* cand, int64_t nc, double t) {
  double cnt = 0, s1 = 0, s2 = 0, zmin = kInf;
#pragma omp simd reduction(+ : cnt, s1, s2) reduction(min : zmin)
  for (int64_t i = 0; i < nc; ++i) {
    const double z = cand[i];
    const bool on = z > t;
    cnt += on ? 1.0 : 0.0;
    s1 += on ? z : 0.0;
    if constexpr (kKind == kEntmax15) s2 += on ? z * z : 0.0;
    zmin = on && z < zmin ? z : zmin;
  }
  return {cnt, s1, s2, zmin};
}

// {z > t} compacted into cand (branch-free), from the blocks whose max is past t
template <int kKind, typename St>
KX_INLINE int64_t gather(const St* x, int64_t n, St m, const St* bm, double t, double* cand) {
  int64_t nc = 0;
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += kBlock) {
    if (!(z_of<kKind>(bm[b], m) > t)) continue;
    const int64_t i1 = std::min(n, i0 + kBlock);
    for (int64_t i = i0; i < i1; ++i) {
      const double z = z_of<kKind>(x[i], m);
      cand[nc] = z;  // nc <= i < n
      nc += z > t;
    }
  }
  return nc;
}

// tau of one row (m finite): the contract's safeguarded Newton on the support, E = kind + 1, each pass
// summing over {z > t}. The candidates {z > -1} are compacted first (every support the iteration visits
// is a subset: t starts at -1 and only grows), and the passes read them instead of the row.
template <int kKind, typename St>
KX_INLINE double newton_tau(const St* x, int64_t n, St m, const St* bm, double* cand) {
  double t = -1.0, tc = -1.0;  // F(-1) >= 1: t starts left of tau
  const int64_t nc = gather<kKind>(x, n, m, bm, t, cand);
  for (int pass = 0; pass < kMaxPasses; ++pass) {
    const Sums s = cand_sums<kKind>(cand, nc, t);
    if (s.cnt == 0) break;  // cannot happen (t <= tau < 0 = max z); keeps the last tc rather than 0 / 0
    if constexpr (kKind == kSparsemax) {
      tc = (s.s1 - 1) / s.cnt;
    } else {
      const double mean = s.s1 / s.cnt, var = std::max(s.s2 / s.cnt - mean * mean, 0.0);
      tc = mean - std::sqrt(std::max(1 / s.cnt - var, 0.0));
    }
    if (s.zmin > tc) return tc;  // {z > tc} is the support the sums were taken on: tc is tau
    const double newton = kKind == kSparsemax
                              ? tc
                              : t + (s.s2 - 2 * t * s.s1 + s.cnt * t * t - 1) / (2 * (s.s1 - s.cnt * t));
    t = std::max(newton, s.zmin);  // both <= tau; the support loses at least one entry
  }
  return tc;
}

// p = relu(z - tau)^E into out (St; may be x itself: entry i is read before it is written); the runs of
// blocks whose max is not past tau are filled with zeros. With kLoss, also sum p^2 (kind 0) or
// p^1.5 = u^3 (kind 1) and sum p (x - m) over the support.
template <int kKind, bool kLoss, typename St>
KX_INLINE void newton_out(const St* x, int64_t n, St m, const St* bm, double tau, St* out, double& omega_sum,
                          double& px_sum) {
  double sq = 0, px = 0;
  int64_t zero_from = 0;
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += kBlock) {
    if (!(z_of<kKind>(bm[b], m) > tau)) continue;
    const int64_t i1 = std::min(n, i0 + kBlock);
    std::fill(out + zero_from, out + i0, St(0));
    zero_from = i1;
#pragma omp simd reduction(+ : sq, px)
    for (int64_t i = i0; i < i1; ++i) {
      const St d = x[i] - m;
      const double xs = static_cast<double>(d);
      const double z = kKind == kEntmax15 ? static_cast<double>(d * St(0.5)) : xs;
      const double u = z - tau;
      const bool on = u > 0;
      const double p = keep(kKind == kEntmax15 ? u * u : u, on);  // -inf entries: masked away
      out[i] = static_cast<St>(p);
      if constexpr (kLoss) {
        sq += p * (kKind == kEntmax15 ? keep(u, on) : p);
        px += keep(p * xs, on);  // xs = -inf only off the support, where p * xs is NaN
      }
    }
  }
  std::fill(out + zero_from, out + n, St(0));
  omega_sum = sq, px_sum = px;
}

template <typename T, typename St>
struct FwdArgs {
  const T* x;
  const St* alpha;
  const int64_t* target;
  T* p;
  St* loss;
  int64_t N, n_iter, ignore_index;
  int kind;
};

// the loss of a row that is not ignored, from its sums (m finite)
template <int kKind>
KX_INLINE double entmax_loss(double omega_sum, double px_sum, double xt) {
  const double omega = kKind == kSparsemax ? (1 - omega_sum) / 2 : (1 - omega_sum) / 0.75;
  return omega + px_sum - xt;  // xt = x_t - m = -inf gives +inf
}

template <int kKind, typename T, typename St>
KX_INLINE void newton_rows(const FwdArgs<T, St>& a, int64_t begin, int64_t end, St* buf, St* bm, double* cand) {
  const int64_t N = a.N;
  for (int64_t r = begin; r < end; ++r) {
    const St* x = row_in(a.x + r * N, N, buf);
    T* p = a.p + r * N;
    const St m = row_max_blocks(x, N, bm);
    const bool ignored = a.target && a.target[r] == a.ignore_index;
    if (m == -std::numeric_limits<St>::infinity()) {  // all -inf: p = 0, loss +inf unless ignored
      row_zero<T, St>(p, N);
      if (a.target) a.loss[r] = ignored ? St(0) : std::numeric_limits<St>::infinity();
      continue;
    }
    const double tau = newton_tau<kKind>(x, N, m, bm, cand);
    St* out = row_out(p, buf);  // in place over the scratch row
    double omega_sum = 0, px_sum = 0;
    if (a.target && !ignored) {
      const St xt = x[a.target[r]] - m;  // read before the scratch row is overwritten
      newton_out<kKind, true>(x, N, m, bm, tau, out, omega_sum, px_sum);
      a.loss[r] = static_cast<St>(entmax_loss<kKind>(omega_sum, px_sum, xt));
    } else {
      newton_out<kKind, false>(x, N, m, bm, tau, out, omega_sum, px_sum);
      if (a.target) a.loss[r] = St(0);
    }
    row_flush(p, out, N);
  }
}

// ---- alpha-entmax by bisection ------------------------------------------------------------------------

template <typename T, typename St>
KX_INLINE void bisect_rows(const FwdArgs<T, St>& a, int64_t begin, int64_t end, St* buf, St* cand) {
  const int64_t N = a.N;
  for (int64_t r = begin; r < end; ++r) {
    const St* x = row_in(a.x + r * N, N, buf);
    T* p = a.p + r * N;
    const St m = row_max(x, N);
    if (m == -std::numeric_limits<St>::infinity()) {
      row_zero<T, St>(p, N);
      continue;
    }
    const St c = a.alpha[r] - St(1), e = St(1) / c;
    St lo = St(-1), hi = -std::pow(static_cast<St>(1.0 / static_cast<double>(N)), c);
    // the entries that can be in the support at some mid >= lo: z > lo (every term with z <= mid is 0,
    // and mid only grows with lo), kept compact
    int64_t nc = 0;
    for (int64_t i = 0; i < N; ++i) {
      const St z = c * (x[i] - m);
      if (z > lo) cand[nc++] = z;
    }
    for (int64_t it = 0; it < a.n_iter; ++it) {
      const St mid = (lo + hi) / St(2);
      if (mid <= lo || mid >= hi) break;  // the interval has collapsed in St
      double mass = 0;
      for (int64_t j = 0; j < nc; ++j) {
        const St u = cand[j] - mid;
        if (u > 0) mass += pow_pos(u, e);
      }
      if (mass >= 1) {
        lo = mid;
        int64_t k = 0;
        for (int64_t j = 0; j < nc; ++j)
          if (cand[j] > mid) cand[k++] = cand[j];
        nc = k;
      } else {
        hi = mid;
      }
    }
    double s = 0;  // >= 1: the bisection keeps F(lo) >= 1 (lo = -1: the max entry alone gives 1)
    for (int64_t j = 0; j < nc; ++j) s += pow_pos(cand[j] - lo, e);
    St* out = row_out(p, buf);
    for (int64_t i = 0; i < N; ++i) {
      const St u = c * (x[i] - m) - lo;
      out[i] = u > 0 ? static_cast<St>(static_cast<double>(pow_pos(u, e)) / s) : St(0);
    }
    row_flush(p, out, N);
  }
}

template <typename T, typename St>
KX_INLINE void fwd_rows(const FwdArgs<T, St>& a, int64_t begin, int64_t end) {
  std::vector<St> buf(std::is_same_v<T, St> ? 0 : a.N);
  if (a.kind == kBisect) {
    std::vector<St> cand(a.N);
    bisect_rows(a, begin, end, buf.data(), cand.data());
    return;
  }
  std::vector<St> bm((a.N + kBlock - 1) / kBlock);
  std::vector<double> cand(a.N);
  if (a.kind == kSparsemax)
    newton_rows<kSparsemax>(a, begin, end, buf.data(), bm.data(), cand.data());
  else
    newton_rows<kEntmax15>(a, begin, end, buf.data(), bm.data(), cand.data());
}

// ---- top-k softmax --------------------------------------------------------------------------------------

// order-preserving keys: float32 bits (float rows, 16-bit rows converted exactly), 64-bit for double
template <typename St>
using key_t = std::conditional_t<std::is_same_v<St, double>, uint64_t, uint32_t>;

template <typename St>
KX_INLINE key_t<St> order_key(St v) {
  using K = key_t<St>;
  constexpr int kTop = 8 * sizeof(K) - 1;
  if (v == St(0)) v = St(0);  // -0.0 -> +0.0: equal values, equal keys
  K b;
  std::memcpy(&b, &v, sizeof b);
  return b ^ ((b >> kTop) ? ~K(0) : (K(1) << kTop));
}

template <typename T, typename St>
struct TopkArgs {
  const T* x;
  const int64_t* target;
  T* p;
  St* loss;
  int64_t N, k, ignore_index;
};

template <typename T, typename St>
KX_INLINE void topk_rows(const TopkArgs<T, St>& a, int64_t begin, int64_t end) {
  using K = key_t<St>;
  const int64_t N = a.N;
  std::vector<St> buf(std::is_same_v<T, St> ? 0 : N);
  std::vector<K> keys(N);
  constexpr St inf = std::numeric_limits<St>::infinity();
  for (int64_t r = begin; r < end; ++r) {
    const St* x = row_in(a.x + r * N, N, buf.data());
    T* p = a.p + r * N;
    const St m = row_max(x, N);
    const bool ignored = a.target && a.target[r] == a.ignore_index;
    if (m == -inf) {
      row_zero<T, St>(p, N);
      if (a.target) a.loss[r] = ignored ? St(0) : inf;
      continue;
    }
    // radix select of the k-th largest key, 8 bits a pass from the top; `need` counts down to the rank of
    // v among the keys that share the prefix, i.e. finally k - #{key > v}
    for (int64_t i = 0; i < N; ++i) keys[i] = order_key(x[i]);
    int64_t nc = N, need = a.k;
    K v = 0;
    for (int shift = 8 * sizeof(K) - 8; shift >= 0; shift -= 8) {
      int64_t hist[256] = {};
      for (int64_t j = 0; j < nc; ++j) ++hist[(keys[j] >> shift) & 0xff];
      int d = 255;
      for (; d > 0 && hist[d] < need; --d) need -= hist[d];
      v |= K(d) << shift;
      if (shift == 0) break;
      int64_t kept = 0;  // the candidates with this digit
      for (int64_t j = 0; j < nc; ++j)
        if (((keys[j] >> shift) & 0xff) == K(d)) keys[kept++] = keys[j];
      nc = kept;
    }
    // S = {key > v} + the first `need` entries with key == v; exponentials of S, then normalised
    St* out = row_out(p, buf.data());
    const St xt = a.target && !ignored ? x[a.target[r]] - m : St(0);  // before the scratch row is overwritten
    double s = 0;
    for (int64_t i = 0; i < N; ++i) {
      const K key = order_key(x[i]);
      const bool sel = key > v || (key == v && need > 0 && need--);
      const St ex = sel ? std::exp(x[i] - m) : St(0);
      out[i] = ex;
      s += ex;
    }
    const double inv = 1.0 / s;  // s >= 1: the max entry is selected
    for (int64_t i = 0; i < N; ++i) out[i] = static_cast<St>(out[i] * inv);
    row_flush(p, out, N);
    if (a.target) a.loss[r] = ignored ? St(0) : static_cast<St>(std::log(s) - static_cast<double>(xt));
  }
}

// ---- backward -------------------------------------------------------------------------------------------

template <typename T, typename St>
struct BwdArgs {
  const T* dp;
  const T* p;
  const St* alpha;
  T* dx;
  St* dalpha;
  int64_t N;
  int kind;
  bool alpha_grad;
};

// kinds 0 and 3: g = 1 or p on the support (vectorised); kind 1: g = sqrt(p), a branch on the support
// (GCC vectorises no sqrt here: the call may set errno), cheap for the usual sparse p
template <int kKind>
KX_INLINE double g_of(double p) {
  if constexpr (kKind == kSparsemax) return 1.0;
  if constexpr (kKind == kSoftmax) return p;
  return std::sqrt(p);
}

template <int kKind, typename St>
KX_INLINE void bwd_row_simple(const St* p, const St* dp, int64_t n, St* dx, St* bm) {
  double G = 0, S = 0;
  if constexpr (kKind == kEntmax15) {
    // sqrt is scalar: only the blocks that hold support (their max p > 0) are walked
    for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += kBlock) {
      const int64_t i1 = std::min(n, i0 + kBlock);
      St mb = 0;
#pragma omp simd reduction(max : mb)
      for (int64_t i = i0; i < i1; ++i) mb = p[i] > mb ? p[i] : mb;
      bm[b] = mb;
      if (!(mb > 0)) continue;
      for (int64_t i = i0; i < i1; ++i) {
        if (!(p[i] > 0)) continue;
        const double g = g_of<kKind>(p[i]);
        G += g;
        S += g * static_cast<double>(dp[i]);
      }
    }
  } else {
#pragma omp simd reduction(+ : G, S)
    for (int64_t i = 0; i < n; ++i) {
      const double pv = p[i];
      const bool on = pv > 0;
      const double g = on ? g_of<kKind>(pv) : 0.0;
      G += g;
      S += g * keep(dp[i], on);  // dp off the support may be anything (inf): masked away
    }
  }
  const double q = G > 0 ? S / G : 0.0;
  if constexpr (kKind == kEntmax15) {
    for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += kBlock) {
      const int64_t i1 = std::min(n, i0 + kBlock);
      if (!(bm[b] > 0)) {
        std::fill(dx + i0, dx + i1, St(0));
        continue;
      }
      for (int64_t i = i0; i < i1; ++i)
        dx[i] = p[i] > 0 ? static_cast<St>(g_of<kKind>(p[i]) * (static_cast<double>(dp[i]) - q)) : St(0);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const double pv = p[i];
      dx[i] = static_cast<St>(keep(g_of<kKind>(pv) * (static_cast<double>(dp[i]) - q), pv > 0));
    }
  }
}

// alpha-entmax: g = p^(2 - a) on the support, and dalpha. Scalar (a power per support entry); g by
// pow in double: for a near 3, g ~ 1 / p is large where p is small, and exp2(e log2 p) in float loses
// |e log2 p| ulps of it (the reference takes p ** (2 - a)).
template <typename St>
KX_INLINE St bwd_row_bisect(const St* p, const St* dp, int64_t n, St a, bool alpha_grad, St* dx) {
  const double ge = static_cast<double>(St(2) - a);
  double G = 0, S = 0, ent = 0, A = 0, C = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double pv = p[i];
    if (!(pv > 0)) continue;
    const double g = std::pow(pv, ge), d = dp[i];
    G += g;
    S += g * d;
    if (alpha_grad) {
      const double plogp = pv * std::log(pv);
      ent += plogp;
      A += d * pv;
      C += d * plogp;
    }
  }
  const double q = G > 0 ? S / G : 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double pv = p[i];
    dx[i] = pv > 0 ? static_cast<St>(std::pow(pv, ge) * (static_cast<double>(dp[i]) - q)) : St(0);
  }
  if (!alpha_grad || !(G > 0)) return St(0);
  const double c = static_cast<double>(a - St(1)), B = q;
  return static_cast<St>((A - B) / (c * c) - (C - B * ent) / c);
}

template <typename T, typename St>
KX_INLINE void bwd_rows(const BwdArgs<T, St>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  constexpr bool kSame = std::is_same_v<T, St>;
  std::vector<St> pbuf(kSame ? 0 : N), dbuf(kSame ? 0 : N), bm(a.kind == kEntmax15 ? (N + kBlock - 1) / kBlock : 0);
  for (int64_t r = begin; r < end; ++r) {
    const St* p = row_in(a.p + r * N, N, pbuf.data());
    const St* dp = row_in(a.dp + r * N, N, dbuf.data());
    T* dx = a.dx + r * N;
    St* out = row_out(dx, dbuf.data());  // over the dp scratch row: each entry read before written
    switch (a.kind) {
      case kSparsemax:
        bwd_row_simple<kSparsemax>(p, dp, N, out, bm.data());
        break;
      case kEntmax15:
        bwd_row_simple<kEntmax15>(p, dp, N, out, bm.data());
        break;
      case kSoftmax:
        bwd_row_simple<kSoftmax>(p, dp, N, out, bm.data());
        break;
      default: {
        const St d = bwd_row_bisect(p, dp, N, a.alpha[r], a.alpha_grad, out);
        if (a.alpha_grad) a.dalpha[r] = d;
      }
    }
    row_flush(dx, out, N);
  }
}

// ---- ISA clones (KX_CLONES: simd.h) ----------------------------------------------------------------

KX_CLONES(fwd_rows, FwdArgs)
KX_CLONES(topk_rows, TopkArgs)
KX_CLONES(bwd_rows, BwdArgs)

// rows per task: about 64K entries, at least one row
int64_t grain(int64_t N) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(N, 1)); }

// ---- ops -------------------------------------------------------------------------------------------------

at::ScalarType state_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous (R, N) tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating");
}

void check_per_row(const char* op, const char* name, const Tensor& t, int64_t R, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == R && t.is_contiguous() && t.scalar_type() == dtype, op, ": ", name,
              " must be a contiguous (R,) tensor of dtype ", dtype);
}

std::tuple<Tensor, Tensor> entmax_cpu(const Tensor& x, const optional<Tensor>& alpha, int64_t kind, int64_t n_iter,
                                      const optional<Tensor>& target, int64_t ignore_index) {
  const char* op = "kxops::entmax (cpu)";
  check_rows(op, "x", x);
  TORCH_CHECK(kind >= kSparsemax && kind <= kBisect, op, ": kind must be 0, 1 or 2, got ", kind);
  TORCH_CHECK(!(target && kind == kBisect), op, ": the loss (target) is for kinds 0 and 1");
  const int64_t R = x.size(0), N = x.size(1);
  const auto st = state_dtype(x.scalar_type());
  if (kind == kBisect) {
    TORCH_CHECK(alpha.has_value(), op, ": kind 2 needs alpha");
    check_per_row(op, "alpha", *alpha, R, st);
  }
  if (target) check_per_row(op, "target", *target, R, at::kLong);
  Tensor p = at::empty_like(x), loss = at::empty({target ? R : 0}, x.options().dtype(st));
  if (R == 0 || N == 0) {
    p.zero_();
    loss.fill_(0);
    return {p, loss};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_entmax_cpu", [&] {
    using St = state_t<scalar_t>;
    FwdArgs<scalar_t, St> a{x.const_data_ptr<scalar_t>(),
                            kind == kBisect ? alpha->const_data_ptr<St>() : nullptr,
                            target ? target->const_data_ptr<int64_t>() : nullptr,
                            p.data_ptr<scalar_t>(),
                            target ? loss.data_ptr<St>() : nullptr,
                            N,
                            n_iter,
                            ignore_index,
                            static_cast<int>(kind)};
    const auto fn = fwd_rows_pick<scalar_t, St>();
    at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {p, loss};
}

std::tuple<Tensor, Tensor> entmax_backward_cpu(const Tensor& dp, const Tensor& p, const optional<Tensor>& alpha,
                                               int64_t kind, bool alpha_grad) {
  const char* op = "kxops::entmax_backward (cpu)";
  check_rows(op, "p", p);
  check_rows(op, "dp", dp);
  TORCH_CHECK(dp.sizes() == p.sizes() && dp.scalar_type() == p.scalar_type(), op,
              ": dp must have p's shape and dtype");
  TORCH_CHECK(kind >= kSparsemax && kind <= kSoftmax, op, ": kind must be 0, 1, 2 or 3, got ", kind);
  TORCH_CHECK(!alpha_grad || kind == kBisect, op, ": alpha_grad is for kind 2");
  const int64_t R = p.size(0), N = p.size(1);
  const auto st = state_dtype(p.scalar_type());
  if (kind == kBisect) {
    TORCH_CHECK(alpha.has_value(), op, ": kind 2 needs alpha");
    check_per_row(op, "alpha", *alpha, R, st);
  }
  Tensor dx = at::empty_like(p), dalpha = at::empty({alpha_grad ? R : 0}, p.options().dtype(st));
  if (R == 0 || N == 0) {
    dx.zero_();
    dalpha.fill_(0);
    return {dx, dalpha};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "kxops_entmax_backward_cpu", [&] {
    using St = state_t<scalar_t>;
    BwdArgs<scalar_t, St> a{dp.const_data_ptr<scalar_t>(),
                            p.const_data_ptr<scalar_t>(),
                            kind == kBisect ? alpha->const_data_ptr<St>() : nullptr,
                            dx.data_ptr<scalar_t>(),
                            alpha_grad ? dalpha.data_ptr<St>() : nullptr,
                            N,
                            static_cast<int>(kind),
                            alpha_grad};
    const auto fn = bwd_rows_pick<scalar_t, St>();
    at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {dx, dalpha};
}

std::tuple<Tensor, Tensor> topk_softmax_cpu(const Tensor& x, int64_t k, const optional<Tensor>& target,
                                            int64_t ignore_index) {
  const char* op = "kxops::topk_softmax (cpu)";
  check_rows(op, "x", x);
  const int64_t R = x.size(0), N = x.size(1);
  TORCH_CHECK(k >= 1 && k <= N, op, ": k must be in [1, ", N, "], got ", k);
  const auto st = state_dtype(x.scalar_type());
  if (target) check_per_row(op, "target", *target, R, at::kLong);
  Tensor p = at::empty_like(x), loss = at::empty({target ? R : 0}, x.options().dtype(st));
  if (R == 0) return {p, loss};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_topk_softmax_cpu", [&] {
    using St = state_t<scalar_t>;
    TopkArgs<scalar_t, St> a{x.const_data_ptr<scalar_t>(),
                             target ? target->const_data_ptr<int64_t>() : nullptr,
                             p.data_ptr<scalar_t>(),
                             target ? loss.data_ptr<St>() : nullptr,
                             N,
                             k,
                             ignore_index};
    const auto fn = topk_rows_pick<scalar_t, St>();
    at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) { fn(a, b, e); });
  });
  return {p, loss};
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("entmax", &entmax_cpu);
  m.impl("entmax_backward", &entmax_backward_cpu);
  m.impl("topk_softmax", &topk_softmax_cpu);
}

}  // namespace kxops
