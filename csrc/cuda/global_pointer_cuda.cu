// CUDA implementations of kxops::global_pointer_loss and global_pointer_loss_backward, the span logits
// kxops::global_pointer and global_pointer_backward, decoding (global_pointer_decode) and the row losses on
// materialised logits (multilabel_categorical_crossentropy, _backward)
// (docs/global_pointer_kernel_contract.md; the math: ../shared/spec/global_pointer.md).
//
// Per (batch b, type h) row, over the valid spans (i, j) of the L x L score matrix
//   s_ij = scale (R_i q_i) . (R_j k_j) + start[i] + end[j],
//   lse_neg = log(1 + sum (1 - t_ij) e^s_ij),  lse_pos = log(1 + sum t_ij e^-s_ij),  loss = lse_neg + lse_pos,
// never materialising B H L L: the scores are recomputed tile by tile (bt x bt, bt = 64, 32 or 16 by
// the sequence length and the device's shared memory) from q, k tiles that are loaded, rotated (RoPE,
// interleaved pairs at positions 0..L-1) and kept in shared memory. With RoPE a first launch fills an
// (L, d / 2) table of (cos, sin) (one sincosf per position and pair, the reference's float32 angle), which
// the tile loads of both passes read.
//
// Forward, two launches (after the table's):
//   1. a block per (b, q head, type group, i-block of bt rows) walks the row's j-blocks (from the
//      diagonal with tril; tiles without a valid row or column are skipped) and folds every score of
//      its types into per-thread online log-sum-exps (running max m and sum l: one pair for the
//      negatives, one for the negated positives; a tile's terms summed in float, the tiles' sums in
//      double). With Hq = 1 (types share q, k) a block serves up to kTypeGroup types from one score
//      tile. The block's pairs are merged into one (m, l) per (row, i-block) in a double workspace;
//   2. a thread per row merges its i-blocks' pairs, starting from the threshold class (m = 0, l = 1).
// Labels: CSR rows of sorted flat spans i L + j (membership: a binary search in the row's segment) or
// dense targets (any float dtype); t = 0 and t = 1 exact (a zero weight adds nothing).
//
// Backward, two launches of one kernel (flash-attention style, deterministic, no atomics): the q side, a
// block per (b, q head, i-block) walking j-blocks, gives dq and dstart; the k side, a block per (b, k
// head, j-block) walking i-blocks, gives dk and dend. Per tile the scores are recomputed and
//   ds_ij = dloss ((1 - t) e^(s - lse_neg) - t e^(-s - lse_pos))   (valid spans; summed over the types
// when Hq = 1), its row sums go to the block's own bias gradient rows, and the block's accumulator takes
// ds (bt x bt) times the other side's rotated tile (bt x d); at the end dx = R^T (scale acc).
//
// Matrix products: fp16 / bf16 inputs on tensor cores (nvcuda::wmma m16n16k16, bf16 operands, float
// accumulators), 4 warps a block, a warp per 16 x 16 output tile. The loss and the bias gradients are
// float32 outputs that the reference computes in float32 from the 16-bit inputs, so the scores must be
// float-accurate: an operand is stored as 1 to 3 bf16 pieces, each the rounding of what the previous ones
// left (bf16 inputs: 1, exact; fp16 inputs: 2, exact, as bf16 has fp16's range and more; rotated values: 3,
// a float's 24 bits), and the scores take every piece product down to 2^-16 of the leading one (pieces
// a, b with a + b <= 2: 1, 4 or 6 products; hi hi in one accumulator, the smaller ones in a second). The
// gradient product ds Kt (ds^T Qt) feeds q-dtype outputs only: ds and the operand in two pieces, three
// products (hi hi, hi lo, lo hi). float32 inputs: CUDA cores, the scores' dot products and the gradient
// accumulators in double (as in linear_attention_cuda.cu: the float32 rule leaves no room for TF32).
//
// The span logits and decoding share one kernel (gp_scores_kernel, its pass in p.mode), with the loss's
// tiles: a block per (b, q head, type group, i-block) walks the j-blocks, computes a score tile as above and
// turns it into s_ij = (scale dot) + start + end (float, no FMA contraction: span_score). The logits pass
// writes every span (-inf where invalid); decoding runs a counting pass (the hits s > threshold of each row
// (b, h, i)), an inclusive scan of the counts (ATen's cumsum) whose last entry the host reads (one device
// synchronisation: the hit count sizes the outputs), and a writing pass in which a warp per tile row ranks
// its hits by ballot and carries the row's next output index from tile to tile, so that the spans come out
// in row-major order. Being the same machine code, the passes agree with the logits bit for bit. The
// logits' backward is the loss's backward kernel (LG = true) with ds read from dlogits on the valid spans.
// The row losses: a warp (short rows) or a block (long rows) per row, online log-sum-exps (see there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "kx_cuda.cuh"

namespace kxops {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDim = 256;
constexpr int kTypeGroup = 8;  // forward, Hq = 1: most types a block folds from one score tile

using MT = __nv_bfloat16;  // the tensor cores' operand type

template <typename T> struct Tr;  // per input type: tensor cores, bf16 pieces an input value needs
template <> struct Tr<float> {
  static constexpr bool kTc = false;
  static constexpr int kPieces = 0;
};
template <> struct Tr<__half> {
  static constexpr bool kTc = true;
  static constexpr int kPieces = 2;
};
template <> struct Tr<__nv_bfloat16> {
  static constexpr bool kTc = true;
  static constexpr int kPieces = 1;
};

using kx::from_f;
using kx::to_f;

// Shared memory of a block, as byte offsets (-1: absent), every buffer 128-byte aligned; leading
// dimensions in elements. Operands: bt rows of dp (d rounded up to 16) columns, x the block's own side,
// y the other side; tensor cores: `pieces` bf16 copies, rows padded by 16 bytes; float32: floats, odd
// rows (no bank conflicts). s: the score tile (float). Forward: m (float) and l (double), [2][G][kThreads]:
// every thread's online log-sum-exps (negatives, positives) per type. Backward: ds (float), its bf16
// pieces dsp [2] (tensor cores), the accumulator acc (float; double for float32). rf, cf: the own and
// the other tile's rows that are tokens. Scores (logits, decode): cnt (int64) [G][bt], decode's hits per
// own row and type (counting pass), or the next hit's output index (writing pass).
enum class Kind { kLossForward, kBackward, kScores };

struct Lay {
  int bt = 0, pieces = 0, G = 1;
  int ldo = 0, lds = 0, ldd = 0, lda = 0;
  int64_t x = -1, y = -1, s = -1, m = -1, l = -1, ds = -1, dsp = -1, acc = -1, cnt = -1, rf = -1, cf = -1;
  int64_t bytes = 0;
};

template <typename T>
Lay make_layout(Kind kind, int bt, int dp, int pieces, int G) {
  constexpr bool tc = Tr<T>::kTc;
  Lay l;
  l.bt = bt;
  l.pieces = tc ? pieces : 0;
  l.G = G;
  l.ldo = tc ? dp + 8 : dp + 1;
  l.lds = bt + 4;
  l.ldd = bt + 8;
  l.lda = tc ? dp + 4 : dp;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += (bytes + 127) / 128 * 128;
    return o;
  };
  const int64_t operand = int64_t{bt} * l.ldo * (tc ? 2 * pieces : 4);
  l.x = take(operand);
  l.y = take(operand);
  l.s = take(int64_t{bt} * l.lds * 4);
  if (kind == Kind::kLossForward) {
    l.m = take(int64_t{2} * G * kThreads * 4);
    l.l = take(int64_t{2} * G * kThreads * 8);
  } else if (kind == Kind::kScores) {
    l.cnt = take(int64_t{G} * bt * 8);
  } else {
    l.ds = take(int64_t{bt} * l.lds * 4);
    if (tc) l.dsp = take(int64_t{2} * bt * l.ldd * 2);
    l.acc = take(int64_t{bt} * l.lda * (tc ? 4 : 8));
  }
  l.rf = take(bt);
  l.cf = take(bt);
  l.bytes = off;
  return l;
}

template <typename T>
struct Params {
  const T* q = nullptr;
  const T* k = nullptr;
  int64_t q_sb = 0, q_sl = 0, q_sh = 0, k_sb = 0, k_sl = 0, k_sh = 0;
  const bool* mask = nullptr;      // (B, L) or null
  const float* sb = nullptr;       // start bias (B, H, L) or null
  const float* eb = nullptr;       // end bias (B, H, L) or null
  const float* inv_freq = nullptr;  // (d / 2) or null: no RoPE
  const float* rope = nullptr;      // with RoPE: (L, d / 2, 2) cos, sin of position x inv_freq (a table)
  const int32_t* off = nullptr;    // sparse labels: (B H + 1) row offsets into idx, or null
  const int32_t* idx = nullptr;
  int64_t nidx = 0;
  const void* tgt = nullptr;  // dense labels (B, H, L, L), or null
  int tgt_type = 0;           // 0 float, 1 double, 2 half, 3 bfloat16
  int64_t B = 0, L = 0, nblk = 0;
  int H = 0, Hq = 0, d = 0, dp = 0, ngroups = 1;
  float scale = 1.0f;
  bool tril = true;
  Lay lay;
  double* ws = nullptr;  // forward: (B H, nblk, 4) the i-blocks' (m_neg, l_neg, m_pos, l_pos)
  // backward
  const float* dloss = nullptr;
  const float* lse_neg = nullptr;
  const float* lse_pos = nullptr;
  int64_t dl_sb = 0, dl_sh = 0, ln_sb = 0, ln_sh = 0, lp_sb = 0, lp_sh = 0;
  T* dx = nullptr;         // this launch's dq or dk, (B, L, Hq, d) contiguous
  float* dbias = nullptr;  // this launch's dstart or dend, (B, H, L), or null
  const float* dlogits = nullptr;  // the logits' backward: (B, H, L, L) contiguous
  // scores (logits, decode): the pass, and its outputs
  int mode = 0;                    // kLogits, kCount, kWrite
  float* logits = nullptr;         // kLogits: (B, H, L, L)
  int64_t* counts = nullptr;       // kCount: (B H L) hits per row (b, h, i); kWrite: read
  const int64_t* incl = nullptr;   // kWrite: the counts' inclusive scan
  int64_t* spans = nullptr;        // kWrite: (N, 4)
  float* hit_scores = nullptr;     // kWrite: (N)
  float threshold = 0.0f;
};

constexpr int kLogits = 0, kCount = 1, kWrite = 2;

// ---- labels ----

__device__ __forceinline__ float target_at(const void* t, int type, int64_t at) {
  switch (type) {
    case 0: return static_cast<const float*>(t)[at];
    case 1: return static_cast<float>(static_cast<const double*>(t)[at]);
    case 2: return __half2float(static_cast<const __half*>(t)[at]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(t)[at]);
  }
}

// Row `row`'s segment [lo, hi) of the sparse labels (clamped into idx, so that bad offsets from a direct
// op call cannot send a thread out of bounds); empty for dense labels.
template <typename T>
__device__ __forceinline__ void segment(const Params<T>& p, int64_t row, int64_t& lo, int64_t& hi) {
  lo = hi = 0;
  if (p.off != nullptr) {
    lo = min(max(static_cast<int64_t>(p.off[row]), int64_t{0}), p.nidx);
    hi = min(max(static_cast<int64_t>(p.off[row + 1]), lo), p.nidx);
  }
}

// t_ij of row `row` (sparse: 1 if i L + j is in the row's segment, else 0).
template <typename T>
__device__ __forceinline__ float label(const Params<T>& p, int64_t row, int64_t lo, int64_t hi, int64_t i, int64_t j) {
  if (p.tgt != nullptr) return target_at(p.tgt, p.tgt_type, (row * p.L + i) * p.L + j);
  const int64_t f = i * p.L + j;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    const int64_t v = p.idx[mid];
    if (v == f) return 1.0f;
    if (v < f) lo = mid + 1;
    else hi = mid;
  }
  return 0.0f;
}

// ---- online log-sum-exp ----

// (m, l) += w e^x: l = sum w e^(x - m), m = -inf: no terms. A zero weight is never passed (t = 0, 1
// exact). In float: a thread's terms of one tile (bt / tpr <= 32 of them).
__device__ __forceinline__ void online(float& m, float& l, float x, float w) {
  if (x > m) {
    l = l * expf(m - x) + w;
    m = x;
  } else {
    l += w * expf(x - m);
  }
}

// A tile's (m2, l2) folded into a thread's running (m, l), whose sum is in double.
__device__ __forceinline__ void fold(float& m, double& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m2 > m) {
    l = l * static_cast<double>(expf(m - m2)) + static_cast<double>(l2);
    m = m2;
  } else {
    l += static_cast<double>(l2) * static_cast<double>(expf(m2 - m));
  }
}

// (m, l) merged with (m2, l2); m = -inf: no terms.
__device__ __forceinline__ void merge(double& m, double& l, double m2, double l2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    l = l2;
    return;
  }
  const double M = m > m2 ? m : m2;
  l = l * exp(m - M) + l2 * exp(m2 - M);
  m = M;
}

// ---- tiles ----

// v into an operand buffer at element `at` (tensor cores: its bf16 pieces, lay.pieces of them).
template <typename T>
__device__ __forceinline__ void put_operand(const Lay& l, unsigned char* buf, int at, float v) {
  if constexpr (Tr<T>::kTc) {
    MT* o = reinterpret_cast<MT*>(buf);
    const int ps = l.bt * l.ldo;
    const MT h = __float2bfloat16_rn(v);
    o[at] = h;
    if (l.pieces > 1) {
      const float r = v - __bfloat162float(h);
      const MT m = __float2bfloat16_rn(r);
      o[ps + at] = m;
      if (l.pieces > 2) o[2 * ps + at] = __float2bfloat16_rn(r - __bfloat162float(m));
    }
  } else {
    reinterpret_cast<float*>(buf)[at] = v;
  }
}

// Rows row0 + [0, bt) of x (row r at x0 + r st, unit stride over d), rotated to their positions with
// RoPE, into an operand buffer; zero past L and past d. flags[r]: row r is a token (< L, not padding).
template <typename T>
__device__ void load_operand(const Params<T>& p, unsigned char* buf, unsigned char* flags, const T* x0, int64_t st,
                             int64_t b, int64_t row0) {
  const Lay& l = p.lay;
  const int np = p.dp / 2;
  for (int it = threadIdx.x; it < l.bt * np; it += kThreads) {
    const int r = it / np, c = 2 * (it - r * np);
    const int64_t i = row0 + r;
    float v0 = 0.0f, v1 = 0.0f;
    if (i < p.L && c < p.d) {
      const T* x = x0 + r * st;
      v0 = to_f(x[c]);
      if (c + 1 < p.d) v1 = to_f(x[c + 1]);
      if (p.rope != nullptr) {
        const float* t = p.rope + 2 * (i * (p.d >> 1) + (c >> 1));
        const float cs = t[0], sn = t[1];
        const float a = v0 * cs - v1 * sn;
        v1 = v0 * sn + v1 * cs;
        v0 = a;
      }
    }
    put_operand<T>(l, buf, r * l.ldo + c, v0);
    put_operand<T>(l, buf, r * l.ldo + c + 1, v1);
  }
  for (int r = threadIdx.x; r < l.bt; r += kThreads) {
    const int64_t i = row0 + r;
    flags[r] = i < p.L && (p.mask == nullptr || p.mask[b * p.L + i]);
  }
}

// S (bt x bt, float) = X Y^T over d: the unscaled dot products of the tiles' rows.
template <typename T>
__device__ void scores(const Params<T>& p, const unsigned char* xb, const unsigned char* yb, float* S) {
  const Lay& l = p.lay;
  if constexpr (Tr<T>::kTc) {
    using namespace nvcuda;
    const MT* x = reinterpret_cast<const MT*>(xb);
    const MT* y = reinterpret_cast<const MT*>(yb);
    const int ps = l.bt * l.ldo, nt = l.bt / 16, warp = threadIdx.x >> 5;
    for (int tile = warp; tile < nt * nt; tile += kWarps) {
      const int ti = tile / nt, tj = tile - ti * nt;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> main, corr;
      wmma::fill_fragment(main, 0.0f);
      wmma::fill_fragment(corr, 0.0f);
      for (int kk = 0; kk < p.dp; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb[3];
#pragma unroll
        for (int b = 0; b < 3; ++b) {
          if (b < l.pieces) wmma::load_matrix_sync(fb[b], y + b * ps + 16 * tj * l.ldo + kk, l.ldo);
        }
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          if (a < l.pieces) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, x + a * ps + 16 * ti * l.ldo + kk, l.ldo);
#pragma unroll
            for (int b = 2; b >= 0; --b) {  // the smaller products first
              if (b < l.pieces && a + b <= 2) {
                if (a + b == 0) wmma::mma_sync(main, fa, fb[b], main);
                else wmma::mma_sync(corr, fa, fb[b], corr);
              }
            }
          }
        }
      }
      for (int e = 0; e < main.num_elements; ++e) main.x[e] += corr.x[e];
      wmma::store_matrix_sync(S + 16 * ti * l.lds + 16 * tj, main, l.lds, wmma::mem_row_major);
    }
  } else {
    const float* x = reinterpret_cast<const float*>(xb);
    const float* y = reinterpret_cast<const float*>(yb);
    const int tpr = kThreads / l.bt, r = threadIdx.x / tpr;
    const float* xr = x + r * l.ldo;
    for (int c = threadIdx.x - r * tpr; c < l.bt; c += tpr) {
      const float* yc = y + c * l.ldo;
      double acc = 0.0;
      for (int k = 0; k < p.d; ++k) acc += static_cast<double>(xr[k]) * static_cast<double>(yc[k]);
      S[r * l.lds + c] = static_cast<float>(acc);
    }
  }
}

// acc (bt x dp) += DS (bt x bt) Y (bt x dp). Tensor cores: DS's two pieces in dsp, Y's first two.
template <typename T>
__device__ void grad_product(const Params<T>& p, unsigned char* smem) {
  const Lay& l = p.lay;
  if constexpr (Tr<T>::kTc) {
    using namespace nvcuda;
    const MT* ds = reinterpret_cast<const MT*>(smem + l.dsp);
    const MT* y = reinterpret_cast<const MT*>(smem + l.y);
    float* acc = reinterpret_cast<float*>(smem + l.acc);
    const int ps = l.bt * l.ldo, dps = l.bt * l.ldd, nt = l.bt / 16, nk = p.dp / 16, warp = threadIdx.x >> 5;
    for (int tile = warp; tile < nt * nk; tile += kWarps) {
      const int ti = tile / nk, tk = tile - ti * nk;
      float* at = acc + 16 * ti * l.lda + 16 * tk;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
      wmma::load_matrix_sync(f, at, l.lda, wmma::mem_row_major);
      for (int cc = 0; cc < l.bt; cc += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> a0, a1;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::row_major> b0, b1;
        wmma::load_matrix_sync(a0, ds + 16 * ti * l.ldd + cc, l.ldd);
        wmma::load_matrix_sync(a1, ds + dps + 16 * ti * l.ldd + cc, l.ldd);
        wmma::load_matrix_sync(b0, y + cc * l.ldo + 16 * tk, l.ldo);
        wmma::mma_sync(f, a1, b0, f);
        if (l.pieces > 1) {
          wmma::load_matrix_sync(b1, y + ps + cc * l.ldo + 16 * tk, l.ldo);
          wmma::mma_sync(f, a0, b1, f);
        }
        wmma::mma_sync(f, a0, b0, f);
      }
      wmma::store_matrix_sync(at, f, l.lda, wmma::mem_row_major);
    }
  } else {
    const float* ds = reinterpret_cast<const float*>(smem + l.ds);
    const float* y = reinterpret_cast<const float*>(smem + l.y);
    double* acc = reinterpret_cast<double*>(smem + l.acc);
    for (int it = threadIdx.x; it < l.bt * p.d; it += kThreads) {
      const int r = it / p.d, k = it - r * p.d;
      double a = 0.0;
      for (int c = 0; c < l.bt; ++c) a += static_cast<double>(ds[r * l.lds + c]) * static_cast<double>(y[c * l.ldo + k]);
      acc[r * l.lda + k] += a;
    }
  }
}

// s_ij of row `row` (b H + h) from the tile's dot product, rounded as the reference rounds it (scale times
// the dot product, then + start, then + end, each in float) and never contracted into an FMA, so that
// every call site (logits, decode's two passes) gives the same bits.
template <typename T>
__device__ __forceinline__ float span_score(const Params<T>& p, float dot, int64_t row, int64_t i, int64_t j) {
  float s = __fmul_rn(p.scale, dot);
  if (p.sb != nullptr) s = __fadd_rn(s, p.sb[row * p.L + i]);
  if (p.eb != nullptr) s = __fadd_rn(s, p.eb[row * p.L + j]);
  return s;
}

// ---- kernels ----

// The RoPE table: (cos, sin) of float32(i) * inv_freq[k] for i < L, k < d / 2 (n = L d / 2 entries), so
// that the tiles' loads, one per tile and block, read what one sincosf per entry gave.
__global__ void __launch_bounds__(kThreads) gp_rope_table_kernel(const float* inv_freq, int64_t n, int half,
                                                                 float* tab) {
  for (int64_t it = int64_t{blockIdx.x} * kThreads + threadIdx.x; it < n; it += int64_t{gridDim.x} * kThreads) {
    const int64_t i = it / half;
    float sn, cs;
    sincosf(static_cast<float>(i) * inv_freq[it - i * half], &sn, &cs);
    tab[2 * it] = cs;
    tab[2 * it + 1] = sn;
  }
}

// The element mapping of a tile: tpr = kThreads / bt threads per row, thread (r, cb) owns the
// columns cb, cb + tpr, ... of row r (its tpr threads are adjacent lanes of one warp).

// Forward: per (b, q head, type group, i-block), the (m, l) pairs of the block's rows into p.ws.
template <typename T>
__global__ void __launch_bounds__(kThreads) gp_forward_kernel(const Params<T> p) {
  extern __shared__ __align__(128) unsigned char gp_smem[];
  const Lay& l = p.lay;
  const int bt = l.bt, G = l.G, tid = threadIdx.x, tpr = kThreads / bt;
  const int r = tid / tpr, cb = tid - r * tpr, lane = tid & 31, warp = tid >> 5;
  unsigned char* xb = gp_smem + l.x;
  unsigned char* yb = gp_smem + l.y;
  float* S = reinterpret_cast<float*>(gp_smem + l.s);
  float* Ms = reinterpret_cast<float*>(gp_smem + l.m);     // [2][G][kThreads]
  double* Ls = reinterpret_cast<double*>(gp_smem + l.l);  // [2][G][kThreads]
  unsigned char* rf = gp_smem + l.rf;
  unsigned char* cf = gp_smem + l.cf;
  const int64_t items = p.B * p.Hq * p.ngroups * p.nblk;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t ib = w % p.nblk;
    int64_t rest = w / p.nblk;
    const int grp = static_cast<int>(rest % p.ngroups);
    rest /= p.ngroups;
    const int hq = static_cast<int>(rest % p.Hq);
    const int64_t b = rest / p.Hq;
    const int h0 = p.Hq == 1 ? grp * G : hq;
    const int nty = p.Hq == 1 ? min(G, p.H - h0) : 1;
    const int64_t i0 = ib * bt, i = i0 + r;
    load_operand(p, xb, rf, p.q + b * p.q_sb + hq * p.q_sh + i0 * p.q_sl, p.q_sl, b, i0);
    for (int s = 0; s < 2 * G; ++s) {
      Ms[s * kThreads + tid] = -INFINITY;
      Ls[s * kThreads + tid] = 0.0;
    }
    if (__syncthreads_or(tid < bt && rf[tid])) {
      for (int64_t jb = p.tril ? ib : 0; jb < p.nblk; ++jb) {
        const int64_t j0 = jb * bt;
        load_operand(p, yb, cf, p.k + b * p.k_sb + hq * p.k_sh + j0 * p.k_sl, p.k_sl, b, j0);
        if (!__syncthreads_or(tid < bt && cf[tid])) continue;
        scores(p, xb, yb, S);
        __syncthreads();
        if (rf[r]) {
          for (int g = 0; g < nty; ++g) {
            const int64_t row = b * p.H + h0 + g;
            float mn = -INFINITY, mp = -INFINITY, ln = 0.0f, lp = 0.0f;  // this tile's
            const float si = p.sb != nullptr ? p.sb[row * p.L + i] : 0.0f;
            const float* eb = p.eb != nullptr ? p.eb + row * p.L + j0 : nullptr;
            int64_t lo, hi;
            segment(p, row, lo, hi);
            for (int c = cb; c < bt; c += tpr) {
              const int64_t j = j0 + c;
              if (!cf[c] || (p.tril && j < i)) continue;
              float s = p.scale * S[r * l.lds + c] + si;
              if (eb != nullptr) s += eb[c];
              const float t = label(p, row, lo, hi, i, j);
              if (t < 1.0f) online(mn, ln, s, 1.0f - t);
              if (t > 0.0f) online(mp, lp, -s, t);
            }
            fold(Ms[g * kThreads + tid], Ls[g * kThreads + tid], mn, ln);
            fold(Ms[(G + g) * kThreads + tid], Ls[(G + g) * kThreads + tid], mp, lp);
          }
        }
        __syncthreads();
      }
    }
    __syncthreads();
    // per (type, class), a warp merges the block's pairs
    for (int gc = warp; gc < 2 * nty; gc += kWarps) {
      const int g = gc >> 1, cls = gc & 1, slot = (cls * G + g) * kThreads;
      double m = -INFINITY, s = 0.0;
      for (int t = lane; t < kThreads; t += 32) merge(m, s, Ms[slot + t], Ls[slot + t]);
      for (int o = 16; o > 0; o >>= 1) {
        const double m2 = __shfl_xor_sync(kx::kFullMask, m, o);
        const double s2 = __shfl_xor_sync(kx::kFullMask, s, o);
        merge(m, s, m2, s2);
      }
      if (lane == 0) {
        double* out = p.ws + ((b * p.H + h0 + g) * p.nblk + ib) * 4 + 2 * cls;
        out[0] = m;
        out[1] = s;
      }
    }
    __syncthreads();
  }
}

// Forward, per row: the i-blocks' pairs and the threshold class (score 0: m = 0, l = 1).
__global__ void __launch_bounds__(kThreads) gp_combine_kernel(const double* ws, int64_t rows, int64_t nblk,
                                                              float* loss, float* lse_neg, float* lse_pos) {
  for (int64_t row = int64_t{blockIdx.x} * kThreads + threadIdx.x; row < rows;
       row += int64_t{gridDim.x} * kThreads) {
    double mn = 0.0, ln = 1.0, mp = 0.0, lp = 1.0;
    for (int64_t ib = 0; ib < nblk; ++ib) {
      const double* o = ws + (row * nblk + ib) * 4;
      merge(mn, ln, o[0], o[1]);
      merge(mp, lp, o[2], o[3]);
    }
    const double a = mn + log(ln), c = mp + log(lp);
    lse_neg[row] = static_cast<float>(a);
    lse_pos[row] = static_cast<float>(c);
    loss[row] = static_cast<float>(a + c);
  }
}

// The span scores, one kernel for three passes (p.mode), so that decoding's hits are those of the logits
// that the same machine code computes: a block per (b, q head, type group, i-block) walks the j-blocks as
// the loss's forward does, a score tile serving up to G types when Hq = 1.
//   kLogits: every (i, j) of the block's rows into p.logits, -inf where the span is invalid (whole tiles
//            below the diagonal or without a valid row or column included);
//   kCount:  the hits (valid, s > threshold) of each own row (b, h, i) into p.counts;
//   kWrite:  the hits, [b, h, i, j] and s, at p.incl - p.counts (the row's first output index) onwards,
//            in row-major order: a warp per tile row takes its columns 32 at a time, a ballot gives each
//            lane its hit's rank, and cnt carries the row's next index from tile to tile.
template <typename T>
__global__ void __launch_bounds__(kThreads) gp_scores_kernel(const Params<T> p) {
  extern __shared__ __align__(128) unsigned char gp_smem[];
  const Lay& l = p.lay;
  const int bt = l.bt, G = l.G, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  unsigned char* xb = gp_smem + l.x;
  unsigned char* yb = gp_smem + l.y;
  float* S = reinterpret_cast<float*>(gp_smem + l.s);
  int64_t* cnt = reinterpret_cast<int64_t*>(gp_smem + l.cnt);  // [G][bt]
  unsigned char* rf = gp_smem + l.rf;
  unsigned char* cf = gp_smem + l.cf;
  const int64_t items = p.B * p.Hq * p.ngroups * p.nblk;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t ib = w % p.nblk;
    int64_t rest = w / p.nblk;
    const int grp = static_cast<int>(rest % p.ngroups);
    rest /= p.ngroups;
    const int hq = static_cast<int>(rest % p.Hq);
    const int64_t b = rest / p.Hq;
    const int h0 = p.Hq == 1 ? grp * G : hq;
    const int nty = p.Hq == 1 ? min(G, p.H - h0) : 1;
    const int64_t i0 = ib * bt;
    load_operand(p, xb, rf, p.q + b * p.q_sb + hq * p.q_sh + i0 * p.q_sl, p.q_sl, b, i0);
    if (p.mode != kLogits) {
      for (int it = tid; it < G * bt; it += kThreads) {
        const int g = it / bt;
        const int64_t i = i0 + (it - g * bt), at = ((b * p.H + h0 + g) * p.L + i);
        cnt[it] = p.mode == kWrite && g < nty && i < p.L ? p.incl[at] - p.counts[at] : 0;
      }
    }
    const bool any_row = __syncthreads_or(tid < bt && rf[tid]);
    for (int64_t jb = 0; jb < p.nblk; ++jb) {
      const int64_t j0 = jb * bt;
      bool live = any_row && !(p.tril && jb < ib);  // block-uniform
      if (live) {
        load_operand(p, yb, cf, p.k + b * p.k_sb + hq * p.k_sh + j0 * p.k_sl, p.k_sl, b, j0);
        live = __syncthreads_or(tid < bt && cf[tid]);
      }
      if (live) {
        scores(p, xb, yb, S);
        __syncthreads();
      }
      if (p.mode == kLogits) {  // consecutive threads, consecutive j
        for (int g = 0; g < nty; ++g) {
          const int64_t row = b * p.H + h0 + g;
          for (int it = tid; it < bt * bt; it += kThreads) {
            const int r = it / bt, c = it - r * bt;
            const int64_t i = i0 + r, j = j0 + c;
            if (i >= p.L || j >= p.L) continue;
            float v = -INFINITY;
            if (live && rf[r] && cf[c] && !(p.tril && j < i)) v = span_score(p, S[r * l.lds + c], row, i, j);
            p.logits[(row * p.L + i) * p.L + j] = v;
          }
        }
      } else if (live) {
        for (int r = warp; r < bt; r += kWarps) {
          const int64_t i = i0 + r;
          if (!rf[r]) continue;  // warp-uniform
          for (int g = 0; g < nty; ++g) {
            const int64_t row = b * p.H + h0 + g;
            const int64_t base = cnt[g * bt + r];
            int n = 0;
            for (int c0 = 0; c0 < bt; c0 += 32) {
              const int c = c0 + lane;
              const int64_t j = j0 + c;
              float v = 0.0f;
              bool hit = false;
              if (c < bt && cf[c] && !(p.tril && j < i)) {
                v = span_score(p, S[r * l.lds + c], row, i, j);
                hit = v > p.threshold;
              }
              const unsigned ballot = __ballot_sync(kx::kFullMask, hit);
              if (p.mode == kWrite && hit) {
                const int64_t at = base + n + __popc(ballot & ((1u << lane) - 1u));
                int64_t* sp = p.spans + 4 * at;
                sp[0] = b;
                sp[1] = h0 + g;
                sp[2] = i;
                sp[3] = j;
                p.hit_scores[at] = v;
              }
              n += __popc(ballot);
            }
            __syncwarp();
            if (lane == 0) cnt[g * bt + r] = base + n;
          }
        }
      }
      __syncthreads();  // before the next tile's loads
    }
    if (p.mode == kCount) {
      for (int it = tid; it < nty * bt; it += kThreads) {
        const int g = it / bt;
        const int64_t i = i0 + (it - g * bt);
        if (i < p.L) p.counts[(b * p.H + h0 + g) * p.L + i] = cnt[it];
      }
    }
    __syncthreads();
  }
}

// Backward. KS = false: the q side (own rows i, dq, dstart); KS = true: the k side (own rows j, dk,
// dend). A block per (b, head of q / k, own block); with Hq = 1 it sums ds over all H types. LG: the
// logits' backward, ds = dlogits on the valid spans (no scores recomputed: each type's dlogits tile is
// read into S along j, where dlogits is contiguous, the invalid spans' entries never read).
template <typename T, bool KS, bool LG = false>
__global__ void __launch_bounds__(kThreads) gp_backward_kernel(const Params<T> p) {
  extern __shared__ __align__(128) unsigned char gp_smem[];
  constexpr bool tc = Tr<T>::kTc;
  using Acc = std::conditional_t<tc, float, double>;
  const Lay& l = p.lay;
  const int bt = l.bt, tid = threadIdx.x, tpr = kThreads / bt;
  const int r = tid / tpr, cb = tid - r * tpr;
  unsigned char* xb = gp_smem + l.x;
  unsigned char* yb = gp_smem + l.y;
  float* S = reinterpret_cast<float*>(gp_smem + l.s);
  float* DS = reinterpret_cast<float*>(gp_smem + l.ds);
  Acc* acc = reinterpret_cast<Acc*>(gp_smem + l.acc);
  unsigned char* rf = gp_smem + l.rf;
  unsigned char* cf = gp_smem + l.cf;
  const T* own = KS ? p.k : p.q;
  const T* oth = KS ? p.q : p.k;
  const int64_t own_sb = KS ? p.k_sb : p.q_sb, own_sl = KS ? p.k_sl : p.q_sl, own_sh = KS ? p.k_sh : p.q_sh;
  const int64_t oth_sb = KS ? p.q_sb : p.k_sb, oth_sl = KS ? p.q_sl : p.k_sl, oth_sh = KS ? p.q_sh : p.k_sh;
  const int np = p.dp / 2;
  const int64_t items = p.B * p.Hq * p.nblk;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t ob = w % p.nblk;
    const int hq = static_cast<int>(w / p.nblk % p.Hq);
    const int64_t b = w / p.nblk / p.Hq;
    const int h0 = p.Hq == 1 ? 0 : hq, nty = p.Hq == 1 ? p.H : 1;
    const int64_t o0 = ob * bt, gr = o0 + r;  // the own rows' first, this thread's
    load_operand(p, xb, rf, own + b * own_sb + hq * own_sh + o0 * own_sl, own_sl, b, o0);
    for (int it = tid; it < bt * l.lda; it += kThreads) acc[it] = Acc(0);
    if (p.dbias != nullptr && cb == 0 && gr < p.L) {
      for (int g = 0; g < nty; ++g) p.dbias[(b * p.H + h0 + g) * p.L + gr] = 0.0f;
    }
    if (__syncthreads_or(tid < bt && rf[tid]) && nty > 0) {  // nty = 0: Hq = 1 with H = 0, no terms
      // the other side's blocks that hold valid spans: j >= i with tril
      const int64_t t_begin = (p.tril && !KS) ? ob : 0, t_end = (p.tril && KS) ? ob + 1 : p.nblk;
      for (int64_t tb = t_begin; tb < t_end; ++tb) {
        const int64_t t0 = tb * bt;
        load_operand(p, yb, cf, oth + b * oth_sb + hq * oth_sh + t0 * oth_sl, oth_sl, b, t0);
        if (!__syncthreads_or(tid < bt && cf[tid])) continue;
        if constexpr (!LG) {
          scores(p, xb, yb, S);
          __syncthreads();
        }
        for (int g = 0; g < nty; ++g) {
          const int h = h0 + g;
          const int64_t row = b * p.H + h;
          float dl = 0.0f, lneg = 0.0f, lpos = 0.0f;
          if constexpr (LG) {
            if (g > 0) __syncthreads();  // the previous type's ds read
            for (int it = tid; it < bt * bt; it += kThreads) {
              const int a = it / bt, e = it - a * bt;          // e: along j
              const int ro = KS ? e : a, co = KS ? a : e;        // own row, other column
              const int64_t i = KS ? t0 + co : o0 + ro, j = KS ? o0 + ro : t0 + co;
              float v = 0.0f;
              if (rf[ro] && cf[co] && !(p.tril && j < i)) v = p.dlogits[(row * p.L + i) * p.L + j];
              S[ro * l.lds + co] = v;
            }
            __syncthreads();
          } else {
            dl = p.dloss[b * p.dl_sb + h * p.dl_sh];
            lneg = p.lse_neg[b * p.ln_sb + h * p.ln_sh];
            lpos = p.lse_pos[b * p.lp_sb + h * p.lp_sh];
          }
          int64_t lo, hi;
          segment(p, row, lo, hi);
          float rsum = 0.0f;
          for (int c = cb; c < bt; c += tpr) {
            const int64_t gc = t0 + c, i = KS ? gc : gr, j = KS ? gr : gc;
            float ds = 0.0f;
            if constexpr (LG) {
              ds = S[r * l.lds + c];  // 0 on invalid spans
            } else if (rf[r] && cf[c] && !(p.tril && j < i)) {
              float s = p.scale * S[r * l.lds + c] + (p.sb != nullptr ? p.sb[row * p.L + i] : 0.0f);
              if (p.eb != nullptr) s += p.eb[row * p.L + j];
              const float t = label(p, row, lo, hi, i, j);
              float v = 0.0f;
              if (t < 1.0f) v = (1.0f - t) * expf(s - lneg);
              if (t > 0.0f) v -= t * expf(-s - lpos);
              ds = dl * v;
            }
            float* e = DS + r * l.lds + c;
            *e = g == 0 ? ds : *e + ds;
            rsum += ds;
          }
          for (int o = 1; o < tpr; o <<= 1) rsum += __shfl_xor_sync(kx::kFullMask, rsum, o);
          if (p.dbias != nullptr && cb == 0 && gr < p.L) p.dbias[row * p.L + gr] += rsum;
        }
        if constexpr (tc) {  // ds as two bf16 pieces
          MT* dsp = reinterpret_cast<MT*>(gp_smem + l.dsp);
          const int dps = bt * l.ldd;
          for (int c = cb; c < bt; c += tpr) {
            const float v = DS[r * l.lds + c];
            const MT h = __float2bfloat16_rn(v);
            dsp[r * l.ldd + c] = h;
            dsp[dps + r * l.ldd + c] = __float2bfloat16_rn(v - __bfloat162float(h));
          }
        }
        __syncthreads();
        grad_product(p, gp_smem);
        __syncthreads();
      }
    }
    // dx = R^T (scale acc) for the own rows
    for (int it = tid; it < bt * np; it += kThreads) {
      const int rr = it / np, c = 2 * (it - rr * np);
      const int64_t gi = o0 + rr;
      if (gi >= p.L || c >= p.d) continue;
      float g0 = static_cast<float>(acc[rr * l.lda + c] * static_cast<Acc>(p.scale));
      float g1 = c + 1 < p.d ? static_cast<float>(acc[rr * l.lda + c + 1] * static_cast<Acc>(p.scale)) : 0.0f;
      if (p.rope != nullptr) {
        const float* t = p.rope + 2 * (gi * (p.d >> 1) + (c >> 1));
        const float cs = t[0], sn = t[1];
        const float a = g0 * cs + g1 * sn;
        g1 = g1 * cs - g0 * sn;
        g0 = a;
      }
      T* out = p.dx + ((b * p.L + gi) * p.Hq + hq) * p.d;
      out[c] = from_f<T>(g0);
      if (c + 1 < p.d) out[c + 1] = from_f<T>(g1);
    }
    __syncthreads();
  }
}

// ---- the row losses on materialised logits ----
//
// x (R, C): a group of TPR threads per row (a warp, 4 rows a block, for short rows; a block of 256 for long
// ones), each thread striding over the row (coalesced) with its own online log-sum-exps (float running
// max, double sum: the terms' exponentials in float, a rescale's in double), merged in double by shuffles
// (and shared memory across the block's warps), then with the threshold class (m = 0, l = 1). Labels:
// dense targets (float32), or the row's positives, a set: P <= kLinearP ones are scanned, more are sorted
// on the host (ATen) and binary-searched; a row's positives are first copied into shared memory when
// P <= kSetP. The backward's ds has the same form, per element.

constexpr int kLinearP = 32;    // positives scanned linearly up to this many per row
constexpr int kSetP = 256;      // positives kept in shared memory up to this many per row
constexpr int kRowGroups = 4;   // most rows a block serves (short rows: a warp each)
constexpr int kRowWarps = 8;    // most warps a row's group spans (long rows: a block of 256)

template <typename T>
struct RowParams {
  const T* x = nullptr;            // (R, C) contiguous
  const float* tgt = nullptr;      // (R, C) contiguous, or null
  const int64_t* pos = nullptr;    // (R, P) contiguous (sorted within rows when P > kLinearP), or null
  int64_t R = 0, C = 0, P = 0;
  bool mask_zero = false;          // positives only: class 0 is no class
  float* loss = nullptr;           // forward: (R) each
  float* lse_neg = nullptr;
  float* lse_pos = nullptr;
  const float* dloss = nullptr;    // backward: (R) each, strided
  const float* lneg = nullptr;
  const float* lpos = nullptr;
  int64_t dl_s = 0, ln_s = 0, lp_s = 0;
  T* dx = nullptr;                 // (R, C)
};

__device__ __forceinline__ bool is_finite_f(float v) { return fabsf(v) <= 3.402823466e38f; }  // false for NaN too

// (m, l) += w e^x with x finite, w > 0; m = -inf: no terms.
__device__ __forceinline__ void online_row(float& m, double& l, float x, float w) {
  if (x > m) {
    l = l * exp(static_cast<double>(m) - static_cast<double>(x)) + static_cast<double>(w);
    m = x;
  } else {
    l += static_cast<double>(w * expf(x - m));
  }
}

// Whether class c is among the row's positives set[0, P) (sorted: binary search; else a scan).
__device__ __forceinline__ bool member(const int64_t* set, int64_t P, bool sorted, int64_t c) {
  if (!sorted) {
    for (int64_t k = 0; k < P; ++k)
      if (set[k] == c) return true;
    return false;
  }
  int64_t lo = 0, hi = P;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    const int64_t v = set[mid];
    if (v == c) return true;
    if (v < c) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

template <int TPR>
__device__ __forceinline__ void group_sync() {
  if constexpr (TPR == 32) __syncwarp();
  else __syncthreads();
}

// The row's positives: in shared memory (copied by the group) when P <= kSetP, else in place.
template <typename T, int TPR>
__device__ __forceinline__ const int64_t* row_set(const RowParams<T>& p, int64_t row, int64_t* smem_set, int t) {
  if (p.pos == nullptr) return nullptr;
  const int64_t* src = p.pos + row * p.P;
  if (p.P > kSetP) return src;
  for (int64_t k = t; k < p.P; k += TPR) smem_set[k] = src[k];
  group_sync<TPR>();
  return smem_set;
}

// t of class c (x[c] finite, and c != 0 under mask_zero).
template <typename T>
__device__ __forceinline__ float row_label(const RowParams<T>& p, int64_t row, const int64_t* set, int64_t c) {
  if (p.tgt != nullptr) return p.tgt[row * p.C + c];
  return set != nullptr && member(set, p.P, p.P > kLinearP, c) ? 1.0f : 0.0f;
}

template <typename T, int TPR, int NT>
__global__ void __launch_bounds__(NT) mlce_forward_kernel(const RowParams<T> p) {
  __shared__ __align__(16) int64_t mlce_set[kRowGroups * kSetP];
  __shared__ __align__(16) double mlce_red[4 * kRowWarps];  // per warp: m_neg, l_neg, m_pos, l_pos
  constexpr int RPB = NT / TPR, W = TPR / 32;
  const int grp = threadIdx.x / TPR, t = threadIdx.x - grp * TPR, lane = threadIdx.x & 31, wg = t >> 5;
  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const int64_t* set = row_set<T, TPR>(p, row, mlce_set + grp * kSetP, t);
    const T* xr = p.x + row * p.C;
    float mn = -INFINITY, mp = -INFINITY;
    double ln = 0.0, lp = 0.0;
    for (int64_t c = t; c < p.C; c += TPR) {
      const float v = to_f(xr[c]);
      if (!is_finite_f(v) || (p.mask_zero && c == 0)) continue;
      const float tv = row_label(p, row, set, c);
      if (tv < 1.0f) online_row(mn, ln, v, 1.0f - tv);
      if (tv > 0.0f) online_row(mp, lp, -v, tv);
    }
    double an = mn, bn = ln, ap = mp, bp = lp;
    for (int o = 16; o > 0; o >>= 1) {
      const double a2 = __shfl_xor_sync(kx::kFullMask, an, o), b2 = __shfl_xor_sync(kx::kFullMask, bn, o);
      const double c2 = __shfl_xor_sync(kx::kFullMask, ap, o), d2 = __shfl_xor_sync(kx::kFullMask, bp, o);
      merge(an, bn, a2, b2);
      merge(ap, bp, c2, d2);
    }
    if constexpr (W > 1) {
      if (lane == 0) {
        mlce_red[4 * wg] = an, mlce_red[4 * wg + 1] = bn, mlce_red[4 * wg + 2] = ap, mlce_red[4 * wg + 3] = bp;
      }
      __syncthreads();
      if (t == 0) {
        for (int k = 1; k < W; ++k) {
          merge(an, bn, mlce_red[4 * k], mlce_red[4 * k + 1]);
          merge(ap, bp, mlce_red[4 * k + 2], mlce_red[4 * k + 3]);
        }
      }
    }
    if (t == 0) {
      merge(an, bn, 0.0, 1.0);  // the threshold class
      merge(ap, bp, 0.0, 1.0);
      const double a = an + log(bn), z = ap + log(bp);
      p.lse_neg[row] = static_cast<float>(a);
      p.lse_pos[row] = static_cast<float>(z);
      p.loss[row] = static_cast<float>(a + z);
    }
    group_sync<TPR>();  // the set and mlce_red, before the next row's
  }
}

template <typename T, int TPR, int NT>
__global__ void __launch_bounds__(NT) mlce_backward_kernel(const RowParams<T> p) {
  __shared__ __align__(16) int64_t mlce_set[kRowGroups * kSetP];
  constexpr int RPB = NT / TPR;
  const int grp = threadIdx.x / TPR, t = threadIdx.x - grp * TPR;
  for (int64_t row = int64_t{blockIdx.x} * RPB + grp; row < p.R; row += int64_t{gridDim.x} * RPB) {
    const int64_t* set = row_set<T, TPR>(p, row, mlce_set + grp * kSetP, t);
    const float dl = p.dloss[row * p.dl_s], a = p.lneg[row * p.ln_s], z = p.lpos[row * p.lp_s];
    const T* xr = p.x + row * p.C;
    T* dxr = p.dx + row * p.C;
    for (int64_t c = t; c < p.C; c += TPR) {
      const float v = to_f(xr[c]);
      float g = 0.0f;
      if (is_finite_f(v) && !(p.mask_zero && c == 0)) {
        const float tv = row_label(p, row, set, c);
        float u = 0.0f;
        if (tv < 1.0f) u = (1.0f - tv) * expf(v - a);
        if (tv > 0.0f) u -= tv * expf(-v - z);
        g = dl * u;
      }
      dxr[c] = from_f<T>(g);
    }
    group_sync<TPR>();  // the set, before the next row's
  }
}

// ---- host ----

struct Checked {
  int64_t B, L, Hq, d, H;
};

void check_vector(const char* op, const std::optional<at::Tensor>& t, const char* name, at::ScalarType dt,
                  at::IntArrayRef shape, const at::Tensor& q, const char* what) {
  if (!t) return;
  TORCH_CHECK(t->is_cuda() && t->device() == q.device() && t->scalar_type() == dt && t->sizes() == shape &&
                  t->is_contiguous(),
              op, ": ", name, " must be a contiguous ", what, " tensor of shape ", shape, " on q's device, got ",
              t->scalar_type(), " ", t->sizes(), t->is_contiguous() ? "" : " (not contiguous)",
              t->is_cuda() ? "" : " on CPU");
}

// The span scores' arguments (every op of the family but the row losses).
Checked check_score_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& start_bias,
                         const std::optional<at::Tensor>& end_bias, const std::optional<at::Tensor>& inv_freq,
                         int64_t H) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt != at::kDouble, op, ": float64 is supported on CPU only");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.is_cuda() && k.device() == q.device(), op, ": k must be a CUDA tensor on q's device");
  TORCH_CHECK(k.scalar_type() == dt, op, ": k must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (batch, seq, heads, dim), got ", q.dim(), "-D");
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  Checked c{q.size(0), q.size(1), q.size(2), q.size(3), H};
  TORCH_CHECK(H >= 0 && (c.Hq == H || c.Hq == 1), op, ": q and k must have H = ", H, " heads or 1, got ", c.Hq);
  TORCH_CHECK(c.d >= 1 && c.d <= kMaxDim, op, ": head dim must be in [1, ", kMaxDim, "], got ", c.d);
  TORCH_CHECK((q.stride(3) == 1 || c.d == 1) && (k.stride(3) == 1 || c.d == 1), op,
              ": q and k must have unit stride in the last dimension");
  check_vector(op, mask, "mask", at::kBool, {c.B, c.L}, q, "bool");
  check_vector(op, start_bias, "start_bias", at::kFloat, {c.B, H, c.L}, q, "float32");
  check_vector(op, end_bias, "end_bias", at::kFloat, {c.B, H, c.L}, q, "float32");
  if (inv_freq) {
    TORCH_CHECK(c.d % 2 == 0, op, ": RoPE needs an even head dim, got d=", c.d);
    check_vector(op, inv_freq, "inv_freq", at::kFloat, {c.d / 2}, q, "float32");
  }
  return c;
}

// The loss's arguments: the scores' and the labels.
Checked check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                   const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias,
                   const std::optional<at::Tensor>& inv_freq, int64_t H,
                   const std::optional<at::Tensor>& pos_offsets, const std::optional<at::Tensor>& pos_index,
                   const std::optional<at::Tensor>& targets) {
  const Checked c = check_score_args(op, q, k, mask, start_bias, end_bias, inv_freq, H);
  const bool sparse = pos_offsets.has_value() || pos_index.has_value();
  TORCH_CHECK(sparse != targets.has_value(), op,
              ": the labels are either sparse (pos_offsets and pos_index) or dense (targets), exactly one of them");
  if (sparse) {
    TORCH_CHECK(pos_offsets && pos_index, op, ": pos_offsets and pos_index must be given together");
    check_vector(op, pos_offsets, "pos_offsets", at::kInt, {c.B * H + 1}, q, "int32");
    TORCH_CHECK(pos_index->dim() == 1, op, ": pos_index must be 1-D, got ", pos_index->sizes());
    check_vector(op, pos_index, "pos_index", at::kInt, {pos_index->size(0)}, q, "int32");
  } else {
    const auto tt = targets->scalar_type();
    TORCH_CHECK(tt == at::kFloat || tt == at::kDouble || tt == at::kHalf || tt == at::kBFloat16, op,
                ": targets must be a floating tensor, got ", tt);
    check_vector(op, targets, "targets", tt, {c.B, H, c.L, c.L}, q, "floating");
  }
  return c;
}

// A (B, H) float32 tensor the backward reads (any strides).
void check_rows(const char* op, const at::Tensor& t, const char* name, const Checked& c, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.size(0) == c.B && t.size(1) == c.H,
              op, ": ", name, " must be a float32 (", c.B, ", ", c.H, ") tensor on q's device, got ", t.scalar_type(),
              " ", t.sizes());
}

template <typename T>
Params<T> make_params(const Checked& c, const at::Tensor& q, const at::Tensor& k,
                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& start_bias,
                      const std::optional<at::Tensor>& end_bias, const std::optional<at::Tensor>& inv_freq,
                      double scale, bool tril, const std::optional<at::Tensor>& pos_offsets,
                      const std::optional<at::Tensor>& pos_index, const std::optional<at::Tensor>& targets) {
  Params<T> p;
  p.q = reinterpret_cast<const T*>(q.const_data_ptr());
  p.k = reinterpret_cast<const T*>(k.const_data_ptr());
  p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
  if (mask) p.mask = mask->const_data_ptr<bool>();
  if (start_bias) p.sb = start_bias->const_data_ptr<float>();
  if (end_bias) p.eb = end_bias->const_data_ptr<float>();
  if (inv_freq) p.inv_freq = inv_freq->const_data_ptr<float>();
  if (pos_offsets) {
    p.off = pos_offsets->const_data_ptr<int32_t>();
    p.idx = pos_index->const_data_ptr<int32_t>();
    p.nidx = pos_index->size(0);
  } else if (targets) {
    p.tgt = targets->const_data_ptr();
    const auto tt = targets->scalar_type();
    p.tgt_type = tt == at::kFloat ? 0 : tt == at::kDouble ? 1 : tt == at::kHalf ? 2 : 3;
  }
  p.B = c.B;
  p.L = c.L;
  p.H = static_cast<int>(c.H);
  p.Hq = static_cast<int>(c.Hq);
  p.d = static_cast<int>(c.d);
  p.dp = (p.d + 15) / 16 * 16;
  p.scale = static_cast<float>(scale);
  p.tril = tril;
  return p;
}

// The tile size: the largest of 64, 32, 16 that the sequence needs and the device's shared memory holds.
template <typename T>
void choose_layout(const char* op, Params<T>& p, Kind kind, int G, int device) {
  const int64_t limit = kx::max_smem_optin(device);
  const int pieces = p.inv_freq != nullptr ? 3 : Tr<T>::kPieces;
  int bt = 64;
  while (bt > 16 && bt / 2 >= p.L) bt /= 2;
  for (; bt >= 16; bt /= 2) {
    const Lay l = make_layout<T>(kind, bt, p.dp, pieces, G);
    if (l.bytes <= limit) {
      p.lay = l;
      p.nblk = (p.L + bt - 1) / bt;
      return;
    }
  }
  TORCH_CHECK(false, op, ": head dim ", p.d, " needs more shared memory than the device's ", limit, " bytes per block");
}

template <typename K, typename P>
void launch(K kernel, const P& p, int64_t items) {
  if (items <= 0) return;
  if (p.lay.bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(p.lay.bytes)));
  }
  const auto grid = static_cast<unsigned>(std::min<int64_t>(items, kx::max_grid_x()));
  kernel<<<grid, kThreads, p.lay.bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// With RoPE: the (L, d / 2, 2) table of p.rope, filled (the tensor must live until the kernels ran:
// the caller keeps it).
template <typename T>
at::Tensor rope_table(Params<T>& p, const at::Tensor& q) {
  if (p.inv_freq == nullptr) return at::Tensor();
  const int half = p.d / 2;
  const int64_t n = p.L * half;
  at::Tensor tab = at::empty({2 * n}, q.options().dtype(at::kFloat));
  p.rope = tab.data_ptr<float>();
  if (n > 0) {
    const auto grid = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kx::max_grid_x()));
    gp_rope_table_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p.inv_freq, n, half,
                                                                                   tab.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return tab;
}

template <typename Fn>
void dispatch(const at::Tensor& q, Fn fn) {
  switch (q.scalar_type()) {
    case at::kHalf: fn(__half()); break;
    case at::kBFloat16: fn(__nv_bfloat16()); break;
    default: fn(float()); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_cuda(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias,
    const std::optional<at::Tensor>& inv_freq, int64_t H, double scale, bool tril,
    const std::optional<at::Tensor>& pos_offsets, const std::optional<at::Tensor>& pos_index,
    const std::optional<at::Tensor>& targets) {
  const char* op = "global_pointer_loss";
  const Checked c = check_args(op, q, k, mask, start_bias, end_bias, inv_freq, H, pos_offsets, pos_index, targets);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto loss = at::empty({c.B, c.H}, f32);
  auto lse_neg = at::empty({c.B, c.H}, f32);
  auto lse_pos = at::empty({c.B, c.H}, f32);
  if (c.B * c.H == 0) return {loss, lse_neg, lse_pos};
  dispatch(q, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, mask, start_bias, end_bias, inv_freq, scale, tril, pos_offsets, pos_index,
                                 targets);
    const int G = c.Hq == 1 ? static_cast<int>(std::min<int64_t>(c.H, kTypeGroup)) : 1;
    choose_layout(op, p, Kind::kLossForward, G, q.get_device());
    p.ngroups = c.Hq == 1 ? static_cast<int>((c.H + G - 1) / G) : 1;
    const at::Tensor tab = rope_table(p, q);
    const at::Tensor ws = at::empty({c.B * c.H * p.nblk * 4}, q.options().dtype(at::kDouble));
    p.ws = ws.data_ptr<double>();
    launch(gp_forward_kernel<T>, p, c.B * c.Hq * p.ngroups * p.nblk);
    const int64_t rows = c.B * c.H;
    const auto grid = static_cast<unsigned>(std::min<int64_t>((rows + kThreads - 1) / kThreads, kx::max_grid_x()));
    gp_combine_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        p.ws, rows, p.nblk, loss.data_ptr<float>(), lse_neg.data_ptr<float>(), lse_pos.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse_neg, lse_pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cuda(
    const at::Tensor& dloss, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias,
    const std::optional<at::Tensor>& inv_freq, int64_t H, double scale, bool tril,
    const std::optional<at::Tensor>& pos_offsets, const std::optional<at::Tensor>& pos_index,
    const std::optional<at::Tensor>& targets, const at::Tensor& lse_neg, const at::Tensor& lse_pos) {
  const char* op = "global_pointer_loss_backward";
  const Checked c = check_args(op, q, k, mask, start_bias, end_bias, inv_freq, H, pos_offsets, pos_index, targets);
  check_rows(op, dloss, "dloss", c, q);
  check_rows(op, lse_neg, "lse_neg", c, q);
  check_rows(op, lse_pos, "lse_pos", c, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty({c.B, c.L, c.Hq, c.d}, q.options());
  auto dk = at::empty({c.B, c.L, c.Hq, c.d}, k.options());
  auto dstart = start_bias ? at::empty({c.B, c.H, c.L}, f32) : at::empty({0}, f32);
  auto dend = end_bias ? at::empty({c.B, c.H, c.L}, f32) : at::empty({0}, f32);
  if (c.B * c.Hq * c.L == 0) return {dq, dk, dstart, dend};
  dispatch(q, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, mask, start_bias, end_bias, inv_freq, scale, tril, pos_offsets, pos_index,
                                 targets);
    choose_layout(op, p, Kind::kBackward, 1, q.get_device());
    const at::Tensor tab = rope_table(p, q);
    p.dloss = dloss.const_data_ptr<float>();
    p.dl_sb = dloss.stride(0), p.dl_sh = dloss.stride(1);
    p.lse_neg = lse_neg.const_data_ptr<float>();
    p.ln_sb = lse_neg.stride(0), p.ln_sh = lse_neg.stride(1);
    p.lse_pos = lse_pos.const_data_ptr<float>();
    p.lp_sb = lse_pos.stride(0), p.lp_sh = lse_pos.stride(1);
    const int64_t items = c.B * c.Hq * p.nblk;
    Params<T> pq = p;
    pq.dx = reinterpret_cast<T*>(dq.data_ptr());
    pq.dbias = start_bias ? dstart.data_ptr<float>() : nullptr;
    launch(gp_backward_kernel<T, false>, pq, items);
    Params<T> pk = p;
    pk.dx = reinterpret_cast<T*>(dk.data_ptr());
    pk.dbias = end_bias ? dend.data_ptr<float>() : nullptr;
    launch(gp_backward_kernel<T, true>, pk, items);
  });
  return {dq, dk, dstart, dend};
}

// ---- the span logits, their backward, decoding ----

// The scores kernel's layout and type groups (as the loss's forward: with Hq = 1 a block serves up to
// kTypeGroup types from one score tile). Needs H >= 1.
template <typename T>
void prepare_scores(const char* op, Params<T>& p, const Checked& c, int device) {
  const int G = c.Hq == 1 ? static_cast<int>(std::min<int64_t>(c.H, kTypeGroup)) : 1;
  choose_layout(op, p, Kind::kScores, G, device);
  p.ngroups = c.Hq == 1 ? static_cast<int>((c.H + G - 1) / G) : 1;
}

at::Tensor global_pointer_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias,
                               const std::optional<at::Tensor>& inv_freq, int64_t H, double scale, bool tril) {
  const char* op = "global_pointer";
  const Checked c = check_score_args(op, q, k, mask, start_bias, end_bias, inv_freq, H);
  const c10::cuda::CUDAGuard guard(q.device());
  auto logits = at::empty({c.B, c.H, c.L, c.L}, q.options().dtype(at::kFloat));
  if (c.B * c.H * c.L == 0) return logits;
  dispatch(q, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, mask, start_bias, end_bias, inv_freq, scale, tril, std::nullopt,
                                 std::nullopt, std::nullopt);
    prepare_scores(op, p, c, q.get_device());
    const at::Tensor tab = rope_table(p, q);
    p.mode = kLogits;
    p.logits = logits.data_ptr<float>();
    launch(gp_scores_kernel<T>, p, c.B * c.Hq * p.ngroups * p.nblk);
  });
  return logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_backward_cuda(
    const at::Tensor& dlogits, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias,
    const std::optional<at::Tensor>& inv_freq, int64_t H, double scale, bool tril) {
  const char* op = "global_pointer_backward";
  const Checked c = check_score_args(op, q, k, mask, start_bias, end_bias, inv_freq, H);
  TORCH_CHECK(dlogits.is_cuda() && dlogits.device() == q.device() && dlogits.scalar_type() == at::kFloat &&
                  dlogits.sizes() == at::IntArrayRef({c.B, c.H, c.L, c.L}) && dlogits.is_contiguous(),
              op, ": dlogits must be a contiguous float32 (", c.B, ", ", c.H, ", ", c.L, ", ", c.L,
              ") tensor on q's device, got ", dlogits.scalar_type(), " ", dlogits.sizes(),
              dlogits.is_contiguous() ? "" : " (not contiguous)");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty({c.B, c.L, c.Hq, c.d}, q.options());
  auto dk = at::empty({c.B, c.L, c.Hq, c.d}, k.options());
  auto dstart = start_bias ? at::empty({c.B, c.H, c.L}, f32) : at::empty({0}, f32);
  auto dend = end_bias ? at::empty({c.B, c.H, c.L}, f32) : at::empty({0}, f32);
  if (c.B * c.Hq * c.L == 0) return {dq, dk, dstart, dend};
  dispatch(q, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, mask, start_bias, end_bias, inv_freq, scale, tril, std::nullopt,
                                 std::nullopt, std::nullopt);
    choose_layout(op, p, Kind::kBackward, 1, q.get_device());
    const at::Tensor tab = rope_table(p, q);
    p.dlogits = dlogits.const_data_ptr<float>();
    const int64_t items = c.B * c.Hq * p.nblk;
    Params<T> pq = p;
    pq.dx = reinterpret_cast<T*>(dq.data_ptr());
    pq.dbias = start_bias ? dstart.data_ptr<float>() : nullptr;
    launch(gp_backward_kernel<T, false, true>, pq, items);
    Params<T> pk = p;
    pk.dx = reinterpret_cast<T*>(dk.data_ptr());
    pk.dbias = end_bias ? dend.data_ptr<float>() : nullptr;
    launch(gp_backward_kernel<T, true, true>, pk, items);
  });
  return {dq, dk, dstart, dend};
}

// Decoding: a counting pass (hits per row (b, h, i)), their inclusive scan (ATen's cumsum), whose last
// entry, the number of hits N, the host reads (a device synchronisation: N sizes the outputs), then a
// writing pass of the same kernel, each row's hits in column order from its first index on.
std::tuple<at::Tensor, at::Tensor> global_pointer_decode_cuda(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias,
    const std::optional<at::Tensor>& inv_freq, int64_t H, double scale, bool tril, double threshold) {
  const char* op = "global_pointer_decode";
  const Checked c = check_score_args(op, q, k, mask, start_bias, end_bias, inv_freq, H);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto i64 = q.options().dtype(at::kLong);
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t rows = c.B * c.H * c.L;
  if (rows == 0) return {at::empty({0, 4}, i64), at::empty({0}, f32)};
  at::Tensor spans, hit_scores;
  dispatch(q, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, mask, start_bias, end_bias, inv_freq, scale, tril, std::nullopt,
                                 std::nullopt, std::nullopt);
    prepare_scores(op, p, c, q.get_device());
    const at::Tensor tab = rope_table(p, q);
    p.threshold = static_cast<float>(threshold);  // the comparison in float32, as the logits'
    const int64_t items = c.B * c.Hq * p.ngroups * p.nblk;
    const at::Tensor counts = at::empty({rows}, i64);
    p.mode = kCount;
    p.counts = counts.data_ptr<int64_t>();
    launch(gp_scores_kernel<T>, p, items);
    const at::Tensor incl = at::cumsum(counts, 0);
    const int64_t n = incl[rows - 1].item<int64_t>();
    spans = at::empty({n, 4}, i64);
    hit_scores = at::empty({n}, f32);
    if (n > 0) {
      p.mode = kWrite;
      p.incl = incl.const_data_ptr<int64_t>();
      p.spans = spans.data_ptr<int64_t>();
      p.hit_scores = hit_scores.data_ptr<float>();
      launch(gp_scores_kernel<T>, p, items);
    }
  });
  return {spans, hit_scores};
}

// ---- the row losses ----

constexpr int64_t kShortRow = 2048;  // rows of up to this many classes: a warp each, else a block of 256

void check_mlce(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& targets,
                const std::optional<at::Tensor>& positives) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt != at::kDouble, op, ": float64 is supported on CPU only");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (R, C) tensor, got ", x.sizes(),
              x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(targets.has_value() != positives.has_value(), op,
              ": the labels are either dense (targets) or positive indices (positives), exactly one of them");
  if (targets) {
    TORCH_CHECK(targets->is_cuda() && targets->device() == x.device() && targets->scalar_type() == at::kFloat &&
                    targets->sizes() == x.sizes() && targets->is_contiguous(),
                op, ": targets must be a contiguous float32 tensor of x's shape ", x.sizes(), " on x's device, got ",
                targets->scalar_type(), " ", targets->sizes(), targets->is_contiguous() ? "" : " (not contiguous)");
  } else {
    TORCH_CHECK(positives->is_cuda() && positives->device() == x.device() &&
                    positives->scalar_type() == at::kLong && positives->dim() == 2 &&
                    positives->size(0) == x.size(0) && positives->is_contiguous(),
                op, ": positives must be a contiguous int64 (", x.size(0), ", P) tensor on x's device, got ",
                positives->scalar_type(), " ", positives->sizes(), positives->is_contiguous() ? "" : " (not contiguous)");
  }
}

// A (R,) float32 tensor the backward reads (any stride).
void check_row_vector(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                  t.size(0) == x.size(0),
              op, ": ", name, " must be a float32 (", x.size(0), ",) tensor on x's device, got ", t.scalar_type(),
              " ", t.sizes());
}

// The row kernels' parameters; `sorted` keeps a sorted copy of the positives alive (P > kLinearP).
template <typename T>
RowParams<T> row_params(const at::Tensor& x, const std::optional<at::Tensor>& targets,
                        const std::optional<at::Tensor>& positives, bool mask_zero, at::Tensor& sorted) {
  RowParams<T> p;
  p.x = reinterpret_cast<const T*>(x.const_data_ptr());
  p.R = x.size(0);
  p.C = x.size(1);
  if (targets) p.tgt = targets->const_data_ptr<float>();
  if (positives) {
    p.P = positives->size(1);
    sorted = p.P > kLinearP ? std::get<0>(at::sort(*positives, 1)).contiguous() : *positives;
    p.pos = sorted.const_data_ptr<int64_t>();
    p.mask_zero = mask_zero;
  }
  return p;
}

template <int TPR, int NT, typename K, typename P>
void launch_rows(K kernel, const P& p) {
  constexpr int RPB = NT / TPR;
  static_assert(RPB <= kRowGroups && TPR / 32 <= kRowWarps && NT % TPR == 0 && TPR % 32 == 0);
  const auto grid = static_cast<unsigned>(std::min<int64_t>((p.R + RPB - 1) / RPB, kx::max_grid_x()));
  kernel<<<grid, NT, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlce_cuda(const at::Tensor& x, const std::optional<at::Tensor>& targets,
                                                         const std::optional<at::Tensor>& positives, bool mask_zero) {
  const char* op = "multilabel_categorical_crossentropy";
  check_mlce(op, x, targets, positives);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t R = x.size(0);
  auto loss = at::empty({R}, f32);
  auto lse_neg = at::empty({R}, f32);
  auto lse_pos = at::empty({R}, f32);
  if (R == 0) return {loss, lse_neg, lse_pos};
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    at::Tensor sorted;
    RowParams<T> p = row_params<T>(x, targets, positives, mask_zero, sorted);
    p.loss = loss.data_ptr<float>();
    p.lse_neg = lse_neg.data_ptr<float>();
    p.lse_pos = lse_pos.data_ptr<float>();
    if (p.C <= kShortRow) launch_rows<32, 128>(mlce_forward_kernel<T, 32, 128>, p);
    else launch_rows<256, 256>(mlce_forward_kernel<T, 256, 256>, p);
  });
  return {loss, lse_neg, lse_pos};
}

at::Tensor mlce_backward_cuda(const at::Tensor& dloss, const at::Tensor& x, const std::optional<at::Tensor>& targets,
                              const std::optional<at::Tensor>& positives, bool mask_zero, const at::Tensor& lse_neg,
                              const at::Tensor& lse_pos) {
  const char* op = "multilabel_categorical_crossentropy_backward";
  check_mlce(op, x, targets, positives);
  check_row_vector(op, dloss, "dloss", x);
  check_row_vector(op, lse_neg, "lse_neg", x);
  check_row_vector(op, lse_pos, "lse_pos", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    at::Tensor sorted;
    RowParams<T> p = row_params<T>(x, targets, positives, mask_zero, sorted);
    p.dloss = dloss.const_data_ptr<float>();
    p.lneg = lse_neg.const_data_ptr<float>();
    p.lpos = lse_pos.const_data_ptr<float>();
    p.dl_s = dloss.stride(0), p.ln_s = lse_neg.stride(0), p.lp_s = lse_pos.stride(0);
    p.dx = reinterpret_cast<T*>(dx.data_ptr());
    if (p.C <= kShortRow) launch_rows<32, 128>(mlce_backward_kernel<T, 32, 128>, p);
    else launch_rows<256, 256>(mlce_backward_kernel<T, 256, 256>, p);
  });
  return dx;
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CUDA, m) {
  m.impl("global_pointer_loss", &kxops::global_pointer_loss_cuda);
  m.impl("global_pointer_loss_backward", &kxops::global_pointer_loss_backward_cuda);
  m.impl("global_pointer", &kxops::global_pointer_cuda);
  m.impl("global_pointer_backward", &kxops::global_pointer_backward_cuda);
  m.impl("global_pointer_decode", &kxops::global_pointer_decode_cuda);
  m.impl("multilabel_categorical_crossentropy", &kxops::mlce_cuda);
  m.impl("multilabel_categorical_crossentropy_backward", &kxops::mlce_backward_cuda);
}
