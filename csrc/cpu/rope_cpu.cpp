// RoPE on CPU: kxops::rope, rope_, rope_qk, rope_qk_ (semantics: docs/rope_kernel_contract.md).
//
// Work is split over tokens. A token's cos/sin (R/2 each) go into a small per-thread table that
// serves every head of q and then of k; consecutive tokens with the same positions (the batch
// entries of one step when positions do not depend on the batch) reuse it, since tokens are
// visited step-major. Rows with a unit stride on D take plain-pointer loops that the compiler
// vectorises; any other stride takes a generic loop. The loops are compiled twice, for baseline
// x86-64 and for AVX2 (picked at run time); neither uses FMA, so both give the same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif


#include "../rope.h"
#include "sincos.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define KX_HAVE_AVX2_CLONE 1
#define KX_INLINE inline __attribute__((always_inline))
#else
#define KX_INLINE inline
#endif

namespace kxops {
namespace {

using cpu::sincos_table;

// ---- element conversions (to the opmath type and back, one rounding) ----------------------------

template <typename T, typename A>
KX_INLINE A load(const T& v) {
  return static_cast<A>(v);
}
template <>
KX_INLINE float load<c10::BFloat16, float>(const c10::BFloat16& v) {
  return c10::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
}

template <typename T, typename A>
KX_INLINE T store(A v) {
  return static_cast<T>(v);
}
// c10's round-to-nearest-even with the NaN test as a select instead of a branch, so that the
// loops vectorise; same bits.
template <>
KX_INLINE c10::BFloat16 store<c10::BFloat16, float>(float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  const uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? UINT32_C(0x7FC0) : r), c10::BFloat16::from_bits());
}

// Bit-identical copy of one element (no trip through a floating register).
template <typename T>
KX_INLINE void copy_bits(const T* src, T* dst) {
  std::memcpy(dst, src, sizeof(T));
}

// ---- the work description ---------------------------------------------------------------------

template <typename T>
struct Operand {
  const T* in;
  T* out;
  int64_t H;
  int64_t ib, is, ih, id;  // input strides (elements)
  int64_t ob, os, oh, od;  // output strides (elements)
};

template <typename A>
struct Job {
  int64_t B, D, R, A_axes;
  bool conjugate;
  const A* inv_freq;
  const int32_t* axis;  // null: every pair follows axis 0
  RopePositions pos;
};

// ---- one row (the D coordinates of one head of one token) ---------------------------------------

// Unit stride on D for both input and output. In place, in == out: iteration i only touches its own
// pair, so vectorising (omp simd) stays correct.
template <typename T, typename A, bool kInterleaved>
KX_INLINE void rotate_row_contig(const T* in, T* out, const A* c, const A* s, int64_t half) {
  if constexpr (kInterleaved) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const A a = load<T, A>(in[2 * i]), b = load<T, A>(in[2 * i + 1]);
      out[2 * i] = store<T, A>(a * c[i] - b * s[i]);
      out[2 * i + 1] = store<T, A>(a * s[i] + b * c[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const A a = load<T, A>(in[i]), b = load<T, A>(in[i + half]);
      out[i] = store<T, A>(a * c[i] - b * s[i]);
      out[i + half] = store<T, A>(a * s[i] + b * c[i]);
    }
  }
}

template <typename T, typename A, bool kInterleaved>
KX_INLINE void rotate_row_strided(const T* in, T* out, int64_t id, int64_t od, const A* c, const A* s,
                                  int64_t half) {
  const int64_t ja = kInterleaved ? 2 : 1, jb = kInterleaved ? 1 : half;  // a at ja*i, b at a + jb
  for (int64_t i = 0; i < half; ++i) {
    const int64_t da = ja * i, db = da + jb;
    const A a = load<T, A>(in[da * id]), b = load<T, A>(in[db * id]);
    out[da * od] = store<T, A>(a * c[i] - b * s[i]);
    out[db * od] = store<T, A>(a * s[i] + b * c[i]);
  }
}

#ifdef KX_HAVE_AVX2_CLONE
// fp16 rows for the AVX2 loops: GCC does not vectorise scalar F16C conversions, so convert the row
// to float 8 at a time, rotate the float row in place with the float loop, convert back. Same bits as
// the scalar path (both conversions round to nearest even). `buf` holds R floats.
template <bool kInterleaved>
__attribute__((target("avx2,f16c"))) void rotate_rows_f16c(const c10::Half* in, c10::Half* out, int64_t H,
                                                           int64_t ih, int64_t oh, const float* c,
                                                           const float* s, int64_t R, float* buf) {
  const int64_t R8 = R & ~int64_t{7};
  for (int64_t h = 0; h < H; ++h) {
    const auto* ri = reinterpret_cast<const uint16_t*>(in + h * ih);
    auto* ro = reinterpret_cast<uint16_t*>(out + h * oh);
    for (int64_t d = 0; d < R8; d += 8)
      _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ri + d))));
    for (int64_t d = R8; d < R; ++d) buf[d] = _cvtsh_ss(ri[d]);
    rotate_row_contig<float, float, kInterleaved>(buf, buf, c, s, R / 2);
    for (int64_t d = 0; d < R8; d += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ro + d),
                       _mm256_cvtps_ph(_mm256_loadu_ps(buf + d), _MM_FROUND_TO_NEAREST_INT));
    for (int64_t d = R8; d < R; ++d) ro[d] = _cvtss_sh(buf[d], _MM_FROUND_TO_NEAREST_INT);
  }
}
#endif

// Tokens [begin, end) in step-major order (t = s * B + b). `table` holds 3 R/2 values (cos, sin, angle),
// `last` and `pf` A_axes values each; all per thread.
template <typename T, typename A, bool kInterleaved, bool kF16C>
KX_INLINE void rope_tokens(const Job<A>& job, const Operand<T>* ops, int nops, int64_t begin, int64_t end,
                           A* table, int64_t* last, A* pf, A* buf) {
  const int64_t B = job.B, D = job.D, R = job.R, half = R / 2, NA = job.A_axes;
  A* const c = table;
  A* const s = table + half;
  A* const theta = table + 2 * half;
  bool valid = false;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t st = t / B, b = t - st * B;
    bool same = valid;
    for (int64_t a = 0; a < NA; ++a) {
      const int64_t p = job.pos.at(b, st, a);
      if (p != last[a]) same = false;
      last[a] = p;
    }
    if (!same) {
      for (int64_t a = 0; a < NA; ++a) pf[a] = static_cast<A>(last[a]);
      if (job.axis) {
        for (int64_t i = 0; i < half; ++i) theta[i] = pf[job.axis[i]] * job.inv_freq[i];
      } else {
        const A p0 = pf[0];
        for (int64_t i = 0; i < half; ++i) theta[i] = p0 * job.inv_freq[i];
      }
      sincos_table(theta, c, s, half, job.conjugate);
      valid = true;
    }
    for (int k = 0; k < nops; ++k) {
      const Operand<T>& op = ops[k];
      const T* in = op.in + b * op.ib + st * op.is;
      T* out = op.out + b * op.ob + st * op.os;
      const bool contig = op.id == 1 && op.od == 1;
      const bool copy_tail = R < D && static_cast<const void*>(in) != static_cast<const void*>(out);
#ifdef KX_HAVE_AVX2_CLONE
      if constexpr (kF16C && std::is_same_v<T, c10::Half>) {
        if (contig) {
          rotate_rows_f16c<kInterleaved>(in, out, op.H, op.ih, op.oh, c, s, R, buf);
          if (copy_tail)
            for (int64_t h = 0; h < op.H; ++h)
              std::memcpy(out + h * op.oh + R, in + h * op.ih + R, (D - R) * sizeof(T));
          continue;
        }
      }
#endif
      for (int64_t h = 0; h < op.H; ++h) {
        const T* ri = in + h * op.ih;
        T* ro = out + h * op.oh;
        if (contig) {
          rotate_row_contig<T, A, kInterleaved>(ri, ro, c, s, half);
          if (copy_tail) std::memcpy(ro + R, ri + R, (D - R) * sizeof(T));
        } else {
          rotate_row_strided<T, A, kInterleaved>(ri, ro, op.id, op.od, c, s, half);
          if (copy_tail)
            for (int64_t d = R; d < D; ++d) copy_bits(ri + d * op.id, ro + d * op.od);
        }
      }
    }
  }
}

template <typename T, typename A, bool kInterleaved>
void rope_tokens_default(const Job<A>& job, const Operand<T>* ops, int nops, int64_t begin, int64_t end,
                         A* table, int64_t* last, A* pf, A* buf) {
  rope_tokens<T, A, kInterleaved, false>(job, ops, nops, begin, end, table, last, pf, buf);
}

#ifdef KX_HAVE_AVX2_CLONE
template <typename T, typename A, bool kInterleaved>
__attribute__((target("avx2"))) void rope_tokens_avx2(const Job<A>& job, const Operand<T>* ops, int nops,
                                                      int64_t begin, int64_t end, A* table, int64_t* last,
                                                      A* pf, A* buf) {
  rope_tokens<T, A, kInterleaved, true>(job, ops, nops, begin, end, table, last, pf, buf);
}

// ATEN_CPU_CAPABILITY=default turns the AVX2 loops off as it does ATen's (for testing both).
bool use_avx2() {
  static const bool yes = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env && std::strcmp(env, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
}
#endif

// ---- host side --------------------------------------------------------------------------------

template <typename T>
Operand<T> make_operand(const at::Tensor& in, const at::Tensor& out) {
  Operand<T> op;
  op.in = in.const_data_ptr<T>();
  op.out = out.data_ptr<T>();
  op.H = in.size(2);
  op.ib = in.stride(0), op.is = in.stride(1), op.ih = in.stride(2), op.id = in.stride(3);
  op.ob = out.stride(0), op.os = out.stride(1), op.oh = out.stride(2), op.od = out.stride(3);
  return op;
}

// Checks on the contents of the small index tensors: cheap on CPU, and the kernel would otherwise
// read out of bounds (the Python layer already guarantees them).
void check_index_contents(const char* op, const RopePositions& p, const std::optional<at::Tensor>& axis,
                          int64_t S, int64_t A) {
  if (p.cu_seqlens) {
    TORCH_CHECK(p.cu_seqlens[0] == 0 && p.cu_seqlens[p.nseq] == S, op,
                ": cu_seqlens must start at 0 and end at seq=", S);
    for (int64_t n = 0; n < p.nseq; ++n)
      TORCH_CHECK(p.cu_seqlens[n] <= p.cu_seqlens[n + 1], op, ": cu_seqlens must be non-decreasing");
  }
  if (axis) {
    const int32_t* a = axis->const_data_ptr<int32_t>();
    for (int64_t i = 0; i < axis->numel(); ++i)
      TORCH_CHECK(a[i] >= 0 && a[i] < A, op, ": axis entries must be in [0, ", A, "), got ", a[i]);
  }
}

// Rotates x (and k) into out_x (and out_k); out may be the input itself (in place).
void rope_launch(const char* name, const at::Tensor& x, const at::Tensor& out_x, const at::Tensor* k,
                 const at::Tensor* out_k, const std::optional<at::Tensor>& positions,
                 const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
                 const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
                 bool interleaved, bool conjugate) {
  const RopePositions pos = check_rope_args(name, x, k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(3);
  const int64_t A_axes = positions ? positions->size(2) : 1;
  check_index_contents(name, pos, axis, S, A_axes);
  if (B == 0 || S == 0) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_rope_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    Job<A> job;
    job.B = B, job.D = D, job.R = rotary_dim, job.A_axes = A_axes, job.conjugate = conjugate;
    job.inv_freq = inv_freq.const_data_ptr<A>();
    job.axis = axis ? axis->const_data_ptr<int32_t>() : nullptr;
    job.pos = pos;
    Operand<T> ops[2];
    int nops = 0;
    if (x.size(2) > 0) ops[nops++] = make_operand<T>(x, out_x);
    if (k && k->size(2) > 0) ops[nops++] = make_operand<T>(*k, *out_k);
    if (nops == 0) return;

    // Chunks of a few hundred KB of traffic; at::parallel_for splits evenly over the threads and only
    // uses fewer when the work is smaller than that.
    const int64_t heads = x.size(2) + (k ? k->size(2) : 0);
    const int64_t bytes_per_token = std::max<int64_t>(1, heads * D * static_cast<int64_t>(sizeof(T)) * 2);
    const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / bytes_per_token);

    auto fn = interleaved ? &rope_tokens_default<T, A, true> : &rope_tokens_default<T, A, false>;
#ifdef KX_HAVE_AVX2_CLONE
    if (use_avx2()) fn = interleaved ? &rope_tokens_avx2<T, A, true> : &rope_tokens_avx2<T, A, false>;
#endif
    at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
      // per-thread scratch: on the stack for usual head sizes (a decoding step is a few microseconds)
      c10::SmallVector<A, 3 * 128> table(3 * (rotary_dim / 2));
      c10::SmallVector<A, 256> buf(std::is_same_v<T, at::Half> ? rotary_dim : 0);
      c10::SmallVector<A, 4> pf(A_axes);
      c10::SmallVector<int64_t, 4> last(A_axes, 0);
      fn(job, ops, nops, begin, end, table.data(), last.data(), pf.data(), buf.data());
    });
  });
}

// A fresh multi-MB output costs more in first-touch page faults (4 KiB each: ~20 ms for 32 MB on the
// 2-core dev machine) than the rotation itself (~2.5 ms); ask for transparent huge pages on its 2 MiB-
// aligned interior, as PyTorch's allocator does for every allocation under THP_MEM_ALLOC_ENABLE=1.
// Only a hint, on memory this op owns and writes in full right after.
at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + out.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return out;
}

at::Tensor rope(const at::Tensor& x, const std::optional<at::Tensor>& positions,
                const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
                const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
                bool interleaved, bool conjugate) {
  at::Tensor out = new_output(x);
  rope_launch("kxops.rope", x, out, nullptr, nullptr, positions, offsets, offset, cu_seqlens, inv_freq, axis,
              rotary_dim, interleaved, conjugate);
  return out;
}

void rope_(const at::Tensor& x, const std::optional<at::Tensor>& positions,
           const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
           const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
           bool interleaved, bool conjugate) {
  at::assert_no_internal_overlap(x);  // e.g. an expanded tensor: its elements would be rotated twice
  rope_launch("kxops.rope_", x, x, nullptr, nullptr, positions, offsets, offset, cu_seqlens, inv_freq, axis,
              rotary_dim, interleaved, conjugate);
}

std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k,
                                           const std::optional<at::Tensor>& positions,
                                           const std::optional<at::Tensor>& offsets, int64_t offset,
                                           const std::optional<at::Tensor>& cu_seqlens,
                                           const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis,
                                           int64_t rotary_dim, bool interleaved, bool conjugate) {
  at::Tensor out_q = new_output(q);
  at::Tensor out_k = new_output(k);
  rope_launch("kxops.rope_qk", q, out_q, &k, &out_k, positions, offsets, offset, cu_seqlens, inv_freq, axis,
              rotary_dim, interleaved, conjugate);
  return {out_q, out_k};
}

void rope_qk_(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& positions,
              const std::optional<at::Tensor>& offsets, int64_t offset, const std::optional<at::Tensor>& cu_seqlens,
              const at::Tensor& inv_freq, const std::optional<at::Tensor>& axis, int64_t rotary_dim,
              bool interleaved, bool conjugate) {
  at::assert_no_internal_overlap(q);
  at::assert_no_internal_overlap(k);
  rope_launch("kxops.rope_qk_", q, q, &k, &k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim,
              interleaved, conjugate);
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("rope", &rope);
  m.impl("rope_", &rope_);
  m.impl("rope_qk", &rope_qk);
  m.impl("rope_qk_", &rope_qk_);
}

}  // namespace kxops
