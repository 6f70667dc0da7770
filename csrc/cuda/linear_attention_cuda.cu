// CUDA implementations of kxops::linear_attention, linear_attention_backward and linear_attention_step
// (docs/linear_attention_kernel_contract.md; the math: ../shared/spec/linear_attention.md).
//
// Chunkwise-parallel form. A block owns one (sequence, head, tile of DVT value columns) and walks the
// sequence in chunks of C tokens with the F x DVT state S (and z) in shared memory. Per chunk, with RQ,
// RK (C x F) the chunk's numerator features and FQ, FK the denominator's (RQ = FQ without RoPE), built
// on load (feature map, RoPE; q's scale goes on the products), and the mask M keeping s <= t:
//   out = RQ S + (M o RQ RK^T) V,   den = FQ z + rowsum(M o FQ FK^T),   S += RK^T V,   z += colsum(FK)
// The backward (the contract's formulas) is three launches:
//   1. forward walk: U = dO S^T + (M o dO V^T) RK (= S_t g_t, this tile's share of d rq_t / a_t) and per
//      token z_t, den_t = fq_t . z_t and the tile's share of g_t . num_t (= rq_t . U_t);
//   2. reverse walk with the state G, Gz (M' keeps s >= t; gN_s = a_s g_s):
//      dRK = V G^T + (M' o V gN^T) RQ,   dV = RK G + (M' o RK RQ^T) gN,   Gz_t,   G += RQ^T gN;
//   3. per token: the tiles' shares summed, RoPE undone, the denominator's terms, phi' -> dq, dk.
// Memory: the state per block; the backward's float workspaces hold O(T H F) per value tile.
//
// Matrix products: fp16 / bf16 on tensor cores (nvcuda::wmma m16n16k16, float accumulators), 8 warps a
// block, a warp per 16 x 16 output tile. An operand the input type cannot hold exactly (the masked
// scores, the states, gN, and features other than the inputs themselves: elu1, taylor, rotated) goes in
// as pieces in that type, each the rounding of what the previous ones left, and a product is a sum of
// piece products. Products that only feed outputs in the input type (out, dq, dk, dv) take two pieces,
// hi + lo (16 significant bits in bf16, 22 in fp16; (hi + lo)(hi + lo) without lo lo: three products
// against two split operands, two against an exact one): the project's rule (2x the 16-bit reference's
// own error, which is one rounding of the output) leaves no room for more roundings, and these leave
// about 2^-17. Products that feed the float32 outputs take three, hi + lo + x3 (exact for a float: 3 x 8
// bits in bf16, 3 x 11 in fp16), and every piece product down to 2^-24: three against an exact operand (v, dout, raw
// features), six for two split ones (hi hi, hi lo, lo hi, hi x3, lo lo, x3 hi). They are S += RK^T V (the
// forward's S), G += RQ^T gN (dS0), and with normalize, as den and g . num reach dS0 and dz0 through a
// and gd, the backward forward walk's state update and U = G S^T + (M o G V^T) RK (rk, the state, the
// scores: g_t . num_t = rq_t . U_t); that walk computes den_t = fq_t . z_t and rq_t . U_t on CUDA cores
// from features recomputed in float, z and Gz are sums in double. hi hi and the smaller piece products
// are accumulated apart, then added to the state once. The third pieces live in buffers their kernel
// leaves idle (make_layout). fp16 splits carry a power-of-two scale (the states outgrow fp16's range on
// long sequences). float32: CUDA cores, double accumulators and a double state, as the fp32 rule leaves
// no room for TF32 or for float sums in an order other than the reference's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "kx_cuda.cuh"

namespace kxops {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kStepThreads = 128;
constexpr int kMaxDim = 256;
constexpr float kTaylorNormMin = 1e-12f;  // |x| is clamped here in x / |x| (the reference's constant)

enum FeatureMap { kIdentity = 0, kElu1 = 1, kRelu = 2, kTaylor = 3 };
enum Tri { kFull = 0, kLower = 1, kUpper = 2 };  // which entries of a C x C score matrix are kept

template <typename T> struct Tr;  // per input type: state type, tensor cores
template <> struct Tr<float> {
  using S = double;
  static constexpr bool kTc = false;
};
template <> struct Tr<__half> {
  using S = float;
  static constexpr bool kTc = true;
};
template <> struct Tr<__nv_bfloat16> {
  using S = float;
  static constexpr bool kTc = true;
};

using kx::from_f;
using kx::to_f;

// The three walk kernels: forward, the backward's forward walk and its reverse walk.
enum WalkKind { kForwardWalk = 0, kBackwardForwardWalk = 1, kBackwardReverseWalk = 2 };

// Shared memory of one block, as byte offsets (-1: absent) and leading dimensions in elements. The
// 16-bit buffers' rows are padded by 16 bytes (no bank conflicts on column-tile loads) and every
// buffer starts 128-byte aligned (wmma wants 32).
struct Layout {
  int C = 0, dvt = 0;
  int ldf = 0, ldv = 0, ldh = 0, ldp = 0, lds = 0, ldsh = 0;
  int64_t q = -1, k = -1, ql = -1, kl = -1, v = -1, g = -1, gnh = -1, gnl = -1, st = -1, sh = -1, sl = -1;
  int64_t p = -1, ph = -1, pl = -1;
  int64_t stage = -1, z = -1, den = -1, a = -1, gd = -1, qn = -1, kn = -1, red = -1;
  // third pieces of the operands of the products that feed float32 outputs (tensor cores): rk (forward,
  // backward forward walk), the state and the scores (backward forward walk), rq and gN (reverse walk)
  int64_t q3 = -1, k3 = -1, s3 = -1, p3 = -1, g3 = -1;
  bool state_sync = false;  // the forward's k3 (the reverse walk's q3, g3) overlap p: see make_layout
  int64_t bytes = 0;
};

// The layout of a walk kernel. exact: the features are exact in T (identity, relu without RoPE: no
// feature splits); normalize: the backward's float32 outputs depend on den (its forward walk's products,
// gN). The forward and the reverse walk write their third pieces as they load the chunk and read them
// in its first product, the state update: they go where the scores (ph, pl, the stage, and p if need
// be: then state_sync, a barrier between the state update and the scores product) are later. compact:
// the state's splits without row padding (the last resort of the smallest devices).
template <typename T>
Layout make_layout(WalkKind kind, int C, int Fp, int dvt, bool exact, bool normalize, bool compact) {
  using S = typename Tr<T>::S;
  constexpr bool tc = Tr<T>::kTc;
  constexpr int e = sizeof(T), pad = 16 / sizeof(T);
  Layout l;
  l.C = C;
  l.dvt = dvt;
  l.ldf = Fp + pad;
  l.ldv = dvt + pad;
  l.ldsh = compact ? dvt : dvt + pad;
  l.ldp = C + 4;
  l.ldh = tc ? C + pad : l.ldp;
  l.lds = dvt + 16 / static_cast<int>(sizeof(S));
  auto round = [](int64_t bytes) { return (bytes + 127) / 128 * 128; };
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += round(bytes);
    return o;
  };
  const int64_t fb = int64_t{C} * l.ldf * e, vb = int64_t{C} * l.ldv * e;  // a feature / value tile
  const int64_t sb = int64_t{Fp} * l.ldsh * e, pb = int64_t{C} * l.ldh * e, pf = int64_t{C} * l.ldp * 4;
  const bool fwd_walk = kind == kBackwardForwardWalk;  // it recomputes rq: no q buffers
  if (!fwd_walk) {
    l.q = take(fb);
    if (tc) l.ql = take(fb);
  }
  l.k = take(fb);
  if (tc) l.kl = take(fb);
  l.v = take(vb);
  if (kind != kForwardWalk) l.g = take(vb);
  if (kind == kBackwardReverseWalk) {
    l.gnh = take(vb);
    if (tc) l.gnl = take(vb);
  }
  l.st = take(int64_t{Fp} * l.lds * sizeof(S));
  if (tc) {
    l.sh = take(sb);
    l.sl = take(sb);
    l.ph = take(pb);  // ph, pl, the stage and p adjacent
    l.pl = take(pb);
    l.stage = take(int64_t{kWarps} * 256 * 4);
  }
  l.p = take(pf);
  if (!tc) l.ph = l.p;  // the masked scores are used in place
  l.z = take(int64_t{Fp} * sizeof(double));
  l.den = take(int64_t{C} * sizeof(S));
  l.a = take(int64_t{C} * sizeof(S));
  l.gd = take(int64_t{C} * sizeof(S));
  l.qn = take(int64_t{C} * 4);
  l.kn = take(int64_t{C} * 4);
  l.red = take(32 * sizeof(S));
  if (tc) {
    if (fwd_walk) {
      if (normalize) {  // own buffers; the scores' piece in v's once the state update and scores read it
        if (!exact) l.k3 = take(fb);
        l.s3 = take(sb);
        l.p3 = pb <= vb ? l.v : take(pb);
      }
    } else {
      const int64_t n3 = kind == kForwardWalk ? (exact ? 0 : fb) : (exact ? 0 : round(fb)) + (normalize ? vb : 0);
      if (n3 > 0) {
        int64_t at = l.ph;
        if (l.ph + round(n3) > l.p + round(pf)) at = take(n3);   // not even with p: more memory
        else if (l.ph + round(n3) > l.p) l.state_sync = true;  // with p
        if (kind == kForwardWalk) {
          l.k3 = at;
        } else {
          if (!exact) l.q3 = at;
          if (normalize) l.g3 = exact ? at : at + round(fb);
        }
      }
    }
  }
  l.bytes = off;
  return l;
}

template <typename T>
struct Params {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t q_sb = 0, q_st = 0, q_sh = 0, k_sb = 0, k_st = 0, k_sh = 0, v_sb = 0, v_st = 0, v_sh = 0;
  const T* g = nullptr;  // backward: dout (B, T, H, Dv), contiguous
  T* out = nullptr;      // forward: out; backward's reverse walk: dv; (B, T, H, Dv), contiguous
  // the state a walk starts from (forward and forward walk: S0, z0; reverse walk: dS, dz; null: zeros)
  // and where it ends up (forward: S, z; reverse walk: dS0, dz0; null: not wanted)
  const float* s_in = nullptr;
  const float* z_in = nullptr;
  float* s_out = nullptr;
  float* z_out = nullptr;
  const int32_t* cu = nullptr;
  int64_t nseq = 0, seqlen = 0;  // seqlen: T (total tokens of the packed row with cu)
  const int64_t* pos = nullptr;
  int64_t pos_sb = 0, pos_st = 0;
  const float* inv_freq = nullptr;
  bool interleaved = false;
  int fmap = 0;
  float scale = 1.0f, eps = 0.0f;
  bool normalize = false, causal = true;
  int H = 0, Dk = 0, Dv = 0, F = 0, Fp = 0, ntiles = 1;
  // backward workspaces: wsq, wsk (ntiles + 1, B*T, H, Fp): the tiles' U / dRK, then z_t / Gz_t;
  // den (B*T, H); dot (ntiles, B*T, H)
  float* wsq = nullptr;
  float* wsk = nullptr;
  float* den = nullptr;
  float* dot = nullptr;
  int64_t ntok = 0;
  Layout lay;
};

template <typename T>
struct Bufs {  // typed views of a block's shared memory
  using S = typename Tr<T>::S;
  T *q, *k, *ql, *kl, *v, *g, *gnh, *gnl, *sh, *sl, *ph, *pl;
  S *st;
  double* z;  // z (Gz): double, as it sums a token at a time
  S *den, *a, *gd, *red;
  float *p, *stage, *qn, *kn;
};

template <typename P>
__device__ __forceinline__ P* at_off(unsigned char* base, int64_t off) {
  return off < 0 ? nullptr : reinterpret_cast<P*>(base + off);
}

template <typename T>
__device__ Bufs<T> bufs(unsigned char* base, const Layout& l) {
  using S = typename Tr<T>::S;
  return {at_off<T>(base, l.q),      at_off<T>(base, l.k),     at_off<T>(base, l.ql),    at_off<T>(base, l.kl),
          at_off<T>(base, l.v),      at_off<T>(base, l.g),     at_off<T>(base, l.gnh),   at_off<T>(base, l.gnl),
          at_off<T>(base, l.sh),     at_off<T>(base, l.sl),    at_off<T>(base, l.ph),    at_off<T>(base, l.pl),
          at_off<S>(base, l.st),     at_off<double>(base, l.z),     at_off<S>(base, l.den),   at_off<S>(base, l.a),
          at_off<S>(base, l.gd),     at_off<S>(base, l.red),   at_off<float>(base, l.p), at_off<float>(base, l.stage),
          at_off<float>(base, l.qn), at_off<float>(base, l.kn)};
}

// ---- features ----

// v as hi + lo in T, or (x3 not null) exactly as hi + lo + x3: each piece the rounding of what the
// previous ones leave (exact in float); 3 x 8 bits hold a float in bf16, 3 x 11 in fp16.
template <typename T>
__device__ __forceinline__ void split_store(T* hi, T* lo, T* x3, int64_t i, float v) {
  const T h = from_f<T>(v);
  const float r = v - to_f(h);
  const T m = from_f<T>(r);
  hi[i] = h;
  lo[i] = m;
  if (x3) x3[i] = from_f<T>(r - to_f(m));
}

// phi(x)_f of a row x (Dk values, unit stride) whose Taylor norm is `norm`.
template <typename T>
__device__ __forceinline__ float feature(const T* x, int f, int fmap, float norm) {
  if (fmap == kTaylor) return f == 0 ? 1.0f : to_f(x[f - 1]) / norm;
  const float v = to_f(x[f]);
  if (fmap == kElu1) return v > 0.0f ? v + 1.0f : expf(v);
  if (fmap == kRelu) return v > 0.0f ? v : 0.0f;
  return v;
}

// d phi / dx at x (not Taylor).
__device__ __forceinline__ float dfeature(float x, int fmap) {
  if (fmap == kElu1) return x > 0.0f ? 1.0f : expf(x);
  if (fmap == kRelu) return x > 0.0f ? 1.0f : 0.0f;
  return 1.0f;
}

// Rotary pair of the x-feature d: its index i (angle pos * inv_freq[i]), the other member, and
// whether d is the pair's first (a -> a c - b s) or second (b -> a s + b c) member.
struct Pair {
  int i, partner;
  bool first;
};
__device__ __forceinline__ Pair pair_of(int d, int Dk, bool interleaved) {
  if (interleaved) return {d >> 1, d ^ 1, (d & 1) == 0};
  const int h = Dk / 2;
  return d < h ? Pair{d, d + h, true} : Pair{d - h, d - h, false};
}

struct Seq {
  int64_t b, start, len, tok0;  // batch row, first token in it, tokens, global index of token 0
};

// Sequence n: batch row n, or [cu[n], cu[n+1]) of the packed row (clamped into it, so that a bad
// cu_seqlens from a direct op call cannot send a block out of bounds).
template <typename T>
__device__ __forceinline__ Seq seq_of(const Params<T>& p, int64_t n) {
  if (p.cu == nullptr) return {n, 0, p.seqlen, n * p.seqlen};
  const int64_t s = min(max(static_cast<int64_t>(p.cu[n]), int64_t{0}), p.seqlen);
  const int64_t e = min(max(static_cast<int64_t>(p.cu[n + 1]), s), p.seqlen);
  return {0, s, e - s, s};
}

// Tokens of the chunk that starts at c0 (chunks of C).
__device__ __forceinline__ int rows_in(const Seq& s, int64_t c0, int C) {
  return static_cast<int>(s.len - c0 < C ? s.len - c0 : C);
}

template <typename T>
__device__ __forceinline__ float position(const Params<T>& p, int64_t b, int64_t tok_in_row, int64_t t_in_seq) {
  return p.pos ? static_cast<float>(p.pos[b * p.pos_sb + tok_in_row * p.pos_st]) : static_cast<float>(t_in_seq);
}

// Feature f (< Fp; 0 past F) of the row x (Taylor norm `norm`), rotated to position pos when `rotate`.
template <typename T>
__device__ __forceinline__ float feature_at(const Params<T>& p, const T* x, int f, float norm, bool rotate, float pos) {
  const int off = p.fmap == kTaylor ? 1 : 0;
  float v = 0.0f;
  if (f < p.F) {
    v = feature(x, f, p.fmap, norm);
    if (rotate && f >= off) {
      const Pair pr = pair_of(f - off, p.Dk, p.interleaved);
      float sn, cs;
      sincosf(pos * p.inv_freq[pr.i], &sn, &cs);
      const float w = feature(x, pr.partner + off, p.fmap, norm);
      v = pr.first ? v * cs - w * sn : w * sn + v * cs;
    }
  }
  return v;
}

// The Taylor norm of the row x (Dk values), by a warp (1 for other feature maps).
template <typename T>
__device__ __forceinline__ float row_norm(const Params<T>& p, const T* x) {
  if (p.fmap != kTaylor) return 1.0f;
  float ss = 0.0f;
  for (int d = threadIdx.x & 31; d < p.Dk; d += 32) {
    const float v = to_f(x[d]);
    ss += v * v;
  }
  ss = kx::warp_reduce(ss, kx::Sum());
  return fmaxf(sqrtf(ss), kTaylorNormMin);
}

// Rows [0, C) of a chunk's features into dst (C x Fp): row t < n is phi(x_(c0+t)), rotated when
// `rotate`, zero past F (q's scale is applied to the products, in float: scale * phi(q) in T would
// round once more); rows t >= n are zero. lo (if not null): what rounding to T left out (elu1's
// x + 1, taylor's x / |x| and rotated features lose bits in T), rounded to T; x3 (if not null): what
// that rounding left out in turn (hi + lo + x3 is the float feature). A warp per row (the Taylor norm
// is a row reduction); norms[t]: row t's Taylor norm, for later recomputations.
template <typename T>
__device__ void load_features(const Params<T>& p, T* dst, std::type_identity_t<T>* lo, std::type_identity_t<T>* x3,
                              int ld, float* norms, const T* x0, int64_t st, const Seq& s, int64_t c0, int n,
                              bool rotate) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = warp; t < p.lay.C; t += kWarps) {
    T* row = dst + t * ld;
    T* row_lo = lo ? lo + t * ld : nullptr;
    T* row_x3 = x3 ? x3 + t * ld : nullptr;
    if (t >= n) {
      for (int f = lane; f < p.Fp; f += 32) {
        row[f] = from_f<T>(0.0f);
        if (row_lo) row_lo[f] = from_f<T>(0.0f);
        if (row_x3) row_x3[f] = from_f<T>(0.0f);
      }
      continue;
    }
    const T* x = x0 + (c0 + t) * st;
    const float norm = row_norm(p, x);
    if (p.fmap == kTaylor && lane == 0) norms[t] = norm;
    const float pos = rotate ? position(p, s.b, s.start + c0 + t, c0 + t) : 0.0f;
    for (int f = lane; f < p.Fp; f += 32) {
      const float v = feature_at(p, x, f, norm, rotate, pos);
      if (row_lo) split_store(row, row_lo, row_x3, f, v);
      else row[f] = from_f<T>(v);
    }
  }
}

// Rows [0, C) x columns [0, dvt) of value-like rows x0 + (c0 + t) * st into dst, zero past n rows and
// `cols` columns.
template <typename T>
__device__ void load_tile(const Params<T>& p, T* dst, int ld, const T* x0, int64_t st, int64_t c0, int n, int cols) {
  const int dvt = p.lay.dvt;
  for (int idx = threadIdx.x; idx < p.lay.C * dvt; idx += kThreads) {
    const int t = idx / dvt, j = idx - t * dvt;
    dst[t * ld + j] = (t < n && j < cols) ? x0[(c0 + t) * st + j] : from_f<T>(0.0f);
  }
}

// ---- matrix products on shared memory ----

template <typename E>
struct Opnd {
  const E* hi;
  const E* lo;  // null, or the second piece of a split
  int ld;
  const E* x3 = nullptr;  // null, or the third piece (with lo: hi + lo + x3 exact)
};

// A x B, K deep, A (M x K) and B (K x N) read row-major or (TA / TB) column-major from ld-strided rows;
// a_tri: A is lower (upper) triangular, so only K tiles up to (from) the output row's are read.
// scale: multiplies the term, in float (q's scale, the splits' powers of two). X: a product for a float32
// output (term3): its operands' third pieces, where they have them, are used.
template <bool TA, bool TB, typename EA, typename EB, bool X = false>
struct Term {
  static constexpr bool kTA = TA, kTB = TB, kX = X;
  using A = EA;
  using B = EB;
  Opnd<EA> a;
  Opnd<EB> b;
  int K;
  int a_tri;
  float scale;
};

template <bool TA, bool TB, typename EA, typename EB>
__device__ __forceinline__ Term<TA, TB, EA, EB> term(Opnd<EA> a, Opnd<EB> b, int K, int a_tri = kFull,
                                                     float scale = 1.0f) {
  return {a, b, K, a_tri, scale};
}
template <bool TA, bool TB, typename EA, typename EB>
__device__ __forceinline__ Term<TA, TB, EA, EB, true> term3(Opnd<EA> a, Opnd<EB> b, int K, int a_tri = kFull,
                                                            float scale = 1.0f) {
  return {a, b, K, a_tri, scale};
}

struct NoTerm {
  static constexpr bool kX = false;
};

template <typename O>
struct ToSmem {  // the product into (or, accumulate, onto) a shared matrix
  O* out;
  int ld;
  bool accumulate;
};

template <typename Fn>
struct ToFn {  // every product element to fn(row, col, value)
  Fn fn;
};
template <typename Fn>
__device__ __forceinline__ ToFn<Fn> to_fn(Fn fn) {
  return {fn};
}

template <typename X> struct IsSmem : std::false_type {};
template <typename O> struct IsSmem<ToSmem<O>> : std::true_type {};

__device__ __forceinline__ bool skipped(int out_tri, int i, int j) {
  return (out_tri == kLower && j > i) || (out_tri == kUpper && j < i);
}

// The piece products a_i b_j with i + j <= P + 1, P the most pieces of an operand: (hi + lo)(hi + lo)
// without lo lo (a term for a q-dtype output: two pieces at most); a term3 with a third piece: all that
// reach 2^-24 (3 x 3 pieces: 6 of 9). A term3's hi hi products go to main, the others, small ones first,
// to corr, so that their roundings stay at their own magnitude; other terms accumulate all in main.
template <typename Tm, typename Frag>
__device__ __forceinline__ void term_mma(const Tm& t, int i, int j, Frag& main, Frag& corr) {
  using namespace nvcuda;
  using E = typename Tm::A;
  using LA = std::conditional_t<Tm::kTA, wmma::col_major, wmma::row_major>;
  using LB = std::conditional_t<Tm::kTB, wmma::col_major, wmma::row_major>;
  int k0 = 0, k1 = t.K;
  if (t.a_tri == kLower) k1 = min(k1, 16 * (i + 1));
  else if (t.a_tri == kUpper) k0 = 16 * i;
  for (int kk = k0; kk < k1; kk += 16) {
    const int64_t ao = Tm::kTA ? int64_t{kk} * t.a.ld + 16 * i : int64_t{16 * i} * t.a.ld + kk;
    const int64_t bo = Tm::kTB ? int64_t{16 * j} * t.b.ld + kk : int64_t{kk} * t.b.ld + 16 * j;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, LA> a, a2;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, E, LB> b, b2;
    wmma::load_matrix_sync(a, t.a.hi + ao, t.a.ld);
    wmma::load_matrix_sync(b, t.b.hi + bo, t.b.ld);
    if constexpr (Tm::kX) {
      const bool three = t.a.x3 != nullptr || t.b.x3 != nullptr;
      if (t.a.x3) {
        wmma::load_matrix_sync(a2, t.a.x3 + ao, t.a.ld);
        wmma::mma_sync(corr, a2, b, corr);
      }
      if (t.b.x3) {
        wmma::load_matrix_sync(b2, t.b.x3 + bo, t.b.ld);
        wmma::mma_sync(corr, a, b2, corr);
      }
      if (t.a.lo) wmma::load_matrix_sync(a2, t.a.lo + ao, t.a.ld);
      if (t.b.lo) wmma::load_matrix_sync(b2, t.b.lo + bo, t.b.ld);
      if (three && t.a.lo && t.b.lo) wmma::mma_sync(corr, a2, b2, corr);
      if (t.a.lo) wmma::mma_sync(corr, a2, b, corr);
      if (t.b.lo) wmma::mma_sync(corr, a, b2, corr);
      wmma::mma_sync(main, a, b, main);
    } else {
      wmma::mma_sync(main, a, b, main);
      if (t.a.lo) {
        wmma::load_matrix_sync(a2, t.a.lo + ao, t.a.ld);
        wmma::mma_sync(main, a2, b, main);
      }
      if (t.b.lo) {
        wmma::load_matrix_sync(b, t.b.lo + bo, t.b.ld);
        wmma::mma_sync(main, a, b, main);
      }
    }
  }
}

template <typename Tm, typename Frag>
__device__ __forceinline__ void term_acc(const Tm& t, int i, int j, Frag& acc) {
  if constexpr (std::is_same_v<Tm, NoTerm>) {
    return;
  } else if constexpr (Tm::kX) {
    Frag main, corr;
    nvcuda::wmma::fill_fragment(main, 0.0f);
    nvcuda::wmma::fill_fragment(corr, 0.0f);
    term_mma(t, i, j, main, corr);
    for (int e = 0; e < main.num_elements; ++e) acc.x[e] += t.scale * (main.x[e] + corr.x[e]);
  } else if (t.scale == 1.0f) {
    term_mma(t, i, j, acc, acc);
  } else {
    Frag part;
    nvcuda::wmma::fill_fragment(part, 0.0f);
    term_mma(t, i, j, part, part);
    for (int e = 0; e < part.num_elements; ++e) acc.x[e] += t.scale * part.x[e];
  }
}

// Tensor cores: a warp per 16 x 16 output tile. X: a product for a float32 output (a term3), onto the
// state: the state is added last, once.
template <bool X, typename Epi, typename T1, typename T2>
__device__ void gemm_tc(int M, int N, int out_tri, const T1& t1, const T2& t2, const Epi& epi, float* stage) {
  using namespace nvcuda;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nt = N / 16;
  for (int tile = warp; tile < M / 16 * nt; tile += kWarps) {
    const int i = tile / nt, j = tile - i * nt;
    if (skipped(out_tri, i, j)) continue;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    if constexpr (IsSmem<Epi>::value && !X) {
      const float* at = epi.out + int64_t{16 * i} * epi.ld + 16 * j;
      if (epi.accumulate) wmma::load_matrix_sync(acc, at, epi.ld, wmma::mem_row_major);
    }
    term_acc(t1, i, j, acc);
    term_acc(t2, i, j, acc);
    if constexpr (IsSmem<Epi>::value) {
      if (X && epi.accumulate) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> prev;
        wmma::load_matrix_sync(prev, epi.out + int64_t{16 * i} * epi.ld + 16 * j, epi.ld, wmma::mem_row_major);
        for (int e = 0; e < acc.num_elements; ++e) acc.x[e] += prev.x[e];
      }
      wmma::store_matrix_sync(epi.out + int64_t{16 * i} * epi.ld + 16 * j, acc, epi.ld, wmma::mem_row_major);
    } else {  // through the warp's 16 x 16 stage, so that the epilogue knows each element's place
      float* st = stage + warp * 256;
      wmma::store_matrix_sync(st, acc, 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) epi.fn(16 * i + (e >> 4), 16 * j + (e & 15), st[e]);
      __syncwarp();
    }
  }
}

template <typename Tm>
__device__ __forceinline__ double term_dot(const Tm& t, int r, int c) {
  if constexpr (std::is_same_v<Tm, NoTerm>) {
    return 0.0;
  } else {
    int k0 = 0, k1 = t.K;
    if (t.a_tri == kLower) k1 = min(k1, r + 1);
    else if (t.a_tri == kUpper) k0 = r;
    double acc = 0.0;
    for (int k = k0; k < k1; ++k) {
      const double a = Tm::kTA ? t.a.hi[int64_t{k} * t.a.ld + r] : t.a.hi[int64_t{r} * t.a.ld + k];
      const double b = Tm::kTB ? t.b.hi[int64_t{c} * t.b.ld + k] : t.b.hi[int64_t{k} * t.b.ld + c];
      acc += a * b;
    }
    return acc * t.scale;
  }
}

// CUDA cores (float32 inputs): a thread per output element, double sums.
template <typename Epi, typename T1, typename T2>
__device__ void gemm_simt(int M, int N, int out_tri, const T1& t1, const T2& t2, const Epi& epi) {
  for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
    const int r = idx / N, c = idx - r * N;
    if ((out_tri == kLower && c > r) || (out_tri == kUpper && c < r)) continue;
    double acc = 0.0;
    if constexpr (IsSmem<Epi>::value) {
      if (epi.accumulate) acc = epi.out[int64_t{r} * epi.ld + c];
    }
    acc += term_dot(t1, r, c);
    acc += term_dot(t2, r, c);
    if constexpr (IsSmem<Epi>::value) {
      epi.out[int64_t{r} * epi.ld + c] = static_cast<std::remove_pointer_t<decltype(epi.out)>>(acc);
    } else {
      epi.fn(r, c, acc);
    }
  }
}

// out (M x N) = term1 (+ term2), output tiles outside out_tri skipped; all threads of the block call it.
template <typename T, typename Epi, typename T1, typename T2 = NoTerm>
__device__ __forceinline__ void gemm(const Bufs<T>& sm, int M, int N, int out_tri, const Epi& epi, const T1& t1,
                                     const T2& t2 = NoTerm{}) {
  constexpr bool x = T1::kX || T2::kX;
  if constexpr (Tr<T>::kTc) gemm_tc<x>(M, N, out_tri, t1, t2, epi, sm.stage);
  else gemm_simt(M, N, out_tri, t1, t2, epi);
}

// ---- splits (a float matrix as an operand in the input type) ----

// fp16: the power of two that brings max|x| = m near 2^14 (fp16 overflows at 65504 and loses bits
// below 6e-5); bf16 has float's range. Every thread calls it.
template <typename T>
__device__ __forceinline__ float split_scale(const Bufs<T>& sm, float m) {
  if constexpr (std::is_same_v<T, __half>) {
    m = kx::block_reduce(m, kx::Max(), reinterpret_cast<float*>(sm.red));
    return (m > 0.0f && m < INFINITY) ? ldexpf(1.0f, ilogbf(m) - 13) : 1.0f;
  } else {
    return 1.0f;
  }
}

// The state (Fp x dvt) as hi / lo operands (and x3: exact); returns the split's scale (tensor cores only).
template <typename T>
__device__ float split_state(const Params<T>& p, const Bufs<T>& sm, T* x3) {
  const int dvt = p.lay.dvt, n = p.Fp * dvt;
  float m = 0.0f;
  if constexpr (std::is_same_v<T, __half>) {
    for (int idx = threadIdx.x; idx < n; idx += kThreads) {
      m = fmaxf(m, fabsf(sm.st[(idx / dvt) * p.lay.lds + idx % dvt]));
    }
  }
  const float up = split_scale(sm, m), down = 1.0f / up;
  for (int idx = threadIdx.x; idx < n; idx += kThreads) {
    const int f = idx / dvt, j = idx - f * dvt;
    split_store(sm.sh, sm.sl, x3, int64_t{f} * p.lay.ldsh + j, sm.st[f * p.lay.lds + j] * down);
  }
  return up;
}

// The C x C scores in sm.p, masked to `tri` and their columns scaled by colscale (null: 1), as the
// operand (ph, pl, and x3 if not null: exact); returns the split's scale (1 without tensor cores: in place).
template <typename T>
__device__ float split_scores(const Params<T>& p, const Bufs<T>& sm, int tri, const typename Tr<T>::S* colscale,
                              T* x3) {
  using S = typename Tr<T>::S;
  const int C = p.lay.C;
  auto value = [&](int t, int s) -> float {
    if (tri == kLower ? s > t : s < t) return 0.0f;
    const float v = sm.p[t * p.lay.ldp + s];
    return colscale ? static_cast<float>(static_cast<S>(v) * colscale[s]) : v;
  };
  if constexpr (Tr<T>::kTc) {
    float m = 0.0f;
    if constexpr (std::is_same_v<T, __half>) {
      for (int idx = threadIdx.x; idx < C * C; idx += kThreads) m = fmaxf(m, fabsf(value(idx / C, idx % C)));
    }
    const float up = split_scale(sm, m), down = 1.0f / up;
    for (int idx = threadIdx.x; idx < C * C; idx += kThreads) {
      const int t = idx / C, s = idx - t * C;
      split_store(sm.ph, sm.pl, x3, int64_t{t} * p.lay.ldh + s, value(t, s) * down);
    }
    return up;
  } else {
    for (int idx = threadIdx.x; idx < C * C; idx += kThreads) {
      const int t = idx / C, s = idx - t * C;
      sm.p[t * p.lay.ldp + s] = value(t, s);
    }
    return 1.0f;
  }
}

// gN = a_t g_t (C x dvt) as (gnh, gnl, and x3 if not null: exact); returns the split's scale.
template <typename T>
__device__ float split_gn(const Params<T>& p, const Bufs<T>& sm, T* x3) {
  using S = typename Tr<T>::S;
  const int dvt = p.lay.dvt, n = p.lay.C * dvt;
  auto value = [&](int idx) -> float {
    const int t = idx / dvt;
    return static_cast<float>(sm.a[t] * static_cast<S>(to_f(sm.g[t * p.lay.ldv + idx - t * dvt])));
  };
  if constexpr (Tr<T>::kTc) {
    float m = 0.0f;
    if constexpr (std::is_same_v<T, __half>) {
      for (int idx = threadIdx.x; idx < n; idx += kThreads) m = fmaxf(m, fabsf(value(idx)));
    }
    const float up = split_scale(sm, m), down = 1.0f / up;
    for (int idx = threadIdx.x; idx < n; idx += kThreads) {
      const int t = idx / dvt;
      split_store(sm.gnh, sm.gnl, x3, int64_t{t} * p.lay.ldv + idx - t * dvt, value(idx) * down);
    }
    return up;
  } else {
    for (int idx = threadIdx.x; idx < n; idx += kThreads) {
      const int t = idx / dvt;
      sm.gnh[t * p.lay.ldv + idx - t * dvt] = value(idx);
    }
    return 1.0f;
  }
}

// The state as a right operand: the split (tensor cores; x3: its third piece or null) or the double
// state itself.
template <typename T>
__device__ __forceinline__ auto state_op(const Params<T>& p, const Bufs<T>& sm, const T* x3) {
  if constexpr (Tr<T>::kTc) return Opnd<T>{sm.sh, sm.sl, p.lay.ldsh, x3};
  else return Opnd<double>{sm.st, nullptr, p.lay.lds};
}

// ---- state, denominators ----

// sm.st <- the state tile (rows F, columns j0 + [0, cols)) of `s` (null: zeros), zero padded;
// sm.z <- z (null: zeros).
template <typename T>
__device__ void load_state(const Params<T>& p, const Bufs<T>& sm, const float* s, const float* z, int64_t nh,
                           int j0, int cols) {
  using S = typename Tr<T>::S;
  const int dvt = p.lay.dvt;
  for (int idx = threadIdx.x; idx < p.Fp * dvt; idx += kThreads) {
    const int f = idx / dvt, j = idx - f * dvt;
    sm.st[f * p.lay.lds + j] = (s && f < p.F && j < cols) ? static_cast<S>(s[(nh * p.F + f) * p.Dv + j0 + j]) : S(0);
  }
  for (int f = threadIdx.x; f < p.Fp; f += kThreads) {
    sm.z[f] = (z && f < p.F) ? static_cast<double>(z[nh * p.F + f]) : 0.0;
  }
}

template <typename T>
__device__ void store_state(const Params<T>& p, const Bufs<T>& sm, float* s, float* z, int64_t nh, int j0, int cols,
                            bool with_z) {
  const int n = p.F * cols;
  if (s) {
    for (int idx = threadIdx.x; idx < n; idx += kThreads) {
      const int f = idx / cols, j = idx - f * cols;
      s[(nh * p.F + f) * p.Dv + j0 + j] = static_cast<float>(sm.st[f * p.lay.lds + j]);
    }
  }
  if (z && with_z) {
    for (int f = threadIdx.x; f < p.F; f += kThreads) z[nh * p.F + f] = static_cast<float>(sm.z[f]);
  }
}

// den_t = fq_t . z (+ sum_(s <= t) P[t][s] when intra) for rows t < n, into sm.den (and den_out[t * H]).
// A warp per row; fq recomputed from q in float (unrotated).
template <typename T>
__device__ void den_rows(const Params<T>& p, const Bufs<T>& sm, const T* q0, int64_t c0, int n, bool intra,
                         float* den_out) {
  using S = typename Tr<T>::S;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = warp; t < n; t += kWarps) {
    const T* x = q0 + (c0 + t) * p.q_st;
    const float norm = p.fmap == kTaylor ? sm.qn[t] : 1.0f;
    S acc = 0;
    for (int f = lane; f < p.F; f += 32) {
      acc += static_cast<S>(feature(x, f, p.fmap, norm) * p.scale) * static_cast<S>(sm.z[f]);
    }
    if (intra) {
      for (int s = lane; s <= t; s += 32) acc += static_cast<S>(sm.p[t * p.lay.ldp + s]);
    }
    acc = kx::warp_reduce(acc, kx::Sum());
    if (lane == 0) {
      sm.den[t] = acc;
      if (den_out) den_out[(c0 + t) * p.H] = static_cast<float>(acc);
    }
  }
}

// z += sum_(t < n) fk_t (fk recomputed from k in float, summed in double); zt: z after each token t
// (row t * zt_st), or null.
template <typename T>
__device__ void z_update(const Params<T>& p, const Bufs<T>& sm, const T* k0, int64_t c0, int n, float* zt,
                         int64_t zt_st) {
  for (int f = threadIdx.x; f < p.F; f += kThreads) {
    double acc = sm.z[f];
    for (int t = 0; t < n; ++t) {
      acc += feature(k0 + (c0 + t) * p.k_st, f, p.fmap, p.fmap == kTaylor ? sm.kn[t] : 1.0f);
      if (zt) zt[t * zt_st + f] = static_cast<float>(acc);
    }
    sm.z[f] = acc;
  }
}

// ---- kernels ----

// a_t = 1 / (den_t + eps) and gd_t = -a_t^2 (g_t . num_t) of a chunk's rows into sm.a, sm.gd; row:
// the (token, head) row of the chunk's first token.
template <typename T>
__device__ void row_coefs(const Params<T>& p, const Bufs<T>& sm, int64_t row, int n) {
  using S = typename Tr<T>::S;
  for (int t = threadIdx.x; t < p.lay.C; t += kThreads) {
    S a = 0, gd = 0;
    if (t < n) {
      const int64_t i = row + t * p.H;
      a = S(1) / (static_cast<S>(p.den[i]) + static_cast<S>(p.eps));
      S dot = 0;
      for (int j = 0; j < p.ntiles; ++j) dot += static_cast<S>(p.dot[j * p.ntok * p.H + i]);
      gd = -a * a * dot;
    }
    sm.a[t] = a;
    sm.gd[t] = gd;
  }
}

// Gz_t = Gz_after + sum_(s >= t in the chunk) gd_s fq_s for the chunk's rows (from the last, in
// double), into gzt[t * gzt_st] (if not null); sm.z becomes Gz before the chunk.
template <typename T>
__device__ void gz_update(const Params<T>& p, const Bufs<T>& sm, const T* q0, int64_t c0, int n, float* gzt,
                          int64_t gzt_st) {
  for (int f = threadIdx.x; f < p.F; f += kThreads) {
    double acc = sm.z[f];
    for (int t = n - 1; t >= 0; --t) {
      if (p.normalize) {
        const float fq = feature(q0 + (c0 + t) * p.q_st, f, p.fmap, p.fmap == kTaylor ? sm.qn[t] : 1.0f) * p.scale;
        acc += static_cast<double>(sm.gd[t]) * fq;
      }
      if (gzt) gzt[t * gzt_st + f] = static_cast<float>(acc);
    }
    sm.z[f] = acc;
  }
}

// A block's work item, one (sequence, head, value tile), with the operands of its products in shared
// memory and the steps the three walks share.
template <typename T>
struct Walk {
  using S = typename Tr<T>::S;
  const Params<T>& p;
  Bufs<T> sm;
  T* qlo;  // the features' lo pieces; null when T holds them exactly (identity, relu, unrotated)
  T* klo;
  // third pieces, where the kernel's layout has them (else null): rq (reverse walk), rk (forward, forward
  // walk), the state and the scores (forward walk), gN (reverse walk)
  T* q3;
  T* k3;
  T* s3;
  T* p3;
  T* g3;
  int64_t n;
  int h, tile, j0, cols;
  Seq s;
  int64_t row0;  // (token, head) row of the sequence's first token
  const T* q0;
  const T* k0;
  const T* v0;  // from column j0
  const T* g0;  // dout, from column j0
  bool rope;

  __device__ Walk(const Params<T>& params, unsigned char* smem, int64_t w) : p(params), sm(bufs<T>(smem, params.lay)) {
    rope = p.inv_freq != nullptr;
    const bool exact = !rope && (p.fmap == kIdentity || p.fmap == kRelu);
    qlo = exact ? nullptr : sm.ql;
    klo = exact ? nullptr : sm.kl;
    q3 = at_off<T>(smem, p.lay.q3);
    k3 = at_off<T>(smem, p.lay.k3);
    s3 = at_off<T>(smem, p.lay.s3);
    p3 = at_off<T>(smem, p.lay.p3);
    g3 = at_off<T>(smem, p.lay.g3);
    tile = static_cast<int>(w % p.ntiles);
    h = static_cast<int>(w / p.ntiles % p.H);
    n = w / (int64_t{p.ntiles} * p.H);
    j0 = tile * p.lay.dvt;
    cols = min(p.lay.dvt, p.Dv - j0);
    s = seq_of(p, n);
    row0 = s.tok0 * p.H + h;
    q0 = p.q + s.b * p.q_sb + s.start * p.q_st + h * p.q_sh;
    k0 = p.k + s.b * p.k_sb + s.start * p.k_st + h * p.k_sh;
    v0 = p.v + s.b * p.v_sb + s.start * p.v_st + h * p.v_sh + j0;
    g0 = p.g ? p.g + row0 * p.Dv + j0 : nullptr;
  }

  // Operands: Q, K in two pieces (products for q-dtype outputs), Q3, K3 with their third pieces where
  // the walk has them (products for float32 outputs); the state and the scores as split.
  __device__ Opnd<T> Q() const { return {sm.q, qlo, p.lay.ldf}; }
  __device__ Opnd<T> K() const { return {sm.k, klo, p.lay.ldf}; }
  __device__ Opnd<T> Q3() const { return {sm.q, qlo, p.lay.ldf, q3}; }
  __device__ Opnd<T> K3() const { return {sm.k, klo, p.lay.ldf, k3}; }
  __device__ Opnd<T> V() const { return {sm.v, nullptr, p.lay.ldv}; }
  __device__ Opnd<T> G() const { return {sm.g, nullptr, p.lay.ldv}; }
  __device__ Opnd<T> scores() const { return {sm.ph, sm.pl, p.lay.ldh, p3}; }  // split_scores' operand
  __device__ auto state() const { return state_op(p, sm, s3); }
  __device__ ToSmem<float> to_scores() const { return {sm.p, p.lay.ldp, false}; }
  __device__ ToSmem<S> onto_state() const { return {sm.st, p.lay.lds, true}; }

  // third: with the third piece (where the walk has one)
  __device__ void load_q(int64_t c0, int rows, bool rotate, bool third = false) const {
    load_features(p, sm.q, qlo, third ? q3 : nullptr, p.lay.ldf, sm.qn, q0, p.q_st, s, c0, rows, rotate);
  }
  __device__ void load_k(int64_t c0, int rows, bool rotate, bool third = false) const {
    load_features(p, sm.k, klo, third ? k3 : nullptr, p.lay.ldf, sm.kn, k0, p.k_st, s, c0, rows, rotate);
  }
  __device__ void load_v(int64_t c0, int rows) const { load_tile(p, sm.v, p.lay.ldv, v0, p.v_st, c0, rows, cols); }
  __device__ void load_g(int64_t c0, int rows) const {
    load_tile(p, sm.g, p.lay.ldv, g0, int64_t{p.H} * p.Dv, c0, rows, cols);
  }

  // The state tile and z from `s_in`, `z_in` (null: zeros); returns the split's scale.
  __device__ float begin() const {
    load_state(p, sm, p.s_in, p.z_in, n * p.H + h, j0, cols);
    __syncthreads();
    return split();
  }
  __device__ void end() const {
    store_state(p, sm, p.s_out, p.z_out, n * p.H + h, j0, cols, tile == 0);
    __syncthreads();
  }
  // The state as hi / lo (/ s3) operands (tensor cores) and their scale; a barrier follows.
  __device__ float split() const {
    float up = 1.0f;
    if constexpr (Tr<T>::kTc) up = split_state(p, sm, s3);
    __syncthreads();
    return up;
  }

  // sm.p = scale FQ FK^T (s <= t) of the features in sm.q, sm.k.
  __device__ void qk_scores() const {
    gemm(sm, p.lay.C, p.lay.C, kLower, to_scores(), term<false, true>(Q(), K(), p.Fp, kFull, p.scale));
  }
  // sm.den (and den_out) of the chunk's rows from the unrotated features in sm.q, sm.k, or, with
  // `load`, loaded here (RoPE: the numerator's are rotated, loaded after).
  __device__ void chunk_den(int64_t c0, int rows, bool load, float* den_out) const {
    if (load) {
      load_q(c0, rows, false);
      load_k(c0, rows, false);
      __syncthreads();
    }
    qk_scores();
    __syncthreads();
    den_rows(p, sm, q0, c0, rows, true, den_out);
    __syncthreads();
  }
  // S += RK^T V (rk in three pieces where the walk has them)
  __device__ void add_kv() const {
    gemm(sm, p.Fp, p.lay.dvt, kFull, onto_state(), term3<true, false>(K3(), V(), p.lay.C));
  }
  // The global form's state: S += RK^T V and (with_z) z += colsum(FK) over the sequence; returns the
  // split's scale.
  __device__ float sum_kv(bool with_z) const {
    for (int64_t c0 = 0; c0 < s.len; c0 += p.lay.C) {
      const int rows = rows_in(s, c0, p.lay.C);
      load_k(c0, rows, rope, true);
      load_v(c0, rows);
      __syncthreads();
      add_kv();
      if (with_z) z_update(p, sm, k0, c0, rows, nullptr, 0);
      __syncthreads();
    }
    return split();
  }

  // A (token, head, Fp) float workspace slot, at the sequence's first token.
  __device__ float* slot(float* ws, int j) const { return ws + (j * p.ntok * p.H + row0) * p.Fp; }
  // A product's rows c0 + [0, rows) into a workspace slot.
  __device__ auto to_slot(float* at, int64_t c0, int rows) const {
    float* base = at + c0 * p.H * p.Fp;
    const int64_t st = int64_t{p.H} * p.Fp;
    return to_fn([=](int r, int c, auto v) {
      if (r < rows) base[r * st + c] = static_cast<float>(v);
    });
  }
  // Rows c0 + [0, rows) of a workspace slot set to sm.z (the global form's z_t, Gz_t).
  __device__ void z_to_slot(float* at, int64_t c0, int rows) const {
    for (int idx = threadIdx.x; idx < rows * p.F; idx += kThreads) {
      const int t = idx / p.F, f = idx - t * p.F;
      at[(c0 + t) * p.H * p.Fp + f] = static_cast<float>(sm.z[f]);
    }
  }
  // A product's rows c0 + [0, rows) into out (B, T, H, Dv), divided by den + eps when `normalize`.
  __device__ auto to_out(T* out, int64_t c0, int rows, bool normalize) const {
    T* base = out + (row0 + c0 * p.H) * p.Dv + j0;
    const int64_t st = int64_t{p.H} * p.Dv;
    const S* den = sm.den;
    const S eps = p.eps;
    const int nc = cols;
    return to_fn([=](int r, int c, auto v) {
      if (r < rows && c < nc) base[r * st + c] = from_f<T>(static_cast<float>(normalize ? v / (den[r] + eps) : v));
    });
  }
};

// fn(walk) for each of a launch's work items (grid-stride), then the item's final state.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_walk(const Params<T>& p, Fn fn) {
  extern __shared__ __align__(128) unsigned char la_smem[];
  for (int64_t w = blockIdx.x; w < p.nseq * p.H * p.ntiles; w += gridDim.x) {
    const Walk<T> W(p, la_smem, w);
    fn(W);
    W.end();
  }
}

// Forward: out, and the final state.
template <typename T>
__global__ void __launch_bounds__(kThreads) la_forward_kernel(const Params<T> p) {
  constexpr bool tc = Tr<T>::kTc;  // tensor cores: the state's products read its split, not the state
  const int C = p.lay.C, dvt = p.lay.dvt, Fp = p.Fp;
  for_each_walk(p, [&](const Walk<T>& W) {
    const auto& sm = W.sm;
    float s_up = W.begin();
    if (p.causal) {
      for (int64_t c0 = 0; c0 < W.s.len; c0 += C) {
        const int n = rows_in(W.s, c0, C);
        if (W.rope && p.normalize) W.chunk_den(c0, n, true, nullptr);
        W.load_q(c0, n, W.rope);
        W.load_k(c0, n, W.rope, true);
        W.load_v(c0, n);
        __syncthreads();
        if constexpr (tc) {
          W.add_kv();  // first: rk's third piece shares memory with the scores' buffers
          if (p.lay.state_sync) __syncthreads();
        }
        if (p.normalize && !W.rope) {
          W.chunk_den(c0, n, false, nullptr);  // its scores are the numerator's too
        } else {
          W.qk_scores();
          __syncthreads();
        }
        const float p_up = split_scores(p, sm, kLower, static_cast<const typename Tr<T>::S*>(nullptr), W.p3);
        __syncthreads();
        gemm(sm, C, dvt, kFull, W.to_out(p.out, c0, n, p.normalize),
             term<false, false>(W.Q(), W.state(), Fp, kFull, s_up * p.scale),
             term<false, false>(W.scores(), W.V(), C, kLower, p_up));
        if constexpr (!tc) {
          __syncthreads();
          W.add_kv();
        }
        z_update(p, sm, W.k0, c0, n, nullptr, 0);
        __syncthreads();
        s_up = W.split();
      }
    } else {
      s_up = W.sum_kv(true);
      for (int64_t c0 = 0; c0 < W.s.len; c0 += C) {  // out = RQ S / (FQ z + eps)
        const int n = rows_in(W.s, c0, C);
        W.load_q(c0, n, W.rope);
        __syncthreads();
        if (p.normalize) den_rows(p, sm, W.q0, c0, n, false, nullptr);
        __syncthreads();
        gemm(sm, C, dvt, kFull, W.to_out(p.out, c0, n, p.normalize),
             term<false, false>(W.Q(), W.state(), Fp, kFull, s_up * p.scale));
        __syncthreads();
      }
    }
  });
}

// Backward, forward walk: U_t = S_t g_t (this tile's share) into wsq[tile]; with normalize also den_t,
// the share of g_t . num_t = rq_t . U_t into dot[tile], and (tile 0) z_t into wsq[ntiles]. With
// normalize, den and g . num (through gd) feed dz0 and dS0: U exact (three pieces of the state, the
// scores and rk) and den_t = fq_t . z_t in float, as the reference has it.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) la_backward_fwd_kernel(const Params<T> p) {
  using S = typename Tr<T>::S;
  constexpr bool tc = Tr<T>::kTc;
  const int C = p.lay.C, dvt = p.lay.dvt, Fp = p.Fp;
  for_each_walk(p, [&](const Walk<T>& W) {
    const auto& sm = W.sm;
    float* u0 = W.slot(p.wsq, W.tile);
    float* zt0 = W.slot(p.wsq, p.ntiles);
    float* den0 = p.den + W.row0;
    float* dot0 = p.dot + W.tile * p.ntok * p.H + W.row0;
    const bool den_here = p.normalize && W.tile == 0;  // den and z_t: one tile's work
    // per row t of the chunk (a warp each), from the rows of U (and z_t) just written: the tile's share
    // of g_t . num_t = rq_t . U_t, and (den_here) den_t = fq_t . z_t (zt: the z_t rows; null: sm.z);
    // the features recomputed in float
    auto rows = [&](int64_t c0, int n, const float* zt) {
      const int lane = threadIdx.x & 31;
      for (int t = threadIdx.x >> 5; t < n; t += kWarps) {
        const T* x = W.q0 + (c0 + t) * p.q_st;
        const float* u = u0 + (c0 + t) * p.H * Fp;
        const float norm = row_norm(p, x);
        const float pos = W.rope ? position(p, W.s.b, W.s.start + c0 + t, c0 + t) : 0.0f;
        S dot = 0, den = 0;
        for (int f = lane; f < p.F; f += 32) {
          dot += static_cast<S>(feature_at(p, x, f, norm, W.rope, pos)) * static_cast<S>(u[f]);
          if (den_here) {
            const S zf = zt ? static_cast<S>(zt[(c0 + t) * p.H * Fp + f]) : static_cast<S>(sm.z[f]);
            den += static_cast<S>(feature(x, f, p.fmap, norm) * p.scale) * zf;
          }
        }
        dot = kx::warp_reduce(dot, kx::Sum());
        if (den_here) den = kx::warp_reduce(den, kx::Sum());
        if (lane == 0) {
          dot0[(c0 + t) * p.H] = static_cast<float>(dot * static_cast<S>(p.scale));
          if (den_here) den0[(c0 + t) * p.H] = static_cast<float>(den);
        }
      }
    };
    float s_up = W.begin();
    if (p.causal) {
      for (int64_t c0 = 0; c0 < W.s.len; c0 += C) {
        const int n = rows_in(W.s, c0, C);
        W.load_k(c0, n, W.rope, true);
        W.load_v(c0, n);
        W.load_g(c0, n);
        __syncthreads();
        if constexpr (tc) W.add_kv();  // first: rk's third piece is read after the scores' split
        gemm(sm, C, C, kLower, W.to_scores(), term<false, true>(W.G(), W.V(), dvt));
        __syncthreads();
        const float p_up = split_scores(p, sm, kLower, static_cast<const S*>(nullptr), W.p3);
        __syncthreads();
        gemm(sm, C, Fp, kFull, W.to_slot(u0, c0, n), term3<false, true>(W.G(), W.state(), dvt, kFull, s_up),
             term3<false, false>(W.scores(), W.K3(), C, kLower, p_up));
        if (den_here) z_update(p, sm, W.k0, c0, n, zt0 + c0 * p.H * Fp, int64_t{p.H} * Fp);
        __syncthreads();
        if (p.normalize) rows(c0, n, zt0);
        if constexpr (!tc) W.add_kv();  // float32: U read the state itself
        s_up = W.split();
      }
    } else {
      s_up = W.sum_kv(den_here);
      for (int64_t c0 = 0; c0 < W.s.len; c0 += C) {
        const int n = rows_in(W.s, c0, C);
        W.load_g(c0, n);
        __syncthreads();
        if (den_here) W.z_to_slot(zt0, c0, n);
        gemm(sm, C, Fp, kFull, W.to_slot(u0, c0, n), term3<false, true>(W.G(), W.state(), dvt, kFull, s_up));
        __syncthreads();
        if (p.normalize) rows(c0, n, nullptr);
      }
    }
  });
}

// Backward, reverse walk with G, Gz: dRK (this tile's share) into wsk[tile], dv, Gz_t into
// wsk[ntiles] (tile 0), dS0 and dz0.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) la_backward_rev_kernel(const Params<T> p) {
  using S = typename Tr<T>::S;
  constexpr bool tc = Tr<T>::kTc;
  const int C = p.lay.C, dvt = p.lay.dvt, Fp = p.Fp;
  for_each_walk(p, [&](const Walk<T>& W) {
    const auto& sm = W.sm;
    float* drk0 = W.slot(p.wsk, W.tile);
    float* gzt0 = W.tile == 0 ? W.slot(p.wsk, p.ntiles) : nullptr;
    const S* colscale = p.normalize ? sm.a : nullptr;  // M' o (.) scaled by a_s: the scores meet gN
    // rq, g, a, gd of a chunk, and gN = a g: the operands of G += RQ^T gN; returns gN's split scale
    auto load_q_side = [&](int64_t c0, int n) {
      W.load_q(c0, n, W.rope, true);
      W.load_g(c0, n);
      if (p.normalize) row_coefs(p, sm, W.row0 + c0 * p.H, n);
      __syncthreads();
      const float up = p.normalize ? split_gn(p, sm, W.g3) : 1.0f;
      __syncthreads();
      return up;
    };
    auto add_qgn = [&](float gn_up) {  // G += RQ^T gN, exact (rq's and gN's third pieces)
      const Opnd<T> gn = p.normalize ? Opnd<T>{sm.gnh, sm.gnl, p.lay.ldv, W.g3} : W.G();
      gemm(sm, Fp, dvt, kFull, W.onto_state(), term3<true, false>(W.Q3(), gn, C, kFull, gn_up * p.scale));
    };
    float g_up = W.begin();
    if (p.causal) {
      for (int64_t c0 = (W.s.len + C - 1) / C * C - C; c0 >= 0; c0 -= C) {  // the last chunk first
        const int n = rows_in(W.s, c0, C);
        W.load_k(c0, n, W.rope);
        W.load_v(c0, n);
        const float gn_up = load_q_side(c0, n);
        if constexpr (tc) {
          add_qgn(gn_up);  // first: the third pieces share memory with the scores' buffers
          if (p.lay.state_sync) __syncthreads();
        }
        gemm(sm, C, C, kUpper, W.to_scores(), term<false, true>(W.V(), W.G(), dvt));
        __syncthreads();
        float p_up = split_scores(p, sm, kUpper, colscale, static_cast<T*>(nullptr));
        __syncthreads();
        gemm(sm, C, Fp, kFull, W.to_slot(drk0, c0, n), term<false, true>(W.V(), W.state(), dvt, kFull, g_up),
             term<false, false>(W.scores(), W.Q(), C, kUpper, p_up * p.scale));
        __syncthreads();
        gemm(sm, C, C, kUpper, W.to_scores(), term<false, true>(W.K(), W.Q(), Fp, kFull, p.scale));
        __syncthreads();
        p_up = split_scores(p, sm, kUpper, colscale, static_cast<T*>(nullptr));
        __syncthreads();
        gemm(sm, C, dvt, kFull, W.to_out(p.out, c0, n, false), term<false, false>(W.K(), W.state(), Fp, kFull, g_up),
             term<false, false>(W.scores(), W.G(), C, kUpper, p_up));
        if constexpr (!tc) {
          __syncthreads();
          add_qgn(gn_up);
        }
        if (W.tile == 0) gz_update(p, sm, W.q0, c0, n, gzt0 ? gzt0 + c0 * p.H * Fp : nullptr, int64_t{p.H} * Fp);
        __syncthreads();
        g_up = W.split();
      }
    } else {
      for (int64_t c0 = 0; c0 < W.s.len; c0 += C) {  // G = dS + RQ^T gN, Gz = dz + sum gd fq
        const int n = rows_in(W.s, c0, C);
        add_qgn(load_q_side(c0, n));
        if (W.tile == 0) gz_update(p, sm, W.q0, c0, n, nullptr, 0);
        __syncthreads();
      }
      g_up = W.split();
      for (int64_t c0 = 0; c0 < W.s.len; c0 += C) {  // dRK = V G^T, dv = RK G, Gz_t = Gz
        const int n = rows_in(W.s, c0, C);
        W.load_k(c0, n, W.rope);
        W.load_v(c0, n);
        if (gzt0) W.z_to_slot(gzt0, c0, n);
        __syncthreads();
        gemm(sm, C, Fp, kFull, W.to_slot(drk0, c0, n), term<false, true>(W.V(), W.state(), dvt, kFull, g_up));
        gemm(sm, C, dvt, kFull, W.to_out(p.out, c0, n, false), term<false, false>(W.K(), W.state(), Fp, kFull, g_up));
        __syncthreads();
      }
    }
  });
}

// Backward, per token: d x = phi'(x)^T (Rot^T(sum of the tiles' shares, times a) + coef * slot
// ntiles), for q (mul = scale, coef = gd_t) and k (mul = 1, coef = 1). A warp per (token, head).
template <typename T>
__device__ void grad_row(const Params<T>& p, const float* ws, int64_t at, const T* x, T* dx, float pos, float a,
                         float coef, float mul, bool slot) {
  constexpr int kPer = kMaxDim / 32;
  const int lane = threadIdx.x & 31, off = p.fmap == kTaylor ? 1 : 0;
  const int64_t ws_slot = p.ntok * p.H * p.Fp;
  auto share = [&](int f) {
    float acc = 0.0f;
    for (int j = 0; j < p.ntiles; ++j) acc += ws[j * ws_slot + at + f];
    return a * acc;
  };
  float du[kPer];
  float udu = 0.0f, ss = 0.0f;
#pragma unroll
  for (int m = 0; m < kPer; ++m) {
    const int d = lane + 32 * m;
    du[m] = 0.0f;
    if (d < p.Dk) {
      float gf = share(d + off);
      if (p.inv_freq) {  // Rot^T: the rotation by -angle
        const Pair pr = pair_of(d, p.Dk, p.interleaved);
        float sn, cs;
        sincosf(pos * p.inv_freq[pr.i], &sn, &cs);
        const float gp = share(pr.partner + off);
        gf = pr.first ? gf * cs + gp * sn : gf * cs - gp * sn;
      }
      if (slot) gf += coef * ws[p.ntiles * ws_slot + at + d + off];
      du[m] = mul * gf;
      if (p.fmap == kTaylor) {
        const float xv = to_f(x[d]);
        ss += xv * xv;
      }
    }
  }
  float norm = 0.0f;
  if (p.fmap == kTaylor) {  // dx = (du - u (u . du)) / |x|, u = x / max(|x|, 1e-12)
    norm = sqrtf(kx::warp_reduce(ss, kx::Sum()));
    const float nc = fmaxf(norm, kTaylorNormMin);
#pragma unroll
    for (int m = 0; m < kPer; ++m) {
      const int d = lane + 32 * m;
      if (d < p.Dk) udu += to_f(x[d]) / nc * du[m];
    }
    udu = kx::warp_reduce(udu, kx::Sum());
  }
#pragma unroll
  for (int m = 0; m < kPer; ++m) {
    const int d = lane + 32 * m;
    if (d < p.Dk) {
      const float xv = to_f(x[d]);
      float r;
      if (p.fmap == kTaylor) {
        r = norm > kTaylorNormMin ? (du[m] - xv / norm * udu) / norm : du[m] / kTaylorNormMin;
      } else {
        r = du[m] * dfeature(xv, p.fmap);
      }
      dx[d] = from_f<T>(r);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) la_backward_combine_kernel(const Params<T> p, T* dq, T* dk) {
  using S = typename Tr<T>::S;
  const int64_t items = p.ntok * p.H;
  for (int64_t it = int64_t{blockIdx.x} * kWarps + (threadIdx.x >> 5); it < items; it += int64_t{gridDim.x} * kWarps) {
    const int64_t tok = it / p.H;
    const int h = static_cast<int>(it - tok * p.H);
    const int64_t b = tok / p.seqlen, t = tok - b * p.seqlen;
    float pos = 0.0f;
    if (p.inv_freq) {
      int64_t first = 0;  // the token's sequence start (default positions restart there)
      if (p.cu && !p.pos) {
        int64_t lo = 0, hi = p.nseq;  // largest n with cu[n] <= t (sequences may be empty)
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) >> 1;
          if (p.cu[mid] <= t) lo = mid;
          else hi = mid - 1;
        }
        first = p.cu[lo];
      }
      pos = position(p, b, t, t - first);
    }
    float a = 1.0f, gd = 0.0f;
    if (p.normalize) {
      S dot = 0;
      for (int j = 0; j < p.ntiles; ++j) dot += static_cast<S>(p.dot[j * items + it]);
      const S as = S(1) / (static_cast<S>(p.den[it]) + static_cast<S>(p.eps));
      a = static_cast<float>(as);
      gd = static_cast<float>(-as * as * dot);
    }
    const int64_t at = it * p.Fp;
    grad_row(p, p.wsq, at, p.q + b * p.q_sb + t * p.q_st + h * p.q_sh, dq + it * p.Dk, pos, a, gd, p.scale,
             p.normalize);
    grad_row(p, p.wsk, at, p.k + b * p.k_sb + t * p.k_st + h * p.k_sh, dk + it * p.Dk, pos, 1.0f, 1.0f, 1.0f, true);
  }
}

// Decoding step: a block per (batch, head); threads over (value column, group of feature rows), the
// groups' partial numerators summed in shared memory.
template <typename T>
struct StepParams {
  const T* q;
  const T* k;
  const T* v;
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  const float* S;
  const float* z;
  T* out;
  float* S_new;
  float* z_new;
  int64_t B;
  int H, Dk, Dv, F, fmap;
  float scale, eps;
  bool normalize;
};

template <typename T>
__global__ void __launch_bounds__(kStepThreads) la_step_kernel(const StepParams<T> p) {
  using S = typename Tr<T>::S;
  extern __shared__ __align__(16) unsigned char step_smem[];
  S* part = reinterpret_cast<S*>(step_smem);              // (groups, Dv)
  S* red = part + kStepThreads / 32 * p.Dv;               // 32
  float* fq = reinterpret_cast<float*>(red + 32);         // F
  float* fk = fq + p.F;                                   // F
  float* norms = fk + p.F;                                // 2
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int width = min(kStepThreads, (p.Dv + 31) / 32 * 32), groups = kStepThreads / width;
  const int g = tid / width, c = tid - g * width;
  for (int64_t w = blockIdx.x; w < p.B * p.H; w += gridDim.x) {
    const int64_t b = w / p.H;
    const int h = static_cast<int>(w - b * p.H);
    const T* q = p.q + b * p.q_sb + h * p.q_sh;
    const T* k = p.k + b * p.k_sb + h * p.k_sh;
    const T* v = p.v + b * p.v_sb + h * p.v_sh;
    const float* S0 = p.S + w * p.F * p.Dv;
    float* S1 = p.S_new + w * p.F * p.Dv;
    if (p.fmap == kTaylor && warp < 2) {
      const T* x = warp == 0 ? q : k;
      float ss = 0.0f;
      for (int d = lane; d < p.Dk; d += 32) ss += to_f(x[d]) * to_f(x[d]);
      ss = kx::warp_reduce(ss, kx::Sum());
      if (lane == 0) norms[warp] = fmaxf(sqrtf(ss), kTaylorNormMin);
    }
    __syncthreads();
    S den = 0;
    for (int f = tid; f < p.F; f += kStepThreads) {
      fq[f] = feature(q, f, p.fmap, p.fmap == kTaylor ? norms[0] : 1.0f) * p.scale;
      fk[f] = feature(k, f, p.fmap, p.fmap == kTaylor ? norms[1] : 1.0f);
      const float zn = p.z[w * p.F + f] + fk[f];
      p.z_new[w * p.F + f] = zn;
      den += static_cast<S>(fq[f]) * static_cast<S>(zn);
    }
    if (p.normalize) den = kx::block_reduce(den, kx::Sum(), red);
    __syncthreads();
    if (g < groups) {
      for (int j = c; j < p.Dv; j += width) {
        const float vj = to_f(v[j]);
        S acc = 0;
        for (int f = g; f < p.F; f += groups) {
          const float s1 = S0[f * p.Dv + j] + fk[f] * vj;
          S1[f * p.Dv + j] = s1;
          acc += static_cast<S>(fq[f]) * static_cast<S>(s1);
        }
        part[g * p.Dv + j] = acc;
      }
    }
    __syncthreads();
    for (int j = tid; j < p.Dv; j += kStepThreads) {
      S num = 0;
      for (int gg = 0; gg < groups; ++gg) num += part[gg * p.Dv + j];
      p.out[w * p.Dv + j] = from_f<T>(static_cast<float>(p.normalize ? num / (den + static_cast<S>(p.eps)) : num));
    }
    __syncthreads();
  }
}

// ---- host ----

struct Checked {  // what the checks found
  int64_t B, T, H, Dk, Dv, F, N;
};

void check_floating(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
}

void check_state(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), op, ": ", name, " must be a CUDA tensor on q's device");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, op, ": ", name,
              " must be a contiguous float32 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

void check_dims(const char* op, int64_t Dk, int64_t Dv) {
  TORCH_CHECK(Dk >= 1 && Dk <= kMaxDim && Dv >= 1 && Dv <= kMaxDim, op, ": head dims must be in [1, ", kMaxDim,
              "], got Dk=", Dk, ", Dv=", Dv);
}

void check_common(const char* op, const at::Tensor& q, int64_t feature_map) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt != at::kDouble, op, ": float64 is supported on CPU only");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(feature_map >= 0 && feature_map <= 3, op, ": feature_map must be 0 (identity), 1 (elu1), 2 (relu) or ",
              "3 (taylor), got ", feature_map);
}

Checked check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                   const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& positions,
                   const std::optional<at::Tensor>& inv_freq, int64_t feature_map) {
  check_common(op, q, feature_map);
  check_floating(op, k, "k", q);
  check_floating(op, v, "v", q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (batch, seq, heads, dim), got ",
              q.dim(), "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  Checked c{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3), 0, 0};
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == c.B && v.size(1) == c.T && v.size(2) == c.H, op, ": v must be (", c.B, ", ", c.T, ", ", c.H,
              ", Dv), got ", v.sizes());
  check_dims(op, c.Dk, c.Dv);
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, op, ": q, k, v must have unit stride in the last dimension");
  }
  c.F = feature_map == kTaylor ? c.Dk + 1 : c.Dk;
  c.N = c.B;
  if (cu_seqlens) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK(cu.is_cuda() && cu.device() == q.device(), op, ": cu_seqlens must be on q's device");
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1 && cu.is_contiguous(), op,
                ": cu_seqlens must be a contiguous int32 vector (N + 1,)");
    TORCH_CHECK(c.B == 1, op, ": cu_seqlens needs packed input of batch 1, got batch ", c.B);
    c.N = cu.size(0) - 1;
  }
  TORCH_CHECK(S0.has_value() == z0.has_value(), op, ": S0 and z0 must be given together");
  if (S0) {
    check_state(op, *S0, "S0", {c.N, c.H, c.F, c.Dv}, q);
    check_state(op, *z0, "z0", {c.N, c.H, c.F}, q);
  }
  if (inv_freq) {
    const auto& f = *inv_freq;
    TORCH_CHECK(c.Dk % 2 == 0, op, ": RoPE needs an even head dim, got Dk=", c.Dk);
    TORCH_CHECK(f.is_cuda() && f.device() == q.device() && f.scalar_type() == at::kFloat && f.dim() == 1 &&
                    f.size(0) == c.Dk / 2 && f.is_contiguous(),
                op, ": inv_freq must be a contiguous float32 (", c.Dk / 2, ",) tensor on q's device");
  }
  if (positions) {
    const auto& t = *positions;
    TORCH_CHECK(t.is_cuda() && t.device() == q.device() && t.scalar_type() == at::kLong && t.dim() == 2 &&
                    (t.size(0) == 1 || t.size(0) == c.B) && t.size(1) == c.T,
                op, ": positions must be an int64 (1 or ", c.B, ", ", c.T, ") tensor on q's device, got ",
                t.scalar_type(), " ", t.sizes());
  }
  return c;
}

template <typename T>
Params<T> make_params(const Checked& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& positions,
                      const std::optional<at::Tensor>& inv_freq, bool interleaved, int64_t feature_map, double scale,
                      bool normalize, double eps, bool causal) {
  Params<T> p;
  p.q = reinterpret_cast<const T*>(q.const_data_ptr());
  p.k = reinterpret_cast<const T*>(k.const_data_ptr());
  p.v = reinterpret_cast<const T*>(v.const_data_ptr());
  p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_st = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_st = v.stride(1), p.v_sh = v.stride(2);
  if (cu_seqlens) p.cu = cu_seqlens->const_data_ptr<int32_t>();
  p.nseq = c.N;
  p.seqlen = c.T;
  if (inv_freq) {
    p.inv_freq = inv_freq->const_data_ptr<float>();
    if (positions) {
      p.pos = positions->const_data_ptr<int64_t>();
      p.pos_sb = positions->size(0) == 1 ? 0 : positions->stride(0);
      p.pos_st = positions->stride(1);
    }
  }
  p.interleaved = interleaved;
  p.fmap = static_cast<int>(feature_map);
  p.scale = static_cast<float>(scale);
  p.eps = static_cast<float>(eps);
  p.normalize = normalize;
  p.causal = causal;
  p.H = static_cast<int>(c.H);
  p.Dk = static_cast<int>(c.Dk);
  p.Dv = static_cast<int>(c.Dv);
  p.F = static_cast<int>(c.F);
  p.Fp = (p.F + 15) / 16 * 16;
  p.ntok = c.B * c.T;
  return p;
}

// The chunk and value-tile sizes: the largest that fit the device's shared memory, a long chunk first
// (tensor-core work per chunk) but no longer than the padded sequences, and value tiles of up to 64
// columns (a tile's block recomputes the chunk's scores: wider tiles, less of that, but fewer blocks).
// The forward: p.lay; the backward: the reverse walk's p.lay and the forward walk's *walk_lay, with the
// same sizes. Compact layouts only when nothing else fits.
template <typename T>
void choose_layout(Params<T>& p, int device, Layout* walk_lay = nullptr) {
  const int64_t limit = kx::max_smem_optin(device);
  const int dv16 = (p.Dv + 15) / 16 * 16;
  const bool exact = p.inv_freq == nullptr && (p.fmap == kIdentity || p.fmap == kRelu);
  int cmax = Tr<T>::kTc ? 64 : 32;
  while (cmax > 16 && cmax / 2 >= p.seqlen) cmax /= 2;
  for (bool compact : {false, true}) {
    for (int C = cmax; C >= 16; C /= 2) {
      for (int dvt : {std::min(dv16, 64), 32, 16}) {
        if (dvt > dv16) continue;
        const Layout l = make_layout<T>(walk_lay ? kBackwardReverseWalk : kForwardWalk, C, p.Fp, dvt, exact,
                                        p.normalize, compact);
        const Layout w =
            walk_lay ? make_layout<T>(kBackwardForwardWalk, C, p.Fp, dvt, exact, p.normalize, compact) : l;
        if (l.bytes <= limit && w.bytes <= limit) {
          p.lay = l;
          if (walk_lay) *walk_lay = w;
          p.ntiles = (p.Dv + dvt - 1) / dvt;
          return;
        }
      }
    }
  }
  TORCH_CHECK(false, "linear_attention: head dims Dk=", p.Dk, ", Dv=", p.Dv,
              " need more shared memory than the device's ", limit, " bytes per block");
}

// A walk kernel: a block per (sequence, head, value tile), grid-stride.
template <typename T, typename K>
void launch_walk(K kernel, const Params<T>& p) {
  const int64_t items = p.nseq * p.H * p.ntiles;
  if (items == 0) return;
  if (p.lay.bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(p.lay.bytes)));
  const auto grid = static_cast<unsigned>(std::min<int64_t>(items, kx::max_grid_x()));
  kernel<<<grid, kThreads, p.lay.bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& S0,
    const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& inv_freq, bool interleaved,
    int64_t feature_map, double scale, bool normalize, double eps, bool causal) {
  const char* op = "linear_attention";
  const Checked c = check_args(op, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, feature_map);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({c.B, c.T, c.H, c.Dv}, q.options());
  auto S = at::empty({c.N, c.H, c.F, c.Dv}, q.options().dtype(at::kFloat));
  auto z = at::empty({c.N, c.H, c.F}, q.options().dtype(at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                                 normalize, eps, causal);
    p.out = reinterpret_cast<T*>(out.data_ptr());
    if (S0) {
      p.s_in = S0->const_data_ptr<float>();
      p.z_in = z0->const_data_ptr<float>();
    }
    p.s_out = S.data_ptr<float>();
    p.z_out = z.data_ptr<float>();
    choose_layout(p, q.get_device());
    launch_walk(la_forward_kernel<T>, p);
  };
  switch (q.scalar_type()) {
    case at::kHalf: run(__half()); break;
    case at::kBFloat16: run(__nv_bfloat16()); break;
    default: run(float()); break;
  }
  return {out, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_backward_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dS, const std::optional<at::Tensor>& dz,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& S0,
    const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& inv_freq, bool interleaved,
    int64_t feature_map, double scale, bool normalize, double eps, bool causal) {
  const char* op = "linear_attention_backward";
  const Checked c = check_args(op, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, feature_map);
  check_floating(op, dout, "dout", q);
  TORCH_CHECK(dout.is_contiguous() && dout.dim() == 4 && dout.size(0) == c.B && dout.size(1) == c.T &&
                  dout.size(2) == c.H && dout.size(3) == c.Dv,
              op, ": dout must be a contiguous (", c.B, ", ", c.T, ", ", c.H, ", ", c.Dv, ") tensor, got ",
              dout.sizes());
  if (dS) check_state(op, *dS, "dS", {c.N, c.H, c.F, c.Dv}, q);
  if (dz) check_state(op, *dz, "dz", {c.N, c.H, c.F}, q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty({c.B, c.T, c.H, c.Dk}, q.options());
  auto dk = at::empty({c.B, c.T, c.H, c.Dk}, q.options());
  auto dv = at::empty({c.B, c.T, c.H, c.Dv}, q.options());
  auto dS0 = at::empty({c.N, c.H, c.F, c.Dv}, q.options().dtype(at::kFloat));
  auto dz0 = at::empty({c.N, c.H, c.F}, q.options().dtype(at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(c, q, k, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                                 normalize, eps, causal);
    Layout walk_lay;
    choose_layout(p, q.get_device(), &walk_lay);
    const auto f32 = q.options().dtype(at::kFloat);
    // workspaces: the value tiles' shares of d rq / a and d rk, then z_t and Gz_t; den_t; g_t . num_t
    const at::Tensor wsq = at::empty({(p.ntiles + 1) * p.ntok * c.H * p.Fp}, f32);
    const at::Tensor wsk = at::empty({(p.ntiles + 1) * p.ntok * c.H * p.Fp}, f32);
    const at::Tensor den = at::empty({normalize ? p.ntok * c.H : 0}, f32);
    const at::Tensor dot = at::empty({normalize ? p.ntiles * p.ntok * c.H : 0}, f32);
    p.g = reinterpret_cast<const T*>(dout.const_data_ptr());
    p.wsq = wsq.data_ptr<float>();
    p.wsk = wsk.data_ptr<float>();
    p.den = den.data_ptr<float>();
    p.dot = dot.data_ptr<float>();
    Params<T> fwd = p;
    fwd.lay = walk_lay;
    if (S0) {
      fwd.s_in = S0->const_data_ptr<float>();
      fwd.z_in = z0->const_data_ptr<float>();
    }
    launch_walk(la_backward_fwd_kernel<T>, fwd);
    Params<T> rev = p;
    rev.s_in = dS ? dS->const_data_ptr<float>() : nullptr;
    rev.z_in = dz ? dz->const_data_ptr<float>() : nullptr;
    rev.s_out = dS0.data_ptr<float>();
    rev.z_out = dz0.data_ptr<float>();
    rev.out = reinterpret_cast<T*>(dv.data_ptr());
    launch_walk(la_backward_rev_kernel<T>, rev);
    const int64_t items = p.ntok * c.H;
    if (items > 0) {
      const auto grid = static_cast<unsigned>(std::min<int64_t>((items + kWarps - 1) / kWarps, kx::max_grid_x()));
      la_backward_combine_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          p, reinterpret_cast<T*>(dq.data_ptr()), reinterpret_cast<T*>(dk.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  switch (q.scalar_type()) {
    case at::kHalf: run(__half()); break;
    case at::kBFloat16: run(__nv_bfloat16()); break;
    default: run(float()); break;
  }
  return {dq, dk, dv, dS0, dz0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_step_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                          const at::Tensor& v, const at::Tensor& S,
                                                                          const at::Tensor& z, int64_t feature_map,
                                                                          double scale, bool normalize, double eps) {
  const char* op = "linear_attention_step";
  check_common(op, q, feature_map);
  check_floating(op, k, "k", q);
  check_floating(op, v, "v", q);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be 3-D (batch, heads, dim)");
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(2);
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == B && v.size(1) == H, op, ": k must have q's shape ", q.sizes(),
              " and v (", B, ", ", H, ", Dv), got ", k.sizes(), " and ", v.sizes());
  check_dims(op, Dk, Dv);
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(2) == 1 || t->size(2) == 1, op, ": q, k, v must have unit stride in the last dimension");
  }
  const int64_t F = feature_map == kTaylor ? Dk + 1 : Dk;
  check_state(op, S, "S", {B, H, F, Dv}, q);
  check_state(op, z, "z", {B, H, F}, q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({B, H, Dv}, q.options());
  auto S_new = at::empty({B, H, F, Dv}, S.options());
  auto z_new = at::empty({B, H, F}, z.options());
  if (B * H == 0) return {out, S_new, z_new};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    using St = typename Tr<T>::S;
    StepParams<T> p{reinterpret_cast<const T*>(q.const_data_ptr()), reinterpret_cast<const T*>(k.const_data_ptr()),
                    reinterpret_cast<const T*>(v.const_data_ptr()), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                    v.stride(0), v.stride(1), S.const_data_ptr<float>(), z.const_data_ptr<float>(),
                    reinterpret_cast<T*>(out.data_ptr()), S_new.data_ptr<float>(), z_new.data_ptr<float>(), B,
                    static_cast<int>(H), static_cast<int>(Dk), static_cast<int>(Dv), static_cast<int>(F),
                    static_cast<int>(feature_map), static_cast<float>(scale), static_cast<float>(eps), normalize};
    const int64_t smem = (kStepThreads / 32 * Dv + 32) * sizeof(St) + (2 * F + 2) * sizeof(float);
    const auto grid = static_cast<unsigned>(std::min<int64_t>(B * H, kx::max_grid_x()));
    la_step_kernel<T><<<grid, kStepThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (q.scalar_type()) {
    case at::kHalf: run(__half()); break;
    case at::kBFloat16: run(__nv_bfloat16()); break;
    default: run(float()); break;
  }
  return {out, S_new, z_new};
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CUDA, m) {
  m.impl("linear_attention", &kxops::linear_attention_cuda);
  m.impl("linear_attention_backward", &kxops::linear_attention_backward_cuda);
  m.impl("linear_attention_step", &kxops::linear_attention_step_cuda);
}
