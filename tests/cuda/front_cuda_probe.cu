// Test-only: csrc/cuda/front_cuda.cu (the CUDA build's graph-capture probe, installed into the fronts'
// hook kxops::front::cuda_capturing at load) behind one op, for tests/test_front_cuda_emulated.py, which
// runs it through tools/cuda_emulate.py. tools/check_cuda.py compiles this file with nvcc too.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "../../csrc/cuda/kx_cuda.cuh"
// front_cuda.cu is host code only: included as it is, it runs on the emulator's CUDA runtime.
#include "../../csrc/cuda/front_cuda.cu"

// Defined by csrc/kxops.cpp in the extension; this file is built on its own.
bool (*kxops::front::cuda_capturing)() = nullptr;

namespace kxops_frontprobe {
namespace {

// (whether the hook is installed, what it says, the runtime's last error after it) for x's device.
std::tuple<bool, bool, int64_t> probe(const at::Tensor&) {
  const bool installed = kxops::front::cuda_capturing != nullptr;
  const bool capturing = installed && kxops::front::cuda_capturing();
  return {installed, capturing, static_cast<int64_t>(cudaGetLastError())};
}

}  // namespace
}  // namespace kxops_frontprobe

TORCH_LIBRARY(kxops_frontprobe, m) { m.def("probe(Tensor x) -> (bool, bool, int)"); }

TORCH_LIBRARY_IMPL(kxops_frontprobe, CUDA, m) { m.impl("probe", &kxops_frontprobe::probe); }
