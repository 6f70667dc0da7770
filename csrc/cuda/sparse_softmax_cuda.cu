// CUDA implementations of kxops::entmax, entmax_backward and topk_softmax
// (docs/sparse_softmax_kernel_contract.md: the algorithms below are the contract's, pass for pass; the math:
// ../shared/spec/softmaxes.md). fp32 / fp16 / bf16 inputs, every row's arithmetic in float32.
//
// Work split (x is (R, N) contiguous), one launch per op:
//   - short rows (N <= kShortN): a warp per row, kWarpRows = 8 rows a block of 256 threads, the row copied
//     once into the warp's slice of shared memory; reductions are warp shuffles only (no block barrier), so
//     that 4096 x 512 keeps every SM busy instead of waiting on one block's barriers per row;
//   - long rows that fit on chip (N * sizeof(T) <= kOnchipBytes and the device's opt-in shared memory):
//     a block of kBlockThreads = 512 per row, the row copied once into shared memory (in x's dtype: 64 KB for
//     32768 bf16 entries, so that three blocks share an SM and one block's loads overlap another's passes);
//   - longer rows: the same block per row, every pass re-reading the row from global memory (L2).
// Every pass (max, Newton, bisection, histogram, sums) reads the row as 16-byte chunks (shared memory
// always; global memory when x, the output and N allow it, else element by element), and folds its
// per-thread partial results into one reduction: warp shuffles (xor butterfly: every lane gets the same bits,
// so every thread takes the same branch after it), then one word per warp through shared memory and a
// second butterfly. The outputs are written with 16-byte stores when aligned.
//
// entmax kinds 0 / 1: the contract's safeguarded Newton on the support (per pass one reduction of
// cnt, s1, s2, zmin). kind 2: bisection, one reduction (the mass) per step, relu(u)^e as exp2(e log2 u)
// only where u > 0. Losses (kinds 0 / 1) come from sums taken while p is written.
// top-k: a radix select on the order-preserving keys, 8 bits a pass (4 passes: a 256-bin histogram in
// shared memory per row, shared-memory atomics; one warp scans the bins from the top), which gives v, the
// count of entries equal to v and `need`; when need is less than that count, a tile-by-tile scan of the
// row in index order (group exclusive scan of per-thread tie counts) finds the index of the need-th tie.
// Then one sum pass (exp over the selected set) and the write pass. Never a sort.
// Backward: two reads of (dp, p) (the sums over the support, then dx), warp or block per row as above.
//
// Launch thresholds, overridable for tests (read at every launch; the emulated tests force each path at
// small sizes): KXOPS_SPARSE_SOFTMAX_SHORT_N (default kShortN: rows up to this many entries take the warp
// path) and KXOPS_SPARSE_SOFTMAX_ONCHIP_BYTES (default kOnchipBytes: rows up to this many bytes are held in
// shared memory on the block path; 0: always stream).
#include <ATen/core/Tensor.h>
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

#include "kx_cuda.cuh"

namespace kxops {
namespace {

constexpr int kWarpRows = 8;                    // short rows: a warp per row, 8 rows a block
constexpr int kShortThreads = 32 * kWarpRows;
constexpr int kBlockThreads = 512;              // long rows: a block per row
constexpr int64_t kShortN = 1024;               // rows up to this many entries: the warp path
constexpr int64_t kOnchipBytes = 128 * 1024;    // block path: rows up to this many bytes held in shared memory
constexpr int64_t kShortSmem = 44 * 1024;       // the warp path's dynamic shared memory (no opt-in needed)
constexpr int64_t kStaticSmem = 2048;           // the kernels' static shared memory, at most
constexpr int kMaxPasses = 100;                 // the contract's MAX_PASSES
constexpr int kBins = 256;                      // top-k: 8 bits a radix pass
constexpr int kRedWords = 8;                    // most 32-bit words one reduction carries per warp

using kx::from_f;
using kx::to_f;

// 16 bytes of a row: the unit of every vector load and store.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));
template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

// ---- group (a warp or the whole block per row) primitives ----

template <int G>
__device__ __forceinline__ void group_sync() {
  if constexpr (G == 32) __syncwarp();
  else __syncthreads();
}

// Partial results of one pass: NS float sums, an int count (CNT), a float minimum (MN); reduced together.
template <int NS, bool CNT, bool MN>
struct Stats {
  static constexpr int kWords = NS + CNT + MN;
  static_assert(kWords <= kRedWords, "one reduction carries at most kRedWords words");
  float s[NS > 0 ? NS : 1];
  int cnt;
  float mn;

  __device__ __forceinline__ static Stats zero() {
    Stats a;
#pragma unroll
    for (int j = 0; j < NS; ++j) a.s[j] = 0.0f;
    a.cnt = 0;
    a.mn = INFINITY;
    return a;
  }
  __device__ __forceinline__ void merge(const Stats& o) {
#pragma unroll
    for (int j = 0; j < NS; ++j) s[j] += o.s[j];
    if constexpr (CNT) cnt += o.cnt;
    if constexpr (MN) mn = fminf(mn, o.mn);
  }
  __device__ __forceinline__ Stats xor_lane(int o) const {
    Stats b = *this;
#pragma unroll
    for (int j = 0; j < NS; ++j) b.s[j] = __shfl_xor_sync(kx::kFullMask, s[j], o);
    if constexpr (CNT) b.cnt = __shfl_xor_sync(kx::kFullMask, cnt, o);
    if constexpr (MN) b.mn = __shfl_xor_sync(kx::kFullMask, mn, o);
    return b;
  }
  __device__ __forceinline__ void put(float* w) const {
#pragma unroll
    for (int j = 0; j < NS; ++j) w[j] = s[j];
    if constexpr (CNT) w[NS] = __int_as_float(cnt);
    if constexpr (MN) w[NS + CNT] = mn;
  }
  __device__ __forceinline__ static Stats get(const float* w) {
    Stats a = zero();
#pragma unroll
    for (int j = 0; j < NS; ++j) a.s[j] = w[j];
    if constexpr (CNT) a.cnt = __float_as_int(w[NS]);
    if constexpr (MN) a.mn = w[NS + CNT];
    return a;
  }
};

// The group's reduction of a, the same bits in every thread of the group. G > 32: the group is the block
// (one row a block); red: kRedWords * 32 floats of shared memory, free again on return.
template <int G, typename S>
__device__ __forceinline__ S group_reduce(S a, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a.merge(a.xor_lane(o));
  if constexpr (G > 32) {
    constexpr int W = G / 32;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) a.put(red + w * kRedWords);
    __syncthreads();
    S b = lane < W ? S::get(red + lane * kRedWords) : S::zero();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) b.merge(b.xor_lane(o));  // all 32 lanes: every lane gets the total
    __syncthreads();  // red is free for the next reduction
    return b;
  }
  return a;
}

// Exclusive prefix sum of v over the group in thread order, and the group's total. scr: 32 ints of shared
// memory (G > 32).
template <int G>
__device__ __forceinline__ int group_exclusive_scan(int v, int& total, int* scr) {
  const int lane = threadIdx.x & 31;
  int inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kx::kFullMask, inc, o);
    if (lane >= o) inc += u;
  }
  if constexpr (G == 32) {
    total = __shfl_sync(kx::kFullMask, inc, 31);
    return inc - v;
  } else {
    const int w = threadIdx.x >> 5;
    if (lane == 31) scr[w] = inc;
    __syncthreads();
    int before = 0, tot = 0;
    for (int k = 0; k < G / 32; ++k) {
      const int s = scr[k];
      before += k < w ? s : 0;
      tot += s;
    }
    __syncthreads();
    total = tot;
    return before + inc - v;
  }
}

// ---- row access: thread t of the group takes 16-byte chunks t, t + G, ... (vec) or entries t, t + G, ... ----

// f(i, x_i) for the thread's entries of src[0, n). vec: src 16-byte aligned and readable up to the end of
// the chunk that holds entry n - 1 (shared memory rows are padded; global rows have n % kVec == 0).
template <typename T, int G, typename F>
__device__ __forceinline__ void visit(const T* src, int64_t n, int t, bool vec, F&& f) {
  if (vec) {
    constexpr int V = kVec<T>;
    const int64_t nv = (n + V - 1) / V;
#pragma unroll 2
    for (int64_t c = t; c < nv; c += G) {
      const Vec<T> w = kx::load_aligned<Vec<T>>(src + c * V);
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (c * V + j < n) f(c * V + j, to_f(w.v[j]));
    }
  } else {
    for (int64_t i = t; i < n; i += G) f(i, to_f(src[i]));
  }
}

// dst[i] = f(i, x_i) for the thread's entries (the split of visit). vec: src and dst 16-byte aligned,
// n % kVec == 0.
template <typename T, int G, typename F>
__device__ __forceinline__ void write_row(const T* src, T* dst, int64_t n, int t, bool vec, F&& f) {
  if (vec) {
    constexpr int V = kVec<T>;
    const int64_t nv = n / V;
#pragma unroll 2
    for (int64_t c = t; c < nv; c += G) {
      const Vec<T> w = kx::load_aligned<Vec<T>>(src + c * V);
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(f(c * V + j, to_f(w.v[j])));
      kx::store_aligned(dst + c * V, o);
    }
  } else {
    for (int64_t i = t; i < n; i += G) dst[i] = from_f<T>(f(i, to_f(src[i])));
  }
}

// The row's maximum; ONCHIP: the row is also copied to buf (shared memory, 16-byte aligned, padded).
template <typename T, int G, bool ONCHIP>
__device__ __forceinline__ float row_max(const T* xg, T* buf, int64_t n, int t, bool vec, float* red) {
  Stats<0, false, true> a = Stats<0, false, true>::zero();  // the minimum of -x
  if constexpr (ONCHIP) {
    if (vec) {
      constexpr int V = kVec<T>;
      const int64_t nv = n / V;
#pragma unroll 4
      for (int64_t c = t; c < nv; c += G) {
        const Vec<T> w = kx::load_aligned<Vec<T>>(xg + c * V);
        kx::store_aligned(buf + c * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) a.mn = fminf(a.mn, -to_f(w.v[j]));
      }
    } else {
      for (int64_t i = t; i < n; i += G) {
        const T v = xg[i];
        buf[i] = v;
        a.mn = fminf(a.mn, -to_f(v));
      }
    }
    group_sync<G>();  // the row in shared memory, before any thread reads another's entries
  } else {
    visit<T, G>(xg, n, t, vec, [&](int64_t, float x) { a.mn = fminf(a.mn, -x); });
  }
  return -group_reduce<G>(a, red).mn;
}

// ---- entmax forward ----

template <typename T>
struct FwdParams {
  const T* x = nullptr;          // (R, N)
  T* p = nullptr;                // (R, N)
  float* loss = nullptr;         // (R) or null
  const int64_t* target = nullptr;
  const float* alpha = nullptr;  // (R), kind 2
  int64_t R = 0, N = 0;
  int64_t cap = 0;               // entries of a row's shared-memory slice (N rounded up to kVec), on chip
  int64_t k = 0;                 // top-k
  int64_t ignore_index = 0;
  int kind = 0, n_iter = 0;
  bool vec = false;              // x, p 16-byte aligned and N % kVec == 0
};

template <typename T, int G, int NT, bool ONCHIP>
__global__ void __launch_bounds__(NT) entmax_forward_kernel(const FwdParams<T> p) {
  extern __shared__ __align__(16) unsigned char ss_dyn[];
  __shared__ __align__(16) float ss_red[32 * kRedWords];
  constexpr int RPB = NT / G;
  const int grp = threadIdx.x / G, lt = threadIdx.x % G;
  T* buf = reinterpret_cast<T*>(ss_dyn) + grp * p.cap;
  const int64_t N = p.N;
  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const T* xg = p.x + row * N;
    T* pg = p.p + row * N;
    const float m = row_max<T, G, ONCHIP>(xg, buf, N, lt, p.vec, ss_red);
    const T* src = ONCHIP ? buf : xg;
    const bool sv = ONCHIP || p.vec;
    if (m == -INFINITY) {  // all -inf: p = 0, loss +inf unless ignored
      write_row<T, G>(src, pg, N, lt, p.vec, [](int64_t, float) { return 0.0f; });
      if (p.loss != nullptr && lt == 0) p.loss[row] = p.target[row] == p.ignore_index ? 0.0f : INFINITY;
      group_sync<G>();  // buf, before the next row's copy
      continue;
    }
    if (p.kind == 2) {
      // bisection: z = c (x - m), tau in [-1, -(1/N)^c]
      const float a = p.alpha[row], c = a - 1.0f, e = 1.0f / c;
      auto mass = [&](float tt) {
        Stats<1, false, false> s = Stats<1, false, false>::zero();
        visit<T, G>(src, N, lt, sv, [&](int64_t, float x) {
          const float u = (x - m) * c - tt;
          if (u > 0.0f) s.s[0] += exp2f(e * log2f(u));
        });
        return group_reduce<G>(s, ss_red).s[0];
      };
      float lo = -1.0f, hi = -powf(1.0f / static_cast<float>(N), c), slo = -1.0f;
      for (int it = 0; it < p.n_iter; ++it) {
        const float mid = (lo + hi) * 0.5f;
        if (mid <= lo || mid >= hi) break;  // the interval has collapsed in float
        const float s = mass(mid);
        if (s >= 1.0f) lo = mid, slo = s;
        else hi = mid;
      }
      if (slo < 0.0f) slo = mass(lo);  // lo never moved: its mass (>= 1)
      write_row<T, G>(src, pg, N, lt, p.vec, [&](int64_t, float x) {
        const float u = (x - m) * c - lo;
        return u > 0.0f ? exp2f(e * log2f(u)) / slo : 0.0f;
      });
      group_sync<G>();
      continue;
    }
    // kinds 0 / 1: safeguarded Newton from t = -1 (F(t) = sum_{z > t} (z - t)^E, E = kind + 1)
    const bool k1 = p.kind == 1;
    const float c = k1 ? 0.5f : 1.0f;
    float t = -1.0f, tau = -1.0f;
    for (int pass = 0; pass < kMaxPasses; ++pass) {
      using S = Stats<2, true, true>;
      S a = S::zero();
      visit<T, G>(src, N, lt, sv, [&](int64_t, float x) {
        const float z = (x - m) * c;
        if (z > t) {
          a.cnt += 1;
          a.s[0] += z;
          a.s[1] += z * z;
          a.mn = fminf(a.mn, z);
        }
      });
      a = group_reduce<G>(a, ss_red);
      const float cnt = static_cast<float>(a.cnt), s1 = a.s[0], s2 = a.s[1];
      float tc;
      if (!k1) {
        tc = (s1 - 1.0f) / cnt;
      } else {
        const float mean = s1 / cnt, var = fmaxf(s2 / cnt - mean * mean, 0.0f);
        tc = mean - sqrtf(fmaxf(1.0f / cnt - var, 0.0f));
      }
      tau = tc;
      if (a.mn > tc) break;  // {z > tc} is the support: tc is exact
      const float newton = k1 ? t + (s2 - 2.0f * t * s1 + cnt * t * t - 1.0f) / (2.0f * (s1 - cnt * t)) : tc;
      t = fmaxf(newton, a.mn);
    }
    // p = relu(z - tau)^E; the loss's sums (sum p^2 or p^1.5, sum p (x - m)) on the way
    const bool want_loss = p.loss != nullptr;
    Stats<2, false, false> L = Stats<2, false, false>::zero();
    write_row<T, G>(src, pg, N, lt, p.vec, [&](int64_t, float x) {
      const float u = (x - m) * c - tau;
      if (!(u > 0.0f)) return 0.0f;
      const float pv = k1 ? u * u : u;
      if (want_loss) {
        L.s[0] += k1 ? pv * u : pv * pv;
        L.s[1] += pv * (x - m);
      }
      return pv;
    });
    if (want_loss) {
      L = group_reduce<G>(L, ss_red);
      if (lt == 0) {
        const int64_t tg = p.target[row];
        float out = 0.0f;
        if (tg != p.ignore_index) {
          const float xt = to_f(xg[tg]);
          const float omega = k1 ? (1.0f - L.s[0]) / 0.75f : (1.0f - L.s[0]) * 0.5f;
          out = omega + L.s[1] - (xt - m);
        }
        p.loss[row] = out;
      }
    }
    group_sync<G>();  // buf, before the next row's copy
  }
}

// ---- top-k softmax forward ----

// The contract's order-preserving key: -0.0 as +0.0, then flip the sign bit of positives, every bit of
// negatives.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0u;
  return b ^ ((b >> 31) ? 0xffffffffu : 0x80000000u);
}

template <typename T, int G, int NT, bool ONCHIP>
__global__ void __launch_bounds__(NT) topk_forward_kernel(const FwdParams<T> p) {
  extern __shared__ __align__(16) unsigned char ss_dyn[];
  __shared__ __align__(16) float ss_red[32 * kRedWords];
  __shared__ int ss_sel[4 * (NT / G)];  // per row: the chosen digit, entries above it, entries in it
  __shared__ __align__(8) int64_t ss_cut[NT / G];
  constexpr int RPB = NT / G;
  const int grp = threadIdx.x / G, lt = threadIdx.x % G, lane = threadIdx.x & 31;
  int* hist = reinterpret_cast<int*>(ss_dyn) + grp * kBins;
  T* buf = reinterpret_cast<T*>(ss_dyn + RPB * kBins * sizeof(int)) + grp * p.cap;
  int* sel = ss_sel + 4 * grp;
  const int64_t N = p.N;
  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const T* xg = p.x + row * N;
    T* pg = p.p + row * N;
    const float m = row_max<T, G, ONCHIP>(xg, buf, N, lt, p.vec, ss_red);
    const T* src = ONCHIP ? buf : xg;
    const bool sv = ONCHIP || p.vec;
    if (m == -INFINITY) {
      write_row<T, G>(src, pg, N, lt, p.vec, [](int64_t, float) { return 0.0f; });
      if (p.loss != nullptr && lt == 0) p.loss[row] = p.target[row] == p.ignore_index ? 0.0f : INFINITY;
      group_sync<G>();
      continue;
    }
    // radix select of the k-th largest key, 8 bits a pass from the top
    uint32_t prefix = 0u, pmask = 0u;
    int kk = static_cast<int>(p.k), eq = 0;  // kk: the rank still wanted among the keys that match prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = lt; b < kBins; b += G) hist[b] = 0;
      group_sync<G>();
      visit<T, G>(src, N, lt, sv, [&](int64_t, float x) {
        const uint32_t key = order_key(x);
        if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
      });
      group_sync<G>();
      if (lt < 32) {  // one warp: lane l holds bins 255 - 8 l - j, j = 0..7 (descending), scans from the top
        int cnt[8], tot = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) tot += cnt[j] = hist[kBins - 1 - 8 * lane - j];
        int inc = tot;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int u = __shfl_up_sync(kx::kFullMask, inc, o);
          if (lane >= o) inc += u;
        }
        int above = inc - tot;
        if (above < kk && kk <= inc) {  // exactly one lane: the k-th key's digit is among its bins
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (kk <= above + cnt[j]) {
              sel[0] = kBins - 1 - 8 * lane - j;
              sel[1] = above;
              sel[2] = cnt[j];
              break;
            }
            above += cnt[j];
          }
        }
      }
      group_sync<G>();
      const uint32_t d = static_cast<uint32_t>(sel[0]);
      kk -= sel[1];
      eq = sel[2];
      prefix |= d << shift;
      pmask |= 0xffu << shift;
      group_sync<G>();  // sel and hist, before the next pass writes them
    }
    const uint32_t vkey = prefix;
    const int need = kk;  // entries equal to v to take (eq of them exist)
    // the index of the need-th entry equal to v, in index order (all of them: N)
    int64_t cut = N;
    if (need < eq) {
      const int cw = sv ? kVec<T> : 1;  // the chunk a thread takes per tile, as visit's split
      int run = 0;
      for (int64_t base = 0; base < N; base += int64_t{G} * cw) {
        const int64_t c0 = base + int64_t{lt} * cw;
        int mine = 0;
        for (int j = 0; j < cw; ++j)
          if (c0 + j < N && order_key(to_f(src[c0 + j])) == vkey) ++mine;
        int tot;
        const int excl = group_exclusive_scan<G>(mine, tot, reinterpret_cast<int*>(ss_red));
        if (run + excl < need && need <= run + excl + mine) {
          int r = run + excl;
          for (int j = 0; j < cw; ++j) {
            if (c0 + j < N && order_key(to_f(src[c0 + j])) == vkey && ++r == need) {
              ss_cut[grp] = c0 + j;
              break;
            }
          }
        }
        run += tot;
        if (run >= need) break;  // the same in every thread
      }
      group_sync<G>();
      cut = ss_cut[grp];
      group_sync<G>();
    }
    auto selected = [&](int64_t i, float x) {
      const uint32_t key = order_key(x);
      return key > vkey || (key == vkey && i <= cut);
    };
    Stats<1, false, false> s = Stats<1, false, false>::zero();
    visit<T, G>(src, N, lt, sv, [&](int64_t i, float x) {
      if (selected(i, x)) s.s[0] += expf(x - m);
    });
    const float sum = group_reduce<G>(s, ss_red).s[0];
    write_row<T, G>(src, pg, N, lt, p.vec, [&](int64_t i, float x) {
      return selected(i, x) ? expf(x - m) / sum : 0.0f;
    });
    if (p.loss != nullptr && lt == 0) {
      const int64_t tg = p.target[row];
      p.loss[row] = tg == p.ignore_index ? 0.0f : logf(sum) - (to_f(xg[tg]) - m);
    }
    group_sync<G>();
  }
}

// ---- backward ----

template <typename T>
struct BwdParams {
  const T* dp = nullptr;  // (R, N)
  const T* p = nullptr;   // (R, N)
  T* dx = nullptr;        // (R, N)
  const float* alpha = nullptr;
  float* dalpha = nullptr;  // (R) or null
  int64_t R = 0, N = 0;
  int kind = 0;
  bool vec = false;  // dp, p, dx 16-byte aligned and N % kVec == 0
};

// f(i, dp_i, p_i) for the thread's entries (visit's split over two rows).
template <typename T, int G, typename F>
__device__ __forceinline__ void visit2(const T* a, const T* b, int64_t n, int t, bool vec, F&& f) {
  if (vec) {
    constexpr int V = kVec<T>;
    const int64_t nv = n / V;
#pragma unroll 2
    for (int64_t c = t; c < nv; c += G) {
      const Vec<T> u = kx::load_aligned<Vec<T>>(a + c * V), w = kx::load_aligned<Vec<T>>(b + c * V);
#pragma unroll
      for (int j = 0; j < V; ++j) f(c * V + j, to_f(u.v[j]), to_f(w.v[j]));
    }
  } else {
    for (int64_t i = t; i < n; i += G) f(i, to_f(a[i]), to_f(b[i]));
  }
}

template <typename T, int G, typename F>
__device__ __forceinline__ void write2(const T* a, const T* b, T* dst, int64_t n, int t, bool vec, F&& f) {
  if (vec) {
    constexpr int V = kVec<T>;
    const int64_t nv = n / V;
#pragma unroll 2
    for (int64_t c = t; c < nv; c += G) {
      const Vec<T> u = kx::load_aligned<Vec<T>>(a + c * V), w = kx::load_aligned<Vec<T>>(b + c * V);
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(f(to_f(u.v[j]), to_f(w.v[j])));
      kx::store_aligned(dst + c * V, o);
    }
  } else {
    for (int64_t i = t; i < n; i += G) dst[i] = from_f<T>(f(to_f(a[i]), to_f(b[i])));
  }
}

template <typename T, int G, int NT>
__global__ void __launch_bounds__(NT) entmax_backward_kernel(const BwdParams<T> p) {
  __shared__ __align__(16) float ss_red[32 * kRedWords];
  constexpr int RPB = NT / G;
  constexpr float kLn2 = 0.6931471805599453f;
  const int grp = threadIdx.x / G, lt = threadIdx.x % G;
  const int64_t N = p.N;
  const int kind = p.kind;
  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const T* dpg = p.dp + row * N;
    const T* pg = p.p + row * N;
    const float a = kind == 2 ? p.alpha[row] : 2.0f, e2 = 2.0f - a;
    auto g_of = [&](float pv) {  // pv > 0
      switch (kind) {
        case 0: return 1.0f;
        case 1: return sqrtf(pv);
        case 2: return exp2f(e2 * log2f(pv));
        default: return pv;
      }
    };
    const bool ag = p.dalpha != nullptr;
    // read 1: G = sum g, sum g dp (and, for dalpha: ent = sum p log p, A = sum dp p, C = sum dp p log p)
    using S = Stats<5, false, false>;
    S s = S::zero();
    visit2<T, G>(dpg, pg, N, lt, p.vec, [&](int64_t, float d, float pv) {
      if (!(pv > 0.0f)) return;
      const float g = g_of(pv);
      s.s[0] += g;
      s.s[1] += g * d;
      if (ag) {
        const float plogp = pv * (log2f(pv) * kLn2);
        s.s[2] += plogp;
        s.s[3] += d * pv;
        s.s[4] += d * plogp;
      }
    });
    s = group_reduce<G>(s, ss_red);
    const float Gs = s.s[0], q = Gs > 0.0f ? s.s[1] / Gs : 0.0f;
    // read 2: dx = g (dp - q) on the support, 0 elsewhere
    write2<T, G>(dpg, pg, p.dx + row * N, N, lt, p.vec, [&](float d, float pv) {
      return pv > 0.0f ? g_of(pv) * (d - q) : 0.0f;
    });
    if (ag && lt == 0) {
      const float c = a - 1.0f, ent = s.s[2], A = s.s[3], C = s.s[4], B = q;
      p.dalpha[row] = Gs > 0.0f ? (A - B) / (c * c) - (C - B * ent) / c : 0.0f;
    }
  }
}

// ---- host ----

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_rows(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt != at::kDouble, op, ": float64 is supported on CPU only");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": ", name, " must be a contiguous (R, N) tensor, got ",
              x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
}

void check_row_vector(const char* op, const std::optional<at::Tensor>& t, const char* name, at::ScalarType dt,
                      const at::Tensor& x) {
  if (!t) return;
  TORCH_CHECK(t->is_cuda() && t->device() == x.device() && t->scalar_type() == dt && t->dim() == 1 &&
                  t->size(0) == x.size(0) && t->is_contiguous(),
              op, ": ", name, " must be a contiguous ", dt, " (", x.size(0), ",) tensor on x's device, got ",
              t->scalar_type(), " ", t->sizes());
}

template <typename K, typename P>
void launch(K kernel, const P& p, int rows_per_block, int threads, int64_t smem) {
  const auto grid = static_cast<unsigned>(std::min<int64_t>((p.R + rows_per_block - 1) / rows_per_block,
                                                            kx::max_grid_x()));
  // past 48 KB a block: the opt-in, with room for the static shared memory (which the emulator counts in the
  // limit; the callers keep smem + 2 kStaticSmem within the device's opt-in, as CUDA wants the dynamic part
  // within the opt-in less the static part)
  if (smem + kStaticSmem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem + kStaticSmem)));
  }
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward's path (warp per row, block per row on chip, block per row streaming) and its launch.
template <typename T, bool TOPK>
void launch_forward(FwdParams<T>& p, int device) {
  constexpr int V = kVec<T>;
  const int64_t cap = (p.N + V - 1) / V * V;
  const int64_t row_bytes = cap * static_cast<int64_t>(sizeof(T));
  const int64_t hist = TOPK ? kBins * static_cast<int64_t>(sizeof(int)) : 0;
  const int64_t short_n = kx::env_threshold("KXOPS_SPARSE_SOFTMAX_SHORT_N", kShortN);
  const int64_t onchip = kx::env_threshold("KXOPS_SPARSE_SOFTMAX_ONCHIP_BYTES", kOnchipBytes);
  if (p.N <= short_n && kWarpRows * (hist + row_bytes) <= kShortSmem) {
    p.cap = cap;
    auto k = TOPK ? topk_forward_kernel<T, 32, kShortThreads, true> : entmax_forward_kernel<T, 32, kShortThreads, true>;
    launch(k, p, kWarpRows, kShortThreads, kWarpRows * (hist + row_bytes));
  } else if (row_bytes <= onchip && hist + row_bytes <= kx::max_smem_optin(device) - 2 * kStaticSmem) {
    p.cap = cap;
    auto k = TOPK ? topk_forward_kernel<T, kBlockThreads, kBlockThreads, true>
                  : entmax_forward_kernel<T, kBlockThreads, kBlockThreads, true>;
    launch(k, p, 1, kBlockThreads, hist + row_bytes);
  } else {
    p.cap = 0;
    auto k = TOPK ? topk_forward_kernel<T, kBlockThreads, kBlockThreads, false>
                  : entmax_forward_kernel<T, kBlockThreads, kBlockThreads, false>;
    launch(k, p, 1, kBlockThreads, hist);
  }
}

template <typename T>
FwdParams<T> forward_params(const at::Tensor& x, at::Tensor& out, at::Tensor& loss,
                            const std::optional<at::Tensor>& target, int64_t ignore_index) {
  FwdParams<T> p;
  p.x = reinterpret_cast<const T*>(x.const_data_ptr());
  p.p = reinterpret_cast<T*>(out.data_ptr());
  p.R = x.size(0);
  p.N = x.size(1);
  if (target) {
    p.target = target->const_data_ptr<int64_t>();
    p.loss = loss.data_ptr<float>();
  }
  p.ignore_index = ignore_index;
  p.vec = aligned16(p.x) && aligned16(p.p) && p.N % kVec<T> == 0;
  return p;
}

std::tuple<at::Tensor, at::Tensor> entmax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& alpha,
                                               int64_t kind, int64_t n_iter, const std::optional<at::Tensor>& target,
                                               int64_t ignore_index) {
  const char* op = "entmax";
  check_rows(op, x, "x");
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": kind must be 0 (sparsemax), 1 (entmax15) or 2 (bisection), got ", kind);
  TORCH_CHECK(kind != 2 || alpha.has_value(), op, ": kind 2 needs alpha");
  TORCH_CHECK(!target || kind != 2, op, ": the loss is defined for kinds 0 and 1 only");
  TORCH_CHECK(n_iter >= 0 && n_iter <= INT_MAX, op, ": n_iter must be in [0, 2^31), got ", n_iter);
  check_row_vector(op, kind == 2 ? alpha : std::nullopt, "alpha", at::kFloat, x);
  check_row_vector(op, target, "target", at::kLong, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0);
  auto out = at::empty_like(x);
  auto loss = at::empty({target ? R : 0}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, loss};
  kx::dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    FwdParams<T> p = forward_params<T>(x, out, loss, target, ignore_index);
    p.kind = static_cast<int>(kind);
    p.n_iter = static_cast<int>(n_iter);
    if (kind == 2) p.alpha = alpha->const_data_ptr<float>();
    launch_forward<T, false>(p, x.get_device());
  });
  return {out, loss};
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(const at::Tensor& x, int64_t k,
                                                     const std::optional<at::Tensor>& target, int64_t ignore_index) {
  const char* op = "topk_softmax";
  check_rows(op, x, "x");
  TORCH_CHECK(k >= 1 && k <= x.size(1), op, ": k must be in [1, N = ", x.size(1), "], got ", k);
  TORCH_CHECK(x.size(1) <= INT_MAX, op, ": rows of at most 2^31 - 1 entries");
  check_row_vector(op, target, "target", at::kLong, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0);
  auto out = at::empty_like(x);
  auto loss = at::empty({target ? R : 0}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, loss};
  kx::dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    FwdParams<T> p = forward_params<T>(x, out, loss, target, ignore_index);
    p.k = k;
    launch_forward<T, true>(p, x.get_device());
  });
  return {out, loss};
}

std::tuple<at::Tensor, at::Tensor> entmax_backward_cuda(const at::Tensor& dp, const at::Tensor& pr,
                                                        const std::optional<at::Tensor>& alpha, int64_t kind,
                                                        bool alpha_grad) {
  const char* op = "entmax_backward";
  check_rows(op, pr, "p");
  check_rows(op, dp, "dp");
  TORCH_CHECK(dp.device() == pr.device() && dp.scalar_type() == pr.scalar_type() && dp.sizes() == pr.sizes(), op,
              ": dp must have p's dtype, shape and device, got ", dp.scalar_type(), " ", dp.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 3, op, ": kind must be in [0, 3], got ", kind);
  TORCH_CHECK(kind != 2 || alpha.has_value(), op, ": kind 2 needs alpha");
  TORCH_CHECK(!alpha_grad || kind == 2, op, ": alpha_grad is for kind 2 only");
  check_row_vector(op, kind == 2 ? alpha : std::nullopt, "alpha", at::kFloat, pr);
  const c10::cuda::CUDAGuard guard(pr.device());
  const int64_t R = pr.size(0);
  auto dx = at::empty_like(pr);
  auto dalpha = at::empty({alpha_grad ? R : 0}, pr.options().dtype(at::kFloat));
  if (pr.numel() == 0) {
    if (alpha_grad) dalpha.zero_();
    return {dx, dalpha};
  }
  kx::dispatch_float(pr.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    BwdParams<T> b;
    b.dp = reinterpret_cast<const T*>(dp.const_data_ptr());
    b.p = reinterpret_cast<const T*>(pr.const_data_ptr());
    b.dx = reinterpret_cast<T*>(dx.data_ptr());
    if (kind == 2) b.alpha = alpha->const_data_ptr<float>();
    if (alpha_grad) b.dalpha = dalpha.data_ptr<float>();
    b.R = R;
    b.N = pr.size(1);
    b.kind = static_cast<int>(kind);
    b.vec = aligned16(b.dp) && aligned16(b.p) && aligned16(b.dx) && b.N % kVec<T> == 0;
    if (b.N <= kx::env_threshold("KXOPS_SPARSE_SOFTMAX_SHORT_N", kShortN)) {
      launch(entmax_backward_kernel<T, 32, kShortThreads>, b, kWarpRows, kShortThreads, 0);
    } else {
      launch(entmax_backward_kernel<T, kBlockThreads, kBlockThreads>, b, 1, kBlockThreads, 0);
    }
  });
  return {dx, dalpha};
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CUDA, m) {
  m.impl("entmax", &kxops::entmax_cuda);
  m.impl("entmax_backward", &kxops::entmax_backward_cuda);
  m.impl("topk_softmax", &kxops::topk_softmax_cuda);
}
