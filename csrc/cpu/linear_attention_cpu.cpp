// Linear attention on CPU: kxops::linear_attention, linear_attention_backward, linear_attention_step
// (semantics and backward formulas: docs/linear_attention_kernel_contract.md).
//
// Work items are (sequence, head) pairs, taken longest first from a shared counter (packed sequences
// differ in length). A sequence is walked in chunks of C tokens: the chunk's features (phi, scale, RoPE)
// go into small per-thread buffers, and the rest is small matrix products on them (o lower / o upper:
// masked to s <= t / s >= t inside the chunk):
//   causal forward   num = (RQ RK^T o lower) V + RQ S,   S += RK^T V,   den from a running z
//   global forward   S, z over the whole sequence first, then num = RQ S
//   causal backward  a forward sweep gives u_t = S_t g_t = ((G V^T o lower) RK + G S^T)_t, hence
//                    a = 1 / (den + eps), gn = a g, gd (a and gd kept per token) and dq; a reverse
//                    sweep reloads gn = a g, carries G_t and gives
//                    d rk = (V GN^T o upper) RQ + V G^T,   dv = (RK RQ^T o upper) GN + RK G,   G += RQ^T GN
//   global backward  S, z; then u = G S^T, dq and G = dS + RQ^T GN; then d rk = V G^T, dv = RK G
// Nothing of size T x F x Dv, and no per-chunk state, is ever stored.
//
// All arithmetic is in double, whatever the input dtype; outputs and states are rounded once. In float
// the reference is more accurate than a float chunked kernel can be: its cumulative sums accumulate in
// double (ATen's CPU cumsum) and its products are blocked BLAS dot products, and the tolerance is twice
// its error; float tiles summing 64 terms in sequence came out at up to 2.5 times it. The products run
// on a register-tiled kernel written with GCC vector types, compiled for baseline x86-64, AVX2+FMA
// and AVX-512 and picked as ATen picks its own kernels (ATEN_CPU_CAPABILITY).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "simd.h"
#include "sincos.h"

namespace kxops {
namespace {

using at::Tensor;
using cpu::Isa;
using cpu::cpu_isa;
using cpu::kAvx2;
using cpu::kAvx512;
using cpu::kDefault;
using cpu::sincos_table;
using std::optional;

constexpr int64_t kChunk = 32;  // tokens per chunk
constexpr int64_t kPad = 8;     // F, Dv and the chunk are padded to 8 doubles (one 64-byte vector)
constexpr int64_t kMaxDim = 256;
constexpr double kTaylorMin = 1e-12;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- small matrix products (double) --------------------------------------------------------------

// One 64-byte vector: a zmm register, two ymm or four xmm, depending on the clone.
typedef double V __attribute__((vector_size(64), may_alias));
constexpr int64_t W = 8;

// c[MR x NR*W] (+)= sum_(k0 <= k < k1) a[m, k] b[k, :]: a read as scalars at a[m * sam + k * sak] (any
// layout, so transposes cost nothing), b and c rows 64-byte aligned. The accumulators stay in registers
// for the whole k loop.
template <int MR, int NR>
KX_INLINE void tile(int64_t k0, int64_t k1, const double* a, int64_t sam, int64_t sak, const double* b,
                    int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  V acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[m][j] = accumulate ? *reinterpret_cast<const V*>(c + m * ldc + j * W) : V{};
  for (int64_t k = k0; k < k1; ++k) {
    V bv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) bv[j] = *reinterpret_cast<const V*>(b + k * ldb + j * W);
    const double* ak = a + k * sak;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const double s = ak[m * sam];
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[m][j] += s * bv[j];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) *reinterpret_cast<V*>(c + m * ldc + j * W) = acc[m][j];
}

// Which part of a chunk-by-chunk (token x token) product is needed: row tile [m0, m0 + MR) of a
// product whose columns are tokens needs columns <= m0 + MR - 1 (kLowerN) or >= m0 (kUpperN); one
// whose k runs over tokens needs k < m0 + MR (kLowerK) or k >= m0 (kUpperK). Entries computed past
// the diagonal are zeroed by mask().
enum class Tri { kNone, kLowerN, kUpperN, kLowerK, kUpperK };

// c (M x N) (+)= a (M x K) b (K x N); M a multiple of MR, N of W; ldb, ldc multiples of W.
template <int MR, int NR>
KX_INLINE void gemm_tiles(Tri tri, int64_t M, int64_t N, int64_t K, const double* a, int64_t sam, int64_t sak,
                          const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    int64_t n0 = 0, n1 = N, k0 = 0, k1 = K;
    if (tri == Tri::kLowerN) n1 = std::min(N, round_up(m0 + MR, W));
    if (tri == Tri::kUpperN) n0 = m0 / W * W;
    if (tri == Tri::kLowerK) k1 = std::min(K, m0 + MR);
    if (tri == Tri::kUpperK) k0 = std::min(K, m0);
    const double* am = a + m0 * sam;
    double* cm = c + m0 * ldc;
    int64_t n = n0;
    for (; n + NR * W <= n1; n += NR * W) tile<MR, NR>(k0, k1, am, sam, sak, b + n, ldb, cm + n, ldc, accumulate);
    for (; n < n1; n += W) tile<MR, 1>(k0, k1, am, sam, sak, b + n, ldb, cm + n, ldc, accumulate);
  }
}

// The instruction sets, and what each compiles out of line: the products (one copy each) and a
// Worker's element-wise steps (Clone::run, one copy per step and Worker type).
#define KX_GEMM_ARGS                                                                                        \
  Tri tri, int64_t M, int64_t N, int64_t K, const double *a, int64_t sam, int64_t sak, const double *b, \
      int64_t ldb, double *c, int64_t ldc, bool accumulate
#define KX_GEMM_CALL tri, M, N, K, a, sam, sak, b, ldb, c, ldc, accumulate
template <int kIsa>
struct Clone;
template <>
struct Clone<kDefault> {
  static constexpr int MR = 2;  // 16 xmm: 8 accumulators
  __attribute__((noinline)) static void gemm(KX_GEMM_ARGS) { gemm_tiles<2, 1>(KX_GEMM_CALL); }
  template <typename Fn>
  __attribute__((noinline)) static void run(const Fn& fn) { fn(); }
};
#ifdef KX_TARGET_AVX2
template <>
struct Clone<kAvx2> {
  static constexpr int MR = 4;  // 16 ymm: 8 accumulators
  KX_TARGET_AVX2 __attribute__((noinline)) static void gemm(KX_GEMM_ARGS) { gemm_tiles<4, 1>(KX_GEMM_CALL); }
  template <typename Fn>
  KX_TARGET_AVX2 __attribute__((noinline)) static void run(const Fn& fn) { fn(); }
};
template <>
struct Clone<kAvx512> {
  static constexpr int MR = 8;  // 32 zmm: 16 accumulators
  KX_TARGET_AVX512 __attribute__((noinline)) static void gemm(KX_GEMM_ARGS) { gemm_tiles<8, 2>(KX_GEMM_CALL); }
  template <typename Fn>
  KX_TARGET_AVX512 __attribute__((noinline)) static void run(const Fn& fn) { fn(); }
};
#endif
#undef KX_GEMM_ARGS
#undef KX_GEMM_CALL

// P (rows [0, n), ld) keeps s <= i (lower) or s >= i; the rest of each row up to n is zeroed.
KX_INLINE void mask(double* P, int64_t ld, int64_t n, bool lower) {
  for (int64_t i = 0; i < n; ++i) {
    double* row = P + i * ld;
    if (lower)
      std::fill(row + i + 1, row + n, 0.0);
    else
      std::fill(row, row + i, 0.0);
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, all four multiples of 8 and the rows
// 64-byte aligned: 8 x 8 blocks, 24 shuffles each (a scalar transpose costs as much as the products).
KX_INLINE void transpose(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) {
  typedef int64_t I __attribute__((vector_size(64)));
  for (int64_t r0 = 0; r0 < rows; r0 += 8)
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      V x[8], t[8];
      for (int i = 0; i < 8; ++i) x[i] = *reinterpret_cast<const V*>(src + (r0 + i) * lds + c0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(x[i], x[i + 1], I{0, 8, 2, 10, 4, 12, 6, 14});
        t[i + 1] = __builtin_shuffle(x[i], x[i + 1], I{1, 9, 3, 11, 5, 13, 7, 15});
      }
      for (int i = 0; i < 8; i += 4)
        for (int j = 0; j < 2; ++j) {
          x[i + j] = __builtin_shuffle(t[i + j], t[i + j + 2], I{0, 1, 8, 9, 4, 5, 12, 13});
          x[i + j + 2] = __builtin_shuffle(t[i + j], t[i + j + 2], I{2, 3, 10, 11, 6, 7, 14, 15});
        }
      double* d = dst + c0 * ldd + r0;
      for (int j = 0; j < 4; ++j) {
        *reinterpret_cast<V*>(d + j * ldd) = __builtin_shuffle(x[j], x[j + 4], I{0, 1, 2, 3, 8, 9, 10, 11});
        *reinterpret_cast<V*>(d + (j + 4) * ldd) = __builtin_shuffle(x[j], x[j + 4], I{4, 5, 6, 7, 12, 13, 14, 15});
      }
    }
}

// 8 partial sums whatever the vector width: the same order, and error, in every clone.
KX_INLINE double dot(const double* a, const double* b, int64_t n) {
  double s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
#pragma omp simd
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  double t = 0;
  for (; i < n; ++i) t += a[i] * b[i];
  return (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))) + t;
}

// ---- feature maps --------------------------------------------------------------------------------

// y = exp(min(x, 0)) (elu1's negative branch and its derivative). precise: std::exp (float64 inputs).
// Otherwise x came from a narrower float: 2^k times a degree-8 polynomial on |r| <= ln2/2 (relative
// error ~2e-10, far below float's) in a loop that vectorises, unlike calls to exp; the selects are
// bit operations, which GCC vectorises where it does not if-convert the ternaries. x < -745 and NaN
// are redone with std::exp.
KX_INLINE void exp_nonpos(const double* x, double* y, int64_t n, bool precise) {
  if (precise) {
    for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i] > 0 ? 0.0 : x[i]);
    return;
  }
  constexpr double kLog2e = 1.4426950408889634074, kLn2Hi = 6.93147180369123816490e-01,
                   kLn2Lo = 1.90821492927058770002e-10, kShift = 0x1.8p52;
  int wide = 0;
#pragma omp simd reduction(| : wide)
  for (int64_t i = 0; i < n; ++i) {
    wide |= static_cast<int>(!(x[i] >= -745.0));
    const uint64_t xb = c10::bit_cast<uint64_t>(x[i]);
    const double d = c10::bit_cast<double>(xb & static_cast<uint64_t>(static_cast<int64_t>(xb) >> 63));  // min(x, 0)
    const double kk = d * kLog2e + kShift;
    const double k = kk - kShift;
    const double r = (d - k * kLn2Hi) - k * kLn2Lo;
    const double e = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 +
                     r * (1.0 / 5040 + r * (1.0 / 40320))))))));
    const uint64_t ki = c10::bit_cast<uint64_t>(kk) - c10::bit_cast<uint64_t>(kShift);  // k, two's complement
    // 2^k in two factors: k down to -1075 stays within normal doubles
    const uint64_t k1 = static_cast<uint64_t>(static_cast<int64_t>(ki) >> 1), k2 = ki - k1;
    y[i] = e * c10::bit_cast<double>((k1 + 1023) << 52) * c10::bit_cast<double>((k2 + 1023) << 52);
  }
  if (wide)
    for (int64_t i = 0; i < n; ++i)
      if (!(x[i] >= -745.0)) y[i] = std::exp(x[i]);
}

// f (rows [0, n), ld) = mult * phi(x) for raw rows x (n x Dk); rows [n, C) zeroed. Keeps what the
// derivative needs: e = exp(min(x, 0)) (elu1), nrm = |x| (taylor).
KX_INLINE void features(int fm, bool precise, const double* x, int64_t n, int64_t C, int64_t Dk, int64_t ld,
                        double mult, double* e, double* nrm, double* f) {
  if (fm == 1) exp_nonpos(x, e, n * Dk, precise);
  for (int64_t i = 0; i < n; ++i) {
    const double* xi = x + i * Dk;
    double* fi = f + i * ld;
    if (fm == 0) {
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) fi[d] = mult * xi[d];
    } else if (fm == 1) {
      const double* ei = e + i * Dk;
      // both branches computed, so that GCC if-converts the select (it keeps a branch around an add:
      // the add might trap)
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) {
        const double pos = xi[d] + 1;
        fi[d] = mult * (xi[d] > 0 ? pos : ei[d]);
      }
    } else if (fm == 2) {
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) fi[d] = mult * (xi[d] < 0 ? 0.0 : xi[d]);
    } else {
      nrm[i] = std::sqrt(dot(xi, xi, Dk));
      const double den = std::max(nrm[i], kTaylorMin);
      fi[0] = mult;
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) fi[1 + d] = mult * (xi[d] / den);
    }
  }
  std::memset(static_cast<void*>(f + n * ld), 0, sizeof(double) * (C - n) * ld);
}

// ---- the work description ------------------------------------------------------------------------

// St: the state dtype (float, or double for double inputs).
template <typename T, typename St>
struct Problem {
  const T *q, *k, *v, *g;                  // (B, L, H, D), last stride 1; g: dout (backward)
  int64_t qs[3], ks[3], vs[3], gs[3];      // strides of B, L, H
  T *out, *dq, *dk, *dv;                   // contiguous (B, L, H, D)
  const St *S0, *z0, *dS, *dz;             // contiguous (N, H, F, Dv), (N, H, F); null: zeros
  St *S, *z;                               // final state (forward), dS0 and dz0 (backward)
  const int32_t* cu;                       // (N + 1) or null
  const int64_t* pos;                      // (1 or B, L) or null
  int64_t pos_sb, pos_st;
  const St* inv_freq;                      // (Dk / 2) or null: no RoPE
  int64_t B, L, H, Dk, Dv, F, N;           // L: the seq dimension of q (total tokens when packed)
  int fm;
  double scale, eps;
  bool interleaved, normalize, causal, backward;
};

// What fill() loads for a chunk.
enum Fill : unsigned {
  kQ = 1,      // xq, fq, rq
  kQT = 2,     // + tr = rq^T
  kK = 4,      // xk, fk, rk
  kKT = 8,     // + tr = rk^T
  kKZ = 16,    // + z += the chunk's fk
  kV = 32,     // v
  kVT = 64,    // + vt
  kG = 128,    // g = dout
  kGN = 256,   // + g *= the stored a (gn), gt = g^T
};

// One thread's scratch and the passes over one (sequence, head) item. Buffers hold a chunk's rows (C
// tokens), rows and columns padded to kPad with zeros, 64-byte aligned.
template <typename T, typename St, int kIsa>
struct Worker {
  using K = Clone<kIsa>;
  static constexpr int64_t MR = K::MR;
  const Problem<T, St>& p;
  const int64_t Dk, Dv, F, half, off;  // off: the first feature that comes from x (1 for taylor)
  const bool rope;
  int64_t C, Fp, Dvp, Lx;
  void* mem = nullptr;
  double *xq, *xk, *eq, *ek, *nq, *nk, *gd;  // raw q, k (C x Dk), exp(min(x, 0)), |x|, gd (C)
  double *fq, *rq, *fk, *rk;                 // phi, rotated phi (C x Fp); rq == fq, rk == fk without RoPE
  double *tr;                                // rk^T or rq^T (Fp x C)
  double *v, *vt, *g, *gt;                   // v and its transpose, dout / gn and its transpose (C x Dvp)
  double *P, *x1, *x2;                       // token x token (C x C); products (C x Lx), (C x Dvp)
  double *S, *ST, *z, *gz;                   // running S or G (Fp x Dvp), its transpose; z, Gz (Fp)
  double *a_all, *gd_all;                    // causal backward: a = 1 / (den + eps), gd of every token
  St *theta, *cs, *sn;                       // RoPE angles, cos, sin (C x Dk/2), in the state dtype
  int64_t b = 0, h = 0, seq = 0, start = 0, len = 0;

  Worker(const Problem<T, St>& pr, int64_t Tmax)
      : p(pr), Dk(pr.Dk), Dv(pr.Dv), F(pr.F), half(pr.Dk / 2), off(pr.fm == 3), rope(pr.inv_freq != nullptr) {
    C = std::min(kChunk, round_up(std::max<int64_t>(Tmax, 1), kPad));
    Fp = round_up(F, kPad), Dvp = round_up(Dv, kPad), Lx = std::max(Fp, Dvp);
    const int64_t Tp = round_up(Tmax, kPad), Ct = rope ? C * round_up(half, 16) : 0;
    const bool seq_grads = p.backward && p.causal;
    std::pair<double**, int64_t> parts[] = {
        {&xq, C * Dk}, {&xk, C * Dk}, {&eq, C * Dk}, {&ek, C * Dk}, {&nq, C}, {&nk, C}, {&gd, C},
        {&fq, C * Fp}, {&fk, C * Fp}, {&rq, rope ? C * Fp : 0}, {&rk, rope ? C * Fp : 0}, {&tr, Fp * C},
        {&v, C * Dvp}, {&vt, Dvp * C}, {&g, C * Dvp}, {&gt, Dvp * C}, {&P, C * C}, {&x1, C * Lx},
        {&x2, C * Dvp}, {&S, Fp * Dvp}, {&ST, Dvp * Fp}, {&z, Fp}, {&gz, Fp},
        {&a_all, seq_grads ? Tp : 0}, {&gd_all, seq_grads ? Tp : 0}};
    std::pair<St**, int64_t> tables[] = {{&theta, Ct}, {&cs, Ct}, {&sn, Ct}};
    int64_t bytes = 0;
    for (auto& pt : parts) bytes += sizeof(double) * round_up(pt.second, kPad);
    for (auto& pt : tables) bytes += sizeof(St) * pt.second;
    mem = ::operator new(bytes, std::align_val_t{64});
    std::memset(mem, 0, bytes);
    char* at = static_cast<char*>(mem);
    for (auto& pt : parts) *pt.first = reinterpret_cast<double*>(at), at += sizeof(double) * round_up(pt.second, kPad);
    for (auto& pt : tables) *pt.first = reinterpret_cast<St*>(at), at += sizeof(St) * pt.second;
    if (!rope) rq = fq, rk = fk;
  }
  ~Worker() { ::operator delete(mem, std::align_val_t{64}); }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void set_item(int64_t item) {
    seq = item / p.H, h = item % p.H;
    if (p.cu)
      b = 0, start = p.cu[seq], len = p.cu[seq + 1] - p.cu[seq];
    else
      b = seq, start = 0, len = p.L;
  }
  int64_t state_index() const { return seq * p.H + h; }

  void gemm(Tri tri, int64_t M, int64_t N, int64_t Kd, const double* a, int64_t sam, int64_t sak,
            const double* bm, int64_t ldb, double* c, int64_t ldc, bool accumulate) {
    K::gemm(tri, M, N, Kd, a, sam, sak, bm, ldb, c, ldc, accumulate);
  }
  // S (Fp x Dvp) += a (Fp x n) b (n x Dvp)
  void add_to_state(int64_t n, const double* a, int64_t sam, int64_t sak, const double* bm) {
    K::gemm(Tri::kNone, Fp, Dvp, n, a, sam, sak, bm, Dvp, S, Dvp, true);
  }

  // ---- element-wise pieces (inlined into the steps below) ----

  KX_INLINE void load_raw(const T* x, const int64_t* s, int64_t t0, int64_t n, int64_t D, double* raw, int64_t ld) {
    const T* base = x + b * s[0] + h * s[2] + t0 * s[1];
    for (int64_t i = 0; i < n; ++i) {
      const T* row = base + i * s[1];
      double* r = raw + i * ld;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) r[d] = static_cast<double>(static_cast<St>(row[d]));
    }
  }

  // The rows of the next chunk into L2 while this one computes: rows H * D apart cross a page every
  // few rows, where the hardware prefetchers stop.
  KX_INLINE void prefetch(const T* x, const int64_t* s, int64_t t0, int64_t n, int64_t D) {
    const T* base = x + b * s[0] + h * s[2] + t0 * s[1];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < D * int64_t(sizeof(T)); o += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(base + i * s[1]) + o, 0, 2);
  }

  // cos/sin of every token's angles (computed in the state dtype), one table for q and k.
  KX_INLINE void angles(int64_t t0, int64_t n) {
    const int64_t pb = p.pos_sb ? b : 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = t0 + i;
      const St pa = static_cast<St>(p.pos ? p.pos[pb * p.pos_sb + t * p.pos_st] : t - start);
      St* th = theta + i * half;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) th[j] = pa * p.inv_freq[j];
    }
    sincos_table(theta, cs, sn, n * half, false);
  }

  // y = Rot(x) (Rot^T when transposed) for token i; the features before `off` are copied. In place ok.
  KX_INLINE void rotate(const double* x, double* y, int64_t i, bool transposed) {
    const St* c = cs + i * half;
    const St* s = sn + i * half;
    const double sg = transposed ? -1.0 : 1.0;
    if (off) y[0] = x[0];
    const double* xr = x + off;
    double* yr = y + off;
    if (p.interleaved) {
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const double a = xr[2 * j], bb = xr[2 * j + 1], cj = c[j], sj = sg * s[j];
        yr[2 * j] = a * cj - bb * sj;
        yr[2 * j + 1] = a * sj + bb * cj;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const double a = xr[j], bb = xr[j + half], cj = c[j], sj = sg * s[j];
        yr[j] = a * cj - bb * sj;
        yr[j + half] = a * sj + bb * cj;
      }
    }
  }

  // raw x, f = mult phi(x), r = Rot(f) (+ tr = r^T) for q or k.
  KX_INLINE void fill_features(const T* x, const int64_t* s, int64_t t0, int64_t n, double mult, double* raw,
                               double* e, double* nrm, double* f, double* r, bool transposed) {
    load_raw(x, s, t0, n, Dk, raw, Dk);
    features(p.fm, std::is_same_v<St, double>, raw, n, C, Dk, Fp, mult, e, nrm, f);
    if (rope) {
      for (int64_t i = 0; i < n; ++i) rotate(f + i * Fp, r + i * Fp, i, false);
      std::memset(static_cast<void*>(r + n * Fp), 0, sizeof(double) * (C - n) * Fp);
    }
    if (transposed) transpose(r, Fp, C, Fp, tr, C);
  }

  // Rows of v or dout (C x Dvp) (+ the transpose, Dvp x C).
  KX_INLINE void fill_rows(const T* x, const int64_t* s, int64_t t0, int64_t n, double* dst, double* dst_t) {
    load_raw(x, s, t0, n, Dv, dst, Dvp);
    std::memset(static_cast<void*>(dst + n * Dvp), 0, sizeof(double) * (C - n) * Dvp);
    if (dst_t) transpose(dst, Dvp, C, Dvp, dst_t, C);
  }

  KX_INLINE T* row(T* base, int64_t t, int64_t D) const { return base + ((b * p.L + t) * p.H + h) * D; }

  // z += phi(k) of chunk token i
  KX_INLINE void add_fk(int64_t i) {
    const double* fi = fk + i * Fp;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) z[f] += fi[f];
  }
  // Gz += gd fq of chunk token i
  KX_INLINE void add_gd_fq(int64_t i, double gdi) {
    const double* fi = fq + i * Fp;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) gz[f] += gdi * fi[f];
  }

  // dx (Dk) = mult * phi'(x)^T df for one token (df: F; for taylor df[0] drops out).
  KX_INLINE void phi_grad(const double* x, const double* e, double nrm, const double* df, double mult, T* out) {
    if (p.fm == 0) {
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) out[d] = static_cast<T>(static_cast<St>(mult * df[d]));
    } else if (p.fm == 1) {
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) {
        const double neg = df[d] * e[d];
        out[d] = static_cast<T>(static_cast<St>(mult * (x[d] > 0 ? df[d] : neg)));
      }
    } else if (p.fm == 2) {
#pragma omp simd
      for (int64_t d = 0; d < Dk; ++d) {
        const double gx = mult * df[d];
        out[d] = static_cast<T>(static_cast<St>(x[d] > 0 ? gx : 0.0));
      }
    } else {
      // u = x / |x|: du -> (du - u (u . du)) / |x|; below the clamp u = x / 1e-12 is linear
      const double* du = df + 1;
      if (nrm > kTaylorMin) {
        const double inv = 1.0 / nrm;
        const double ud = dot(x, du, Dk) * inv;
#pragma omp simd
        for (int64_t d = 0; d < Dk; ++d)
          out[d] = static_cast<T>(static_cast<St>(mult * ((du[d] - x[d] * inv * ud) * inv)));
      } else {
#pragma omp simd
        for (int64_t d = 0; d < Dk; ++d) out[d] = static_cast<T>(static_cast<St>(mult * (du[d] / kTaylorMin)));
      }
    }
  }

  // ---- the steps ----

  // The inputs of the chunk at c0 (tokens [t0, t0 + n) of batch row b, t0 = start + c0; what: Fill
  // flags); rows [n, C) are zero. The chunk at next (-1: none) is prefetched.
  void fill(int64_t c0, int64_t n, unsigned what, int64_t next) {
    const int64_t t0 = start + c0;
    K::run([&]() __attribute__((always_inline)) {
      if (next >= 0) {
        const int64_t t1 = start + next, n1 = std::min(C, len - next);
        if (what & kQ) prefetch(p.q, p.qs, t1, n1, Dk);
        if (what & kK) prefetch(p.k, p.ks, t1, n1, Dk);
        if (what & kV) prefetch(p.v, p.vs, t1, n1, Dv);
        if (what & kG) prefetch(p.g, p.gs, t1, n1, Dv);
      }
      if (rope && (what & (kQ | kK))) angles(t0, n);
      if (what & kQ) fill_features(p.q, p.qs, t0, n, p.scale, xq, eq, nq, fq, rq, what & kQT);
      if (what & kK) fill_features(p.k, p.ks, t0, n, 1.0, xk, ek, nk, fk, rk, what & kKT);
      if (what & kKZ)
        for (int64_t i = 0; i < n; ++i) add_fk(i);
      if (what & kV) fill_rows(p.v, p.vs, t0, n, v, (what & kVT) ? vt : nullptr);
      if (what & kG) fill_rows(p.g, p.gs, t0, n, g, nullptr);
      if (what & kGN) {
        for (int64_t i = 0; i < n; ++i) {
          double* gi = g + i * Dvp;
          const double a = a_all[c0 + i];
#pragma omp simd
          for (int64_t j = 0; j < Dv; ++j) gi[j] *= a;
        }
        transpose(g, Dvp, C, Dvp, gt, C);
      }
    });
  }

  // out rows from num (x1 rows) and den = fq . z_t (z running over the chunk's fk when causal).
  void write_out(int64_t t0, int64_t n) {
    K::run([&]() __attribute__((always_inline)) {
      for (int64_t i = 0; i < n; ++i) {
        if (p.causal) add_fk(i);
        T* o = row(p.out, t0 + i, Dv);
        const double* num = x1 + i * Lx;
        const double a = p.normalize ? 1.0 / (dot(fq + i * Fp, z, F) + p.eps) : 1.0;
#pragma omp simd
        for (int64_t j = 0; j < Dv; ++j) o[j] = static_cast<T>(static_cast<St>(num[j] * a));
      }
    });
  }

  // dq rows from u_t = S_t g_t (x1 rows; clobbered) with z_t running over fk (causal) or the final z:
  // gn = a g replaces g, gd goes to gd_out and a to a_out (when given); global: also Gz += gd fq.
  void dq_rows(int64_t t0, int64_t n, double* gd_out, double* a_out) {
    K::run([&]() __attribute__((always_inline)) {
      for (int64_t i = 0; i < n; ++i) {
        if (p.causal) add_fk(i);
        double* u = x1 + i * Lx;
        double gdi = 0, a = 1;
        if (p.normalize) {
          a = 1.0 / (dot(fq + i * Fp, z, F) + p.eps);
          gdi = -a * a * dot(rq + i * Fp, u, F);  // g . num = rq . (S g)
          double* gi = g + i * Dvp;
#pragma omp simd
          for (int64_t j = 0; j < Dv; ++j) gi[j] *= a;
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) u[f] *= a;
        }
        gd_out[i] = gdi;
        if (a_out) a_out[i] = a;
        // d fq = Rot^T(d rq) + gd z_t
        if (rope) rotate(u, u, i, true);
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) u[f] += gdi * z[f];
        phi_grad(xq + i * Dk, eq + i * Dk, nq[i], u, p.scale, row(p.dq, t0 + i, Dk));
        if (!p.causal) add_gd_fq(i, gdi);
      }
    });
  }

  // dk rows from d rk (x1 rows; clobbered) and Gz_t, dv rows from x2. Causal: Gz_t runs backwards
  // over gd fq (gd of the chunk at gd_chunk); global: Gz is final.
  void dk_dv_rows(int64_t t0, int64_t n, const double* gd_chunk) {
    K::run([&]() __attribute__((always_inline)) {
      for (int64_t i = n - 1; i >= 0; --i) {
        if (p.causal) add_gd_fq(i, gd_chunk[i]);
        double* drk = x1 + i * Lx;
        if (rope) rotate(drk, drk, i, true);
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) drk[f] += gz[f];
        phi_grad(xk + i * Dk, ek + i * Dk, nk[i], drk, 1.0, row(p.dk, t0 + i, Dk));
        T* o = row(p.dv, t0 + i, Dv);
        const double* d = x2 + i * Dvp;
#pragma omp simd
        for (int64_t j = 0; j < Dv; ++j) o[j] = static_cast<T>(static_cast<St>(d[j]));
      }
    });
  }

  // ---- state in and out ----

  // S = src (F x Dv) or zeros, padding included; zd = zsrc (F) or zeros.
  void load_state(const St* src, const St* zsrc, double* zd) {
    std::memset(static_cast<void*>(S), 0, sizeof(double) * Fp * Dvp);
    std::memset(static_cast<void*>(zd), 0, sizeof(double) * Fp);
    const int64_t si = state_index();
    if (src)
      for (int64_t f = 0; f < F; ++f) {
        const St* sf = src + (si * F + f) * Dv;
        for (int64_t j = 0; j < Dv; ++j) S[f * Dvp + j] = static_cast<double>(sf[j]);
      }
    if (zsrc)
      for (int64_t f = 0; f < F; ++f) zd[f] = static_cast<double>(zsrc[si * F + f]);
  }
  void store_state(const double* zd) {
    const int64_t si = state_index();
    for (int64_t f = 0; f < F; ++f) {
      St* sf = p.S + (si * F + f) * Dv;
      for (int64_t j = 0; j < Dv; ++j) sf[j] = static_cast<St>(S[f * Dvp + j]);
      p.z[si * F + f] = static_cast<St>(zd[f]);
    }
  }
  void refresh_transpose() {
    K::run([&]() __attribute__((always_inline)) { transpose(S, Dvp, Fp, Dvp, ST, Fp); });
  }

  // S, z: S0, z0 plus every token of the sequence.
  void global_state() {
    load_state(p.S0, p.z0, z);
    for (int64_t c0 = 0; c0 < len; c0 += C) {
      const int64_t n = std::min(C, len - c0);
      fill(c0, n, kK | kKT | kKZ | kV, c0 + C < len ? c0 + C : -1);
      add_to_state(n, tr, C, 1, v);
    }
  }

  // ---- the passes ----

  void forward() {
    if (!p.causal) {
      global_state();
      for (int64_t c0 = 0; c0 < len; c0 += C) {
        const int64_t n = std::min(C, len - c0), t0 = start + c0;
        fill(c0, n, kQ, c0 + C < len ? c0 + C : -1);
        gemm(Tri::kNone, round_up(n, MR), Dvp, F, rq, Fp, 1, S, Dvp, x1, Lx, false);
        write_out(t0, n);
      }
      store_state(z);
      return;
    }
    load_state(p.S0, p.z0, z);
    for (int64_t c0 = 0; c0 < len; c0 += C) {
      const int64_t n = std::min(C, len - c0), t0 = start + c0, Mr = round_up(n, MR), Nc = round_up(n, W);
      fill(c0, n, kQ | kK | kKT | kV, c0 + C < len ? c0 + C : -1);
      // num = (RQ RK^T o lower) V + RQ S_prev
      gemm(Tri::kLowerN, Mr, Nc, F, rq, Fp, 1, tr, C, P, C, false);
      mask(P, C, n, true);
      gemm(Tri::kLowerK, Mr, Dvp, n, P, C, 1, v, Dvp, x1, Lx, false);
      gemm(Tri::kNone, Mr, Dvp, F, rq, Fp, 1, S, Dvp, x1, Lx, true);
      write_out(t0, n);
      add_to_state(n, tr, C, 1, v);  // S += RK^T V
    }
    store_state(z);
  }

  void backward_causal() {
    // forward sweep: u = (G V^T o lower) RK + G S_prev^T, then S += RK^T V
    load_state(p.S0, p.z0, z);
    refresh_transpose();
    for (int64_t c0 = 0; c0 < len; c0 += C) {
      const int64_t n = std::min(C, len - c0), t0 = start + c0, Mr = round_up(n, MR), Nc = round_up(n, W);
      fill(c0, n, kQ | kK | kV | kVT | kG, c0 + C < len ? c0 + C : -1);
      gemm(Tri::kLowerN, Mr, Nc, Dv, g, Dvp, 1, vt, C, P, C, false);
      mask(P, C, n, true);
      gemm(Tri::kLowerK, Mr, Fp, n, P, C, 1, rk, Fp, x1, Lx, false);
      gemm(Tri::kNone, Mr, Fp, Dv, g, Dvp, 1, ST, Fp, x1, Lx, true);
      dq_rows(t0, n, gd_all + c0, a_all + c0);
      add_to_state(n, rk, 1, Fp, v);
      refresh_transpose();
    }
    // reverse sweep from G = dS: d rk = (V GN^T o upper) RQ + V G_next^T,
    // dv = (RK RQ^T o upper) GN + RK G_next, then G += RQ^T GN
    load_state(p.dS, p.dz, gz);
    refresh_transpose();
    for (int64_t c0 = len == 0 ? -1 : (len - 1) / C * C; c0 >= 0; c0 -= C) {
      const int64_t n = std::min(C, len - c0), t0 = start + c0, Mr = round_up(n, MR), Nc = round_up(n, W);
      fill(c0, n, kQ | kQT | kK | kV | kG | kGN, c0 - C);
      gemm(Tri::kUpperN, Mr, Nc, Dv, v, Dvp, 1, gt, C, P, C, false);
      mask(P, C, n, false);
      gemm(Tri::kUpperK, Mr, Fp, n, P, C, 1, rq, Fp, x1, Lx, false);
      gemm(Tri::kNone, Mr, Fp, Dv, v, Dvp, 1, ST, Fp, x1, Lx, true);
      gemm(Tri::kUpperN, Mr, Nc, F, rk, Fp, 1, tr, C, P, C, false);
      mask(P, C, n, false);
      gemm(Tri::kUpperK, Mr, Dvp, n, P, C, 1, g, Dvp, x2, Dvp, false);
      gemm(Tri::kNone, Mr, Dvp, F, rk, Fp, 1, S, Dvp, x2, Dvp, true);
      dk_dv_rows(t0, n, gd_all + c0);
      add_to_state(n, rq, 1, Fp, g);
      refresh_transpose();
    }
    store_state(gz);
  }

  void backward_global() {
    global_state();
    refresh_transpose();          // ST: S^T
    load_state(p.dS, p.dz, gz);   // S: G from here on
    // u = g S^T gives dq; G += RQ^T GN, Gz += sum gd fq
    for (int64_t c0 = 0; c0 < len; c0 += C) {
      const int64_t n = std::min(C, len - c0), t0 = start + c0;
      fill(c0, n, kQ | kG, c0 + C < len ? c0 + C : -1);
      gemm(Tri::kNone, round_up(n, MR), Fp, Dv, g, Dvp, 1, ST, Fp, x1, Lx, false);
      dq_rows(t0, n, gd, nullptr);
      add_to_state(n, rq, 1, Fp, g);
    }
    // d rk = V G^T, dv = RK G
    refresh_transpose();
    for (int64_t c0 = 0; c0 < len; c0 += C) {
      const int64_t n = std::min(C, len - c0), t0 = start + c0, Mr = round_up(n, MR);
      fill(c0, n, kK | kV, c0 + C < len ? c0 + C : -1);
      gemm(Tri::kNone, Mr, Fp, Dv, v, Dvp, 1, ST, Fp, x1, Lx, false);
      gemm(Tri::kNone, Mr, Dvp, F, rk, Fp, 1, S, Dvp, x2, Dvp, false);
      dk_dv_rows(t0, n, nullptr);
    }
    store_state(gz);
  }

  void run(int64_t item) {
    set_item(item);
    if (!p.backward)
      forward();
    else if (p.causal)
      backward_causal();
    else
      backward_global();
  }
};

// One thread: items order[next++] until none is left.
template <typename T, typename St, int kIsa>
void work(const Problem<T, St>& p, std::atomic<int64_t>& next, const int64_t* order, int64_t count, int64_t Tmax) {
  Worker<T, St, kIsa> w(p, Tmax);
  for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
       i = next.fetch_add(1, std::memory_order_relaxed))
    w.run(order[i]);
}

// ---- argument checks ------------------------------------------------------------------------------

at::ScalarType state_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool last_dim_unit(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

void check_floating(const char* op, const char* name, const Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// q, k, v of a kernel op (forward, backward or step): one floating dtype, CPU, unit last stride.
void check_qkv_tensors(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_floating(op, "q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device");
  TORCH_CHECK(last_dim_unit(q) && last_dim_unit(k) && last_dim_unit(v), op,
              ": q, k and v must have a unit stride on the last dimension");
}

void check_state(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape, at::ScalarType acc,
                 bool contiguous) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " (the state dtype), got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(!contiguous || t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_feature_map(const char* op, int64_t fm) {
  TORCH_CHECK(fm >= 0 && fm <= 3, op, ": feature_map must be 0 (identity), 1 (elu1), 2 (relu) or 3 (taylor), got ",
              fm);
}

void check_head_dims(const char* op, int64_t Dk, int64_t Dv) {
  TORCH_CHECK(Dk >= 1 && Dk <= kMaxDim, op, ": q and k must have a head dimension in [1, 256], got ", Dk);
  TORCH_CHECK(Dv >= 1 && Dv <= kMaxDim, op, ": v must have a head dimension in [1, 256], got ", Dv);
}

struct Shape {
  int64_t B, T, H, Dk, Dv, F, N;
};

Shape check_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& S0,
                 const optional<Tensor>& z0, const optional<Tensor>& cu_seqlens, const optional<Tensor>& positions,
                 const optional<Tensor>& inv_freq, int64_t feature_map) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (batch, seq, heads, head_dim), got ", q.dim(), "-D");
  Shape s{q.size(0), q.size(1), q.size(2), q.size(3), 0, 0, 0};
  TORCH_CHECK(k.dim() == 4 && k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == s.B && v.size(1) == s.T && v.size(2) == s.H, op,
              ": v must be (batch, seq, heads, head_dim_v) matching q ", q.sizes(), ", got ", v.sizes());
  s.Dv = v.size(3);
  check_qkv_tensors(op, q, k, v);
  check_head_dims(op, s.Dk, s.Dv);
  check_feature_map(op, feature_map);
  s.F = s.Dk + (feature_map == 3);
  const auto acc = state_dtype(q.scalar_type());
  if (cu_seqlens) {
    const Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.scalar_type() == at::kInt && cu.is_contiguous() &&
                    cu.device().is_cpu(),
                op, ": cu_seqlens must be a contiguous int32 (num_seqs + 1,) CPU vector");
    TORCH_CHECK(s.B == 1, op, ": cu_seqlens needs packed q, k, v, viewed as (1, total, heads, head_dim), got batch ",
                s.B);
    s.N = cu.size(0) - 1;
    const int32_t* c = cu.const_data_ptr<int32_t>();
    TORCH_CHECK(c[0] == 0 && c[s.N] == s.T, op, ": cu_seqlens must start at 0 and end at total=", s.T, ", got ",
                c[0], " and ", c[s.N]);
    for (int64_t n = 0; n < s.N; ++n)
      TORCH_CHECK(c[n] <= c[n + 1], op, ": cu_seqlens must be non-decreasing, got ", c[n], " then ", c[n + 1]);
  } else {
    s.N = s.B;
  }
  TORCH_CHECK(S0.has_value() == z0.has_value(), op, ": S0 and z0 must be given together");
  if (S0) {
    check_state(op, "S0", *S0, {s.N, s.H, s.F, s.Dv}, acc, true);
    check_state(op, "z0", *z0, {s.N, s.H, s.F}, acc, true);
  }
  if (inv_freq) {
    TORCH_CHECK(s.Dk % 2 == 0, op, ": RoPE (inv_freq) needs an even head dimension, got ", s.Dk);
    check_state(op, "inv_freq", *inv_freq, {s.Dk / 2}, acc, true);
  }
  if (positions) {
    const Tensor& t = *positions;
    TORCH_CHECK(t.dim() == 2 && (t.size(0) == 1 || t.size(0) == s.B) && t.size(1) == s.T, op,
                ": positions must be (1 or batch, seq) = (1 or ", s.B, ", ", s.T, "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong && t.device().is_cpu(), op, ": positions must be an int64 CPU tensor, got ",
                t.scalar_type(), " on ", t.device());
  }
  return s;
}

// ---- host side ------------------------------------------------------------------------------------

template <typename T, typename St>
void fill_problem(Problem<T, St>& p, const Shape& s, const Tensor& q, const Tensor& k, const Tensor& v,
                  const optional<Tensor>& cu_seqlens, const optional<Tensor>& positions,
                  const optional<Tensor>& inv_freq, bool interleaved, int64_t feature_map, double scale,
                  bool normalize, double eps, bool causal) {
  p.q = q.const_data_ptr<T>(), p.k = k.const_data_ptr<T>(), p.v = v.const_data_ptr<T>();
  for (int d = 0; d < 3; ++d) p.qs[d] = q.stride(d), p.ks[d] = k.stride(d), p.vs[d] = v.stride(d);
  p.cu = cu_seqlens ? cu_seqlens->const_data_ptr<int32_t>() : nullptr;
  p.inv_freq = inv_freq ? inv_freq->const_data_ptr<St>() : nullptr;
  p.pos = (positions && inv_freq) ? positions->const_data_ptr<int64_t>() : nullptr;
  p.pos_sb = p.pos && positions->size(0) > 1 ? positions->stride(0) : 0;
  p.pos_st = p.pos ? positions->stride(1) : 0;
  p.B = s.B, p.L = s.T, p.H = s.H, p.Dk = s.Dk, p.Dv = s.Dv, p.F = s.F, p.N = s.N;
  p.fm = static_cast<int>(feature_map);
  p.scale = scale, p.eps = eps;
  p.interleaved = interleaved, p.normalize = normalize, p.causal = causal;
}

// Runs every (sequence, head) item, longest first, on all threads.
template <typename T, typename St>
void launch(const Problem<T, St>& p) {
  const int64_t count = p.N * p.H;
  if (count == 0) return;
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  int64_t Tmax = p.L;
  if (p.cu) {
    auto len = [&](int64_t i) { return p.cu[i / p.H + 1] - p.cu[i / p.H]; };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len(a) > len(b); });
    Tmax = len(order[0]);
  }
  auto fn = &work<T, St, kDefault>;
#ifdef KX_TARGET_AVX2
  if (cpu_isa() == kAvx512) fn = &work<T, St, kAvx512>;
  if (cpu_isa() == kAvx2) fn = &work<T, St, kAvx2>;
#endif
  // Below ~1e5 multiply-adds a thread team costs more than it saves.
  const int64_t madds = p.L * p.H * (p.F + kPad) * (p.Dv + kPad) * (p.backward ? 3 : 1);
  const int64_t grain = madds < (int64_t{1} << 17) ? count : 1;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, count, grain, [&](int64_t, int64_t) { fn(p, next, order.data(), count, Tmax); });
}

std::tuple<Tensor, Tensor, Tensor> linear_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const optional<Tensor>& S0, const optional<Tensor>& z0,
                                                    const optional<Tensor>& cu_seqlens,
                                                    const optional<Tensor>& positions,
                                                    const optional<Tensor>& inv_freq, bool interleaved,
                                                    int64_t feature_map, double scale, bool normalize, double eps,
                                                    bool causal) {
  const char* op = "kxops.linear_attention";
  const Shape s = check_args(op, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, feature_map);
  const auto acc = state_dtype(q.scalar_type());
  Tensor out = at::empty({s.B, s.T, s.H, s.Dv}, q.options());
  Tensor S = at::empty({s.N, s.H, s.F, s.Dv}, q.options().dtype(acc));
  Tensor z = at::empty({s.N, s.H, s.F}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kxops_linear_attention_cpu", [&] {
    using T = scalar_t;
    using St = at::opmath_type<T>;
    Problem<T, St> p{};
    fill_problem(p, s, q, k, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale, normalize, eps,
                 causal);
    p.out = out.data_ptr<T>();
    p.S0 = S0 ? S0->const_data_ptr<St>() : nullptr;
    p.z0 = z0 ? z0->const_data_ptr<St>() : nullptr;
    p.S = S.data_ptr<St>(), p.z = z.data_ptr<St>();
    launch(p);
  });
  return {out, S, z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attention_backward(
    const Tensor& dout, const optional<Tensor>& dS, const optional<Tensor>& dz, const Tensor& q, const Tensor& k,
    const Tensor& v, const optional<Tensor>& S0, const optional<Tensor>& z0, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& positions, const optional<Tensor>& inv_freq, bool interleaved, int64_t feature_map,
    double scale, bool normalize, double eps, bool causal) {
  const char* op = "kxops.linear_attention_backward";
  const Shape s = check_args(op, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, feature_map);
  const auto acc = state_dtype(q.scalar_type());
  TORCH_CHECK(dout.sizes() == v.sizes(), op, ": dout must have out's shape ", v.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dout.device() == q.device(), op,
              ": dout must have q's dtype and device, got ", dout.scalar_type(), " on ", dout.device());
  TORCH_CHECK(last_dim_unit(dout), op, ": dout must have a unit stride on the last dimension");
  // the state gradients are small: any strides, made contiguous here
  Tensor dSc, dzc;
  if (dS) {
    check_state(op, "dS", *dS, {s.N, s.H, s.F, s.Dv}, acc, false);
    dSc = dS->contiguous();
  }
  if (dz) {
    check_state(op, "dz", *dz, {s.N, s.H, s.F}, acc, false);
    dzc = dz->contiguous();
  }
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor dS0 = at::empty({s.N, s.H, s.F, s.Dv}, q.options().dtype(acc));
  Tensor dz0 = at::empty({s.N, s.H, s.F}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kxops_linear_attention_backward_cpu",
                                  [&] {
    using T = scalar_t;
    using St = at::opmath_type<T>;
    Problem<T, St> p{};
    fill_problem(p, s, q, k, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale, normalize, eps,
                 causal);
    p.backward = true;
    p.g = dout.const_data_ptr<T>();
    for (int d = 0; d < 3; ++d) p.gs[d] = dout.stride(d);
    p.dq = dq.data_ptr<T>(), p.dk = dk.data_ptr<T>(), p.dv = dv.data_ptr<T>();
    p.S0 = S0 ? S0->const_data_ptr<St>() : nullptr;
    p.z0 = z0 ? z0->const_data_ptr<St>() : nullptr;
    p.dS = dSc.defined() ? dSc.const_data_ptr<St>() : nullptr;
    p.dz = dzc.defined() ? dzc.const_data_ptr<St>() : nullptr;
    p.S = dS0.data_ptr<St>(), p.z = dz0.data_ptr<St>();
    launch(p);
  });
  return {dq, dk, dv, dS0, dz0};
}

// ---- one decoding step ----------------------------------------------------------------------------

template <typename T, typename St>
struct StepProblem {
  const T *q, *k, *v;  // (B, H, D), last stride 1
  int64_t qs[2], ks[2], vs[2];
  const St *S, *z;     // contiguous (B, H, F, Dv), (B, H, F)
  T* out;              // contiguous (B, H, Dv)
  St *S1, *z1;
  int64_t H, Dk, Dv, F;
  int fm;
  double scale, eps;
  bool normalize;
};

// raw q, k; exp; phi(q), phi(k) (F <= 257); v; num; |x|
constexpr int64_t kStepBuf = 3 * kMaxDim + 2 * (kMaxDim + 1) + 2 * kMaxDim + 1;

// Rows [begin, end) of the (B * H) (batch, head) pairs, in double like the chunked kernel; S1 and z1
// rounded once to the state dtype.
template <typename T, typename St>
KX_INLINE void step_rows(const StepProblem<T, St>& p, int64_t begin, int64_t end, double* buf) {
  const int64_t Dk = p.Dk, Dv = p.Dv, F = p.F;
  double *xq = buf, *xk = xq + kMaxDim, *e = xk + kMaxDim, *fq = e + kMaxDim, *fk = fq + kMaxDim + 1,
         *vv = fk + kMaxDim + 1, *num = vv + kMaxDim, *nrm = num + kMaxDim;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.H, h = r % p.H;
    const T* qr = p.q + b * p.qs[0] + h * p.qs[1];
    const T* kr = p.k + b * p.ks[0] + h * p.ks[1];
    const T* vr = p.v + b * p.vs[0] + h * p.vs[1];
    for (int64_t d = 0; d < Dk; ++d)
      xq[d] = static_cast<double>(static_cast<St>(qr[d])), xk[d] = static_cast<double>(static_cast<St>(kr[d]));
    for (int64_t j = 0; j < Dv; ++j) vv[j] = static_cast<double>(static_cast<St>(vr[j])), num[j] = 0;
    const bool precise = std::is_same_v<St, double>;
    features(p.fm, precise, xq, 1, 1, Dk, F, p.scale, e, nrm, fq);
    features(p.fm, precise, xk, 1, 1, Dk, F, 1.0, e, nrm, fk);
    const St* S = p.S + r * F * Dv;
    St* S1 = p.S1 + r * F * Dv;
    for (int64_t f = 0; f < F; ++f) {
      const double a = fk[f], c = fq[f];
      const St* sf = S + f * Dv;
      St* s1 = S1 + f * Dv;
#pragma omp simd
      for (int64_t j = 0; j < Dv; ++j) {
        const double s = static_cast<double>(sf[j]) + a * vv[j];
        s1[j] = static_cast<St>(s);
        num[j] += c * s;
      }
    }
    const St* z = p.z + r * F;
    St* z1 = p.z1 + r * F;
    double d = 0;
    for (int64_t f = 0; f < F; ++f) {
      const double zf = static_cast<double>(z[f]) + fk[f];
      z1[f] = static_cast<St>(zf);
      d += fq[f] * zf;
    }
    const double a = p.normalize ? 1.0 / (d + p.eps) : 1.0;
    T* o = p.out + r * Dv;
    for (int64_t j = 0; j < Dv; ++j) o[j] = static_cast<T>(static_cast<St>(num[j] * a));
  }
}

template <typename T, typename St>
void step_default(const StepProblem<T, St>& p, int64_t begin, int64_t end, double* buf) {
  step_rows(p, begin, end, buf);
}
#ifdef KX_TARGET_AVX2
template <typename T, typename St>
KX_TARGET_AVX2 void step_avx2(const StepProblem<T, St>& p, int64_t begin, int64_t end, double* buf) {
  step_rows(p, begin, end, buf);
}
template <typename T, typename St>
KX_TARGET_AVX512 void step_avx512(const StepProblem<T, St>& p, int64_t begin, int64_t end, double* buf) {
  step_rows(p, begin, end, buf);
}
#endif

std::tuple<Tensor, Tensor, Tensor> linear_attention_step(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& S, const Tensor& z, int64_t feature_map,
                                                         double scale, bool normalize, double eps) {
  const char* op = "kxops.linear_attention_step";
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D (batch, heads, head_dim), got ", q.dim(), "-D");
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == q.size(0) && v.size(1) == q.size(1), op,
              ": v must be (batch, heads, head_dim_v) matching q ", q.sizes(), ", got ", v.sizes());
  check_qkv_tensors(op, q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(2);
  check_head_dims(op, Dk, Dv);
  check_feature_map(op, feature_map);
  const int64_t F = Dk + (feature_map == 3);
  const auto acc = state_dtype(q.scalar_type());
  check_state(op, "S", S, {B, H, F, Dv}, acc, true);
  check_state(op, "z", z, {B, H, F}, acc, true);
  Tensor out = at::empty({B, H, Dv}, q.options());
  Tensor S1 = at::empty(S.sizes(), S.options());
  Tensor z1 = at::empty(z.sizes(), z.options());
  if (B * H == 0) return {out, S1, z1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kxops_linear_attention_step_cpu", [&] {
    using T = scalar_t;
    using St = at::opmath_type<T>;
    StepProblem<T, St> p{};
    p.q = q.const_data_ptr<T>(), p.k = k.const_data_ptr<T>(), p.v = v.const_data_ptr<T>();
    for (int d = 0; d < 2; ++d) p.qs[d] = q.stride(d), p.ks[d] = k.stride(d), p.vs[d] = v.stride(d);
    p.S = S.const_data_ptr<St>(), p.z = z.const_data_ptr<St>();
    p.out = out.data_ptr<T>(), p.S1 = S1.data_ptr<St>(), p.z1 = z1.data_ptr<St>();
    p.H = H, p.Dk = Dk, p.Dv = Dv, p.F = F;
    p.fm = static_cast<int>(feature_map);
    p.scale = scale, p.eps = eps;
    p.normalize = normalize;
    auto fn = &step_default<T, St>;
#ifdef KX_TARGET_AVX2
    if (cpu_isa() == kAvx512) fn = &step_avx512<T, St>;
    if (cpu_isa() == kAvx2) fn = &step_avx2<T, St>;
#endif
    // a step is memory bound: a few hundred KB of state per task
    const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / (F * Dv * 2 * int64_t(sizeof(St))));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      double buf[kStepBuf];
      fn(p, begin, end, buf);
    });
  });
  return {out, S1, z1};
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("linear_attention", &linear_attention);
  m.impl("linear_attention_backward", &linear_attention_backward);
  m.impl("linear_attention_step", &linear_attention_step);
}

}  // namespace kxops
