"""The CUDA RoPE kernel compiled for the host, for CI machines without a GPU.

csrc/cuda/rope_cuda.cu is turned into host C++ (a block's threads become std::threads meeting at a
std::barrier for __syncthreads, shared memory a poisoned host buffer, each launch a loop over blocks)
and registered as the ops kxops_emu::rope, rope_, rope_qk, rope_qk_ for CPU tensors. The kernel's
indexing, vector paths, in-place handling and position rule then run in CI against the reference:
arithmetic is the host's (no FMA contraction, glibc sincosf), layouts and control flow are the
kernel's. Unwritten outputs come back as NaN, misaligned 16-byte accesses abort.
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "rope_cuda.cu")

PRELUDE = r'''
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline
struct EmuDim { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;
thread_local std::barrier<>* emu_barrier = nullptr;
thread_local unsigned char* emu_smem = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// KXOPS_EMU_GRID_CAP lowers the grid's x limit so that tests reach the kernel's grid-stride loop.
inline int64_t emu_grid_cap() {
  const char* v = std::getenv("KXOPS_EMU_GRID_CAP");
  return v ? std::atoll(v) : INT_MAX;
}
using std::max;
using std::min;
'''

EMULATE = r'''
at::Tensor emu_empty(at::IntArrayRef sizes, const at::TensorOptions& o) {
  return at::full(sizes, NAN, o);  // unwritten outputs show up as NaN
}
template <typename T, int VEC, bool IL> __global__ void rope_kernel(const Params<T> p);
template <typename T, int VEC, bool IL>
void emulate(dim3 grid, dim3 block, size_t smem_bytes, Params<T> p) {
  TORCH_CHECK(block.x * block.y <= 1024 && block.z == 1 && grid.z == 1, "emulate: bad launch shape");
  TORCH_CHECK(smem_bytes <= 48 * 1024, "emulate: ", smem_bytes, " bytes of shared memory");
  std::vector<float> smem((smem_bytes + 3) / 4 + 4);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::fill(smem.begin(), smem.end(), NAN);  // a table entry read before it is written poisons the result
      std::barrier<> bar(block.x * block.y);
      std::vector<std::thread> threads;
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx)
          threads.emplace_back([&, tx, ty] {
            threadIdx = {tx, ty, 0};
            blockIdx = {bx, by, 0};
            blockDim = {block.x, block.y, 1};
            gridDim = {grid.x, grid.y, 1};
            emu_barrier = &bar;
            emu_smem = reinterpret_cast<unsigned char*>(smem.data());
            rope_kernel<T, VEC, IL>(p);
          });
      for (auto& t : threads) t.join();
    }
}
'''

REGISTER = r'''
TORCH_LIBRARY(kxops_emu, m) {
  m.def("rope(Tensor x, Tensor? positions, Tensor? offsets, int offset, Tensor? cu_seqlens, Tensor inv_freq, Tensor? axis, int rotary_dim, bool interleaved, bool conjugate) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor? positions, Tensor? offsets, int offset, Tensor? cu_seqlens, Tensor inv_freq, Tensor? axis, int rotary_dim, bool interleaved, bool conjugate) -> ()");
  m.def("rope_qk(Tensor q, Tensor k, Tensor? positions, Tensor? offsets, int offset, Tensor? cu_seqlens, Tensor inv_freq, Tensor? axis, int rotary_dim, bool interleaved, bool conjugate) -> (Tensor, Tensor)");
  m.def("rope_qk_(Tensor(a!) q, Tensor(b!) k, Tensor? positions, Tensor? offsets, int offset, Tensor? cu_seqlens, Tensor inv_freq, Tensor? axis, int rotary_dim, bool interleaved, bool conjugate) -> ()");
}
TORCH_LIBRARY_IMPL(kxops_emu, CPU, m) {
  m.impl("rope", &kxops::rope_cuda);
  m.impl("rope_", &kxops::rope_inplace_cuda);
  m.impl("rope_qk", &kxops::rope_qk_cuda);
  m.impl("rope_qk_", &kxops::rope_qk_inplace_cuda);
}
'''


def _sub(s: str, old: str, new: str, regex: bool = False) -> str:
    out = re.sub(old, new, s) if regex else s.replace(old, new)
    if (re.search(old, s) is None) if regex else (old not in s):
        raise RuntimeError(f"cuda_emulate: {old!r} not found in {SOURCE}: update tools/cuda_emulate.py "
                           "to the kernel's new code")
    return out


def host_source() -> str:
    """rope_cuda.cu as host C++."""
    s = open(SOURCE).read()
    for inc in ("#include <c10/cuda/CUDAStream.h>\n", "#include <c10/cuda/CUDAGuard.h>\n",
                "#include <c10/cuda/CUDAException.h>\n"):
        s = _sub(s, inc, "")
    s = _sub(s, '#include "../rope.h"', f'#include "{os.path.join(ROOT, "csrc", "rope.h")}"')
    s = _sub(s, "extern __shared__ __align__(16) unsigned char smem[];", "unsigned char* smem = emu_smem;")
    s = _sub(s, "x.is_cuda()", "x.is_cpu()")
    s = _sub(s, "C10_CUDA_KERNEL_LAUNCH_CHECK();", "")
    s = _sub(s, r"C10_CUDA_CHECK\(cudaDeviceGetAttribute\(&n, [^;]*\);", "n = 2;", regex=True)
    s = _sub(s, "c10::cuda::getCurrentCUDAStream()", "nullptr")
    s = _sub(s, r"const c10::cuda::CUDAGuard guard\([^;]*\);", "", regex=True)
    s = _sub(s, "std::min<int64_t>(p.ngroups, INT_MAX)", "std::min<int64_t>(p.ngroups, emu_grid_cap())")
    s = _sub(s, "at::empty(", "emu_empty(")
    s = _sub(s, r"rope_kernel<T, VEC, INTERLEAVED><<<([^,]*), ([^,]*), ([^,]*), stream>>>\(p\);",
             r"emulate<T, VEC, INTERLEAVED>(\1, \2, \3, p); (void)stream;", regex=True)
    s = _sub(s, "// The 16-byte path needs", EMULATE + "\n// The 16-byte path needs")
    for old, new in [
        ("else return *reinterpret_cast<const Chunk<T, VEC>*>(row + c);",
         "else { if (reinterpret_cast<uintptr_t>(row + c) % 16) abort(); "
         "return *reinterpret_cast<const Chunk<T, VEC>*>(row + c); }"),
        ("else *reinterpret_cast<Chunk<T, VEC>*>(row + c) = x;",
         "else { if (reinterpret_cast<uintptr_t>(row + c) % 16) abort(); "
         "*reinterpret_cast<Chunk<T, VEC>*>(row + c) = x; }"),
        ("const float4* cs4 = reinterpret_cast<const float4*>(cs);",
         "if (reinterpret_cast<uintptr_t>(cs) % 16) abort(); const float4* cs4 = reinterpret_cast<const float4*>(cs);"),
    ]:
        s = _sub(s, old, new)
    s = s[: s.index("TORCH_LIBRARY_IMPL(kxops, CUDA")] + REGISTER
    return PRELUDE + s


def cuda_include_dir() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_bf16.h")):
            return os.path.join(home, "include")
    return None


def load(build_dir: str | None = None):
    """Builds (cached by torch.utils.cpp_extension) and loads the emulated ops: torch.ops.kxops_emu.*"""
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("cuda_emulate: CUDA headers (cuda_bf16.h) not found; set CUDA_HOME")
    build_dir = build_dir or os.path.join(ROOT, "build", "cuda_emulate")
    os.makedirs(build_dir, exist_ok=True)
    src = os.path.join(build_dir, "rope_cuda_emulated.cpp")
    text = host_source()
    if not os.path.exists(src) or open(src).read() != text:
        with open(src, "w") as f:
            f.write(text)
    cpp_load(name="kxops_cuda_emulated", sources=[src], extra_include_paths=[inc],
             extra_cflags=["-std=c++20", "-O1", "-g0", "-w"], build_directory=build_dir,
             is_python_module=False, verbose=False)
    return torch.ops.kxops_emu


if __name__ == "__main__":
    sys.stdout.write(host_source())
