// The RoPE front: what kxops.rope / kxops.rope_qk run (pyext/rope.py is one call into it). Checks the
// user's arguments, normalises them to the kernel contract (docs/rope_kernel_contract.md), picks a
// backend and calls its op. Also the C++ autograd of the C++ kernel ops.
//
// Reached two ways, one code: the CPython entry `kxops._C.rope` (eager: a few microseconds, what
// decoding pays per call) and the CompositeImplicitAutograd ops kxops::rope_front, rope_qk_front and
// their in-place forms (torch.compile / export: Dynamo records the op, AOTAutograd runs this code on
// fake tensors and records the backend op it calls).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "front.h"
#include "pyentry.h"
#include "rope.h"

namespace kxops {
namespace {

using at::Tensor;
using front::Backend;
using std::optional;

constexpr front::FamilyOps kOps{"kxops::rope", "kxops::rope_triton"};

// ---- the backend ops: one signature per op kind, the same for every backend -----------------

#define KX_ROPE_PARAMS                                                                                  \
  const optional<Tensor>&, const optional<Tensor>&, int64_t, const optional<Tensor>&, const Tensor&, \
      const optional<Tensor>&, int64_t, bool, bool
using RopeSig = Tensor(const Tensor&, KX_ROPE_PARAMS);
using RopeInplaceSig = void(const Tensor&, KX_ROPE_PARAMS);
using RopeQkSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, KX_ROPE_PARAMS);
using RopeQkInplaceSig = void(const Tensor&, const Tensor&, KX_ROPE_PARAMS);
#undef KX_ROPE_PARAMS

front::Op<RopeSig> kRope{"kxops::rope"}, kRopeTriton{"kxops::rope_triton"}, kRopeRef{"kxops::rope_reference"};
front::Op<RopeInplaceSig> kRope_{"kxops::rope_"}, kRopeTriton_{"kxops::rope_triton_"};
front::Op<RopeQkSig> kRopeQk{"kxops::rope_qk"}, kRopeQkTriton{"kxops::rope_qk_triton"},
    kRopeQkRef{"kxops::rope_qk_reference"};
front::Op<RopeQkInplaceSig> kRopeQk_{"kxops::rope_qk_"}, kRopeQkTriton_{"kxops::rope_qk_triton_"};

// The normalised arguments every backend op takes (besides x / q, k).
struct Normalised {
  optional<Tensor> positions, offsets;
  int64_t offset = 0;
  optional<Tensor> cu_seqlens;
  Tensor inv_freq;
  optional<Tensor> axis;
  int64_t rotary_dim = 0;
  bool interleaved = false;
};

// ---- frequency schedule: pyext/reference/rope.py's schedule_lists, to the bit ------------------

enum class Layout { Halves, Alternating, Mrope };

struct Tables {
  Tensor inv_freq;
  optional<Tensor> axis;
};

// inv_freq (R/2,) as float64 values and the axis of every pair (empty: all follow axis 0).
void schedule(int64_t R, double base, int64_t num_axes, Layout layout, const optional<std::vector<int64_t>>& sections,
              std::vector<double>& inv_freq, std::vector<int32_t>& axis) {
  const int64_t half = R / 2;
  inv_freq.clear();
  axis.clear();
  for (int64_t i = 0; i < half; ++i) inv_freq.push_back(std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(R)));
  if (num_axes == 1 && !sections) return;
  std::vector<int64_t> secs;
  if (sections) {
    secs = *sections;
  } else {  // an even split, the first axes taking the remainder
    for (int64_t a = 0; a < num_axes; ++a) secs.push_back(half / num_axes + (a < half % num_axes ? 1 : 0));
  }
  if (layout == Layout::Alternating) {  // round-robin over the axes that still have room
    std::vector<int64_t> left = secs;
    while (static_cast<int64_t>(axis.size()) < half) {
      for (size_t a = 0; a < secs.size(); ++a) {
        if (left[a] > 0 && static_cast<int64_t>(axis.size()) < half) {
          axis.push_back(static_cast<int32_t>(a));
          --left[a];
        }
      }
    }
    return;
  }
  for (size_t a = 0; a < secs.size(); ++a)
    for (int64_t j = 0; j < secs[a]; ++j) axis.push_back(static_cast<int32_t>(a));
  if (layout == Layout::Mrope) return;
  inv_freq.clear();  // halves: each part has the 1-D schedule of its own size
  for (int64_t n : secs)
    for (int64_t j = 0; j < n; ++j)
      inv_freq.push_back(std::pow(base, -2.0 * static_cast<double>(j) / static_cast<double>(2 * n)));
}

using TableKey = std::tuple<int64_t, double, int64_t, int, std::vector<int64_t>, int, int, int>;
front::Cache<TableKey, Tables> table_cache;

// Cached per device, except for traced tensors and during CUDA graph capture (built on the device then).
Tables tables(int64_t R, double base, int64_t num_axes, Layout layout, const optional<std::vector<int64_t>>& sections,
              at::ScalarType acc, at::Device device, bool traced) {
  auto make = [&] {
    std::vector<double> f;
    std::vector<int32_t> a;
    schedule(R, base, num_axes, layout, sections, f, a);
    Tables t;
    t.inv_freq = front::constant(f, acc, device, traced);
    if (!a.empty()) t.axis = front::constant(a, at::kInt, device, traced);
    return t;
  };
  if (traced) return make();
  TableKey key{R, base, num_axes, static_cast<int>(layout), sections.value_or(std::vector<int64_t>{}),
               static_cast<int>(acc), static_cast<int>(device.type()), device.index()};
  if (sections) std::get<4>(key).push_back(-1);  // sections=None and sections=[] differ
  // the same table call after call (a model's layers, decoding steps): no lock for a repeat
  thread_local std::optional<std::pair<TableKey, Tables>> last;
  if (!last || last->first != key) last.emplace(key, table_cache.get(key, make));
  return last->second;
}

// ---- the front ---------------------------------------------------------------------------------

// kxops.rope / rope_qk's arguments (offsets split into a tensor and an int).
struct Args {
  const char* name;  // "rope" or "rope_qk"
  const Tensor& q;
  const Tensor* k;   // null for rope
  const optional<Tensor>& positions;
  double base;
  const optional<Tensor>& inv_freq;
  optional<int64_t> rotary_dim;
  bool interleaved;
  std::string_view axis_layout;
  const optional<std::vector<int64_t>>& sections;
  const optional<Tensor>& offsets;
  optional<int64_t> offset;
  const optional<Tensor>& cu_seqlens;
  bool inplace;
  std::string_view backend;
};

std::string list_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// positions -> int64 (Bp, S, A), Bp in {1, B}; packed: (T,) or (T, A) -> (1, T, A). No copy when the
// caller's tensor is already int64.
Tensor normalise_positions(const char* op, const Tensor& p, const Tensor& x4, bool packed) {
  front::check_int(op, "positions", p);
  front::check_device(op, "positions", p, x4);
  const int64_t B = x4.size(0), S = x4.size(1);
  bool ok;
  std::string expected;
  Tensor out;
  if (packed) {
    ok = (p.dim() == 1 || p.dim() == 2) && p.size(0) == S;
    expected = "(total_tokens=" + std::to_string(S) + ",) or (total_tokens, axes)";
    if (ok) out = p.dim() == 1 ? p.unsqueeze(0).unsqueeze(-1) : p.unsqueeze(0);
  } else {
    ok = (p.dim() == 1 && p.size(0) == S) ||
         ((p.dim() == 2 || p.dim() == 3) && (p.size(0) == 1 || p.size(0) == B) && p.size(1) == S);
    expected = "(seq=" + std::to_string(S) + ",), (batch=" + std::to_string(B) +
               " or 1, seq) or (batch or 1, seq, axes)";
    if (ok) out = p.dim() == 1 ? p.unsqueeze(0).unsqueeze(-1) : (p.dim() == 2 ? p.unsqueeze(-1) : p);
  }
  TORCH_CHECK_VALUE(ok && out.size(-1) >= 1, op, ": positions must be ", expected, ", got shape ",
                    front::shape_str(p.sizes()));
  return out.scalar_type() == at::kLong ? out : out.to(at::kLong);
}

// Checks and normalises; returns the backend and fills `n`, q4 / k4 (packed input viewed as batch 1).
Backend normalise(const Args& a, Normalised& n, Tensor& q4, optional<Tensor>& k4) {
  const char* op = a.name;
  const Tensor& q = a.q;
  const char* qn = a.k ? "q" : "x";
  front::check_float(op, qn, q);
  const bool packed = a.cu_seqlens.has_value();
  const char* want = packed ? "(total_tokens, heads, head_dim) with cu_seqlens" : "(batch, seq, heads, head_dim)";
  TORCH_CHECK_VALUE(q.dim() == (packed ? 3 : 4), op, ": ", qn, " must be ", want, ", got shape ",
                    front::shape_str(q.sizes()));
  const int64_t D = q.size(-1);
  if (a.k) {
    const Tensor& k = *a.k;
    front::check_float(op, "k", k);
    const int64_t lead = q.dim() - 2;
    TORCH_CHECK_VALUE(k.dim() == q.dim() && k.sizes().slice(0, lead) == q.sizes().slice(0, lead) && k.size(-1) == D,
                      op, ": k must be ", want, " matching q ", front::shape_str(q.sizes()),
                      " except in heads, got ", front::shape_str(k.sizes()));
    TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": q and k must have the same dtype, got ",
                     front::dtype_name(q.scalar_type()), " and ", front::dtype_name(k.scalar_type()));
    front::check_device(op, "k", k, q);
  }
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": ", qn, " must have an even head dimension, got ", D);
  if (a.inv_freq) {
    front::check_float(op, "inv_freq", *a.inv_freq);
    front::check_device(op, "inv_freq", *a.inv_freq, q);
    TORCH_CHECK_VALUE(a.inv_freq->dim() == 1, op, ": inv_freq must be 1-D (rotary_dim/2,), got shape ",
                      front::shape_str(a.inv_freq->sizes()));
  }
  const int64_t R = a.rotary_dim ? *a.rotary_dim : (a.inv_freq ? 2 * a.inv_freq->size(0) : D);
  TORCH_CHECK_VALUE(R % 2 == 0 && R >= 2, op, ": rotary_dim must be even and positive, got ", R);
  TORCH_CHECK_VALUE(R <= D, op, ": rotary_dim=", R, " exceeds head_dim=", D);
  if (a.inv_freq)
    TORCH_CHECK_VALUE(a.inv_freq->size(0) == R / 2, op, ": inv_freq must have rotary_dim/2=", R / 2,
                      " entries, got ", a.inv_freq->size(0));
  Layout layout = Layout::Halves;
  if (a.axis_layout == "halves") layout = Layout::Halves;
  else if (a.axis_layout == "alternating") layout = Layout::Alternating;
  else if (a.axis_layout == "mrope") layout = Layout::Mrope;
  else TORCH_CHECK_VALUE(false, op, ": axis_layout must be one of ('halves', 'alternating', 'mrope'), got '",
                         a.axis_layout, "'");
  const Backend backend = front::resolve_backend(op, a.backend, q, kOps);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool traced = front::traced(q) || front::capturing(q);  // tables made on the device, not cached

  q4 = packed ? q.unsqueeze(0) : q;
  if (a.k) k4 = packed ? a.k->unsqueeze(0) : *a.k;
  const int64_t B = q4.size(0), S = q4.size(1);
  if (packed) n.cu_seqlens = front::check_cu_seqlens(op, *a.cu_seqlens, S, q);
  if (a.positions) {
    TORCH_CHECK_VALUE(!a.offsets && !a.offset, op, ": offsets apply to the default positions; add them to positions instead");
    n.positions = normalise_positions(op, *a.positions, q4, packed);
    n.cu_seqlens = std::nullopt;  // explicit positions are already per token
  }
  int64_t num_axes = n.positions ? n.positions->size(-1) : 1;
  if (a.sections) {
    const auto& secs = *a.sections;
    int64_t sum = 0;
    bool nonneg = true;
    for (int64_t s : secs) sum += s, nonneg &= s >= 0;
    TORCH_CHECK_VALUE(nonneg && sum == R / 2, op, ": sections must be non-negative and sum to rotary_dim/2=", R / 2,
                      ", got ", list_str(secs));
    TORCH_CHECK_VALUE(!n.positions || static_cast<int64_t>(secs.size()) == num_axes, op,
                      ": sections must have one entry per position axis (", num_axes, "), got ", list_str(secs));
    num_axes = static_cast<int64_t>(secs.size());
  }
  if (a.offsets) {
    const Tensor& t = *a.offsets;
    const int64_t nseq = packed ? n.cu_seqlens->numel() - 1 : B;
    TORCH_CHECK_TYPE(front::is_int_dtype(t.scalar_type()), op, ": offsets must be an int or an integer tensor, got ",
                     front::dtype_name(t.scalar_type()));
    front::check_device(op, "offsets", t, q);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == nseq, op, ": offsets must have shape (", nseq,
                      ",) (one per sequence), got ", front::shape_str(t.sizes()));
    n.offsets = (t.scalar_type() == at::kLong ? t : t.to(at::kLong)).contiguous();
  }
  n.offset = a.offset.value_or(0);

  if (!a.inv_freq) {
    TORCH_CHECK_VALUE(a.base > 0, op, ": base must be positive, got ", a.base);
    Tables t = tables(R, a.base, num_axes, layout, a.sections, acc, q.device(), traced);
    n.inv_freq = t.inv_freq;
    n.axis = t.axis;
  } else {
    n.inv_freq = (a.inv_freq->scalar_type() == acc ? *a.inv_freq : a.inv_freq->to(acc)).contiguous();
    n.axis = tables(R, 10000.0, num_axes, layout, a.sections, acc, q.device(), traced).axis;
  }
  if (!n.positions) n.axis = std::nullopt;  // default positions are the same on every axis
  n.rotary_dim = R;
  n.interleaved = a.interleaved;
  return backend;
}

#define KX_ROPE_CALL_ARGS(n, conj) \
  n.positions, n.offsets, n.offset, n.cu_seqlens, n.inv_freq, n.axis, n.rotary_dim, n.interleaved, conj

// Functional call: (out_q[, out_k]) as 4-D tensors. Without a gradient to record, the op is called
// below autograd (its autograd kernel, a Python one for Triton, is skipped).
std::vector<Tensor> call_functional(Backend b, const Tensor& q4, const optional<Tensor>& k4, const Normalised& n,
                                    bool needs_grad) {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (!needs_grad) below.emplace();
  if (!k4) {
    auto& op = b == Backend::Triton ? kRopeTriton : (b == Backend::Reference ? kRopeRef : kRope);
    return {op.get().call(q4, KX_ROPE_CALL_ARGS(n, false))};
  }
  auto& op = b == Backend::Triton ? kRopeQkTriton : (b == Backend::Reference ? kRopeQkRef : kRopeQk);
  auto [qo, ko] = op.get().call(q4, *k4, KX_ROPE_CALL_ARGS(n, false));
  return {qo, ko};
}

bool requires_grad(const Tensor& q, const Tensor* k) {
  return at::GradMode::is_enabled() && (q.requires_grad() || (k && k->requires_grad()));
}

// Runs the front: the outputs in the caller's layout, or nothing for in place (the inputs hold the result).
std::vector<Tensor> run(const Args& a) {
  Normalised n;
  Tensor q4;
  optional<Tensor> k4;
  const Backend b = normalise(a, n, q4, k4);
  const bool packed = a.cu_seqlens.has_value();
  const bool needs_grad = requires_grad(a.q, a.k);
  if (a.inplace) {
    if (b == Backend::Reference || needs_grad) {
      // differentiable in place: the functional op, copied in (autograd records the copy; the
      // leaf-tensor and view rules are torch's own for in-place ops)
      auto outs = call_functional(b, q4, k4, n, needs_grad);
      a.q.copy_(packed ? outs[0][0] : outs[0]);
      if (a.k) a.k->copy_(packed ? outs[1][0] : outs[1]);
      return {};
    }
    if (!front::traced(a.q)) {  // the kernels read and write one element per thread: no aliasing
      at::assert_no_internal_overlap(a.q);
      if (a.k) {
        at::assert_no_internal_overlap(*a.k);
        at::assert_no_overlap(a.q, *a.k);
      }
    }
    at::AutoDispatchBelowADInplaceOrView below;
    if (!k4) (b == Backend::Triton ? kRopeTriton_ : kRope_).get().call(q4, KX_ROPE_CALL_ARGS(n, false));
    else (b == Backend::Triton ? kRopeQkTriton_ : kRopeQk_).get().call(q4, *k4, KX_ROPE_CALL_ARGS(n, false));
    front::bump_version(a.q);
    if (a.k) front::bump_version(*a.k);
    return {};
  }
  auto outs = call_functional(b, q4, k4, n, needs_grad);
  if (packed)
    for (auto& t : outs) t = t[0];
  return outs;
}

// ---- the front ops (torch.compile, export) -----------------------------------------------------

#define KX_FRONT_PARAMS                                                                                    \
  const optional<Tensor>&positions, double base, const optional<Tensor>&inv_freq, optional<int64_t> rotary_dim, \
      bool interleaved, c10::string_view axis_layout, at::OptionalIntArrayRef sections,                     \
      const optional<Tensor>&offsets, optional<int64_t> offset, const optional<Tensor>&cu_seqlens,          \
      c10::string_view backend
#define KX_FRONT_ARGS(name, q, k, inplace)                                                                       \
  Args {                                                                                                         \
    name, q, k, positions, base, inv_freq, rotary_dim, interleaved,                                              \
        std::string_view(axis_layout.data(), axis_layout.size()), secs, offsets, offset, cu_seqlens, inplace,  \
        std::string_view(backend.data(), backend.size())                                                         \
  }

optional<std::vector<int64_t>> to_vector(at::OptionalIntArrayRef s) {
  if (!s) return std::nullopt;
  return s->vec();
}

Tensor rope_front(const Tensor& x, KX_FRONT_PARAMS) {
  const auto secs = to_vector(sections);
  return run(KX_FRONT_ARGS("rope", x, nullptr, false))[0];
}

void rope_front_(const Tensor& x, KX_FRONT_PARAMS) {
  const auto secs = to_vector(sections);
  run(KX_FRONT_ARGS("rope", x, nullptr, true));
}

std::tuple<Tensor, Tensor> rope_qk_front(const Tensor& q, const Tensor& k, KX_FRONT_PARAMS) {
  const auto secs = to_vector(sections);
  auto outs = run(KX_FRONT_ARGS("rope_qk", q, &k, false));
  return {outs[0], outs[1]};
}

void rope_qk_front_(const Tensor& q, const Tensor& k, KX_FRONT_PARAMS) {
  const auto secs = to_vector(sections);
  run(KX_FRONT_ARGS("rope_qk", q, &k, true));
}

// ---- the CPython entry (eager) -------------------------------------------------------------------

// kxops._C.rope(is_qk, q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
//               offsets, cu_seqlens, inplace, backend) -> out | (q_out, k_out) | x | (q, k)
PyObject* py_rope(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  py::check_nargs("rope", nargs, 14);
  const bool qk = py::flag(args[0]);
  const char* op = qk ? "rope_qk" : "rope";
  const Tensor& q = py::tensor(args[1], op, qk ? "q" : "x");
  const Tensor* k = qk ? &py::tensor(args[2], op, "k") : nullptr;
  const auto positions = py::opt_tensor(args[3], op, "positions", "an integer tensor");
  const double base = py::real(args[4], op, "base");
  const auto inv_freq = py::opt_tensor(args[5], op, "inv_freq");
  const auto rotary_dim = py::opt_int(args[6], op, "rotary_dim");
  const bool interleaved = py::flag(args[7]);
  const auto layout = py::str(args[8]);
  TORCH_CHECK_VALUE(layout, op, ": axis_layout must be one of ('halves', 'alternating', 'mrope'), got ",
                    py::repr(args[8]));
  const auto sections = py::opt_int_list(args[9], op, "sections");
  optional<Tensor> offsets;
  optional<int64_t> offset;
  if (py::is_int(args[10])) offset = py::to_int(args[10]);
  else offsets = py::opt_tensor(args[10], op, "offsets", "an int or an integer tensor");
  const auto cu_seqlens = py::opt_tensor(args[11], op, "cu_seqlens", "an int32 tensor");
  const bool inplace = py::flag(args[12]);
  const auto backend = py::str(args[13]);
  TORCH_CHECK_VALUE(backend, op, ": backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got ",
                    py::repr(args[13]));
  const Args call{op, q, k, positions, base, inv_freq, rotary_dim, interleaved, *layout, sections, offsets, offset,
                  cu_seqlens, inplace, *backend};
  // Other Python threads run while a large CPU rotation or a host sync (cu_seqlens checks) goes on;
  // a small call is done before a GIL hand-over would be.
  const bool long_call = cu_seqlens || (q.is_cpu() && q.numel() + (k ? k->numel() : 0) >= (1 << 15));
  std::vector<Tensor> outs;
  if (long_call) {
    pybind11::gil_scoped_release no_gil;
    outs = run(call);
  } else {
    outs = run(call);
  }
  if (inplace) return qk ? PyTuple_Pack(2, args[1], args[2]) : Py_NewRef(args[1]);
  if (!qk) return THPVariable_Wrap(std::move(outs[0]));
  PyObject* a = THPVariable_Wrap(std::move(outs[0]));
  PyObject* b = a ? THPVariable_Wrap(std::move(outs[1])) : nullptr;
  if (!b) {
    Py_XDECREF(a);
    return nullptr;
  }
  PyObject* t = PyTuple_Pack(2, a, b);
  Py_DECREF(a);
  Py_DECREF(b);
  return t;
  END_HANDLE_TH_ERRORS
}

const py::Entry rope_entry("rope", &py_rope, "kxops.rope / kxops.rope_qk in eager mode (see pyext/rope.py)");

// ---- C++ autograd of the C++ kernel ops (kxops::rope, rope_qk) -----------------------------------
// y = R(theta) x  =>  dx = R(-theta) dy: the backward is the same op with `conjugate` flipped. The
// Triton ops carry the same formula, registered from Python (pyext/rope.py).

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const optional<Tensor>& k, const optional<Tensor>& positions,
                                                const optional<Tensor>& offsets, int64_t offset,
                                                const optional<Tensor>& cu_seqlens, const Tensor& inv_freq,
                                                const optional<Tensor>& axis, int64_t rotary_dim, bool interleaved,
                                                bool conjugate) {
    ctx->save_for_backward({positions.value_or(Tensor()), offsets.value_or(Tensor()), cu_seqlens.value_or(Tensor()),
                            inv_freq, axis.value_or(Tensor())});
    ctx->saved_data["cfg"] = std::vector<int64_t>{offset, rotary_dim, interleaved, conjugate};
    at::AutoDispatchBelowADInplaceOrView below;
    const auto args = std::forward_as_tuple(positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim,
                                            interleaved, conjugate);
    if (!k) return {std::apply([&](auto&&... r) { return kRope.get().call(q, r...); }, args)};
    auto [qo, ko] = std::apply([&](auto&&... r) { return kRopeQk.get().call(q, *k, r...); }, args);
    return {qo, ko};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    const auto cfg = ctx->saved_data["cfg"].toIntVector();
    const bool interleaved = cfg[2] != 0, conj = cfg[3] == 0;
    torch::autograd::variable_list out(11);
    if (grads.size() == 1) {
      out[0] = kRope.get().call(grads[0], opt(s[0]), opt(s[1]), cfg[0], opt(s[2]), s[3], opt(s[4]), cfg[1],
                                interleaved, conj);
    } else {
      std::tie(out[0], out[1]) = kRopeQk.get().call(grads[0], grads[1], opt(s[0]), opt(s[1]), cfg[0], opt(s[2]),
                                                    s[3], opt(s[4]), cfg[1], interleaved, conj);
    }
    return out;
  }
};

Tensor rope_autograd(const Tensor& x, const optional<Tensor>& positions, const optional<Tensor>& offsets,
                     int64_t offset, const optional<Tensor>& cu_seqlens, const Tensor& inv_freq,
                     const optional<Tensor>& axis, int64_t rotary_dim, bool interleaved, bool conjugate) {
  return RopeFn::apply(x, optional<Tensor>(), positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved,
                       conjugate)[0];
}

std::tuple<Tensor, Tensor> rope_qk_autograd(const Tensor& q, const Tensor& k, const optional<Tensor>& positions,
                                            const optional<Tensor>& offsets, int64_t offset,
                                            const optional<Tensor>& cu_seqlens, const Tensor& inv_freq,
                                            const optional<Tensor>& axis, int64_t rotary_dim, bool interleaved,
                                            bool conjugate) {
  auto out = RopeFn::apply(q, optional<Tensor>(k), positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved,
                           conjugate);
  return {out[0], out[1]};
}

}  // namespace

at::Tensor rope_frequencies(int64_t rotary_dim, double base, at::ScalarType dtype, at::Device device, bool on_device) {
  return tables(rotary_dim, base, 1, Layout::Halves, std::nullopt, dtype, device, on_device).inv_freq;
}

}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CompositeImplicitAutograd, m) {
  m.impl("rope_front", &kxops::rope_front);
  m.impl("rope_front_", &kxops::rope_front_);
  m.impl("rope_qk_front", &kxops::rope_qk_front);
  m.impl("rope_qk_front_", &kxops::rope_qk_front_);
}

TORCH_LIBRARY_IMPL(kxops, Autograd, m) {
  m.impl("rope", &kxops::rope_autograd);
  m.impl("rope_qk", &kxops::rope_qk_autograd);
}
