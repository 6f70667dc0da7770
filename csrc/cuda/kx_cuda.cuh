// What a family's kernels (csrc/cuda/<family>_cuda.cu) include: the CUDA runtime, c10's CUDA stream,
// guard and error checks, tensor cores through nvcuda::wmma (mma.h), and the few helpers through which
// a kernel reaches what CI checks on the host. tools/cuda_emulate.py compiles a .cu that keeps to its
// conventions (listed there) with a host compiler, with KXOPS_CUDA_EMULATION defined and its prelude
// (namespace kx_emu) in front of the file; on the GPU the helpers are the plain code they would be
// written as.
#pragma once
#if !defined(KXOPS_CUDA_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mma.h>  // nvcuda::wmma (emulation: the prelude's)
#endif
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>

namespace kx {

constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp

// A storage type's value in float (the kernels' arithmetic) and back, rounded to nearest.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One access of sizeof(V) bytes (16: LDG.128 / STG.128) at p, which must be aligned to alignof(V):
// the host code checks that before it picks a vector path. A misaligned address is a sticky CUDA
// error on the GPU and an exception in emulation.
template <typename V, typename T>
__device__ __forceinline__ V load_aligned(const T* p) {
#if defined(KXOPS_CUDA_EMULATION)
  kx_emu::check_aligned(p, alignof(V), "kx::load_aligned");
#endif
  return *reinterpret_cast<const V*>(p);
}

template <typename V, typename T>
__device__ __forceinline__ void store_aligned(T* p, const V& v) {
#if defined(KXOPS_CUDA_EMULATION)
  kx_emu::check_aligned(p, alignof(V), "kx::store_aligned");
#endif
  *reinterpret_cast<V*>(p) = v;
}

// Most blocks a grid-stride kernel puts in gridDim.x. Emulation: $KXOPS_EMU_GRID_CAP, so that a test
// with a few blocks' worth of work already walks the loop.
inline int64_t max_grid_x() {
#if defined(KXOPS_CUDA_EMULATION)
  return kx_emu::grid_cap();
#else
  return INT_MAX;
#endif
}

// A device attribute of `device` (-1: the current one), asked of the driver once per device: launch
// heuristics call this on every op call, and decoding makes many small calls.
template <cudaDeviceAttr kAttr>
inline int device_attribute(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device < 0) device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "kx::device_attribute: device index ", device, " out of range");
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, kAttr, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Multiprocessors of `device`.
inline int num_sms(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

// Most dynamic shared memory one block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize)
// on `device`: 227 KB on an H100, 163 KB on an A100.
inline int max_smem_optin(int device) {
#if defined(KXOPS_CUDA_EMULATION)
  return static_cast<int>(kx_emu::smem_optin_limit());  // uncached: tests change it
#else
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
#endif
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {  // NaN wins, as in torch.max
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return (a > b || a != a) ? a : b; }
};

// op over the 32 lanes of a warp, the result in every lane; all 32 lanes must call it.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// op over the whole block, the result in every thread; every thread must call it, and the block must
// be whole warps. scratch: 32 T of shared memory, free again when the call returns.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nwarps = blockDim.x * blockDim.y * blockDim.z / 32;
  v = warp_reduce(v, op);
  if (tid % 32 == 0) scratch[tid / 32] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < nwarps; ++w) v = op(v, scratch[w]);
  __syncthreads();
  return v;
}

// ---- host helpers of the launchers ----

// A launch threshold from the environment (tests force each kernel path at small sizes), else `fallback`.
inline int64_t env_threshold(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && v >= 0, name, " must be a non-negative integer, got '", s, "'");
  return v;
}

// fn(T()) with T the storage type of a float32 / float16 / bfloat16 tensor (anything else: float).
template <typename Fn>
void dispatch_float(c10::ScalarType t, Fn fn) {
  switch (t) {
    case c10::ScalarType::Half: fn(__half()); break;
    case c10::ScalarType::BFloat16: fn(__nv_bfloat16()); break;
    default: fn(float()); break;
  }
}

}  // namespace kx
