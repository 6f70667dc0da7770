// Every kxops schema, in one place. Device kernels register their implementations in their own
// files (csrc/cpu/*_cpu.cpp with CPU, csrc/cuda/*_cuda.cu with CUDA); a CPU-only build leaves
// the .cu files out.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `from . import _C` only needs a module object; the ops register when the .so loads.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

#define KX_ROPE_ARGS                                                                        \
  "Tensor? positions, Tensor? offsets, Tensor? cu_seqlens, Tensor inv_freq, Tensor? axis, " \
  "int rotary_dim, bool interleaved, bool conjugate"

TORCH_LIBRARY(kxops, m) {
  m.def("rope(Tensor x, " KX_ROPE_ARGS ") -> Tensor");
  m.def("rope_(Tensor(a!) x, " KX_ROPE_ARGS ") -> ()");
  m.def("rope_qk(Tensor q, Tensor k, " KX_ROPE_ARGS ") -> (Tensor, Tensor)");
  m.def("rope_qk_(Tensor(a!) q, Tensor(b!) k, " KX_ROPE_ARGS ") -> ()");
}
