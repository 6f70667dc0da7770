// CUDA implementations of kxops::gumbel_softmax, gumbel_softmax_backward, gumbel_max, perturb_max and
// perturb_max_backward (docs/gumbel_softmax_kernel_contract.md: the random bits, the first-max rule and the
// -inf rules are the contract's; the math: ../shared/spec/softmaxes.md). Gumbel ops: fp32 / fp16 / bf16
// inputs, every row's arithmetic in float32. Perturb-max: float64 inside for every dtype.
//
// Gumbel-softmax forward (and gumbel_max, the same kernel writing the index only), x (R, N) contiguous:
//   - the row is cut into quads (4 consecutive entries, G4 = ceil(N / 4) of them): one Philox4x32-10 block
//     (at::philox_engine(seed, 0, r * G4 + quad), the contract's counters) gives a quad's four words, and a
//     thread takes whole quads: quad t, t + G, t + 2 G, ... of its group of G threads (16-byte loads of fp32
//     quads, 8-byte ones of 16-bit quads, when x, the outputs and N allow; else element by element);
//   - the first kRegQuads of a thread's quads stay in registers as v = x + g (float), so that a row of up to
//     G * 4 * kRegQuads entries is read once: (max, first argmax) by a group reduction, e = exp((v - m) / tau)
//     in place, the sum by a second reduction, then the writes;
//   - quads past those (rows longer than 1024 * 32 = 32768 entries) are the "tail": the first read folds them
//     into the max and an online sum (rescaled when the max moves), the write pass reads x again and
//     regenerates their noise from the counters (no noise buffer);
//   - short rows (N <= kShortN): a warp per row, kWarpRows rows a block, warp shuffles only; longer rows: a
//     block per row of 128..1024 threads (enough for kRegQuads quads a thread), shuffles then one word per
//     warp through shared memory. Grid-stride over rows.
// Backward: the same split, (y, dy) quads in registers as 32-bit words of their storage type (kBwdRegQuads:
// 8 for 16-bit, 4 for fp32: 16 words each way), one reduction of sum dy y, then dx; a tail re-reads its quads
// (fp32 rows past 16384 entries on the block path).
//
// Perturb-max (O(K N^2) per row, float64; the host converts x (and dp) to float64 and p (dx) back):
//   1. rows kernel: a warp per (row, i), lanes over k: S_ik by a loop over j, e_ik = exp(S_ik), q_i =
//      mean_k e_ik (warp reduction in a fixed order: deterministic); the backward also stores e_ik (the
//      (N, K) workspace, rows in chunks of at most kWorkspaceBytes) and A_i = sum_k e_ik T_ik;
//   2. normalise kernel: a block per row: Q = sum q; forward p = q / Q; backward h_i = (dp_i - sum dp p) / Q;
//   3. backward kernel: a warp per (row, m), lanes over k: dx_m = h_m A_m / K - sum_k sum_i h_i e_ik r(.) / K.
//
// Launch thresholds, overridable for tests (read at every launch; the emulated tests force each path at small
// sizes): KXOPS_GUMBEL_SOFTMAX_SHORT_N (default kShortN: rows up to this many entries take the warp path),
// KXOPS_GUMBEL_SOFTMAX_REG_QUADS (default: all of them; quads a thread keeps in registers, fewer puts the
// rest of the row in the tail: 0 streams every row) and KXOPS_PERTURB_MAX_WORKSPACE_BYTES (default
// kWorkspaceBytes: the backward's e_ik workspace, rows processed in chunks that fit).
#include <ATen/core/Tensor.h>
#include <ATen/core/PhiloxRNGEngine.h>  // after c10's Exception.h (it uses AT_ASSERT)
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>

#include "kx_cuda.cuh"

namespace kxops {
namespace {

constexpr int kWarpRows = 8;                      // short rows: a warp per row, 8 rows a block
constexpr int kShortThreads = 32 * kWarpRows;
constexpr int kMinBlockThreads = 128;             // long rows: a block per row of 128..1024 threads
constexpr int kMaxBlockThreads = 1024;
constexpr int64_t kShortN = 1024;                 // rows up to this many entries: the warp path
constexpr int kRegQuads = 8;                      // forward: quads (32 floats) a thread keeps in registers
constexpr int kPmThreads = 256;                   // perturb-max kernels
constexpr int64_t kWorkspaceBytes = int64_t{1} << 30;  // perturb-max backward: the e_ik workspace, at most

using kx::from_f;
using kx::to_f;

// The backward keeps (y, dy) quads in their storage type: 32 registers each for 8 quads of 16-bit, 4 of fp32.
template <typename T>
constexpr int kBwdRegQuads = sizeof(T) == 4 ? 4 : 8;

// A quad: 4 consecutive entries, one vector access (16 bytes of fp32, 8 of 16-bit).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// ---- group (a warp per row, or the block per row) reductions: every thread of the group gets the same bits ----

// (m, i) <- the better of (m, i) and (m2, i2): the larger value, the lower index among equal values.
__device__ __forceinline__ void take_better(float& m, int& i, float m2, int i2) {
  if (m2 > m || (m2 == m && i2 < i)) {
    m = m2;
    i = i2;
  }
}

// WARP: the group is the warp (xor butterfly); else the whole block (butterfly, one word per warp through
// sm / si, every thread folds the warps' words in warp order). Two barriers: the words are free on return.
template <bool WARP>
__device__ __forceinline__ void group_argmax(float& m, int& i, float* sm, int* si) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kx::kFullMask, m, o);
    const int i2 = __shfl_xor_sync(kx::kFullMask, i, o);
    take_better(m, i, m2, i2);
  }
  if constexpr (!WARP) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
      sm[w] = m;
      si[w] = i;
    }
    __syncthreads();
    m = sm[0];
    i = si[0];
    for (int k = 1; k < nw; ++k) take_better(m, i, sm[k], si[k]);
    __syncthreads();
  }
}

template <bool WARP>
__device__ __forceinline__ float group_sum(float s, float* ss) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kx::kFullMask, s, o);
  if constexpr (!WARP) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) ss[w] = s;
    __syncthreads();
    s = ss[0];
    for (int k = 1; k < nw; ++k) s += ss[k];
    __syncthreads();
  }
  return s;
}

// ---- quads of a row ----

// The quad q of row r (entries 4 q .. 4 q + 3) as float; entries past N are -inf. vec: 4 | N, r aligned.
template <typename T>
__device__ __forceinline__ void load_quad(const T* r, int q, int N, bool vec, float (&v)[4]) {
  if (vec) {
    const Quad<T> w = kx::load_aligned<Quad<T>>(r + 4 * q);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = to_f(w.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = 4 * q + j < N ? to_f(r[4 * q + j]) : -INFINITY;
  }
}

template <typename T>
__device__ __forceinline__ void store_quad(T* r, int q, int N, bool vec, const float (&v)[4]) {
  if (vec) {
    Quad<T> w;
#pragma unroll
    for (int j = 0; j < 4; ++j) w.v[j] = from_f<T>(v[j]);
    kx::store_aligned(r + 4 * q, w);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (4 * q + j < N) r[4 * q + j] = from_f<T>(v[j]);
  }
}

// A quad as 32-bit words (uint4 of fp32, uint2 of 16-bit), the backward's registers: arrays of 16-bit structs
// make ptxas keep 16-bit registers per entry and spill.
template <typename T>
using Words = std::conditional_t<sizeof(T) == 4, uint4, uint2>;

__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T>
__device__ __forceinline__ float entry_of_bits(uint32_t b) {
  if constexpr (sizeof(T) == 4) return __uint_as_float(b);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  else return __uint_as_float(b << 16);  // bfloat16: the high half of a float
}

// Entry j (0..3) of a quad's words.
template <typename T>
__device__ __forceinline__ float word_entry(const Words<T>& w, int j) {
  if constexpr (sizeof(T) == 4) {
    return entry_of_bits<T>(j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w);
  } else {
    const uint32_t u = j < 2 ? w.x : w.y;
    return entry_of_bits<T>(j & 1 ? u >> 16 : u & 0xffffu);
  }
}

// The quad q of row r as words; entries past N (or the whole quad when !in) are 0.
template <typename T>
__device__ __forceinline__ Words<T> load_words(const T* r, int q, int N, bool vec, bool in) {
  Words<T> w{};
  if (!in) return w;
  if (vec) return kx::load_aligned<Words<T>>(r + 4 * q);
  uint32_t b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = 4 * q + j < N ? bits_of(r[4 * q + j]) : 0u;
  if constexpr (sizeof(T) == 4) {
    w.x = b[0], w.y = b[1], w.z = b[2], w.w = b[3];
  } else {
    w.x = b[0] | b[1] << 16, w.y = b[2] | b[3] << 16;
  }
  return w;
}

// v += g for the quad's four entries: Philox4x32-10 under the seed's 64 bits at counter (c, 0, 0, 0) (ATen's
// philox_engine with subsequence 0 and offset c), u = (2 (w >> 9) + 1) 2^-24, g = -log(-log u) in float.
__device__ __forceinline__ void add_gumbel(uint64_t key, uint64_t c, float (&v)[4]) {
  at::philox_engine eng(key, 0, c);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w = eng();
    const float u = static_cast<float>(2u * (w >> 9) + 1u) * 0x1p-24f;
    v[j] += -logf(-logf(u));
  }
}

// ---- Gumbel-softmax forward / Gumbel-max ----

template <typename T>
struct GsParams {
  const T* x = nullptr;            // (R, N)
  T* y = nullptr;                  // (R, N); null: gumbel_max (the index only)
  T* soft = nullptr;               // (R, N) when hard, else null
  int64_t* index = nullptr;        // (R)
  const int64_t* seed = nullptr;   // one element on the device; null: no noise
  int64_t R = 0;
  int N = 0, G4 = 0;               // entries and quads of a row
  int nreg = 0;                    // quads a thread keeps in registers (<= the kernel's Q)
  float inv_tau = 1.0f;
  bool hard = false;
  bool vec = false;                // x, y, soft aligned to a quad and 4 | N
};

template <typename T, bool WARP, int Q>
__global__ void __launch_bounds__(WARP ? kShortThreads : kMaxBlockThreads) gumbel_forward_kernel(const GsParams<T> p) {
  __shared__ float ss_m[32];
  __shared__ int ss_i[32];
  __shared__ float ss_s[32];
  const int G = WARP ? 32 : static_cast<int>(blockDim.x);
  const int RPB = WARP ? static_cast<int>(blockDim.x) / 32 : 1;
  const int grp = WARP ? static_cast<int>(threadIdx.x) / 32 : 0;
  const int lt = WARP ? static_cast<int>(threadIdx.x) & 31 : static_cast<int>(threadIdx.x);
  const bool noise = p.seed != nullptr;
  const uint64_t key = noise ? static_cast<uint64_t>(*p.seed) : 0;  // read on the device: no host sync
  const int N = p.N, G4 = p.G4, nreg = p.nreg;
  const float inv_tau = p.inv_tau;
  const bool index_only = p.y == nullptr;

  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const T* xr = p.x + row * N;
    const uint64_t c0 = static_cast<uint64_t>(row) * static_cast<uint64_t>(G4);
    auto quad_v = [&](int q, float (&v)[4]) {
      load_quad(xr, q, N, p.vec, v);
      if (noise) add_gumbel(key, c0 + static_cast<uint64_t>(q), v);
    };

    // read 1: v in registers (first nreg quads of the thread), the tail folded into (m, i) and an online sum
    // every load issued before the noise is computed (a thread's quads in flight together)
    float v[Q][4];
    if (p.vec) {
#pragma unroll
      for (int k = 0; k < Q; ++k) {
        const int q = lt + k * G;
        Quad<T> w;
        if (k < nreg && q < G4) w = kx::load_aligned<Quad<T>>(xr + 4 * q);
        else w.v[0] = w.v[1] = w.v[2] = w.v[3] = from_f<T>(-INFINITY);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[k][j] = to_f(w.v[j]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < Q; ++k) {
        const int q = lt + k * G;
#pragma unroll
        for (int j = 0; j < 4; ++j) v[k][j] = k < nreg && 4 * q + j < N ? to_f(xr[4 * q + j]) : -INFINITY;
      }
    }
    float m = -INFINITY;
    int mi = INT_MAX;
#pragma unroll
    for (int k = 0; k < Q; ++k) {
      const int q = lt + k * G;
      if (k < nreg && q < G4) {
        if (noise) add_gumbel(key, c0 + static_cast<uint64_t>(q), v[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (v[k][j] > m) m = v[k][j], mi = 4 * q + j;  // the thread's entries in index order: first max
      }
    }
    float tm = -INFINITY, ts = 0.0f;  // tail: its max and sum_tail exp((v - tm) / tau)
    const int tail0 = lt + nreg * G;
    for (int q = tail0; q < G4; q += G) {
      float w[4];
      quad_v(q, w);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (w[j] > m) m = w[j], mi = 4 * q + j;
        if (index_only || w[j] == -INFINITY) continue;
        if (w[j] > tm) {
          ts = ts * expf((tm - w[j]) * inv_tau) + 1.0f;
          tm = w[j];
        } else {
          ts += expf((w[j] - tm) * inv_tau);
        }
      }
    }
    group_argmax<WARP>(m, mi, ss_m, ss_i);
    const bool dead = m == -INFINITY;  // all -inf: y = soft = 0, index = -1
    if (lt == 0) p.index[row] = dead ? -1 : mi;
    if (index_only) continue;

    float inv_s = 0.0f;
    if (!dead) {
      float s = ts > 0.0f ? ts * expf((tm - m) * inv_tau) : 0.0f;
#pragma unroll
      for (int k = 0; k < Q; ++k)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          v[k][j] = expf((v[k][j] - m) * inv_tau);  // -inf (absent, past N): 0
          s += v[k][j];
        }
      inv_s = 1.0f / group_sum<WARP>(s, ss_s);
    }
    // writes: soft = e / S; y = soft, or the one-hot of the index when hard
    T* yr = p.y + row * N;
    T* sr = p.soft != nullptr ? p.soft + row * N : nullptr;
    auto write = [&](int q, const float (&e)[4]) {
      float o[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = dead ? 0.0f : e[j] * inv_s;  // dead: e holds v (-inf)
      if (p.hard) {
        store_quad(sr, q, N, p.vec, o);
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = !dead && 4 * q + j == mi ? 1.0f : 0.0f;
      }
      store_quad(yr, q, N, p.vec, o);
    };
#pragma unroll
    for (int k = 0; k < Q; ++k) {
      const int q = lt + k * G;
      if (k < nreg && q < G4) write(q, v[k]);
    }
    for (int q = tail0; q < G4; q += G) {  // read 2 of the tail: the same noise from the same counters
      float w[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (!dead) {
        quad_v(q, w);
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = expf((w[j] - m) * inv_tau);
      }
      write(q, w);
    }
  }
}

// ---- Gumbel-softmax backward: dx = y (dy - sum dy y) / tau ----

template <typename T>
struct GsBwdParams {
  const T* dy = nullptr;
  const T* y = nullptr;
  T* dx = nullptr;
  int64_t R = 0;
  int N = 0, G4 = 0, nreg = 0;
  float inv_tau = 1.0f;
  bool vec = false;  // dy, y, dx aligned to a quad and 4 | N
};

template <typename T, bool WARP, int Q>
__global__ void __launch_bounds__(WARP ? kShortThreads : kMaxBlockThreads) gumbel_backward_kernel(const GsBwdParams<T> p) {
  __shared__ float ss_s[32];
  const int G = WARP ? 32 : static_cast<int>(blockDim.x);
  const int RPB = WARP ? static_cast<int>(blockDim.x) / 32 : 1;
  const int grp = WARP ? static_cast<int>(threadIdx.x) / 32 : 0;
  const int lt = WARP ? static_cast<int>(threadIdx.x) & 31 : static_cast<int>(threadIdx.x);
  const int N = p.N, G4 = p.G4, nreg = p.nreg;
  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const T* yr = p.y + row * N;
    const T* dr = p.dy + row * N;
    T* xr = p.dx + row * N;
    Words<T> ry[Q], rd[Q];  // every load issued before the sum (entries past the row: 0)
    if (p.vec) {
#pragma unroll
      for (int k = 0; k < Q; ++k) {
        const int q = lt + k * G;
        ry[k] = load_words(yr, q, N, true, k < nreg && q < G4);
        rd[k] = load_words(dr, q, N, true, k < nreg && q < G4);
      }
    } else {
#pragma unroll
      for (int k = 0; k < Q; ++k) {
        const int q = lt + k * G;
        ry[k] = load_words(yr, q, N, false, k < nreg && q < G4);
        rd[k] = load_words(dr, q, N, false, k < nreg && q < G4);
      }
    }
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < Q; ++k)
#pragma unroll
      for (int j = 0; j < 4; ++j) s += word_entry<T>(ry[k], j) * word_entry<T>(rd[k], j);
    const int tail0 = lt + nreg * G;
    for (int q = tail0; q < G4; q += G) {
      const Words<T> a = load_words(yr, q, N, p.vec, true), b = load_words(dr, q, N, p.vec, true);
#pragma unroll
      for (int j = 0; j < 4; ++j) s += word_entry<T>(a, j) * word_entry<T>(b, j);
    }
    const float c = group_sum<WARP>(s, ss_s);
    auto write = [&](int q, const Words<T>& a, const Words<T>& b) {
      float o[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = word_entry<T>(a, j) * (word_entry<T>(b, j) - c) * p.inv_tau;
      store_quad(xr, q, N, p.vec, o);
    };
#pragma unroll
    for (int k = 0; k < Q; ++k) {
      const int q = lt + k * G;
      if (k < nreg && q < G4) write(q, ry[k], rd[k]);
    }
    for (int q = tail0; q < G4; q += G)
      write(q, load_words(yr, q, N, p.vec, true), load_words(dr, q, N, p.vec, true));
  }
}

// ---- perturb-max (float64) ----

constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2

// L(d) = log Phi(d), the contract's piecewise formula with the double erfc.
__device__ __forceinline__ double log_phi(double d) {
  if (d > 38.0) return 0.0;
  if (d >= -1.0) return log1p(-erfc(d / kSqrt2) / 2.0);
  if (d > -37.5) return log(erfc(-d / kSqrt2) / 2.0);
  return -d * d / 2.0 - log(-d) - kHalfLog2Pi;
}

// r(d) = phi(d) / Phi(d) from L = L(d).
__device__ __forceinline__ double mills_ratio(double d, double L) {
  if (d > 38.0) return 0.0;
  if (d <= -37.5) return -d;
  return exp(-d * d / 2.0 - kHalfLog2Pi - L);
}

struct PmParams {
  const double* x = nullptr;   // (R, N) float64
  const double* z = nullptr;   // (K) nodes
  double* q = nullptr;         // (R, N): q_i (rows kernel); forward: p in place (normalise kernel)
  double* e = nullptr;         // (R, N, K) e_ik, or null (forward)
  double* a = nullptr;         // (R, N) A_i = sum_k e_ik T_ik, or null (forward)
  const double* dp = nullptr;  // (R, N): backward (normalise kernel)
  double* h = nullptr;         // (R, N): backward: h_i
  double* dx = nullptr;        // (R, N): backward
  int64_t R = 0, N = 0;
  int K = 0;
};

// A warp per (row, i), lanes over k: q_i = mean_k exp(S_ik) (0 for absent i); with p.e: e_ik and A_i too.
__global__ void __launch_bounds__(kPmThreads) perturb_rows_kernel(const PmParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x / 32, tasks = p.R * p.N, N = p.N;
  const bool bwd = p.e != nullptr;
  for (int64_t t = int64_t{blockIdx.x} * wpb + threadIdx.x / 32; t < tasks; t += int64_t{gridDim.x} * wpb) {
    const double* xr = p.x + t / N * N;
    const int64_t i = t % N;
    const double xi = xr[i];
    const bool absent = xi == -INFINITY;
    double qs = 0.0, as = 0.0;
    for (int k = lane; k < p.K; k += 32) {
      double S = 0.0, Tk = 0.0;
      if (!absent) {
        const double zk = p.z[k];
        for (int64_t j = 0; j < N; ++j) {
          const double xj = xr[j];
          if (j == i || xj == -INFINITY) continue;
          const double d = xi - xj + zk;
          const double L = log_phi(d);
          S += L;
          if (bwd) Tk += mills_ratio(d, L);
        }
      }
      const double ek = absent ? 0.0 : exp(S);
      if (bwd) p.e[t * p.K + k] = ek;
      qs += ek;
      as += ek * Tk;
    }
    qs = kx::warp_reduce(qs, kx::Sum{});
    if (bwd) as = kx::warp_reduce(as, kx::Sum{});
    if (lane == 0) {
      p.q[t] = qs / p.K;
      if (bwd) p.a[t] = as;
    }
  }
}

// A block per row: Q = sum q; forward (dp null): q <- q / Q in place; backward: h_i = (dp_i - sum dp p) / Q.
__global__ void __launch_bounds__(kPmThreads) perturb_normalise_kernel(const PmParams p) {
  __shared__ double ss_red[32];
  const int64_t N = p.N;
  for (int64_t row = blockIdx.x; row < p.R; row += gridDim.x) {
    double* qr = p.q + row * N;
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) s += qr[i];
    const double Q = kx::block_reduce(s, kx::Sum{}, ss_red);
    if (p.dp == nullptr) {
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) qr[i] = Q > 0.0 ? qr[i] / Q : 0.0;
      continue;
    }
    const double* dr = p.dp + row * N;
    const double* xr = p.x + row * N;
    double c = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
      if (xr[i] > -INFINITY) c += dr[i] * (qr[i] / Q);
    c = kx::block_reduce(c, kx::Sum{}, ss_red);
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
      p.h[row * N + i] = Q > 0.0 && xr[i] > -INFINITY ? (dr[i] - c) / Q : 0.0;
  }
}

// A warp per (row, m), lanes over k: dx_m = (h_m A_m - sum_k sum_{i != m} h_i e_ik r(x_i - x_m + z_k)) / K.
__global__ void __launch_bounds__(kPmThreads) perturb_backward_kernel(const PmParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x / 32, tasks = p.R * p.N, N = p.N;
  for (int64_t t = int64_t{blockIdx.x} * wpb + threadIdx.x / 32; t < tasks; t += int64_t{gridDim.x} * wpb) {
    const int64_t r0 = t / N * N;
    const double* xr = p.x + r0;
    const int64_t m = t % N;
    const double xm = xr[m];
    double acc = 0.0;
    if (xm > -INFINITY) {
      for (int k = lane; k < p.K; k += 32) {
        const double zk = p.z[k];
        double sk = 0.0;
        for (int64_t i = 0; i < N; ++i) {
          const double xi = xr[i];
          if (i == m || xi == -INFINITY) continue;
          const double d = xi - xm + zk;
          sk += p.h[r0 + i] * p.e[(r0 + i) * p.K + k] * mills_ratio(d, log_phi(d));
        }
        acc += sk;
      }
    }
    acc = kx::warp_reduce(acc, kx::Sum{});
    if (lane == 0) p.dx[t] = xm > -INFINITY ? (p.h[t] * p.a[t] - acc) / p.K : 0.0;
  }
}

// ---- host ----

bool aligned_to(const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

void check_rows(const char* op, const at::Tensor& x, const char* name, bool allow_double = false) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (allow_double && dt == at::kDouble), op,
              ": ", name, " must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "", ", got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": ", name, " must be a contiguous (R, N) tensor, got ",
              x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(x.size(1) <= INT_MAX / 2, op, ": rows of at most 2^30 entries, got ", x.size(1));
}

void check_like(const char* op, const at::Tensor& a, const char* name, const at::Tensor& x) {
  TORCH_CHECK(a.device() == x.device() && a.scalar_type() == x.scalar_type() && a.sizes() == x.sizes(), op, ": ",
              name, " must have the dtype, shape and device of the other input, got ", a.scalar_type(), " ",
              a.sizes(), " on ", a.device());
}

void check_seed(const char* op, const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK(seed.is_cuda() && seed.device() == x.device() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              op, ": seed must be an int64 tensor of one element on x's device, got ", seed.scalar_type(), " ",
              seed.sizes(), " on ", seed.device());
}

template <typename K, typename P>
void launch(K kernel, const P& p, int64_t tasks, int tasks_per_block, int threads) {
  const auto grid = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((tasks + tasks_per_block - 1) / tasks_per_block, kx::max_grid_x())));
  kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The block per row's threads: enough for q quads a thread, whole warps, within [128, 1024].
int block_threads(int64_t G4, int q) {
  const int64_t t = (G4 + q - 1) / q;
  return static_cast<int>(std::clamp<int64_t>((t + 31) / 32 * 32, kMinBlockThreads, kMaxBlockThreads));
}

int reg_quads(int q) {
  return static_cast<int>(std::min<int64_t>(q, kx::env_threshold("KXOPS_GUMBEL_SOFTMAX_REG_QUADS", q)));
}

template <typename T>
void launch_forward(GsParams<T>& p) {
  if (p.N <= kx::env_threshold("KXOPS_GUMBEL_SOFTMAX_SHORT_N", kShortN)) {
    p.nreg = reg_quads(kRegQuads);
    launch(gumbel_forward_kernel<T, true, kRegQuads>, p, p.R, kWarpRows, kShortThreads);
  } else {
    p.nreg = reg_quads(kRegQuads);
    launch(gumbel_forward_kernel<T, false, kRegQuads>, p, p.R, 1, block_threads(p.G4, kRegQuads));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_softmax_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& seed,
                                                                   double tau, bool hard) {
  const char* op = "gumbel_softmax";
  check_rows(op, x, "x");
  if (seed) check_seed(op, *seed, x);
  TORCH_CHECK(tau > 0.0 && std::isfinite(tau), op, ": tau must be positive and finite, got ", tau);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0), N = x.size(1);
  auto y = at::empty_like(x);
  auto soft = hard ? at::empty_like(x) : at::empty({0}, x.options());
  auto index = at::empty({R}, x.options().dtype(at::kLong));
  if (R == 0) return {y, soft, index};
  if (N == 0) {
    index.fill_(-1);
    return {y, soft, index};
  }
  kx::dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    GsParams<T> p;
    p.x = reinterpret_cast<const T*>(x.const_data_ptr());
    p.y = reinterpret_cast<T*>(y.data_ptr());
    p.soft = hard ? reinterpret_cast<T*>(soft.data_ptr()) : nullptr;
    p.index = index.data_ptr<int64_t>();
    p.seed = seed ? seed->const_data_ptr<int64_t>() : nullptr;
    p.R = R;
    p.N = static_cast<int>(N);
    p.G4 = static_cast<int>((N + 3) / 4);
    p.inv_tau = static_cast<float>(1.0 / tau);
    p.hard = hard;
    constexpr size_t A = sizeof(Quad<T>);
    p.vec = N % 4 == 0 && aligned_to(p.x, A) && aligned_to(p.y, A) && (!hard || aligned_to(p.soft, A));
    launch_forward<T>(p);
  });
  return {y, soft, index};
}

at::Tensor gumbel_max_cuda(const at::Tensor& x, const at::Tensor& seed) {
  const char* op = "gumbel_max";
  check_rows(op, x, "x");
  check_seed(op, seed, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0), N = x.size(1);
  auto index = at::empty({R}, x.options().dtype(at::kLong));
  if (R == 0) return index;
  if (N == 0) return index.fill_(-1);
  kx::dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    GsParams<T> p;
    p.x = reinterpret_cast<const T*>(x.const_data_ptr());
    p.index = index.data_ptr<int64_t>();
    p.seed = seed.const_data_ptr<int64_t>();
    p.R = R;
    p.N = static_cast<int>(N);
    p.G4 = static_cast<int>((N + 3) / 4);
    p.vec = N % 4 == 0 && aligned_to(p.x, sizeof(Quad<T>));
    launch_forward<T>(p);
  });
  return index;
}

at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& dy, const at::Tensor& y, double tau) {
  const char* op = "gumbel_softmax_backward";
  check_rows(op, y, "y");
  check_like(op, dy, "dy", y);
  TORCH_CHECK(dy.is_contiguous(), op, ": dy must be contiguous");
  TORCH_CHECK(tau > 0.0 && std::isfinite(tau), op, ": tau must be positive and finite, got ", tau);
  const c10::cuda::CUDAGuard guard(y.device());
  auto dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  kx::dispatch_float(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    GsBwdParams<T> b;
    b.dy = reinterpret_cast<const T*>(dy.const_data_ptr());
    b.y = reinterpret_cast<const T*>(y.const_data_ptr());
    b.dx = reinterpret_cast<T*>(dx.data_ptr());
    b.R = y.size(0);
    b.N = static_cast<int>(y.size(1));
    b.G4 = (b.N + 3) / 4;
    b.inv_tau = static_cast<float>(1.0 / tau);
    constexpr size_t A = sizeof(Quad<T>);
    b.vec = b.N % 4 == 0 && aligned_to(b.dy, A) && aligned_to(b.y, A) && aligned_to(b.dx, A);
    if (b.N <= kx::env_threshold("KXOPS_GUMBEL_SOFTMAX_SHORT_N", kShortN)) {
      b.nreg = reg_quads(kRegQuads);
      launch(gumbel_backward_kernel<T, true, kRegQuads>, b, b.R, kWarpRows, kShortThreads);
    } else {
      constexpr int Q = kBwdRegQuads<T>;
      b.nreg = reg_quads(Q);
      launch(gumbel_backward_kernel<T, false, Q>, b, b.R, 1, block_threads(b.G4, Q));
    }
  });
  return dx;
}

void check_nodes(const char* op, const at::Tensor& nodes, const at::Tensor& x) {
  TORCH_CHECK(nodes.is_cuda() && nodes.device() == x.device() && nodes.scalar_type() == at::kDouble &&
                  nodes.dim() == 1 && nodes.is_contiguous() && nodes.size(0) >= 1 && nodes.size(0) <= INT_MAX,
              op, ": nodes must be a contiguous float64 (K,) tensor on x's device, got ", nodes.scalar_type(), " ",
              nodes.sizes(), " on ", nodes.device());
}

// x (fp16 / bf16 / fp32; float64 too: the kernels compute in float64 anyway) -> p in x's dtype.
at::Tensor perturb_max_cuda(const at::Tensor& x, const at::Tensor& nodes) {
  const char* op = "perturb_max";
  check_rows(op, x, "x", true);
  check_nodes(op, nodes, x);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x);
  const auto x64 = x.to(at::kDouble).contiguous();
  auto q = at::empty_like(x64);
  PmParams p;
  p.x = x64.const_data_ptr<double>();
  p.z = nodes.const_data_ptr<double>();
  p.q = q.data_ptr<double>();
  p.R = x.size(0);
  p.N = x.size(1);
  p.K = static_cast<int>(nodes.size(0));
  launch(perturb_rows_kernel, p, p.R * p.N, kPmThreads / 32, kPmThreads);
  launch(perturb_normalise_kernel, p, p.R, 1, kPmThreads);
  return q.to(x.scalar_type());
}

at::Tensor perturb_max_backward_cuda(const at::Tensor& dp, const at::Tensor& x, const at::Tensor& nodes) {
  const char* op = "perturb_max_backward";
  check_rows(op, x, "x", true);
  check_like(op, dp, "dp", x);
  check_nodes(op, nodes, x);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x);
  const auto x64 = x.to(at::kDouble).contiguous();
  const auto dp64 = dp.to(at::kDouble).contiguous();
  const int64_t R = x.size(0), N = x.size(1), K = nodes.size(0);
  // rows in chunks whose e_ik workspace fits the limit (one row at least)
  const int64_t limit = kx::env_threshold("KXOPS_PERTURB_MAX_WORKSPACE_BYTES", kWorkspaceBytes);
  const int64_t rc = std::clamp<int64_t>(limit / (N * K * static_cast<int64_t>(sizeof(double))), 1, R);
  auto e = at::empty({rc, N, K}, x64.options());
  auto qah = at::empty({3, rc, N}, x64.options());
  auto dx = at::empty_like(x64);
  for (int64_t r0 = 0; r0 < R; r0 += rc) {
    PmParams p;
    p.R = std::min(rc, R - r0);
    p.N = N;
    p.K = static_cast<int>(K);
    p.x = x64.const_data_ptr<double>() + r0 * N;
    p.dp = dp64.const_data_ptr<double>() + r0 * N;
    p.z = nodes.const_data_ptr<double>();
    p.e = e.data_ptr<double>();
    p.q = qah.data_ptr<double>();
    p.a = p.q + rc * N;
    p.h = p.a + rc * N;
    p.dx = dx.data_ptr<double>() + r0 * N;
    launch(perturb_rows_kernel, p, p.R * N, kPmThreads / 32, kPmThreads);
    launch(perturb_normalise_kernel, p, p.R, 1, kPmThreads);
    launch(perturb_backward_kernel, p, p.R * N, kPmThreads / 32, kPmThreads);
  }
  return dx.to(x.scalar_type());
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CUDA, m) {
  m.impl("gumbel_softmax", &kxops::gumbel_softmax_cuda);
  m.impl("gumbel_softmax_backward", &kxops::gumbel_softmax_backward_cuda);
  m.impl("gumbel_max", &kxops::gumbel_max_cuda);
  m.impl("perturb_max", &kxops::perturb_max_cuda);
  m.impl("perturb_max_backward", &kxops::perturb_max_backward_cuda);
}
