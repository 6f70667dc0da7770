// CUDA implementations of kxops::rope, rope_, rope_qk, rope_qk_ (docs/rope_kernel_contract.md).
//
// The op is memory bound, so the kernel is built around one pass over q and k:
// - a block owns `tok` consecutive tokens (b * S + s) and first fills a shared table with
//   (cos, sin) of each of their rotary pairs: one sincosf per token and pair, whatever the number
//   of heads of q and k;
// - it then streams over (token, head) items of q then k. threadIdx.x picks a "slot" of the head
//   (a piece of the rotary part, or of the pass-through part d >= R when the output is a new
//   tensor), threadIdx.y walks the items, kUnroll of them loaded before the first is used (the
//   first batch is loaded before the table is filled, to overlap the two);
// - on the fast path (unit stride on D, 16-byte aligned rows) a slot is one 16-byte vector:
//   interleaved, VEC/2 adjacent pairs; rotate-half, VEC coordinates of the first half and the VEC
//   matching ones of the second half. Otherwise a slot is one pair, read through the D stride.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../rope.h"
#include "kx_cuda.cuh"

namespace kxops {
namespace {

constexpr int kThreads = 256;      // threads per block
constexpr int kUnroll = 4;         // (token, head) items in flight per thread
constexpr int kTablePairs = 1024;  // most (cos, sin) pairs per token in a block's table (8 KB)
constexpr int kSmemBytes = 32 * 1024;
constexpr int kMaxTok = 64;        // most tokens per block

// Scalar path: one element <-> float.
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Vector path: two adjacent elements as one word <-> float2. 16-bit data stays packed in 32-bit
// registers (a struct of 16-bit values would be split into one register per value).
template <typename T> struct Pair;
template <> struct Pair<float> {
  using Word = float2;
  static __device__ __forceinline__ float2 to_float2(float2 w) { return w; }
  static __device__ __forceinline__ float2 from_float2(float2 f) { return f; }
};
template <> struct Pair<__half> {
  using Word = uint32_t;
  static __device__ __forceinline__ float2 to_float2(uint32_t w) {
    __half2 h;
    memcpy(&h, &w, sizeof(w));
    return __half22float2(h);
  }
  static __device__ __forceinline__ uint32_t from_float2(float2 f) {
    const __half2 h = __floats2half2_rn(f.x, f.y);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};
template <> struct Pair<__nv_bfloat16> {
  using Word = uint32_t;
  static __device__ __forceinline__ float2 to_float2(uint32_t w) {  // bf16 is the top half of a float
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t from_float2(float2 f) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f.x, f.y);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// What one load moves: an element (VEC == 1), else 16 bytes as VEC / 2 words of two elements.
template <typename T, int VEC>
using Chunk = std::conditional_t<VEC == 1, Vec<T, 1>, Vec<typename Pair<T>::Word, VEC / 2>>;

// How a slot maps to coordinates. VEC == 1: the general-stride path, one pair per slot.
template <int VEC, bool INTERLEAVED>
struct Layout {
  static constexpr int NV = (VEC > 1 && INTERLEAVED) ? 1 : 2;  // loads of VEC elements per slot
  static constexpr int PPS = NV == 1 ? VEC / 2 : VEC;           // pairs per slot
  // First coordinate of load v of rotary slot `slot`; pair `slot * PPS + e` is
  // (load0[2e], load0[2e+1]) when NV == 1, else (load0[e], load1[e]).
  static __device__ __forceinline__ int64_t coord(int slot, int v, int half) {
    if constexpr (NV == 1) return static_cast<int64_t>(slot) * VEC;
    else if constexpr (INTERLEAVED) return 2 * static_cast<int64_t>(slot) + v;
    else return static_cast<int64_t>(slot) * VEC + v * half;
  }
};

template <typename T>
struct Operand {  // q or k: input and output views (out == in for the in-place ops)
  const T* in = nullptr;
  T* out = nullptr;
  int64_t in_sb = 0, in_ss = 0, in_sh = 0, in_sd = 0;
  int64_t out_sb = 0, out_ss = 0, out_sh = 0, out_sd = 0;
  int heads = 0;
};

template <typename T>
struct Params {
  Operand<T> q, k;          // k.heads == 0 for rope / rope_
  RopePositions pos;
  const float* inv_freq = nullptr;
  const int32_t* axis = nullptr;  // null: every pair follows axis 0
  int64_t ntok = 0, seqlen = 0;   // ntok = B * S
  int64_t ngroups = 0;            // groups of `tok` tokens, one per block (grid-stride)
  int tok = 1;
  int rotary_dim = 0;
  int nrot = 0, nslot = 0;        // slots per head: [0, nrot) rotate, [nrot, nslot) copy d >= R
  int chunk = 0;                  // slots per blockIdx.y
  bool conjugate = false;
};

// A block's token group: tokens tok0 + [0, ntok), tok0 = b0 * S + s0.
struct Group {
  int64_t b0, s0;
  int ntok, nitems;  // nitems = ntok * heads
};

template <typename T>
__device__ __forceinline__ void token_of(const Params<T>& p, const Group& g, int t, int64_t& b, int64_t& s) {
  b = g.b0;
  s = g.s0 + t;
  if (s >= p.seqlen) {  // the group crosses a sequence boundary
    const int64_t q = s / p.seqlen;
    b += q;
    s -= q * p.seqlen;
  }
}

template <typename P>
struct Row {
  P ptr;
  int64_t sd;
  int t;  // token within the group
};

// Item `it` of a group is token it / heads, head it % heads (q's heads first, then k's).
// Row pointers are recomputed at store time rather than kept live across the loads.
template <bool OUT, typename T>
__device__ __forceinline__ auto row_of(const Params<T>& p, const Group& g, int heads, int it) {
  const int t = it / heads;
  const int h = it - t * heads;
  const bool is_k = h >= p.q.heads;
  const int64_t hh = is_k ? h - p.q.heads : h;
  int64_t b, s;
  token_of(p, g, t, b, s);
  if constexpr (OUT) {
    T* ptr = (is_k ? p.k.out : p.q.out) + b * (is_k ? p.k.out_sb : p.q.out_sb) +
             s * (is_k ? p.k.out_ss : p.q.out_ss) + hh * (is_k ? p.k.out_sh : p.q.out_sh);
    return Row<T*>{ptr, is_k ? p.k.out_sd : p.q.out_sd, t};
  } else {
    const T* ptr = (is_k ? p.k.in : p.q.in) + b * (is_k ? p.k.in_sb : p.q.in_sb) +
                   s * (is_k ? p.k.in_ss : p.q.in_ss) + hh * (is_k ? p.k.in_sh : p.q.in_sh);
    return Row<const T*>{ptr, is_k ? p.k.in_sd : p.q.in_sd, t};
  }
}

template <int VEC, typename T>
__device__ __forceinline__ Chunk<T, VEC> load(const T* row, int64_t c, int64_t sd) {
  if constexpr (VEC == 1) return Chunk<T, 1>{{row[c * sd]}};
  else return kx::load_aligned<Chunk<T, VEC>>(row + c);  // 16-byte aligned: checked on the host
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* row, int64_t c, int64_t sd, const Chunk<T, VEC>& x) {
  if constexpr (VEC == 1) row[c * sd] = x.v[0];
  else kx::store_aligned(row + c, x);
}

// First coordinate of load v of slot `slot`: a rotary slot (slot < nrot) makes NV loads, a
// pass-through slot one, at R + (slot - nrot) * VEC.
template <int VEC, bool INTERLEAVED, typename T>
__device__ __forceinline__ int64_t slot_coord(const Params<T>& p, int slot, int v) {
  if (slot < p.nrot) return Layout<VEC, INTERLEAVED>::coord(slot, v, p.rotary_dim / 2);
  return p.rotary_dim + static_cast<int64_t>(slot - p.nrot) * VEC;
}

template <typename T, int VEC, bool INTERLEAVED>
struct Batch {  // the loads of kUnroll items of one slot
  Chunk<T, VEC> x[kUnroll][Layout<VEC, INTERLEAVED>::NV];
};

// Issues the loads of items it0 + u * blockDim.y (u < kUnroll) of slot `slot`.
template <int VEC, bool INTERLEAVED, typename T>
__device__ __forceinline__ void load_batch(const Params<T>& p, const Group& g, int heads, int slot, int it0,
                                           Batch<T, VEC, INTERLEAVED>& bt) {
  constexpr int NV = Layout<VEC, INTERLEAVED>::NV;
  const int nv = slot < p.nrot ? NV : 1;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int it = it0 + u * static_cast<int>(blockDim.y);
    if (it < g.nitems) {
      const auto r = row_of<false>(p, g, heads, it);
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        if (v < nv) bt.x[u][v] = load<VEC>(r.ptr, slot_coord<VEC, INTERLEAVED>(p, slot, v), r.sd);
      }
    }
  }
}

// Rotates the PPS pairs of one slot of one item; cs: their (cos, sin), 16-byte aligned when PPS > 1.
template <int VEC, bool INTERLEAVED, typename T>
__device__ __forceinline__ void rotate(Chunk<T, VEC> (&x)[Layout<VEC, INTERLEAVED>::NV], const float2* cs) {
  if constexpr (VEC == 1) {  // x[0], x[1]: the pair's two coordinates
    const float2 k = cs[0];
    const float a = Cvt<T>::to_float(x[0].v[0]), b = Cvt<T>::to_float(x[1].v[0]);
    x[0].v[0] = Cvt<T>::from_float(a * k.x - b * k.y);
    x[1].v[0] = Cvt<T>::from_float(a * k.y + b * k.x);
  } else {
#pragma unroll
    for (int w = 0; w < VEC / 2; ++w) {  // a float4 of cs: (cos, sin) of two pairs
      if constexpr (INTERLEAVED) {  // word w is pair w
        const float4 k4 = kx::load_aligned<float4>(cs + w / 2 * 2);
        const float2 k = w % 2 == 0 ? make_float2(k4.x, k4.y) : make_float2(k4.z, k4.w);
        const float2 f = Pair<T>::to_float2(x[0].v[w]);
        x[0].v[w] = Pair<T>::from_float2(make_float2(f.x * k.x - f.y * k.y, f.x * k.y + f.y * k.x));
      } else {  // word w of x[0] / x[1]: first / second coordinates of pairs 2w and 2w+1
        const float4 k = kx::load_aligned<float4>(cs + 2 * w);
        const float2 a = Pair<T>::to_float2(x[0].v[w]), b = Pair<T>::to_float2(x[1].v[w]);
        x[0].v[w] = Pair<T>::from_float2(make_float2(a.x * k.x - b.x * k.y, a.y * k.z - b.y * k.w));
        x[1].v[w] = Pair<T>::from_float2(make_float2(a.x * k.y + b.x * k.x, a.y * k.w + b.y * k.z));
      }
    }
  }
}

// Rotates (rotary slot) and stores the batch. cs: the table of this group, slot0: its first slot.
template <int VEC, bool INTERLEAVED, typename T>
__device__ __forceinline__ void store_batch(const Params<T>& p, const Group& g, int heads, int slot, int it0,
                                            Batch<T, VEC, INTERLEAVED>& bt, const float2* table, int slot0) {
  using L = Layout<VEC, INTERLEAVED>;
  const bool rot = slot < p.nrot;
  const int nv = rot ? L::NV : 1;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int it = it0 + u * static_cast<int>(blockDim.y);
    if (it < g.nitems) {
      const auto r = row_of<true>(p, g, heads, it);
      if (rot) rotate<VEC, INTERLEAVED, T>(bt.x[u], table + r.t * p.chunk * L::PPS + (slot - slot0) * L::PPS);
#pragma unroll
      for (int v = 0; v < L::NV; ++v) {
        if (v < nv) store<VEC>(r.ptr, slot_coord<VEC, INTERLEAVED>(p, slot, v), r.sd, bt.x[u][v]);
      }
    }
  }
}

template <typename T, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads) rope_kernel(const Params<T> p) {
  constexpr int PPS = Layout<VEC, INTERLEAVED>::PPS;
  // (cos, sin) of the group's tokens and this chunk's pairs: [tok][chunk * PPS], 16-byte aligned.
  extern __shared__ __align__(16) unsigned char smem[];
  float2* table = reinterpret_cast<float2*>(smem);

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int slot0 = blockIdx.y * p.chunk;
  const int nslot = min(p.chunk, p.nslot - slot0);         // this block's slots: slot0 + [0, nslot)
  const int tpairs = max(0, min(p.nrot - slot0, nslot)) * PPS;  // pairs of its rotary slots
  const int heads = p.q.heads + p.k.heads;
  const int step = blockDim.y * kUnroll;

  for (int64_t grp = blockIdx.x; grp < p.ngroups; grp += gridDim.x) {
    const int64_t tok0 = grp * p.tok;
    Group g;
    g.b0 = tok0 / p.seqlen;
    g.s0 = tok0 - g.b0 * p.seqlen;
    g.ntok = static_cast<int>(p.ntok - tok0 < p.tok ? p.ntok - tok0 : p.tok);
    g.nitems = g.ntok * heads;

    // The first batch does not need the table: its loads are in flight while the table is filled.
    Batch<T, VEC, INTERLEAVED> bt;
    const bool first = static_cast<int>(threadIdx.x) < nslot && static_cast<int>(threadIdx.y) < g.nitems;
    if (first) load_batch<VEC, INTERLEAVED>(p, g, heads, slot0 + threadIdx.x, threadIdx.y, bt);

    for (int e = tid; e < g.ntok * tpairs; e += nthreads) {
      const int t = e / tpairs, j = e - t * tpairs;
      const int64_t i = static_cast<int64_t>(slot0) * PPS + j;  // pair index in [0, R/2)
      int64_t b, s;
      token_of(p, g, t, b, s);
      const int64_t pos = p.pos.at(b, s, p.axis ? p.axis[i] : 0);
      float sn, cs;
      sincosf(static_cast<float>(pos) * p.inv_freq[i], &sn, &cs);
      table[t * p.chunk * PPS + j] = make_float2(cs, p.conjugate ? -sn : sn);
    }
    __syncthreads();

    if (first) store_batch<VEC, INTERLEAVED>(p, g, heads, slot0 + threadIdx.x, threadIdx.y, bt, table, slot0);
    // The rest: more items than one batch (many heads), or more slots than threads in x.
    for (int j = threadIdx.x; j < nslot; j += blockDim.x) {
      for (int it0 = threadIdx.y + (j == static_cast<int>(threadIdx.x) ? step : 0); it0 < g.nitems; it0 += step) {
        load_batch<VEC, INTERLEAVED>(p, g, heads, slot0 + j, it0, bt);
        store_batch<VEC, INTERLEAVED>(p, g, heads, slot0 + j, it0, bt, table, slot0);
      }
    }
    __syncthreads();  // the next group overwrites the table
  }
}

// The 16-byte path needs unit stride on D and every row start 16-byte aligned (a stride of a
// size-1 dim is never used).
bool vec_ok(const at::Tensor& t, int vec) {
  if (t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return true;
}

template <typename T>
Operand<T> make_operand(const at::Tensor& in, const at::Tensor& out) {
  Operand<T> o;
  o.in = reinterpret_cast<const T*>(in.const_data_ptr());
  o.out = reinterpret_cast<T*>(out.data_ptr());
  o.in_sb = in.stride(0), o.in_ss = in.stride(1), o.in_sh = in.stride(2), o.in_sd = in.stride(3);
  o.out_sb = out.stride(0), o.out_ss = out.stride(1), o.out_sh = out.stride(2), o.out_sd = out.stride(3);
  o.heads = static_cast<int>(in.size(2));
  return o;
}

template <typename T, int VEC, bool INTERLEAVED>
void launch(Params<T> p, int64_t head_dim, bool copy, int sms, cudaStream_t stream) {
  constexpr int PPS = Layout<VEC, INTERLEAVED>::PPS;
  const int64_t nrot = p.rotary_dim / 2 / PPS;
  const int64_t nslot = nrot + (copy ? (head_dim - p.rotary_dim) / VEC : 0);
  const int chunk = static_cast<int>(nslot < kTablePairs / PPS ? nslot : kTablePairs / PPS);
  const int64_t nchunks = (nslot + chunk - 1) / chunk;
  TORCH_CHECK(nchunks <= 65535, "rope: head_dim ", head_dim, " is too large");
  const int nx = chunk < kThreads ? chunk : kThreads, ny = kThreads / nx;
  const int heads = p.q.heads + p.k.heads;
  const int64_t tok_bytes = static_cast<int64_t>(chunk) * PPS * sizeof(float2);  // table row
  // About kUnroll items per thread per token group, so that a thread's loads go out together.
  int64_t tok = static_cast<int64_t>(ny) * kUnroll / heads;
  // ... but fewer tokens per block when that leaves SMs idle (decoding: few tokens, many heads).
  const int64_t fill = p.ntok / (2 * static_cast<int64_t>(sms));
  tok = std::max<int64_t>(1, std::min<int64_t>({tok, fill, kMaxTok, kSmemBytes / tok_bytes}));
  p.tok = static_cast<int>(tok);
  p.nrot = static_cast<int>(nrot);
  p.nslot = static_cast<int>(nslot);
  p.chunk = chunk;
  p.ngroups = (p.ntok + tok - 1) / tok;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(p.ngroups, kx::max_grid_x())), static_cast<unsigned>(nchunks));
  const dim3 block(nx, ny);
  rope_kernel<T, VEC, INTERLEAVED><<<grid, block, tok * tok_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// q_out / k_out are q / k for the in-place ops; k == nullptr for rope / rope_.
template <typename T>
void run(const at::Tensor& q, const at::Tensor& q_out, const at::Tensor* k, const at::Tensor* k_out,
         const RopePositions& pos, const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis,
         int64_t rotary_dim, bool interleaved, bool conjugate, bool copy) {
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3);
  const int64_t heads = q.size(2) + (k ? k->size(2) : 0);
  if (B * S == 0 || heads == 0) return;
  TORCH_CHECK(heads <= INT_MAX && D <= INT_MAX, "rope: too many heads or too large a head_dim");

  Params<T> p;
  p.q = make_operand<T>(q, q_out);
  if (k) p.k = make_operand<T>(*k, *k_out);
  p.pos = pos;
  p.inv_freq = inv_freq.data_ptr<float>();
  p.axis = axis ? axis->data_ptr<int32_t>() : nullptr;
  p.ntok = B * S;
  p.seqlen = S;
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.conjugate = conjugate;

  constexpr int vec = 16 / sizeof(T);
  const bool use_vec = (interleaved ? rotary_dim % vec == 0 : (rotary_dim / 2) % vec == 0) &&
                       (!copy || (D - rotary_dim) % vec == 0) && vec_ok(q, vec) && vec_ok(q_out, vec) &&
                       (!k || (vec_ok(*k, vec) && vec_ok(*k_out, vec)));
  const int sms = kx::num_sms(q.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (use_vec) {
    if (interleaved) launch<T, vec, true>(p, D, copy, sms, stream);
    else launch<T, vec, false>(p, D, copy, sms, stream);
  } else {
    if (interleaved) launch<T, 1, true>(p, D, copy, sms, stream);
    else launch<T, 1, false>(p, D, copy, sms, stream);
  }
}

void dispatch(const char* op, const at::Tensor& q, const at::Tensor& q_out, const at::Tensor* k,
              const at::Tensor* k_out, const RopePositions& pos, const at::Tensor& inv_freq,
              const std::optional<at::Tensor>& axis, int64_t rotary_dim, bool interleaved,
              bool conjugate, bool copy) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return run<float>(q, q_out, k, k_out, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, copy);
    case at::kHalf:
      return run<__half>(q, q_out, k, k_out, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, copy);
    case at::kBFloat16:
      return run<__nv_bfloat16>(q, q_out, k, k_out, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, copy);
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", q.scalar_type(), " (float32, float16, bfloat16)");
  }
}

RopePositions check(const char* op, const at::Tensor& x, const at::Tensor* k,
                    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& offsets,
                    int64_t offset, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& inv_freq,
                    const std::optional<at::Tensor>& axis, int64_t rotary_dim) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": float64 is supported on CPU only");
  return check_rope_args(op, x, k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim);
}

at::Tensor rope_cuda(const at::Tensor& x, const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
                     const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
                     bool interleaved, bool conjugate) {
  const auto pos = check("rope", x, nullptr, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  dispatch("rope", x, out, nullptr, nullptr, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, true);
  return out;
}

void rope_inplace_cuda(const at::Tensor& x, const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
                       const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
                       bool interleaved, bool conjugate) {
  const auto pos = check("rope_", x, nullptr, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  at::assert_no_internal_overlap(x);  // threads would race on shared memory locations
  dispatch("rope_", x, x, nullptr, nullptr, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, false);
}

std::tuple<at::Tensor, at::Tensor> rope_qk_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const std::optional<at::Tensor>& positions,
                                                const std::optional<at::Tensor>& offsets, int64_t offset,
                                                const std::optional<at::Tensor>& cu_seqlens,
                                                const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis,
                                                int64_t rotary_dim, bool interleaved, bool conjugate) {
  const auto pos = check("rope_qk", q, &k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  dispatch("rope_qk", q, q_out, &k, &k_out, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, true);
  return {q_out, k_out};
}

void rope_qk_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& positions,
                          const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
                          const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
                          bool interleaved, bool conjugate) {
  const auto pos = check("rope_qk_", q, &k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  at::assert_no_internal_overlap(q);
  at::assert_no_internal_overlap(k);
  at::assert_no_overlap(q, k);
  dispatch("rope_qk_", q, q, &k, &k, pos, inv_freq, axis, rotary_dim, interleaved, conjugate, false);
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CUDA, m) {
  m.impl("rope", &kxops::rope_cuda);
  m.impl("rope_", &kxops::rope_inplace_cuda);
  m.impl("rope_qk", &kxops::rope_qk_cuda);
  m.impl("rope_qk_", &kxops::rope_qk_inplace_cuda);
}
