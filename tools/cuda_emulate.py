"""CUDA kernels (csrc/cuda/*.cu) compiled for the host, so that CI machines without a GPU run them.

    ops = cuda_emulate.load("rope")   # or a path: load("csrc/cuda/rope_cuda.cu")
    ops.rope(x_cpu, ...)              # torch.ops.kxops_emu.rope: rope_cuda.cu's code on CPU tensors
    python tools/cuda_emulate.py csrc/cuda/rope_cuda.cu    # prints the host source

The .cu is rewritten into host C++ (prelude below, then the file under its own line numbers), built
with torch.utils.cpp_extension into build/cuda_emulate/<stem>/, and its `TORCH_LIBRARY_IMPL(ns, CUDA,
m)` block registers the same ops for CPU under `<ns>_emu` (kxops -> kxops_emu), with the schemas of
csrc/*.cpp's `TORCH_LIBRARY(ns, m)` (or of the .cu's own TORCH_LIBRARY block). What runs is the
kernel's code: indexing, control flow, shared memory, barriers, shuffles, vector paths and the launch
heuristics. Arithmetic is the host's (no FMA contraction, glibc's expf for __expf): results agree with
the GPU to rounding, not bit for bit.

How a launch runs: its blocks one after another; a block's threads are fibers on the calling thread
that switch only at __syncthreads and warp operations (on x86-64 by a register-and-stack swap of a few
ns; elsewhere by ucontext, whose signal-mask system call per switch dominates a launch). Each warp
runs as far as it can before the next one starts, in thread order up to one __syncthreads and in
reverse order up to the next, so a missing barrier makes a thread read shared memory before it is
written or after it is overwritten.
Shared memory starts every block as 0x7fffffff words (NaN in float, double, half, bfloat16; INT_MAX in
int32). Tensors from at::empty / empty_like / empty_strided start as NaN (floating point), the type's
largest value (integers) or true (bool), so what a kernel leaves unwritten shows.

Covered:
- threadIdx, blockIdx, blockDim, gridDim, warpSize; grids and blocks of 1 to 3 dimensions within
  CUDA's limits; `kernel<<<grid, block[, smem[, stream]]>>>(args)` for any kernel (template
  arguments given or deduced);
- shared memory: `extern __shared__ T name[];` (dynamic) and `__shared__ T name[N]...;` (static, in a
  function, `__align__(n)` kept), 48 KB a block or up to 227 KB after cudaFuncSetAttribute(kernel,
  cudaFuncAttributeMaxDynamicSharedMemorySize, n) (in emulation the largest such n holds for all
  kernels);
- __syncthreads, __syncthreads_count / _and / _or, __syncwarp, __threadfence(_block);
- warp operations with every lane of the warp (mask = the warp's lanes, kx::kFullMask for a whole
  warp): __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (any type of up to 8 bytes,
  width 1 to 32), __ballot_sync, __any_sync, __all_sync, __reduce_add/min/max_sync;
- tensor cores through nvcuda::wmma (mma.h, included by kx_cuda.cuh): fragment<matrix_a | matrix_b,
  m, n, k, __half | __nv_bfloat16, row_major | col_major> and fragment<accumulator, m, n, k, float |
  __half> for m16n16k16, m32n8k16 and m8n32k16; fill_fragment, load_matrix_sync (mem_row_major /
  mem_col_major for accumulators), store_matrix_sync, mma_sync, x.num_elements and x.x[i]. CUDA leaves
  the element-to-lane mapping unspecified; here every lane holds the whole tile (num_elements = the
  tile's size, element e at row e / cols) and element e belongs to lane e % 32: a load reads, in each
  lane as it arrives, the elements that lane owns, a store writes them, and mma_sync takes each element
  from its owner, so a tile staged by other lanes without a __syncwarp, or elementwise code that
  differs between lanes, gives a wrong result. load, store and mma are warp operations (every lane,
  same line, same pointer, ldm and layout; a 32-byte aligned pointer and an ldm of a multiple of 16
  bytes, as CUDA requires). mma_sync: products of 16-bit values are exact in float and are added to C
  in k order in float; the hardware adds them with at least float precision in its own order, so
  results agree to float rounding (a __half accumulator is rounded once, at the end);
- atomicAdd (int, unsigned, unsigned long long, float, double, __half, __nv_bfloat16), atomicSub,
  atomicMax / atomicMin (integers, as in CUDA), atomicExch, atomicCAS, atomicAnd / Or / Xor;
- intrinsics: __expf, __logf, __log2f, __log10f, __exp10f, __powf, __sinf, __cosf, __tanf, __sincosf,
  __fdividef, rsqrtf, __saturatef, __f{add,sub,mul,div,sqrt,rcp}_rn, __fmaf_rn, __float2int_r*,
  bit casts (__float_as_uint ...), __popc(ll), __clz(ll), __ffs(ll), __brev, __(u)mulhi,
  __(u)mul64hi, __ldg and the cache-hint loads and stores, min / max; cuda_fp16.h and cuda_bf16.h
  through their host paths, with BuildExtension's __CUDA_NO_HALF*__ defines;
- host side: c10::cuda::getCurrentCUDAStream, CUDAGuard, OptionalCUDAGuard, current_device,
  C10_CUDA_CHECK, C10_CUDA_KERNEL_LAUNCH_CHECK, cudaDeviceGetAttribute (2 SMs, H100 limits),
  cudaFuncSetAttribute, cudaMemsetAsync, cudaMemcpyAsync, cudaGetLastError / cudaPeekAtLastError (a
  sticky last error), cudaStreamIsCapturing ($KXOPS_EMU_STREAM_CAPTURE: none, active, invalidated or
  no-context, a failing call); `.is_cuda()` and at::kCUDA mean CPU;
- kx_cuda.cuh: kx::load_aligned / store_aligned check the alignment, kx::max_grid_x() is
  $KXOPS_EMU_GRID_CAP (default INT_MAX), kx::num_sms() is 2, kx::max_smem_optin() is 227 KB or
  $KXOPS_EMU_SMEM_OPTIN bytes (cudaDeviceGetAttribute and cudaFuncSetAttribute follow it).

Caught, as a RuntimeError naming the block, the thread and the source line: a misaligned kx:: vector
access; a __syncthreads or warp operation that not every thread of the block or warp reaches (threads
that returned early included) or that is reached from different lines; a mask other than the warp's
lanes; a wmma load or store at a misaligned address or ldm, or with another pointer, ldm or layout in
some lane; shared memory past the limit; a launch configuration the GPU would refuse.

Not covered (such a .cu does not build here, or runs wrong): inline PTX (asm), code that depends on
__CUDA_ARCH__ (the host branch is compiled), cooperative groups, CUB, Thrust, libcu++ (cuda::barrier,
cuda::pipeline), async copies (cp.async, memcpy_async), TMA, thread block clusters, tensor cores other
than the nvcuda::wmma subset above (inline mma / wgmma PTX; wmma on tf32, int8, int4, b1 or double),
the hardware's own accumulation order and rounding inside mma_sync, textures and surfaces, dynamic
parallelism, grid-wide synchronisation or spinning on memory another thread or block writes,
__activemask and masks of part of a warp, curand and ATen's CUDA generators (pass the Philox seed and
offset as op arguments), __constant__ memory written by cudaMemcpyToSymbol, __launch_bounds__
(ignored), __shared__ declared in included headers. Data races are found only as far as the fiber
order exposes them; out-of-bounds accesses are not found.

Conventions a .cu keeps, for the emulator and for review:
1. It includes "kx_cuda.cuh" (CUDA runtime, c10's CUDA stream, guard and error checks, cuda_fp16.h,
   cuda_bf16.h, mma.h) and no other CUDA-only header (c10/cuda, ATen/cuda, cuda_runtime.h, cub ...).
2. Vector accesses (wider than one element) go through kx::load_aligned<V> / kx::store_aligned,
   after a host check of the alignment.
3. A grid-stride kernel caps gridDim.x at kx::max_grid_x(); SM counts come from
   kx::num_sms(tensor.get_device()) (cached per device).
4. Shared memory is declared and kernels are launched in the .cu itself (included headers are
   compiled as they are); one declarator per __shared__ declaration.
5. Outputs and workspaces come from at::empty / empty_like / empty_strided; device checks use
   `.is_cuda()`.
6. The ops are registered in `TORCH_LIBRARY_IMPL(ns, CUDA, m)` with `m.impl("name", fn)`, their
   schemas in csrc/*.cpp's `TORCH_LIBRARY(ns, m)` as string literals and string macros.
7. Warp operations take the whole warp (blocks of whole warps), and every thread of a block reaches
   each __syncthreads.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

# Headers the prelude replaces (through kx_cuda.cuh) or whose device code has no host version.
_FOREIGN_INCLUDES = ("c10/cuda/", "ATen/cuda/", "cuda_runtime.h", "cuda.h", "cub/", "thrust/", "cuda/",
                     "cooperative_groups", "mma.h", "cuda_pipeline", "cuda_awbarrier", "curand")

PRELUDE = r'''// ---- tools/cuda_emulate.py: CUDA's device side on the host (the docstring says what is covered) ----
#define KXOPS_CUDA_EMULATION 1
#define __CUDA_NO_HALF_OPERATORS__
#define __CUDA_NO_HALF_CONVERSIONS__
#define __CUDA_NO_BFLOAT16_CONVERSIONS__
#define __CUDA_NO_HALF2_OPERATORS__
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace kx_emu {

constexpr size_t kSmemDefault = 48 * 1024;  // a block's shared memory without an opt-in
constexpr size_t kSmemOptin = 227 * 1024;   // H100's cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kStack = 256 * 1024;       // an emulated thread's stack
constexpr size_t kGuard = 64 * 1024;        // below it, unmapped: an overflow faults
constexpr uint32_t kPoison = 0x7fffffffu;   // NaN in float, double, half and bfloat16; INT_MAX in int32
constexpr int kNumSms = 2;

enum Wait { kRun, kWarp, kBlock, kDone };

// Fiber contexts. On x86-64 a switch saves the callee-saved registers on the fiber's own stack and
// swaps stack pointers (a few ns); glibc's swapcontext also saves the signal mask, a system call per
// switch, which made emulation switch-bound. Elsewhere: ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

// Saves the caller's callee-saved registers, MXCSR and x87 control word on its stack, stores its stack
// pointer in *from, continues on `to` (a stack that such a switch left, or that start_context made).
__attribute__((naked, noinline)) inline void switch_stack(void** /*from*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

inline void swap_context(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }

// A context that, switched to, calls entry() (which must never return) on the stack [base, base + size).
inline void start_context(Context& c, char* base, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);  // entry's return slot 16-byte aligned, as after a call
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  sp[0] = mxcsr | (uint64_t{fpcw} << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15, r14, r13, r12, rbx, rbp
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;                                 // entry's return address: none
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void swap_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start_context(Context& c, char* base, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Block;

struct Thread {
  Context ctx;
  uint3 idx;
  Wait wait = kRun;
  const char* op = "";  // the warp or block operation it waits in
  unsigned mask = 0;
  std::source_location site;
  // A warp operation whose work is done once for the warp when its lanes are released (wmma):
  // run on lanes [first, last) with each lane's pending value (a pointer to its arguments).
  void (*collective)(Block&, int first, int last) = nullptr;
};

struct Block {
  std::vector<Thread> t;  // by linear thread id: lane = id % 32, warp = id / 32
  Context sched;
  int cur = -1;           // the running thread; -1 in the scheduler
  unsigned char* smem = nullptr;
  size_t used = 0, limit = 0;
  std::vector<std::pair<const void*, size_t>> statics;  // static __shared__ variables: key, offset
  // What each thread brings to its next synchronisation, and what the last warp operation and the
  // last __syncthreads gave out (apart: other warps' operations come before a thread reads the latter).
  std::vector<uint64_t> pending, warp_out, block_out;
  const std::function<void()>* kernel = nullptr;
  std::string error;
};

inline thread_local Block* current = nullptr;

inline std::string str(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

inline std::string site_str(const std::source_location& s) {
  const char* f = std::strrchr(s.file_name(), '/');
  return std::string(f ? f + 1 : s.file_name()) + ":" + std::to_string(s.line());
}

// In a kernel: ends the launch with `what` as a RuntimeError (the scheduler throws it).
[[noreturn]] inline void fail(const std::string& what) {
  Block* b = current;
  TORCH_CHECK(b != nullptr && b->cur >= 0, "kx_emu: ", what);
  b->error = what + " (block " + str(blockIdx) + ", thread " + str(threadIdx) + ")";
  swap_context(b->t[b->cur].ctx, b->sched);
  std::abort();  // never resumed
}

inline Block& block_of(const char* op) {
  if (current == nullptr || current->cur < 0) TORCH_CHECK(false, "kx_emu: ", op, " outside a kernel");
  return *current;
}

inline void check_aligned(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%p", p);
    fail(std::string(what) + ": address " + buf + " is not " + std::to_string(align) + "-byte aligned");
  }
}

inline int64_t grid_cap() {
  const char* v = std::getenv("KXOPS_EMU_GRID_CAP");
  return v ? std::max<int64_t>(1, std::atoll(v)) : INT_MAX;
}

inline void poison(void* p, size_t bytes) {
  unsigned char* c = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < bytes; i += 4) std::memcpy(c + i, &kPoison, std::min<size_t>(4, bytes - i));
}

inline at::Tensor poisoned(at::Tensor t) {
  const auto st = t.scalar_type();
  if (at::isFloatingType(st) || at::isComplexType(st)) t.fill_(NAN);
  else if (st == at::kBool) t.fill_(true);
  else AT_DISPATCH_INTEGRAL_TYPES(st, "poison", [&] { t.fill_(std::numeric_limits<scalar_t>::max()); });
  return t;
}
inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions o = {}, std::optional<at::MemoryFormat> f = std::nullopt) {
  return poisoned(at::empty(size, o, f));
}
inline at::Tensor empty_like(const at::Tensor& x, at::TensorOptions o = {}, std::optional<at::MemoryFormat> f = std::nullopt) {
  return poisoned(at::empty_like(x, o, f));
}
inline at::Tensor empty_strided(at::IntArrayRef size, at::IntArrayRef stride, at::TensorOptions o = {}) {
  return poisoned(at::empty_strided(size, stride, o));
}

// ---- shared memory ----

inline unsigned char* dynamic_smem() { return block_of("extern __shared__").smem; }

// Key: a lambda's type, unique per declaration and per template instantiation, as on the GPU.
// Align: the declaration's __align__(n), if any.
template <typename A, size_t Align, typename Key>
A& static_smem(Key) {
  static const char key = 0;
  Block& b = block_of("__shared__");
  for (const auto& [k, off] : b.statics)
    if (k == &key) return *reinterpret_cast<A*>(b.smem + off);
  const size_t align = std::max<size_t>({alignof(A), Align, 16});
  const size_t off = (b.used + align - 1) / align * align;
  if (off + sizeof(A) > b.limit)
    fail("__shared__ variables past " + std::to_string(b.limit) + " bytes of shared memory");
  poison(b.smem + off, sizeof(A));
  b.used = off + sizeof(A);
  b.statics.emplace_back(&key, off);
  return *reinterpret_cast<A*>(b.smem + off);
}

// The device's opt-in limit: H100's, or $KXOPS_EMU_SMEM_OPTIN bytes (up to H100's), so that a test can
// run a kernel's choices for a device with less (an A100 has 163 KB).
inline size_t smem_optin_limit() {
  const char* v = std::getenv("KXOPS_EMU_SMEM_OPTIN");
  return v ? std::clamp<size_t>(std::strtoull(v, nullptr, 10), kSmemDefault, kSmemOptin) : kSmemOptin;
}

inline size_t& smem_optin() {  // the largest cudaFuncAttributeMaxDynamicSharedMemorySize set
  static size_t v = kSmemDefault;
  return v;
}

// ---- fibers and synchronisation ----

inline void wait_at(Wait w, const char* op, unsigned mask, const std::source_location& site) {
  Block& b = block_of(op);
  Thread& me = b.t[b.cur];
  me.wait = w;
  me.op = op;
  me.mask = mask;
  me.site = site;
  swap_context(me.ctx, b.sched);
}

inline int lanes_of(const Block& b, int id) {  // threads in id's warp
  return std::min<int>(32, static_cast<int>(b.t.size()) - id / 32 * 32);
}

inline unsigned lane_mask(int lanes) { return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1; }

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "kx_emu: warp operations take up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Brings v to a warp operation; returns what the warp's lanes brought (lane 0 first).
inline const uint64_t* warp_sync(uint64_t v, const char* op, unsigned mask, const std::source_location& site) {
  Block& b = block_of(op);
  const int id = b.cur;
  b.pending[id] = v;
  wait_at(kWarp, op, mask, site);
  return &b.warp_out[id / 32 * 32];
}

inline const uint64_t* block_sync(uint64_t v, const char* op, const std::source_location& site) {
  Block& b = block_of(op);
  b.pending[b.cur] = v;
  wait_at(kBlock, op, 0, site);
  return b.block_out.data();
}

template <typename T>
T shuffle(const char* op, unsigned mask, T v, int src, int width, const std::source_location& site) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail(std::string(op) + ": width must be a power of 2 up to 32");
  const uint64_t* lanes = warp_sync(to_bits(v), op, mask, site);
  if (src >= lanes_of(*current, current->cur)) fail(std::string(op) + ": source lane " + std::to_string(src) + " does not exist");
  return from_bits<T>(lanes[src]);
}

inline int lane() { return block_of("a warp shuffle").cur % 32; }

template <typename T, typename Op>
T warp_fold(unsigned mask, T v, Op op, const char* name, const std::source_location& s) {
  const uint64_t* lanes = warp_sync(to_bits(v), name, mask, s);
  T r = from_bits<T>(lanes[0]);
  for (int l = 1; l < lanes_of(*current, current->cur); ++l) r = op(r, from_bits<T>(lanes[l]));
  return r;
}

template <typename T, typename Better>
T atomic_extremum(T* p, T v, Better better) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMax and atomicMin take integers");
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (better(v, old) && !a.compare_exchange_weak(old, v)) {}
  return old;
}

[[noreturn]] inline void divergence(Block& b, int first, int last) {
  std::string what;
  for (int i = first; i < last;) {  // runs of threads in the same state
    int j = i;
    const Thread& t = b.t[i];
    while (j < last && b.t[j].wait == t.wait && std::strcmp(b.t[j].op, t.op) == 0 &&
           b.t[j].site.line() == t.site.line() && b.t[j].mask == t.mask)
      ++j;
    what += "\n  threads " + std::to_string(i) + ".." + std::to_string(j - 1) + ": " +
            (t.wait == kDone ? std::string("returned") : std::string("wait in ") + t.op + " at " + site_str(t.site));
    if (t.wait == kWarp) {
      char mask[16];
      std::snprintf(mask, sizeof(mask), "%#x", t.mask);
      what += std::string(" with mask ") + mask;
    }
    i = j;
  }
  TORCH_CHECK(false, "kx_emu: block ", str(blockIdx), ": a __syncthreads or warp operation that not every thread ",
              "reaches (or reaches from another line, or with a mask other than its warp's lanes):", what);
}

inline bool same(const Thread& a, const Thread& b) {
  return a.wait == b.wait && std::strcmp(a.op, b.op) == 0 && a.site.line() == b.site.line() &&
         std::strcmp(a.site.file_name(), b.site.file_name()) == 0 && a.mask == b.mask;
}

// Lets the lanes [first, last) of a warp go on when they all wait in one warp operation.
inline bool release_warp(Block& b, int first, int last) {
  for (int i = first; i < last; ++i)
    if (b.t[i].wait != kWarp) return false;
  for (int i = first; i < last; ++i)
    if (!same(b.t[i], b.t[first]) || b.t[i].mask != lane_mask(last - first)) divergence(b, first, last);
  std::copy(&b.pending[first], &b.pending[last - 1] + 1, &b.warp_out[first]);
  if (auto* fn = b.t[first].collective) {
    for (int i = first; i < last; ++i) b.t[i].collective = nullptr;
    fn(b, first, last);  // before any lane resumes: every lane's arguments are still live
  }
  for (int i = first; i < last; ++i) b.t[i].wait = kRun;
  return true;
}

// Lets the block go on when all its threads wait in one __syncthreads; false when all returned.
inline bool release_block(Block& b) {
  const int n = static_cast<int>(b.t.size());
  if (std::all_of(b.t.begin(), b.t.end(), [](const Thread& t) { return t.wait == kDone; })) return false;
  for (const Thread& t : b.t)
    if (t.wait != kBlock || !same(t, b.t[0])) divergence(b, 0, n);
  b.block_out = b.pending;
  for (Thread& t : b.t) t.wait = kRun;
  return true;
}

inline void fiber_main() {
  Block& b = *current;
  try {
    (*b.kernel)();
  } catch (const std::exception& e) {
    fail(e.what());
  }
  Thread& me = b.t[b.cur];
  me.wait = kDone;
  swap_context(me.ctx, b.sched);
}

struct Stacks {  // kept for the next launch
  std::vector<char*> s;
  char* operator[](size_t i) {
    while (s.size() <= i) {
      void* p = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "kx_emu: no memory for a thread's stack");
      mprotect(p, kGuard, PROT_NONE);
      s.push_back(static_cast<char*>(p) + kGuard);
    }
    return s[i];
  }
  ~Stacks() {
    for (char* p : s) munmap(p - kGuard, kStack + kGuard);
  }
};

inline void run_block(Block& b) {
  static thread_local Stacks stacks;
  const int n = static_cast<int>(b.t.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.t[i];
    start_context(t.ctx, stacks[i], kStack, &fiber_main);
    t.wait = kRun;
  }
  // Each warp runs as far as it can before the next starts, lane after lane between warp
  // operations, in thread order up to a __syncthreads and in reverse order up to the next: the
  // most skew a GPU could show, so that a missing barrier shows as a wrong result.
  bool forward = true;
  do {
    const int nwarps = (n + 31) / 32;
    for (int k = 0; k < nwarps; ++k) {
      const int first = 32 * (forward ? k : nwarps - 1 - k), last = std::min(n, first + 32);
      do {
        for (int j = 0; j < last - first; ++j) {
          const int i = forward ? first + j : last - 1 - j;
          if (b.t[i].wait != kRun) continue;
          b.cur = i;
          threadIdx = b.t[i].idx;
          swap_context(b.sched, b.t[i].ctx);
          b.cur = -1;
          TORCH_CHECK(b.error.empty(), "kx_emu: ", b.error);
        }
      } while (release_warp(b, first, last));
    }
    forward = !forward;
  } while (release_block(b));
}

inline void run(dim3 grid, dim3 block, size_t smem, const std::function<void()>& kernel) {
  TORCH_CHECK(current == nullptr, "kx_emu: a launch from device code (dynamic parallelism is not emulated)");
  const uint64_t n = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(n >= 1 && n <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64,
              "kx_emu: invalid configuration argument: block ", str(block));
  TORCH_CHECK(grid.x >= 1 && grid.x <= INT_MAX && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "kx_emu: invalid configuration argument: grid ", str(grid));
  TORCH_CHECK(smem <= smem_optin(), "kx_emu: ", smem, " bytes of dynamic shared memory, over the ", smem_optin(),
              " allowed (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raises the limit)");
  static thread_local std::unique_ptr<unsigned char, decltype(&std::free)> arena(
      static_cast<unsigned char*>(std::aligned_alloc(1024, kSmemOptin)), &std::free);
  Block b;
  b.t.resize(n);
  for (uint64_t i = 0; i < n; ++i)
    b.t[i].idx = {unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (uint64_t{block.x} * block.y))};
  b.pending.assign(n, 0);
  b.warp_out.assign(n, 0);
  b.block_out.assign(n, 0);
  b.kernel = &kernel;
  b.smem = arena.get();
  b.limit = smem_optin();
  blockDim = block;
  gridDim = grid;
  struct Reset {
    ~Reset() { current = nullptr; }
  } reset;
  current = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        poison(b.smem, smem);
        b.used = smem;
        b.statics.clear();
        run_block(b);
      }
}

// `kernel<<<grid, block, smem, stream>>>(args)` becomes `launch(call, grid, block, smem, stream)(args)`,
// where call(args...) calls the kernel: every thread gets its own copy of the arguments.
template <typename Call>
struct Launch {
  Call call;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    const std::tuple<std::decay_t<A>...> args(std::forward<A>(a)...);
    const std::function<void()> kernel = [&] { std::apply(call, args); };
    run(grid, block, smem, kernel);
  }
};

template <typename Call>
Launch<Call> launch(Call call, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {call, grid, block, smem};
}

// ---- the CUDA runtime and c10::cuda, as far as kernels' host code uses them ----

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kNumSms; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSmemDefault; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(smem_optin_limit()); break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxGridDimX: *value = INT_MAX; break;
    case cudaDevAttrMaxGridDimY: case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    default: TORCH_CHECK(false, "kx_emu: cudaDeviceGetAttribute(", int(attr), ") is not emulated");
  }
  return cudaSuccess;
}

template <typename F>
cudaError_t func_set_attribute(F*, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > smem_optin_limit()) return cudaErrorInvalidValue;
    smem_optin() = std::max(smem_optin(), size_t(value));
  }
  return cudaSuccess;
}

inline cudaError_t memset_async(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t memcpy_async(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
// The runtime's sticky last error: set by an emulated call that fails, returned and cleared by
// cudaGetLastError (cudaPeekAtLastError leaves it).
inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}
inline cudaError_t get_last_error() { return std::exchange(last_error(), cudaSuccess); }
inline cudaError_t peek_last_error() { return last_error(); }

// Graph capture of the (only) stream, as $KXOPS_EMU_STREAM_CAPTURE says: "none" (default), "active",
// "invalidated", or "no-context" (the call fails as before any CUDA context exists, and sets the last
// error).
inline cudaError_t stream_is_capturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  const char* v = std::getenv("KXOPS_EMU_STREAM_CAPTURE");
  const std::string mode = v ? v : "none";
  if (mode == "no-context") return last_error() = cudaErrorInitializationError;
  TORCH_CHECK(mode == "none" || mode == "active" || mode == "invalidated",
              "kx_emu: KXOPS_EMU_STREAM_CAPTURE must be none, active, invalidated or no-context, got ", mode);
  *status = mode == "active"        ? cudaStreamCaptureStatusActive
            : mode == "invalidated" ? cudaStreamCaptureStatusInvalidated
                                    : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

}  // namespace kx_emu

#define cudaDeviceGetAttribute ::kx_emu::device_get_attribute
#define cudaFuncSetAttribute ::kx_emu::func_set_attribute
#define cudaMemsetAsync ::kx_emu::memset_async
#define cudaMemcpyAsync ::kx_emu::memcpy_async
#define cudaGetDevice ::kx_emu::get_device
#define cudaGetLastError ::kx_emu::get_last_error
#define cudaPeekAtLastError ::kx_emu::peek_last_error
#define cudaStreamIsCapturing ::kx_emu::stream_is_capturing
#define C10_CUDA_CHECK(EXPR)                                                           \
  do {                                                                                 \
    const cudaError_t kx_err = (EXPR);                                                 \
    TORCH_CHECK(kx_err == cudaSuccess, "kx_emu: ", #EXPR, " failed: ", int(kx_err));   \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
  c10::DeviceIndex device_index() const { return 0; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline c10::DeviceIndex current_device() { return 0; }
inline c10::DeviceIndex device_count() { return 1; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
  void set_device(c10::Device) {}
  void set_index(c10::DeviceIndex) {}
};
}  // namespace c10::cuda
namespace at::cuda {
using c10::cuda::CUDAGuard;
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::OptionalCUDAGuard;
}  // namespace at::cuda

// ---- device functions ----

inline void __syncthreads(std::source_location s = std::source_location::current()) {
  kx_emu::block_sync(0, "__syncthreads", s);
}
inline int __syncthreads_count(int p, std::source_location s = std::source_location::current()) {
  const uint64_t* v = kx_emu::block_sync(p != 0, "__syncthreads_count", s);
  return static_cast<int>(std::count(v, v + kx_emu::current->t.size(), 1));
}
inline int __syncthreads_and(int p, std::source_location s = std::source_location::current()) {
  return __syncthreads_count(p, s) == static_cast<int>(kx_emu::current->t.size());
}
inline int __syncthreads_or(int p, std::source_location s = std::source_location::current()) {
  return __syncthreads_count(p, s) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location s = std::source_location::current()) {
  kx_emu::warp_sync(0, "__syncwarp", mask, s);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, std::source_location s = std::source_location::current()) {
  const int lane = kx_emu::lane();
  return kx_emu::shuffle("__shfl_sync", mask, v, (lane & -width) + (src & (width - 1)), width, s);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, std::source_location s = std::source_location::current()) {
  const int lane = kx_emu::lane(), src = lane - static_cast<int>(delta);
  return kx_emu::shuffle("__shfl_up_sync", mask, v, src < (lane & -width) ? lane : src, width, s);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize, std::source_location s = std::source_location::current()) {
  const int lane = kx_emu::lane(), src = lane + static_cast<int>(delta);
  return kx_emu::shuffle("__shfl_down_sync", mask, v, src >= (lane & -width) + width ? lane : src, width, s);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, std::source_location s = std::source_location::current()) {
  const int lane = kx_emu::lane(), src = lane ^ lane_mask;
  return kx_emu::shuffle("__shfl_xor_sync", mask, v, src >= (lane & -width) + width ? lane : src, width, s);
}
inline unsigned __ballot_sync(unsigned mask, int p, std::source_location s = std::source_location::current()) {
  const uint64_t* v = kx_emu::warp_sync(p != 0, "__ballot_sync", mask, s);
  unsigned r = 0;
  for (int l = 0; l < kx_emu::lanes_of(*kx_emu::current, kx_emu::current->cur); ++l) r |= unsigned(v[l]) << l;
  return r;
}
inline int __any_sync(unsigned mask, int p, std::source_location s = std::source_location::current()) {
  return __ballot_sync(mask, p, s) != 0;
}
inline int __all_sync(unsigned mask, int p, std::source_location s = std::source_location::current()) {
  return __ballot_sync(mask, p, s) == mask;
}
template <typename T>
T __reduce_add_sync(unsigned mask, T v, std::source_location s = std::source_location::current()) {
  return kx_emu::warp_fold(mask, v, [](T a, T b) { return a + b; }, "__reduce_add_sync", s);
}
template <typename T>
T __reduce_min_sync(unsigned mask, T v, std::source_location s = std::source_location::current()) {
  return kx_emu::warp_fold(mask, v, [](T a, T b) { return std::min(a, b); }, "__reduce_min_sync", s);
}
template <typename T>
T __reduce_max_sync(unsigned mask, T v, std::source_location s = std::source_location::current()) {
  return kx_emu::warp_fold(mask, v, [](T a, T b) { return std::max(a, b); }, "__reduce_max_sync", s);
}

template <typename T>
T atomicAdd(T* p, std::type_identity_t<T> v) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    const T old = *p;
    *p = __hadd(old, v);
    return old;
  } else {
    return std::atomic_ref<T>(*p).fetch_add(v);
  }
}
template <typename T>
T atomicSub(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T>
T atomicExch(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T>
T atomicCAS(T* p, std::type_identity_t<T> expected, std::type_identity_t<T> v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, v);
  return expected;
}
template <typename T>
T atomicMax(T* p, std::type_identity_t<T> v) { return kx_emu::atomic_extremum(p, v, std::greater<T>()); }
template <typename T>
T atomicMin(T* p, std::type_identity_t<T> v) { return kx_emu::atomic_extremum(p, v, std::less<T>()); }
template <typename T>
T atomicAnd(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <typename T>
T atomicOr(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <typename T>
T atomicXor(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_xor(v); }

// glibc declares these (as its own aliases) without exporting them: defined here.
float __expf(float x) noexcept { return expf(x); }
float __logf(float x) noexcept { return logf(x); }
float __log2f(float x) noexcept { return log2f(x); }
float __log10f(float x) noexcept { return log10f(x); }
float __exp10f(float x) noexcept { return exp10f(x); }
float __powf(float x, float y) noexcept { return powf(x, y); }
float __sinf(float x) noexcept { return sinf(x); }
float __cosf(float x) noexcept { return cosf(x); }
float __tanf(float x) noexcept { return tanf(x); }
void __sincosf(float x, float* s, float* c) noexcept { sincosf(x, s, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline int __popc(unsigned v) { return std::popcount(v); }
inline int __popcll(unsigned long long v) { return std::popcount(v); }
inline int __clz(int v) { return std::countl_zero(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return std::countl_zero(static_cast<unsigned long long>(v)); }
inline int __ffs(int v) { return v ? std::countr_zero(static_cast<unsigned>(v)) + 1 : 0; }
inline int __ffsll(long long v) { return v ? std::countr_zero(static_cast<unsigned long long>(v)) + 1 : 0; }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((int64_t{a} * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldca(const T* p) { return *p; }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> T __ldlu(const T* p) { return *p; }
template <typename T> T __ldcv(const T* p) { return *p; }
template <typename T> void __stwb(T* p, T v) { *p = v; }
template <typename T> void __stcg(T* p, T v) { *p = v; }
template <typename T> void __stcs(T* p, T v) { *p = v; }
template <typename T> void __stwt(T* p, T v) { *p = v; }

// CUDA's min / max of mixed arithmetic types (fminf / fmaxf for floating point).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  else return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  else return C(a) < C(b) ? C(b) : C(a);
}

// ---- tensor cores: nvcuda::wmma ----
// A fragment holds its whole tile in every lane (num_elements = rows * cols, element e at row
// e / cols, column e % cols): CUDA leaves the element-to-lane mapping unspecified, so code that
// keeps to the API cannot tell. Element e "belongs" to lane e % 32: load_matrix_sync reads in each
// lane, when it arrives, only the elements it owns, store_matrix_sync writes only those, and a
// lane's elements are what mma_sync and the next load take from it; when the warp is released every
// lane gets the assembled tile. So a lane that reads a tile other lanes have yet to write sees the
// poison, and elementwise code (x[i]) that differs between lanes shows.
namespace kx_emu::wmma_impl {

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<float>(v);
}

template <typename T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return static_cast<T>(v);
}

[[noreturn]] inline void warp_error(const Block& b, int first, const std::string& what) {
  TORCH_CHECK(false, "kx_emu: block ", str(blockIdx), ", warp ", first / 32, ": ", what, " at ",
              site_str(b.t[first].site));
}

inline void full_warp(const Block& b, int first, int last, const char* op) {
  if (last - first != 32) warp_error(b, first, std::string(op) + " needs a warp of 32 threads");
}

template <typename Frag>
void check_access(const void* p, unsigned ldm, const char* op) {
  using T = typename Frag::storage_element_type;
  check_aligned(p, 32, op);  // mptr: 256-bit aligned
  if (ldm * sizeof(T) % 16 != 0)
    fail(std::string(op) + ": ldm " + std::to_string(ldm) + " is not a multiple of " + std::to_string(16 / sizeof(T)) +
         " elements (16 bytes)");
}

template <typename Frag, typename T>
struct Access {  // a lane's arguments of a load or store
  Frag* frag;
  T* ptr;
  unsigned ldm;
  bool col;  // the memory holds the tile column-major
};

// Offset in memory of fragment element e.
template <typename Frag>
size_t offset(int e, unsigned ldm, bool col) {
  const int r = e / Frag::kCols, c = e % Frag::kCols;
  return col ? size_t(c) * ldm + r : size_t(r) * ldm + c;
}

template <typename Frag, typename T>
void same_access(const Block& b, int first, int last, const char* op) {
  const auto* a0 = reinterpret_cast<const Access<Frag, T>*>(b.pending[first]);
  for (int i = first + 1; i < last; ++i) {
    const auto* a = reinterpret_cast<const Access<Frag, T>*>(b.pending[i]);
    if (a->ptr != a0->ptr || a->ldm != a0->ldm || a->col != a0->col)
      warp_error(b, first, std::string(op) + ": lanes " + std::to_string(first % 32) + " and " +
                               std::to_string(i % 32) + " pass a different pointer, ldm or layout");
  }
}

// Every lane gets element e from its owner, lane e % 32.
template <typename Frag>
void assemble(Frag* const* frags) {
  typename Frag::storage_element_type tile[Frag::num_elements];
  for (int e = 0; e < Frag::num_elements; ++e) tile[e] = frags[e % 32]->x[e];
  for (int l = 0; l < 32; ++l) std::copy(tile, tile + Frag::num_elements, frags[l]->x);
}

template <typename Frag, typename T>
void load_collective(Block& b, int first, int last) {
  full_warp(b, first, last, "wmma::load_matrix_sync");
  same_access<Frag, T>(b, first, last, "wmma::load_matrix_sync");
  Frag* frags[32];
  for (int l = 0; l < 32; ++l) frags[l] = reinterpret_cast<Access<Frag, T>*>(b.pending[first + l])->frag;
  assemble(frags);
}

template <typename Frag, typename T>
void store_collective(Block& b, int first, int last) {
  full_warp(b, first, last, "wmma::store_matrix_sync");
  same_access<Frag, T>(b, first, last, "wmma::store_matrix_sync");
}

template <typename FD, typename FA, typename FB, typename FC>
struct MmaArgs {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
};

// D = A B + C: products of 16-bit values are exact in float; they are added to C in k order in
// float (the hardware adds them with at least float precision, in its own order).
template <typename FD, typename FA, typename FB, typename FC>
void mma_collective(Block& blk, int first, int last) {
  full_warp(blk, first, last, "wmma::mma_sync");
  constexpr int M = FA::kRows, K = FA::kCols, N = FB::kCols;
  float A[M * K], B[K * N], D[M * N];
  const MmaArgs<FD, FA, FB, FC>* lane[32];
  for (int l = 0; l < 32; ++l) lane[l] = reinterpret_cast<const MmaArgs<FD, FA, FB, FC>*>(blk.pending[first + l]);
  for (int e = 0; e < M * K; ++e) A[e] = to_float(lane[e % 32]->a->x[e]);
  for (int e = 0; e < K * N; ++e) B[e] = to_float(lane[e % 32]->b->x[e]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = to_float(lane[(i * N + j) % 32]->c->x[i * N + j]);
      for (int k = 0; k < K; ++k) acc += A[i * K + k] * B[k * N + j];
      D[i * N + j] = acc;
    }
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < M * N; ++e) lane[l]->d->x[e] = from_float<typename FD::storage_element_type>(D[e]);
}

// Brings a lane's arguments to the warp operation `op`; fn does its work once all lanes are there.
inline void sync(const void* args, void (*fn)(Block&, int, int), const char* op, const std::source_location& s) {
  Block& b = block_of(op);
  b.t[b.cur].collective = fn;
  warp_sync(reinterpret_cast<uint64_t>(args), op, lane_mask(lanes_of(b, b.cur)), s);
}

// A lane's part of load_matrix_sync: the elements it owns, now; the rest when the warp is there.
template <typename Frag, typename T>
void load(Frag& f, const T* p, unsigned ldm, bool col, const std::source_location& s) {
  check_access<Frag>(p, ldm, "wmma::load_matrix_sync");
  for (int e = ::kx_emu::lane(); e < Frag::num_elements; e += 32) f.x[e] = p[offset<Frag>(e, ldm, col)];
  Access<Frag, const T> a{&f, p, ldm, col};
  sync(&a, &load_collective<Frag, const T>, "wmma::load_matrix_sync", s);
}

}  // namespace kx_emu::wmma_impl

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment {
  static_assert((m == 16 && n == 16 && k == 16) || (m == 32 && n == 8 && k == 16) || (m == 8 && n == 32 && k == 16),
                "kx_emu: wmma shapes m16n16k16, m32n8k16 and m8n32k16 are emulated");
  static_assert(std::is_same_v<Use, accumulator> ? (std::is_same_v<T, float> || std::is_same_v<T, __half>)
                                                 : (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>),
                "kx_emu: wmma on __half and __nv_bfloat16 with float or __half accumulators is emulated");
  static_assert(std::is_same_v<Use, accumulator> == std::is_same_v<Layout, void>,
                "wmma: matrix_a and matrix_b fragments take row_major or col_major, accumulators no layout");

 public:
  using element_type = T;
  using storage_element_type = T;
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? k : m;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? k : n;
  static constexpr bool kColMajor = std::is_same_v<Layout, col_major>;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];
};

template <typename Use, int m, int n, int k, typename T, typename L, typename V>
void fill_fragment(fragment<Use, m, n, k, T, L>& f, const V& v) {
  for (auto& e : f.x) {
    if constexpr (std::is_same_v<V, T>) e = v;
    else e = ::kx_emu::wmma_impl::from_float<T>(static_cast<float>(v));
  }
}

template <typename Use, int m, int n, int k, typename T, typename L>
void load_matrix_sync(fragment<Use, m, n, k, T, L>& f, const T* p, unsigned ldm,
                      std::source_location s = std::source_location::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "wmma: an accumulator load takes a layout_t");
  ::kx_emu::wmma_impl::load(f, p, ldm, fragment<Use, m, n, k, T, L>::kColMajor, s);
}

template <int m, int n, int k, typename T>
void load_matrix_sync(fragment<accumulator, m, n, k, T>& f, const T* p, unsigned ldm, layout_t layout,
                      std::source_location s = std::source_location::current()) {
  ::kx_emu::wmma_impl::load(f, p, ldm, layout == mem_col_major, s);
}

template <int m, int n, int k, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, m, n, k, T>& f, unsigned ldm, layout_t layout,
                       std::source_location s = std::source_location::current()) {
  using Frag = fragment<accumulator, m, n, k, T>;
  namespace w = ::kx_emu::wmma_impl;
  w::check_access<Frag>(p, ldm, "wmma::store_matrix_sync");
  const bool col = layout == mem_col_major;
  const int lane = ::kx_emu::lane();
  for (int e = lane; e < Frag::num_elements; e += 32) p[w::offset<Frag>(e, ldm, col)] = f.x[e];
  w::Access<Frag, T> a{const_cast<Frag*>(&f), p, ldm, col};
  w::sync(&a, &w::store_collective<Frag, T>, "wmma::store_matrix_sync", s);
}

template <int m, int n, int k, typename TA, typename LA, typename LB, typename TC, typename TD>
void mma_sync(fragment<accumulator, m, n, k, TD>& d, const fragment<matrix_a, m, n, k, TA, LA>& a,
              const fragment<matrix_b, m, n, k, TA, LB>& b, const fragment<accumulator, m, n, k, TC>& c,
              std::source_location s = std::source_location::current()) {
  using FD = fragment<accumulator, m, n, k, TD>;
  using FA = fragment<matrix_a, m, n, k, TA, LA>;
  using FB = fragment<matrix_b, m, n, k, TA, LB>;
  using FC = fragment<accumulator, m, n, k, TC>;
  namespace w = ::kx_emu::wmma_impl;
  w::MmaArgs<FD, FA, FB, FC> args{&d, &a, &b, &c};
  w::sync(&args, &w::mma_collective<FD, FA, FB, FC>, "wmma::mma_sync", s);
}

}  // namespace nvcuda::wmma
// ---- end of the prelude ----
'''


class EmulationError(RuntimeError):
    """The .cu does not keep to the conventions of this module's docstring."""


def source_path(source: str) -> str:
    """A family name ("rope") or a path to a .cu file (relative to the repository root or not)."""
    if not source.endswith(".cu"):
        return os.path.join(CUDA_DIR, f"{source}_cuda.cu")
    return source if os.path.isabs(source) else os.path.join(ROOT, source)


def _mask(s: str) -> str:
    """s with comments and the insides of string and character literals blanked (same length and
    lines), so that patterns match code only."""
    out = list(s)
    i, n = 0, len(s)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if s.startswith("//", i):
            j = s.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif s.startswith("/*", i):
            j = s.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif s[i] == '"' or (s[i] == "'" and not (i and s[i - 1].isdigit())):  # 1'000: a digit separator
            j = i + 1
            while j < n and s[j] != s[i]:
                j += 2 if s[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _line(s: str, pos: int) -> int:
    return s.count("\n", 0, pos) + 1


def _block_end(masked: str, start: int) -> int:
    """The index after the brace block that opens at or after start."""
    i = masked.index("{", start)
    depth = 0
    for j in range(i, len(masked)):
        depth += {"{": 1, "}": -1}.get(masked[j], 0)
        if depth == 0:
            return j + 1
    raise EmulationError("unbalanced braces")


def _same_lines(old: str, new: str) -> str:
    """new, padded with newlines so that the file keeps its line numbers."""
    return new + "\n" * max(0, old.count("\n") - new.count("\n"))


def _kernel_start(masked: str, end: int) -> int:
    """Start of the kernel expression before `<<<` at end: a name, maybe qualified, maybe with
    template arguments."""
    i = end
    while i > 0 and masked[i - 1].isspace():
        i -= 1
    if i > 0 and masked[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            depth += {">": 1, "<": -1}.get(masked[i], 0)
            if depth == 0:
                break
        while i > 0 and masked[i - 1].isspace():
            i -= 1
    while i > 0 and (masked[i - 1].isalnum() or masked[i - 1] in "_:"):
        i -= 1
    return i


def _string_macros(text: str, masked: str) -> dict[str, str]:
    """#define NAME "..." "..." (continued lines allowed): name -> its tokens as text."""
    macros = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+((?:[^\n]*\\\n)*[^\n]*)", masked, re.M):
        macros[m.group(1)] = text[m.start(2):m.end(2)].replace("\\\n", " ")
    return macros


def _concat(tokens: str, macros: dict[str, str], where: str) -> str:
    """The string that adjacent literals and string macros spell."""
    out = []
    for lit, name in re.findall(r'"((?:[^"\\]|\\.)*)"|(\w+)', tokens):
        if name:
            if name not in macros:
                raise EmulationError(f"{where}: {name} is not a string macro of that file")
            out.append(_concat(macros[name], macros, where))
        else:
            out.append(lit)
    return "".join(out)


def _schemas(path: str, ns: str) -> dict[str, str]:
    """op name -> schema, from the TORCH_LIBRARY(ns, m) block of the file at path ({} if none)."""
    text = open(path).read()
    masked = _mask(text)
    m = re.search(rf"\bTORCH_LIBRARY\s*\(\s*{ns}\s*,\s*(\w+)\s*\)", masked)
    if not m:
        return {}
    macros = _string_macros(text, masked)
    end = _block_end(masked, m.end())
    out = {}
    for d in re.finditer(rf"\b{m.group(1)}\s*\.\s*def\s*\(", masked[m.end():end]):
        a = m.end() + d.end()
        b = a + re.search(r"[,)]", masked[a:end]).start()  # the first argument: literals and macros
        schema = _concat(text[a:b], macros, f"{os.path.relpath(path, ROOT)}:{_line(text, a)}")
        out[re.match(r"[\w.]+", schema).group(0)] = schema
    return out


def _edits(text: str, masked: str, path: str):
    """The rewrites that make the .cu host C++: (start, end, replacement), and the ops implemented
    per namespace, and the namespaces the file defines itself."""
    rel = os.path.relpath(path, ROOT)
    edits, impls, own = [], {}, set()

    def bad(pos, why):
        raise EmulationError(f"{rel}:{_line(text, pos)}: {why} (conventions: tools/cuda_emulate.py)")

    for m in re.finditer(r"^[ \t]*#[ \t]*include[ \t]*[<\"]", masked, re.M):
        target = re.match(r"[^>\"]*", text[m.end():]).group(0)
        if target.startswith(_FOREIGN_INCLUDES):
            bad(m.start(), f"#include <{target}>: include \"kx_cuda.cuh\" for the CUDA runtime and c10/cuda "
                           "(other CUDA-only headers are not emulated)")
    if not re.search(r'^[ \t]*#[ \t]*include[ \t]*"([^"]*/)?kx_cuda\.cuh"', text, re.M):
        raise EmulationError(f"{rel}: does not include \"kx_cuda.cuh\"")

    for m in re.finditer(r"\b__shared__\b", masked):
        start = max(masked.rfind(c, 0, m.start()) for c in ";{}") + 1
        while (line := re.match(r"\s*#[^\n]*\n", masked[start:])) and start + line.end() <= m.start():
            start += line.end()  # a preprocessor line before the declaration
        start += len(masked[start:]) - len(masked[start:].lstrip())
        end = masked.index(";", m.end()) + 1
        align = re.search(r"__align__\s*\(\s*(\d+)\s*\)", masked[start:end - 1])
        decl = re.sub(r"__align__\s*\(\s*\d+\s*\)|\b(?:static|__shared__)\b", " ", masked[start:end - 1])
        extern = re.match(r"\s*extern\b", decl)
        d = re.fullmatch(r"(.+?)\s*\b([A-Za-z_]\w*)\s*((?:\[[^\]]*\])*)\s*", decl[extern.end():] if extern else decl, re.S)
        flat = decl
        while "<" in flat and (inner := re.sub(r"<[^<>]*>", "", flat)) != flat:
            flat = inner  # template arguments may hold commas
        if not d or "=" in decl or "," in flat or bool(extern) != (re.sub(r"\s", "", d.group(3)) == "[]"):
            bad(m.start(), "one __shared__ variable per declaration, without an initializer; "
                           "extern __shared__ T name[] for dynamic shared memory")
        ty, name = " ".join(d.group(1).split()), d.group(2)
        new = (f"{ty}* const {name} = reinterpret_cast<{ty}*>(::kx_emu::dynamic_smem());" if extern else
               f"auto& {name} = ::kx_emu::static_smem<{ty}{d.group(3)}, {align.group(1) if align else 16}>([] {{}});")
        edits.append((start, end, _same_lines(text[start:end], new)))

    for pat, new in ((r"(?<=[.>])is_cuda\s*\(\s*\)", "is_cpu()"), (r"\b(?:at|c10|torch)::kCUDA\b", "at::kCPU"),
                     (r"\bDeviceType::CUDA\b", "DeviceType::CPU"),
                     (r"\b(?:at|torch)::(empty|empty_like|empty_strided)\s*\(", r"::kx_emu::\1(")):
        for m in re.finditer(pat, masked):
            edits.append((m.start(), m.end(), m.expand(new)))

    for m in re.finditer(r"<<<", masked):
        close = masked.find(">>>", m.end())
        if close < 0:
            bad(m.start(), "<<< without >>>")
        k = _kernel_start(masked, m.start())
        if k == m.start():
            bad(m.start(), "a launch without a kernel name")
        edits.append((k, m.end(), _same_lines(text[k:m.end()], f"::kx_emu::launch([&](auto... kx_args) {{ "
                                                                    f"{text[k:m.start()].strip()}(kx_args...); }}, ")))
        edits.append((close, close + 3, ")"))

    for m in re.finditer(r"\bTORCH_LIBRARY(_FRAGMENT)?\s*\(\s*(\w+)\s*,\s*(\w+)\s*\)", masked):
        own.add(m.group(2))
        edits.append((m.start(), m.end(), f"TORCH_LIBRARY_FRAGMENT({m.group(2)}_emu, {m.group(3)})"))
    for m in re.finditer(r"\bTORCH_LIBRARY_IMPL\s*\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*\)", masked):
        ns, key, lib = m.groups()
        if key != "CUDA":
            bad(m.start(), f"TORCH_LIBRARY_IMPL for {key}: a .cu registers CUDA kernels only")
        edits.append((m.start(), m.end(), f"TORCH_LIBRARY_IMPL({ns}_emu, CPU, {lib})"))
        body = slice(m.end(), _block_end(masked, m.end()))
        for i in re.finditer(rf"\b{lib}\s*\.\s*impl\s*\(\s*\"", masked[body]):
            impls.setdefault(ns, []).append(re.match(r'[^"]*', text[body.start + i.end():]).group(0))
    if not impls:
        raise EmulationError(f"{rel}: no TORCH_LIBRARY_IMPL(ns, CUDA, m) block with m.impl(\"op\", fn)")
    return edits, impls, own


def host_source(source: str = "rope") -> str:
    """The .cu (a family name or a path) as host C++: the prelude, then the rewritten file under its
    own name and line numbers, then the schemas of its ops."""
    path = source_path(source)
    text = open(path).read()
    masked = _mask(text)
    edits, impls, own = _edits(text, masked, path)
    edits.sort()
    for (a0, a1, _), (b0, _b1, _) in zip(edits, edits[1:]):
        if b0 < a1:
            raise EmulationError(f"{os.path.relpath(path, ROOT)}:{_line(text, b0)}: overlapping rewrites")
    out = text
    for a, b, new in reversed(edits):
        out = out[:a] + new + out[b:]

    defs = []
    for ns, ops in impls.items():
        if ns in own:
            continue
        schemas = {}
        for cpp in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))):
            schemas.update(_schemas(cpp, ns))
        missing = [op for op in ops if op not in schemas]
        if missing:
            raise EmulationError(f"{os.path.relpath(path, ROOT)}: no schema for {ns}::{', '.join(missing)} in csrc/*.cpp")
        defs.append(f"\nTORCH_LIBRARY_FRAGMENT({ns}_emu, m) {{  // the schemas, from csrc/*.cpp\n" +
                    "".join(f"  m.def({json.dumps(schemas[op])});\n" for op in ops) + "}\n")
    return f'{PRELUDE}#line 1 "{path}"\n{out}' + "".join(defs)


def namespace(source: str = "rope") -> str:
    """The namespace the emulated ops of a .cu are registered under: <ns>_emu."""
    path = source_path(source)
    text = open(path).read()
    _, impls, _ = _edits(text, _mask(text), path)
    if len(impls) != 1:
        raise EmulationError(f"{path}: implements ops of several namespaces ({', '.join(impls)})")
    return f"{next(iter(impls))}_emu"


def cuda_include_dir() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_bf16.h")):
            return os.path.join(home, "include")
    return None


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path) and open(path).read() == text:
        return
    tmp = f"{path}.{os.getpid()}.tmp"  # several test workers may build at once
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load(source: str = "rope", build_dir: str | None = None):
    """Builds (cached by torch.utils.cpp_extension) and loads one .cu's emulated ops; returns their
    namespace, torch.ops.<ns>_emu (torch.ops.kxops_emu for the kxops families)."""
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("cuda_emulate: CUDA headers (cuda_bf16.h) not found; set CUDA_HOME")
    path = source_path(source)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    build_dir = build_dir or os.path.join(ROOT, "build", "cuda_emulate", stem)
    os.makedirs(build_dir, exist_ok=True)
    src = os.path.join(build_dir, f"{stem}_emulated.cpp")
    _write_if_changed(src, host_source(path))
    cpp_load(name=f"kx_emu_{stem}", sources=[src], extra_include_paths=[inc, os.path.dirname(path)],
             extra_cflags=["-std=c++20", "-O1", "-g0", "-w", "-fvisibility=hidden"], build_directory=build_dir,
             is_python_module=False, verbose=False)
    return getattr(torch.ops, namespace(path))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/cuda_emulate.py <file.cu | family>")
    sys.stdout.write(host_source(sys.argv[1]))
