// Shared by the CPU and CUDA RoPE kernels: argument checks (host) and the per-token position
// rule (host and device). The math is in docs/rope_kernel_contract.md.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

#if defined(__CUDACC__)
#define KX_HD __host__ __device__ __forceinline__
#else
#define KX_HD inline
#endif

namespace kxops {

// Where a token's position comes from; plain pointers so that the struct can be passed to a
// CUDA kernel by value.
struct RopePositions {
  const int64_t* pos = nullptr;   // (Bp, S, A) or null
  int64_t pos_sb = 0, pos_ss = 0, pos_sa = 0;  // strides; pos_sb == 0 when Bp == 1
  const int64_t* offsets = nullptr;            // (B,) or (nseq,) or null
  int64_t offset = 0;                          // added to every default position (int offsets)
  const int32_t* cu_seqlens = nullptr;         // (nseq + 1,) or null
  int64_t nseq = 0;

  // Position of token (b, s) on axis a.
  KX_HD int64_t at(int64_t b, int64_t s, int64_t a) const {
    if (pos) return pos[b * pos_sb + s * pos_ss + a * pos_sa];
    if (cu_seqlens) {
      // largest n with cu[n] <= s (sequences may be empty)
      int64_t lo = 0, hi = nseq;
      while (lo < hi) {
        int64_t mid = (lo + hi + 1) >> 1;
        if (cu_seqlens[mid] <= s) lo = mid; else hi = mid - 1;
      }
      return s - cu_seqlens[lo] + offset + (offsets ? offsets[lo] : 0);
    }
    return s + offset + (offsets ? offsets[b] : 0);
  }
};

// Checks what the Python layer normalised; a direct torch.ops.kxops call gets the same errors.
inline RopePositions check_rope_args(const char* op, const at::Tensor& x, const at::Tensor* k,
                                     const std::optional<at::Tensor>& positions,
                                     const std::optional<at::Tensor>& offsets, int64_t offset,
                                     const std::optional<at::Tensor>& cu_seqlens,
                                     const at::Tensor& inv_freq,
                                     const std::optional<at::Tensor>& axis, int64_t rotary_dim) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (batch, seq, heads, head_dim), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(3);
  if (k) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == B && k->size(1) == S && k->size(3) == D, op,
                ": k must be (batch, seq, heads_k, head_dim) matching q ", x.sizes(), ", got ", k->sizes());
    TORCH_CHECK(k->scalar_type() == x.scalar_type(), op, ": q and k must have one dtype, got ",
                x.scalar_type(), " and ", k->scalar_type());
    TORCH_CHECK(k->device() == x.device(), op, ": q and k must be on one device");
  }
  TORCH_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= D, op,
              ": rotary_dim must be even and in [2, head_dim=", D, "], got ", rotary_dim);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == rotary_dim / 2 && inv_freq.is_contiguous() &&
                  inv_freq.scalar_type() == acc && inv_freq.device() == x.device(),
              op, ": inv_freq must be a contiguous ", acc, " vector of rotary_dim/2=", rotary_dim / 2,
              " on x's device");
  RopePositions p;
  int64_t A = 1;
  if (positions) {
    const auto& t = *positions;
    TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == B) && t.size(1) == S && t.size(2) >= 1, op,
                ": positions must be (1 or batch, seq, axes), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong && t.device() == x.device(), op,
                ": positions must be int64 on x's device");
    TORCH_CHECK(!offsets && offset == 0 && !cu_seqlens, op, ": positions exclude offsets and cu_seqlens");
    A = t.size(2);
    p.pos = t.data_ptr<int64_t>();
    p.pos_sb = t.size(0) == 1 ? 0 : t.stride(0);
    p.pos_ss = t.stride(1);
    p.pos_sa = t.stride(2);
  }
  if (cu_seqlens) {
    const auto& t = *cu_seqlens;
    TORCH_CHECK(B == 1, op, ": cu_seqlens needs packed x, viewed as (1, total, heads, head_dim)");
    TORCH_CHECK(t.dim() == 1 && t.size(0) >= 2 && t.scalar_type() == at::kInt && t.is_contiguous() &&
                    t.device() == x.device(), op, ": cu_seqlens must be a contiguous int32 (batch + 1,) vector on x's device");
    p.cu_seqlens = t.data_ptr<int32_t>();
    p.nseq = t.size(0) - 1;
  }
  if (offsets) {
    const auto& t = *offsets;
    const int64_t n = cu_seqlens ? p.nseq : B;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kLong && t.is_contiguous() &&
                    t.device() == x.device(), op, ": offsets must be a contiguous int64 (", n, ",) vector on x's device");
    p.offsets = t.data_ptr<int64_t>();
  }
  p.offset = offset;
  if (axis) {
    const auto& t = *axis;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rotary_dim / 2 && t.scalar_type() == at::kInt && t.is_contiguous() &&
                    t.device() == x.device(), op, ": axis must be a contiguous int32 (rotary_dim/2,) vector on x's device");
  } else {
    TORCH_CHECK(A == 1, op, ": positions with ", A, " axes need the axis table");
  }
  return p;
}

// The 1-D RoPE frequencies base^(-2i/R), i < R/2, as a (R/2,) tensor of `dtype` on `device`: the front's
// cached table (csrc/rope.cpp); on_device: built on the device, not cached (tracing, graph capture).
// Host only (the linear attention front rotates its numerator with it).
at::Tensor rope_frequencies(int64_t rotary_dim, double base, at::ScalarType dtype, at::Device device, bool on_device);

}  // namespace kxops
