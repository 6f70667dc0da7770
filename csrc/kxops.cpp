// Every kxops schema, in one place, and the Python module `kxops._C`. Device kernels register their
// implementations in their own files (csrc/cpu/*_cpu.cpp with CPU, csrc/cuda/*_cuda.cu with CUDA; a
// CPU-only build leaves the .cu files out); the fronts (csrc/<family>.cpp) register the
// CompositeImplicitAutograd front ops, the C++ autograd and their CPython entries; the Python package
// registers the Triton ops, the reference ops' implementations and the fake implementations.
#include <torch/library.h>

#include <vector>

#include "front.h"
#include "pyentry.h"

namespace kxops::front {
bool (*cuda_capturing)() = nullptr;
}

namespace kxops::py {

static std::vector<PyMethodDef>& table() {
  static std::vector<PyMethodDef> t;
  return t;
}

Entry::Entry(const char* name, PyObject* (*fn)(PyObject*, PyObject* const*, Py_ssize_t), const char* doc) {
  table().push_back({name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL, doc});
}

PyMethodDef* methods() {
  static std::vector<PyMethodDef> t = [] {
    auto v = table();
    v.push_back({nullptr, nullptr, 0, nullptr});
    return v;
  }();
  return t.data();
}

}  // namespace kxops::py

extern "C" {
// `from . import _C`: the ops register when the .so loads; the module carries the fronts' entries.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kxops::py::methods()};
  return PyModule_Create(&def);
}
}

// RoPE (docs/rope_kernel_contract.md). Kernel ops: implemented by the CPU and CUDA kernels, autograd
// in C++ (csrc/rope.cpp); the Triton backend registers the same four as kxops::rope*_triton.
#define KX_ROPE_ARGS                                                                                    \
  "Tensor? positions, Tensor? offsets, int offset, Tensor? cu_seqlens, Tensor inv_freq, Tensor? axis, " \
  "int rotary_dim, bool interleaved, bool conjugate"
// The public function's arguments (kxops.rope), normalised only in type: offsets split into a tensor
// and an int (None: not given).
#define KX_ROPE_FRONT_ARGS                                                                            \
  "Tensor? positions, float base, Tensor? inv_freq, int? rotary_dim, bool interleaved, "             \
  "str axis_layout, int[]? sections, Tensor? offsets, int? offset, Tensor? cu_seqlens, str backend"

// Linear attention (docs/linear_attention_kernel_contract.md): kernel ops on normalised arguments (CPU,
// CUDA; Triton as kxops::linear_attention*_triton), their reference, and the fronts.
#define KX_LA_ARGS                                                                                    \
  "Tensor? cu_seqlens, Tensor? positions, Tensor? inv_freq, bool interleaved, int feature_map, "      \
  "float scale, bool normalize, float eps, bool causal"
#define KX_LA_STEP_ARGS "int feature_map, float scale, bool normalize, float eps"
// The public function's arguments (feature_map by name, scale None: Dk ** -0.5).
#define KX_LA_FRONT_ARGS                                                                              \
  "bool causal, str feature_map, bool normalize, float eps, float? scale, Tensor? S0, Tensor? z0, "   \
  "Tensor? cu_seqlens, bool rope, float rope_base, Tensor? positions, bool interleaved, str backend"

// GlobalPointer (docs/global_pointer_kernel_contract.md): the fused span loss on normalised arguments
// (CPU, CUDA; Triton as kxops::global_pointer_loss*_triton) and its reference.
#define KX_GP_ARGS                                                                                    \
  "Tensor? mask, Tensor? start_bias, Tensor? end_bias, Tensor? inv_freq, int H, float scale, bool tril, " \
  "Tensor? pos_offsets, Tensor? pos_index, Tensor? targets"
// the span scores' arguments (logits, decode)
#define KX_GP_SCORE_ARGS \
  "Tensor? mask, Tensor? start_bias, Tensor? end_bias, Tensor? inv_freq, int H, float scale, bool tril"
// the row losses on materialised logits x (R, C): dense targets (R, C) or positive indices (R, P)
#define KX_MLCE_ARGS "Tensor? targets, Tensor? positives, bool mask_zero"

TORCH_LIBRARY(kxops, m) {
  m.def("rope(Tensor x, " KX_ROPE_ARGS ") -> Tensor");
  m.def("rope_(Tensor(a!) x, " KX_ROPE_ARGS ") -> ()");
  m.def("rope_qk(Tensor q, Tensor k, " KX_ROPE_ARGS ") -> (Tensor, Tensor)");
  m.def("rope_qk_(Tensor(a!) q, Tensor(b!) k, " KX_ROPE_ARGS ") -> ()");
  // the reference (pyext/reference/rope.py) on the same normalised arguments: backend="reference"
  m.def("rope_reference(Tensor x, " KX_ROPE_ARGS ") -> Tensor");
  m.def("rope_qk_reference(Tensor q, Tensor k, " KX_ROPE_ARGS ") -> (Tensor, Tensor)");
  // fronts: checks, normalisation and backend choice (CompositeImplicitAutograd, csrc/rope.cpp)
  m.def("rope_front(Tensor x, " KX_ROPE_FRONT_ARGS ") -> Tensor");
  m.def("rope_front_(Tensor(a!) x, " KX_ROPE_FRONT_ARGS ") -> ()");
  m.def("rope_qk_front(Tensor q, Tensor k, " KX_ROPE_FRONT_ARGS ") -> (Tensor, Tensor)");
  m.def("rope_qk_front_(Tensor(a!) q, Tensor(b!) k, " KX_ROPE_FRONT_ARGS ") -> ()");

  m.def("linear_attention(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, " KX_LA_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_backward(Tensor dout, Tensor? dS, Tensor? dz, Tensor q, Tensor k, Tensor v, "
        "Tensor? S0, Tensor? z0, " KX_LA_ARGS ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_attention_step(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, " KX_LA_STEP_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_reference(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, " KX_LA_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_step_reference(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, " KX_LA_STEP_ARGS
        ") -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_front(Tensor q, Tensor k, Tensor v, " KX_LA_FRONT_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_step_front(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, str feature_map, "
        "bool normalize, float eps, float? scale, str backend) -> (Tensor, Tensor, Tensor)");

  m.def("global_pointer_loss(Tensor q, Tensor k, " KX_GP_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("global_pointer_loss_backward(Tensor dloss, Tensor q, Tensor k, " KX_GP_ARGS
        ", Tensor lse_neg, Tensor lse_pos) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("global_pointer_loss_reference(Tensor q, Tensor k, " KX_GP_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("global_pointer(Tensor q, Tensor k, " KX_GP_SCORE_ARGS ") -> Tensor");
  m.def("global_pointer_backward(Tensor dlogits, Tensor q, Tensor k, " KX_GP_SCORE_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("global_pointer_reference(Tensor q, Tensor k, " KX_GP_SCORE_ARGS ") -> Tensor");
  m.def("global_pointer_decode(Tensor q, Tensor k, " KX_GP_SCORE_ARGS ", float threshold) -> (Tensor, Tensor)");
  m.def("global_pointer_decode_reference(Tensor q, Tensor k, " KX_GP_SCORE_ARGS
        ", float threshold) -> (Tensor, Tensor)");
  m.def("multilabel_categorical_crossentropy(Tensor x, " KX_MLCE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("multilabel_categorical_crossentropy_backward(Tensor dloss, Tensor x, " KX_MLCE_ARGS
        ", Tensor lse_neg, Tensor lse_pos) -> Tensor");
  m.def("multilabel_categorical_crossentropy_reference(Tensor x, " KX_MLCE_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("global_pointer_front(Tensor q, Tensor k, Tensor? mask, bool rope, float base, bool tril, float? scale, "
        "Tensor? start_bias, Tensor? end_bias, str backend) -> Tensor");
  m.def("global_pointer_decode_front(Tensor q, Tensor k, Tensor? mask, float threshold, bool rope, float base, "
        "bool tril, float? scale, Tensor? start_bias, Tensor? end_bias, str backend) -> (Tensor, Tensor)");
  m.def("multilabel_categorical_crossentropy_front(Tensor x, Tensor? targets, Tensor? positives, bool mask_zero, "
        "str reduction, str backend) -> Tensor");
  m.def("global_pointer_loss_front(Tensor q, Tensor k, Tensor labels, Tensor? mask, bool rope, float base, "
        "bool tril, float? scale, Tensor? start_bias, Tensor? end_bias, str reduction, str backend) -> Tensor");

  // Sparse softmaxes (docs/sparse_softmax_kernel_contract.md): x (R, N) rows; kind 0 sparsemax, 1 entmax15,
  // 2 alpha-entmax by bisection (3: softmax, backward only: top-k). Kernel ops (CPU, CUDA; Triton as
  // kxops::*_triton), the references on the same arguments, and the fronts.
  m.def("entmax(Tensor x, Tensor? alpha, int kind, int n_iter, Tensor? target, int ignore_index) -> (Tensor, Tensor)");
  m.def("entmax_backward(Tensor dp, Tensor p, Tensor? alpha, int kind, bool alpha_grad) -> (Tensor, Tensor)");
  m.def("topk_softmax(Tensor x, int k, Tensor? target, int ignore_index) -> (Tensor, Tensor)");
  m.def("entmax_reference(Tensor x, Tensor? alpha, int kind, int n_iter, Tensor? target, int ignore_index) -> "
        "(Tensor, Tensor)");
  m.def("topk_softmax_reference(Tensor x, int k, Tensor? target, int ignore_index) -> (Tensor, Tensor)");
  // the losses' gradient (p - onehot(target)) * dloss per row, 0 for ignored rows (every backend's autograd)
  m.def("sparse_softmax_loss_backward(Tensor dloss, Tensor p, Tensor target, int ignore_index) -> Tensor");
  m.def("entmax_front(Tensor x, Tensor? alpha, float alpha_value, int kind, int dim, int n_iter, str backend) -> Tensor");
  m.def("topk_softmax_front(Tensor x, int k, int dim, str backend) -> Tensor");
  m.def("entmax_loss_front(Tensor x, Tensor target, int kind, int ignore_index, str reduction, str backend) -> Tensor");
  m.def("topk_softmax_cross_entropy_front(Tensor x, Tensor target, int k, int ignore_index, str reduction, "
        "str backend) -> Tensor");

  // Gumbel / perturb-max softmaxes (docs/gumbel_softmax_kernel_contract.md): x (R, N) rows, seed an int64
  // one-element tensor on x's device (the Philox key; None: no noise). Kernel ops (CPU, CUDA; Triton as
  // kxops::*_triton), the references on the same arguments, and the fronts (the public functions draw the seed).
  m.def("gumbel_softmax(Tensor x, Tensor? seed, float tau, bool hard) -> (Tensor, Tensor, Tensor)");
  m.def("gumbel_softmax_backward(Tensor dy, Tensor y, float tau) -> Tensor");
  m.def("gumbel_max(Tensor x, Tensor seed) -> Tensor");
  m.def("perturb_max(Tensor x, Tensor nodes) -> Tensor");
  m.def("perturb_max_backward(Tensor dp, Tensor x, Tensor nodes) -> Tensor");
  m.def("gumbel_softmax_reference(Tensor x, Tensor? seed, float tau, bool hard) -> (Tensor, Tensor, Tensor)");
  m.def("gumbel_max_reference(Tensor x, Tensor seed) -> Tensor");
  m.def("perturb_max_reference(Tensor x, Tensor nodes) -> Tensor");
  m.def("gumbel_softmax_front(Tensor logits, Tensor seed, float tau, bool hard, int dim, str backend) -> Tensor");
  m.def("gumbel_max_front(Tensor logits, Tensor seed, int dim, str backend) -> Tensor");
  m.def("perturb_max_softmax_front(Tensor x, str noise, int num_quantiles, int dim, str backend) -> Tensor");
}
