// Test-only kernels for tests/test_cuda_emulate.py: the CUDA features tools/cuda_emulate.py emulates,
// each used the way a kernel family would use it, in ops of their own namespace (kxops_selftest, never
// built into kxops; tools/check_cuda.py compiles this file with nvcc so that it stays real CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../../csrc/cuda/kx_cuda.cuh"

namespace kxops_selftest {
namespace {

constexpr int kThreads = 128;

int grid_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, kx::max_grid_x())));
}

// Per row of x (rows, n): sum, max and the number of positive entries. A block per row, grid-stride
// over rows; vectorized: float4 loads (n % 4 == 0; rows 16-byte aligned is the caller's promise,
// which the tests break on purpose).
template <bool VEC>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const float* x, int64_t rows, int64_t n, int64_t stride,
                                                              float* sum_out, float* max_out, int* npos_out) {
  __shared__ float scratch[32];
  __shared__ int iscratch[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * stride;
    float s = 0.0f, m = -INFINITY;
    int pos = 0;
    if constexpr (VEC) {
      for (int64_t base = 0; base < n; base += 4 * blockDim.x) {  // whole tiles: every lane reaches the ballots
        const int64_t i = base + 4 * threadIdx.x;
        const float4 v = i < n ? kx::load_aligned<float4>(row + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (i < n) {
          s += (v.x + v.y) + (v.z + v.w);
          m = kx::Max()(m, kx::Max()(kx::Max()(v.x, v.y), kx::Max()(v.z, v.w)));
        }
        pos += __popc(__ballot_sync(kx::kFullMask, v.x > 0.0f)) + __popc(__ballot_sync(kx::kFullMask, v.y > 0.0f)) +
               __popc(__ballot_sync(kx::kFullMask, v.z > 0.0f)) + __popc(__ballot_sync(kx::kFullMask, v.w > 0.0f));
      }
      pos = threadIdx.x % 32 == 0 ? pos : 0;  // a ballot's count is in every lane
    } else {
      for (int64_t base = 0; base < n; base += blockDim.x) {  // whole tiles: every thread reaches the count
        const int64_t i = base + threadIdx.x;
        const float v = i < n ? row[i] : 0.0f;
        if (i < n) {
          s += v;
          m = kx::Max()(m, v);
        }
        const int c = __syncthreads_count(v > 0.0f);
        if (threadIdx.x == 0) pos += c;
      }
    }
    s = kx::block_reduce(s, kx::Sum(), scratch);
    m = kx::block_reduce(m, kx::Max(), scratch);
    pos = kx::block_reduce(pos, kx::Sum(), iscratch);
    if (threadIdx.x == 0) {
      sum_out[r] = s;
      max_out[r] = m;
      npos_out[r] = pos;
    }
  }
}

// Inclusive prefix sums of each row of x (rows, n), in tiles of blockDim.x: a warp scan with
// __shfl_up_sync, the warps' totals scanned by warp 0 in dynamic shared memory, a running carry.
// Without the barrier at the end of a tile (a bug the tests plant) a warp may overwrite the totals
// another still reads.
__global__ void __launch_bounds__(kThreads) cumsum_kernel(const float* x, float* out, int64_t rows, int64_t n,
                                                          bool tile_barrier) {
  extern __shared__ float warp_total[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float carry = 0.0f;
    for (int64_t base = 0; base < n; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      float v = i < n ? x[r * n + i] : 0.0f;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float t = __shfl_up_sync(kx::kFullMask, v, o);
        if (lane >= o) v += t;
      }
      if (lane == 31) warp_total[warp] = v;
      __syncthreads();
      if (warp == 0) {
        float w = lane < nwarps ? warp_total[lane] : 0.0f;
        for (int o = 1; o < 32; o <<= 1) {
          const float t = __shfl_up_sync(kx::kFullMask, w, o);
          if (lane >= o) w += t;
        }
        if (lane < nwarps) warp_total[lane] = w;
      }
      __syncthreads();
      if (i < n) out[r * n + i] = carry + v + (warp > 0 ? warp_total[warp - 1] : 0.0f);
      carry += __shfl_sync(kx::kFullMask, lane < nwarps ? warp_total[lane] : 0.0f, nwarps - 1);
      if (tile_barrier) __syncthreads();  // the next tile rewrites warp_total
    }
  }
}

// counts[b] += 1, sums[b] += w and top = max(idx) with atomics; a grid-stride loop over a 2-D block.
__global__ void bincount_kernel(const int64_t* idx, const float* w, int64_t n, int* counts, float* sums, int* top) {
  const int64_t tid = threadIdx.x + blockDim.x * threadIdx.y;
  const int64_t nthreads = blockDim.x * blockDim.y;
  for (int64_t i = blockIdx.x * nthreads + tid; i < n; i += gridDim.x * nthreads) {
    const int b = static_cast<int>(idx[i]);
    atomicAdd(counts + b, 1);
    atomicAdd(sums + b, w[i]);
    atomicMax(top, b);
  }
}

// One block of whole warps; row r of out: x shuffled by (0) __shfl_sync from lane + 3, (1)
// __shfl_up_sync by 3, (2) __shfl_down_sync by 3, (3) __shfl_xor_sync with 5, all within `width`;
// votes: __any_sync, __all_sync of x > 0 and __reduce_add_sync of the lane numbers.
__global__ void shuffles_kernel(const float* x, int width, float* out, int* votes) {
  const int i = threadIdx.x, n = blockDim.x, lane = i % 32;
  const float v = x[i];
  out[i] = __shfl_sync(kx::kFullMask, v, lane + 3, width);
  out[n + i] = __shfl_up_sync(kx::kFullMask, v, 3, width);
  out[2 * n + i] = __shfl_down_sync(kx::kFullMask, v, 3, width);
  out[3 * n + i] = __shfl_xor_sync(kx::kFullMask, v, 5, width);
  votes[i] = __any_sync(kx::kFullMask, v > 0.0f);
  votes[n + i] = __all_sync(kx::kFullMask, v > 0.0f);
  votes[2 * n + i] = static_cast<int>(__reduce_add_sync(kx::kFullMask, static_cast<unsigned>(lane)));
}

// Writes the even elements only: the odd ones show what emulation leaves in unwritten outputs.
__global__ void copy_even_kernel(const float* x, int64_t n, float* out, int* index) {
  for (int64_t i = 2 * (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x); i < n; i += 2 * gridDim.x * blockDim.x) {
    out[i] = x[i];
    index[i] = static_cast<int>(i);
  }
}

// out = alpha * (A B) + C on tensor cores: A (M, K) and B (K, N) in half or bfloat16, each stored
// row-major or as its transpose (ACOL: a is A^T, (K, M), read as col_major fragments); C float (M, N);
// out float, (M, N), or its transpose when out_col. One warp per 16x16 tile of out: A's tiles go
// through shared memory, each lane staging 8 consecutive elements (so that a missing __syncwarp
// shows: the fragment's elements belong to other lanes), B's tiles come from global memory.
template <typename T, bool ACOL, bool BCOL>
__global__ void wmma_gemm_kernel(const T* a, const T* b, const float* c, float* out, int M, int N, int K,
                                 float alpha, bool out_col, bool stage_sync) {
  using namespace nvcuda;
  __shared__ __align__(32) T stage[2][16 * 16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles_n = N / 16, tile = blockIdx.x * 2 + warp;
  if (tile >= M / 16 * tiles_n) return;  // a whole warp: no block-wide barrier follows
  const int i = tile / tiles_n, j = tile % tiles_n;
  using LA = std::conditional_t<ACOL, wmma::col_major, wmma::row_major>;
  using LB = std::conditional_t<BCOL, wmma::col_major, wmma::row_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc, cf;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = 0; k < K; k += 16) {
    for (int e = 8 * lane; e < 8 * lane + 8; ++e) {  // the tile as stored: 16 rows of 16
      const int r = e / 16, cc = e % 16;
      stage[warp][e] = ACOL ? a[(k + r) * M + i * 16 + cc] : a[(i * 16 + r) * K + k + cc];
    }
    if (stage_sync) __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
    wmma::load_matrix_sync(fa, stage[warp], 16);
    wmma::load_matrix_sync(fb, BCOL ? b + j * 16 * K + k : b + k * N + j * 16, BCOL ? K : N);
    wmma::mma_sync(acc, fa, fb, acc);
    __syncwarp();  // the next k overwrites the stage
  }
  wmma::load_matrix_sync(cf, c + i * 16 * N + j * 16, N, wmma::mem_row_major);
  for (int e = 0; e < acc.num_elements; ++e) acc.x[e] = alpha * acc.x[e] + cf.x[e];
  if (out_col) wmma::store_matrix_sync(out + j * 16 * M + i * 16, acc, M, wmma::mem_col_major);
  else wmma::store_matrix_sync(out + i * 16 * N + j * 16, acc, N, wmma::mem_row_major);
}

// Mistakes emulation must catch. what: 0 = threads return before a __syncthreads, 1 = a shuffle
// in half a warp, 2 = shared memory read before it is written, 5 = a wmma load in half a warp,
// 6 = a wmma load from an address that is not 32-byte aligned.
__global__ void misuse_kernel(int what, float* out) {
  __shared__ float never_written[32];
  __shared__ __align__(32) __half tile[16 * 24];
  const int lane = threadIdx.x % 32;
  float v = lane;
  if (what == 0) {
    if (lane >= 16) return;
    __syncthreads();
  } else if (what == 1) {
    if (lane < 16) v = __shfl_xor_sync(kx::kFullMask, v, 1);
  } else if (what == 5 || what == 6) {
    for (int e = lane; e < 16 * 24; e += 32) tile[e] = __float2half_rn(1.0f);
    __syncwarp();
    if (what == 5 && lane >= 16) return;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> f;
    nvcuda::wmma::load_matrix_sync(f, what == 6 ? tile + 8 : tile, 24);
    v = __half2float(f.x[0]);
  } else {
    v = never_written[lane];
  }
  out[threadIdx.x] = v;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous(), "selftest: ", name,
              " must be a contiguous CUDA tensor of ", dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats(const at::Tensor& x, bool vectorized) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "row_stats: x must be a float32 CUDA matrix with unit stride along rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  auto sum = at::empty({rows}, x.options());
  auto max = at::empty({rows}, x.options());
  auto npos = at::empty({rows}, x.options().dtype(at::kInt));
  if (rows == 0) return {sum, max, npos};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorized) {
    TORCH_CHECK(n % 4 == 0, "row_stats: vectorized needs rows of a multiple of 4");
    row_stats_kernel<true><<<grid_for(rows), kThreads, 0, stream>>>(x.const_data_ptr<float>(), rows, n, x.stride(0),
        sum.data_ptr<float>(), max.data_ptr<float>(), npos.data_ptr<int>());
  } else {
    row_stats_kernel<false><<<grid_for(rows), kThreads, 0, stream>>>(x.const_data_ptr<float>(), rows, n, x.stride(0),
        sum.data_ptr<float>(), max.data_ptr<float>(), npos.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum, max, npos};
}

at::Tensor cumsum(const at::Tensor& x, bool tile_barrier) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2, "cumsum: x must be 2-D");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;
  cumsum_kernel<<<grid_for(x.size(0)), kThreads, kThreads / 32 * sizeof(float), c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), tile_barrier);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bincount(const at::Tensor& idx, const at::Tensor& w, int64_t bins) {
  check(idx, "idx", at::kLong);
  check(w, "weights", at::kFloat);
  TORCH_CHECK(idx.sizes() == w.sizes(), "bincount: idx and weights must have one shape");
  const c10::cuda::CUDAGuard guard(idx.device());
  auto counts = at::zeros({bins}, idx.options().dtype(at::kInt));
  auto sums = at::zeros({bins}, w.options());
  auto top = at::full({1}, INT_MIN, idx.options().dtype(at::kInt));
  const int64_t n = idx.numel();
  if (n == 0) return {counts, sums, top};
  const dim3 block(32, 8);
  bincount_kernel<<<grid_for((n + 255) / 256), block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      idx.const_data_ptr<int64_t>(), w.const_data_ptr<float>(), n, counts.data_ptr<int>(), sums.data_ptr<float>(),
      top.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, sums, top};
}

std::tuple<at::Tensor, at::Tensor> copy_even(const at::Tensor& x) {
  check(x, "x", at::kFloat);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  auto index = at::empty(x.sizes(), x.options().dtype(at::kInt));
  const int64_t n = x.numel();
  if (n == 0) return {out, index};
  copy_even_kernel<<<grid_for((n + 2 * kThreads - 1) / (2 * kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<float>(), n, out.data_ptr<float>(), index.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> shuffles(const at::Tensor& x, int64_t width) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 1 && x.numel() % 32 == 0 && x.numel() <= 1024 && x.numel() > 0,
              "shuffles: x must hold 32 to 1024 elements, whole warps");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({4, x.numel()}, x.options());
  auto votes = at::empty({3, x.numel()}, x.options().dtype(at::kInt));
  shuffles_kernel<<<1, x.numel(), 0, c10::cuda::getCurrentCUDAStream()>>>(x.const_data_ptr<float>(), static_cast<int>(width),
                                                                          out.data_ptr<float>(), votes.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, votes};
}

template <typename T, bool ACOL, bool BCOL>
void launch_wmma_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& out,
                      double alpha, bool out_col, bool stage_sync) {
  const int M = c.size(0), N = c.size(1), K = ACOL ? a.size(0) : a.size(1);
  const int tiles = M / 16 * (N / 16);
  wmma_gemm_kernel<T, ACOL, BCOL><<<(tiles + 1) / 2, 64, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(a.const_data_ptr()), reinterpret_cast<const T*>(b.const_data_ptr()),
      c.const_data_ptr<float>(), out.data_ptr<float>(), M, N, K, static_cast<float>(alpha), out_col, stage_sync);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_wmma_gemm(bool a_col, bool b_col, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                        const at::Tensor& out, double alpha, bool out_col, bool stage_sync) {
  if (a_col && b_col) launch_wmma_gemm<T, true, true>(a, b, c, out, alpha, out_col, stage_sync);
  else if (a_col) launch_wmma_gemm<T, true, false>(a, b, c, out, alpha, out_col, stage_sync);
  else if (b_col) launch_wmma_gemm<T, false, true>(a, b, c, out, alpha, out_col, stage_sync);
  else launch_wmma_gemm<T, false, false>(a, b, c, out, alpha, out_col, stage_sync);
}

// a: A (M, K), or A^T (K, M) when a_col; b: B (K, N), or B^T (N, K) when b_col; sizes multiples of 16.
at::Tensor wmma_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double alpha, bool a_col,
                     bool b_col, bool out_col, bool stage_sync) {
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "wmma_gemm: a must be float16 or bfloat16");
  check(a, "a", dt);
  check(b, "b", dt);
  check(c, "c", at::kFloat);
  const int64_t M = c.size(0), N = c.size(1), K = a_col ? a.size(0) : a.size(1);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && (a_col ? a.size(1) : a.size(0)) == M &&
                  (b_col ? b.size(1) : b.size(0)) == K && (b_col ? b.size(0) : b.size(1)) == N,
              "wmma_gemm: shapes do not match");
  TORCH_CHECK(M % 16 == 0 && N % 16 == 0 && K % 16 == 0 && M > 0 && N > 0 && K > 0,
              "wmma_gemm: sizes must be positive multiples of 16");
  const c10::cuda::CUDAGuard guard(c.device());
  auto out = out_col ? at::empty({N, M}, c.options()) : at::empty({M, N}, c.options());
  if (dt == at::kHalf) dispatch_wmma_gemm<__half>(a_col, b_col, a, b, c, out, alpha, out_col, stage_sync);
  else dispatch_wmma_gemm<__nv_bfloat16>(a_col, b_col, a, b, c, out, alpha, out_col, stage_sync);
  return out;
}

// what < 3, 5, 6: misuse_kernel's cases; 3: a block of 2048 threads; 4: 64 KB of dynamic shared memory
// without the opt-in.
at::Tensor misuse(const at::Tensor& like, int64_t what) {
  TORCH_CHECK(like.is_cuda(), "misuse: like must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(like.device());
  auto out = at::empty({64}, like.options().dtype(at::kFloat));
  const int threads = what == 3 ? 2048 : 64;
  const size_t smem = what == 4 ? 64 * 1024 : 0;
  misuse_kernel<<<1, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(static_cast<int>(what), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace kxops_selftest

TORCH_LIBRARY(kxops_selftest, m) {
  m.def("row_stats(Tensor x, bool vectorized) -> (Tensor, Tensor, Tensor)");
  m.def("cumsum(Tensor x, bool tile_barrier=True) -> Tensor");
  m.def("bincount(Tensor idx, Tensor weights, int bins) -> (Tensor, Tensor, Tensor)");
  m.def("shuffles(Tensor x, int width) -> (Tensor, Tensor)");
  m.def("copy_even(Tensor x) -> (Tensor, Tensor)");
  m.def("misuse(Tensor like, int what) -> Tensor");
  m.def("wmma_gemm(Tensor a, Tensor b, Tensor c, float alpha, bool a_col, bool b_col, bool out_col, "
        "bool stage_sync=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(kxops_selftest, CUDA, m) {
  m.impl("row_stats", &kxops_selftest::row_stats);
  m.impl("cumsum", &kxops_selftest::cumsum);
  m.impl("bincount", &kxops_selftest::bincount);
  m.impl("shuffles", &kxops_selftest::shuffles);
  m.impl("copy_even", &kxops_selftest::copy_even);
  m.impl("misuse", &kxops_selftest::misuse);
  m.impl("wmma_gemm", &kxops_selftest::wmma_gemm);
}
