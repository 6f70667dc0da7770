// The linear attention front: what kxops.linear_attention, causal_dot_product and linear_attention_step run
// (pyext/linear_attention.py is one call into it). Checks the user's arguments, normalises them to the
// kernel contract (docs/linear_attention_kernel_contract.md), picks a backend and calls its op; and the
// C++ autograd of the C++ kernel ops. Reached, like RoPE's front, through CPython entries (eager) and the
// CompositeImplicitAutograd ops kxops::linear_attention_front / linear_attention_step_front (tracing).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
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

constexpr front::FamilyOps kOps{"kxops::linear_attention", "kxops::linear_attention_triton"};
constexpr int64_t kMaxHeadDim = 256;
constexpr const char* kMaps[] = {"identity", "elu1", "relu", "taylor"};  // kernel ids 0..3

#define KX_LA_PARAMS                                                                                     \
  const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, bool, int64_t, double, bool, \
      double, bool
using Triple = std::tuple<Tensor, Tensor, Tensor>;
using FwdSig = Triple(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                      KX_LA_PARAMS);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, KX_LA_PARAMS);
using StepSig = Triple(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                       bool, double);
#undef KX_LA_PARAMS

front::Op<FwdSig> kFwd{"kxops::linear_attention"}, kFwdTriton{"kxops::linear_attention_triton"},
    kFwdRef{"kxops::linear_attention_reference"};
front::Op<BwdSig> kBwd{"kxops::linear_attention_backward"};
front::Op<StepSig> kStep{"kxops::linear_attention_step"}, kStepTriton{"kxops::linear_attention_step_triton"},
    kStepRef{"kxops::linear_attention_step_reference"};

// The kernel contract's arguments besides q, k, v, S0, z0.
struct Options {
  optional<Tensor> cu_seqlens, positions, inv_freq;
  bool interleaved = false;
  int64_t feature_map = 1;
  double scale = 1.0;
  bool normalize = true;
  double eps = 1e-6;
  bool causal = true;
};

#define KX_LA_OPTS(o) o.cu_seqlens, o.positions, o.inv_freq, o.interleaved, o.feature_map, o.scale, o.normalize, \
                      o.eps, o.causal

int64_t feature_map_id(const char* op, std::string_view name) {
  for (int64_t i = 0; i < 4; ++i)
    if (name == kMaps[i]) return i;
  TORCH_CHECK_VALUE(false, op, ": feature_map must be one of 'elu1', 'relu', 'identity', 'taylor', got '", name, "'");
  return -1;
}

at::ScalarType state_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Tensor last_dim_contiguous(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// q, k, v checked against each other; `lead` names the leading dims in messages.
void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, int64_t dims, const char* lead) {
  front::check_float(op, "q", q);
  front::check_float(op, "k", k);
  front::check_float(op, "v", v);
  TORCH_CHECK_VALUE(q.dim() == dims, op, ": q must be (", lead, ", heads, Dk), got shape ", front::shape_str(q.sizes()));
  TORCH_CHECK_VALUE(k.dim() == dims && k.sizes() == q.sizes(), op, ": k must have q's shape ",
                    front::shape_str(q.sizes()), " (", lead, ", heads, Dk), got ", front::shape_str(k.sizes()));
  TORCH_CHECK_VALUE(v.dim() == dims && v.sizes().slice(0, dims - 1) == q.sizes().slice(0, dims - 1), op,
                    ": v must be (", lead, ", heads, Dv) with q's ", lead, " and heads ",
                    front::shape_str(q.sizes().slice(0, dims - 1)), ", got ", front::shape_str(v.sizes()));
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must have one dtype, got ", front::dtype_name(q.scalar_type()), ", ",
                   front::dtype_name(k.scalar_type()), " and ", front::dtype_name(v.scalar_type()));
  front::check_device(op, "k", k, q, "q");
  front::check_device(op, "v", v, q, "q");
  const int64_t Dk = q.size(-1), Dv = v.size(-1);
  TORCH_CHECK_VALUE(Dk >= 1 && Dk <= kMaxHeadDim && Dv >= 1 && Dv <= kMaxHeadDim, op,
                    ": head dims must be in [1, ", kMaxHeadDim, "], got Dk=", Dk, " and Dv=", Dv);
}

// A state tensor of the expected shape and dtype, on q's device.
void check_state(const char* op, const char* arg, const Tensor& t, at::IntArrayRef shape, const Tensor& q) {
  const at::ScalarType acc = state_dtype(q);
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", arg, " must be ", front::dtype_name(acc),
                   " (the state is kept in ", front::dtype_name(acc), " for ", front::dtype_name(q.scalar_type()),
                   " inputs), got ", front::dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", arg, " must have shape ", front::shape_str(shape), ", got ",
                    front::shape_str(t.sizes()));
  front::check_device(op, arg, t, q, "q");
}

Backend resolve(const char* op, std::string_view backend, const Tensor& q) {
  return front::resolve_backend(op, backend, q, kOps);
}

// ---- linear_attention ----------------------------------------------------------------------------

struct Args {  // the public function's arguments
  const char* name;
  const Tensor& q;
  const Tensor& k;
  const Tensor& v;
  bool causal;
  std::string_view feature_map;
  bool normalize;
  double eps;
  optional<double> scale;
  const optional<Tensor>& S0;
  const optional<Tensor>& z0;
  const optional<Tensor>& cu_seqlens;
  bool rope;
  double rope_base;
  const optional<Tensor>& positions;
  bool interleaved;
  std::string_view backend;
};

bool requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

// -> (out in the caller's layout, S, z)
Triple run(const Args& a) {
  const char* op = a.name;
  const bool packed = a.cu_seqlens.has_value();
  check_qkv(op, a.q, a.k, a.v, packed ? 3 : 4, packed ? "total_tokens" : "batch, seq");
  const int64_t fm = feature_map_id(op, a.feature_map);
  const Backend backend = resolve(op, a.backend, a.q);
  const bool on_device = front::traced(a.q) || front::capturing(a.q);
  const int64_t Dk = a.q.size(-1), Dv = a.v.size(-1), H = a.q.size(-2);
  const int64_t F = fm == 3 ? Dk + 1 : Dk;

  Tensor q = last_dim_contiguous(packed ? a.q.unsqueeze(0) : a.q);
  Tensor k = last_dim_contiguous(packed ? a.k.unsqueeze(0) : a.k);
  Tensor v = last_dim_contiguous(packed ? a.v.unsqueeze(0) : a.v);
  const int64_t B = q.size(0), T = q.size(1);
  Options o;
  if (packed) o.cu_seqlens = front::check_cu_seqlens(op, *a.cu_seqlens, T, a.q);
  const int64_t N = packed ? o.cu_seqlens->size(0) - 1 : B;
  o.feature_map = fm;
  o.scale = a.scale ? *a.scale : 1.0 / std::sqrt(static_cast<double>(Dk));
  o.normalize = a.normalize;
  o.eps = a.eps;
  o.causal = a.causal;
  o.interleaved = a.interleaved;

  optional<Tensor> S0, z0;
  if (a.S0) {
    check_state(op, "initial_state[0] (S)", *a.S0, {N, H, F, Dv}, a.q);
    S0 = a.S0->contiguous();
    if (a.z0) {
      check_state(op, "initial_state[1] (z)", *a.z0, {N, H, F}, a.q);
      z0 = a.z0->contiguous();
    } else {
      z0 = at::zeros({N, H, F}, S0->options());
    }
  } else {
    TORCH_CHECK_VALUE(!a.z0, op, ": initial_state must be (S, z) or (S, None), got (None, z)");
  }

  if (a.rope) {
    TORCH_CHECK_VALUE(Dk % 2 == 0, op, ": rope=True needs an even head dimension Dk, got ", Dk);
    TORCH_CHECK_VALUE(a.rope_base > 0, op, ": rope_base must be positive, got ", a.rope_base);
    o.inv_freq = rope_frequencies(Dk, a.rope_base, state_dtype(a.q), a.q.device(), on_device);
    if (a.positions) {
      const Tensor& p = *a.positions;
      front::check_int(op, "positions", p);
      front::check_device(op, "positions", p, a.q, "q");
      const bool ok = packed ? (p.dim() == 1 && p.size(0) == T)
                             : ((p.dim() == 1 && p.size(0) == T) ||
                                (p.dim() == 2 && (p.size(0) == 1 || p.size(0) == B) && p.size(1) == T));
      TORCH_CHECK_VALUE(ok, op, ": positions must be ",
                        packed ? "(total_tokens=" + std::to_string(T) + ",)"
                               : "(seq=" + std::to_string(T) + ",) or (batch=" + std::to_string(B) + " or 1, seq)",
                        ", got shape ", front::shape_str(p.sizes()));
      Tensor p2 = p.dim() == 1 ? p.unsqueeze(0) : p;
      o.positions = p2.scalar_type() == at::kLong ? p2 : p2.to(at::kLong);
    }
  } else {
    TORCH_CHECK_VALUE(!a.positions, op, ": positions are RoPE positions: pass rope=True with them");
  }

  const bool grad = requires_grad({&a.q, &a.k, &a.v, S0 ? &*S0 : nullptr, z0 ? &*z0 : nullptr});
  Triple r;
  {
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!grad) below.emplace();
    auto& fwd = backend == Backend::Triton ? kFwdTriton : (backend == Backend::Reference ? kFwdRef : kFwd);
    r = fwd.get().call(q, k, v, S0, z0, KX_LA_OPTS(o));
  }
  if (packed) std::get<0>(r) = std::get<0>(r)[0];
  return r;
}

// ---- linear_attention_step -------------------------------------------------------------------------

struct StepArgs {
  const Tensor& q;
  const Tensor& k;
  const Tensor& v;
  const Tensor& S;
  const Tensor* z;  // null: zeros
  std::string_view feature_map;
  bool normalize;
  double eps;
  optional<double> scale;
  std::string_view backend;
};

// q, k, v (B, H, D) or (B, 1, H, D) -> (out in q's layout, S', z')
Triple run_step(const StepArgs& a) {
  const char* op = "linear_attention_step";
  const bool one = a.q.dim() == 4;
  check_qkv(op, a.q, a.k, a.v, one ? 4 : 3, one ? "batch, 1" : "batch");
  TORCH_CHECK_VALUE(!one || a.q.size(1) == 1, op, ": q must be (batch, heads, Dk) or (batch, 1, heads, Dk): one token "
                    "per sequence, got shape ", front::shape_str(a.q.sizes()));
  const int64_t fm = feature_map_id(op, a.feature_map);
  const Backend backend = resolve(op, a.backend, a.q);
  Tensor q = last_dim_contiguous(one ? a.q.select(1, 0) : a.q);
  Tensor k = last_dim_contiguous(one ? a.k.select(1, 0) : a.k);
  Tensor v = last_dim_contiguous(one ? a.v.select(1, 0) : a.v);
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(2);
  const int64_t F = fm == 3 ? Dk + 1 : Dk;
  check_state(op, "state[0] (S)", a.S, {B, H, F, Dv}, a.q);
  Tensor S = a.S.contiguous();
  Tensor z;
  if (a.z) {
    check_state(op, "state[1] (z)", *a.z, {B, H, F}, a.q);
    z = a.z->contiguous();
  } else {
    z = at::zeros({B, H, F}, S.options());
  }
  const double scale = a.scale ? *a.scale : 1.0 / std::sqrt(static_cast<double>(Dk));
  const bool grad = requires_grad({&a.q, &a.k, &a.v, &S, &z});
  Triple r;
  {
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!grad) below.emplace();
    auto& step = backend == Backend::Triton ? kStepTriton : (backend == Backend::Reference ? kStepRef : kStep);
    r = step.get().call(q, k, v, S, z, fm, scale, a.normalize, a.eps);
  }
  if (one) std::get<0>(r) = std::get<0>(r).unsqueeze(1);
  return r;
}

// ---- the front ops (torch.compile, export) ---------------------------------------------------------

Triple linear_attention_front(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                              c10::string_view feature_map, bool normalize, double eps, optional<double> scale,
                              const optional<Tensor>& S0, const optional<Tensor>& z0,
                              const optional<Tensor>& cu_seqlens, bool rope, double rope_base,
                              const optional<Tensor>& positions, bool interleaved, c10::string_view backend) {
  return run(Args{"linear_attention", q, k, v, causal, std::string_view(feature_map.data(), feature_map.size()),
                  normalize, eps, scale, S0, z0, cu_seqlens, rope, rope_base, positions, interleaved,
                  std::string_view(backend.data(), backend.size())});
}

Triple linear_attention_step_front(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& S,
                                   const Tensor& z, c10::string_view feature_map, bool normalize, double eps,
                                   optional<double> scale, c10::string_view backend) {
  return run_step(StepArgs{q, k, v, S, &z, std::string_view(feature_map.data(), feature_map.size()), normalize, eps,
                           scale, std::string_view(backend.data(), backend.size())});
}

// ---- the CPython entries (eager) -------------------------------------------------------------------

PyObject* wrap3(Triple r) {
  PyObject* a = THPVariable_Wrap(std::move(std::get<0>(r)));
  PyObject* b = a ? THPVariable_Wrap(std::move(std::get<1>(r))) : nullptr;
  PyObject* c = b ? THPVariable_Wrap(std::move(std::get<2>(r))) : nullptr;
  PyObject* t = c ? PyTuple_Pack(3, a, b, c) : nullptr;
  Py_XDECREF(a);
  Py_XDECREF(b);
  Py_XDECREF(c);
  return t;
}

std::string_view str_arg(PyObject* o, const char* op, const char* arg, const char* expected) {
  const auto s = py::str(o);
  TORCH_CHECK_VALUE(s, op, ": ", arg, " must be one of ", expected, ", got ", py::repr(o));
  return *s;
}

// kxops._C.linear_attention(name, q, k, v, causal, feature_map, normalize, eps, scale, S0, z0, cu_seqlens, rope,
//                           rope_base, positions, interleaved, backend) -> (out, S, z)
PyObject* py_linear_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  py::check_nargs("linear_attention", nargs, 17);
  const auto name = py::str(args[0]);
  const char* op = name && *name == "causal_dot_product" ? "causal_dot_product" : "linear_attention";
  const Tensor& q = py::tensor(args[1], op, "q");
  const Tensor& k = py::tensor(args[2], op, "k");
  const Tensor& v = py::tensor(args[3], op, "v");
  const bool causal = py::flag(args[4]);
  const auto fm = str_arg(args[5], op, "feature_map", "'elu1', 'relu', 'identity', 'taylor'");
  const bool normalize = py::flag(args[6]);
  const double eps = py::real(args[7], op, "eps");
  const optional<double> scale = args[8] == Py_None ? std::nullopt : optional<double>(py::real(args[8], op, "scale"));
  const auto S0 = py::opt_tensor(args[9], op, "initial_state[0] (S)");
  const auto z0 = py::opt_tensor(args[10], op, "initial_state[1] (z)");
  const auto cu = py::opt_tensor(args[11], op, "cu_seqlens", "an int32 tensor");
  const bool rope = py::flag(args[12]);
  const double rope_base = py::real(args[13], op, "rope_base");
  const auto positions = py::opt_tensor(args[14], op, "positions", "an integer tensor");
  const bool interleaved = py::flag(args[15]);
  const auto backend = str_arg(args[16], op, "backend", "'auto', 'cpu', 'cuda', 'triton', 'reference'");
  const Args call{op, q, k, v, causal, fm, normalize, eps, scale, S0, z0, cu, rope, rope_base, positions, interleaved,
                  backend};
  Triple r;
  if (cu || (q.is_cpu() && q.numel() >= (1 << 15))) {  // long enough to let other Python threads run
    pybind11::gil_scoped_release no_gil;
    r = run(call);
  } else {
    r = run(call);
  }
  return wrap3(std::move(r));
  END_HANDLE_TH_ERRORS
}

// kxops._C.linear_attention_step(q, k, v, S, z, feature_map, normalize, eps, scale, backend) -> (out, S', z')
PyObject* py_linear_attention_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "linear_attention_step";
  py::check_nargs(op, nargs, 10);
  const Tensor& q = py::tensor(args[0], op, "q");
  const Tensor& k = py::tensor(args[1], op, "k");
  const Tensor& v = py::tensor(args[2], op, "v");
  const Tensor& S = py::tensor(args[3], op, "state[0] (S)");
  const auto z = py::opt_tensor(args[4], op, "state[1] (z)");
  const auto fm = str_arg(args[5], op, "feature_map", "'elu1', 'relu', 'identity', 'taylor'");
  const bool normalize = py::flag(args[6]);
  const double eps = py::real(args[7], op, "eps");
  const optional<double> scale = args[8] == Py_None ? std::nullopt : optional<double>(py::real(args[8], op, "scale"));
  const auto backend = str_arg(args[9], op, "backend", "'auto', 'cpu', 'cuda', 'triton', 'reference'");
  return wrap3(run_step(StepArgs{q, k, v, S, z ? &*z : nullptr, fm, normalize, eps, scale, backend}));
  END_HANDLE_TH_ERRORS
}

const py::Entry la_entry("linear_attention", &py_linear_attention,
                         "kxops.linear_attention / causal_dot_product in eager mode (pyext/linear_attention.py)");
const py::Entry step_entry("linear_attention_step", &py_linear_attention_step,
                           "kxops.linear_attention_step in eager mode (pyext/linear_attention.py)");

// ---- C++ autograd of the C++ kernel ops ---------------------------------------------------------------

torch::autograd::variable_list opt_list(std::initializer_list<optional<Tensor>> ts) {
  torch::autograd::variable_list out;
  for (const auto& t : ts) out.push_back(t.value_or(Tensor()));
  return out;
}

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// Forward: the kernel op; backward: kxops::linear_attention_backward (once differentiable).
struct LinearAttentionFn : public torch::autograd::Function<LinearAttentionFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, const optional<Tensor>& S0,
                                                const optional<Tensor>& z0, const optional<Tensor>& cu_seqlens,
                                                const optional<Tensor>& positions, const optional<Tensor>& inv_freq,
                                                bool interleaved, int64_t feature_map, double scale, bool normalize,
                                                double eps, bool causal) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(opt_list({q, k, v, S0, z0, cu_seqlens, positions, inv_freq}));
    ctx->saved_data["fm"] = feature_map;
    ctx->saved_data["flags"] = std::vector<int64_t>{interleaved, normalize, causal};
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, S, z] = kFwd.get().call(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map,
                                       scale, normalize, eps, causal);
    return {out, S, z};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto flags = ctx->saved_data["flags"].toIntVector();
    // out (B, T, H, Dv) has v's shape and q's dtype
    Tensor dout = grads[0].defined() ? grads[0].contiguous() : at::zeros(s[2].sizes(), s[0].options());
    auto [dq, dk, dv, dS0, dz0] = kBwd.get().call(
        dout, opt(grads[1]), opt(grads[2]), s[0], s[1], s[2], opt(s[3]), opt(s[4]), opt(s[5]), opt(s[6]), opt(s[7]),
        flags[0] != 0, ctx->saved_data["fm"].toInt(), ctx->saved_data["scale"].toDouble(), flags[1] != 0,
        ctx->saved_data["eps"].toDouble(), flags[2] != 0);
    torch::autograd::variable_list out(14);
    out[0] = dq, out[1] = dk, out[2] = dv;
    if (s[3].defined()) out[3] = dS0, out[4] = dz0;
    return out;
  }
};

Triple linear_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& S0,
                                 const optional<Tensor>& z0, const optional<Tensor>& cu_seqlens,
                                 const optional<Tensor>& positions, const optional<Tensor>& inv_freq,
                                 bool interleaved, int64_t feature_map, double scale, bool normalize, double eps,
                                 bool causal) {
  auto r = LinearAttentionFn::apply(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                                    normalize, eps, causal);
  return {r[0], r[1], r[2]};
}

// The step's backward is the reference's: the step is for decoding, its gradient rarely wanted, and the
// reference is the specification (autograd over its aten ops).
struct StepFn : public torch::autograd::Function<StepFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const Tensor& v, const Tensor& S, const Tensor& z,
                                                int64_t feature_map, double scale, bool normalize, double eps) {
    ctx->save_for_backward({q, k, v, S, z});
    ctx->saved_data["fm"] = feature_map;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, S1, z1] = kStep.get().call(q, k, v, S, z, feature_map, scale, normalize, eps);
    return {out, S1, z1};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    torch::autograd::variable_list ins;
    for (auto& t : s) ins.push_back(t.detach().requires_grad_(true));
    torch::autograd::variable_list outs, gs;
    {
      at::AutoGradMode enable(true);
      auto [out, S1, z1] = kStepRef.get().call(ins[0], ins[1], ins[2], ins[3], ins[4], ctx->saved_data["fm"].toInt(),
                                               ctx->saved_data["scale"].toDouble(),
                                               ctx->saved_data["normalize"].toBool(), ctx->saved_data["eps"].toDouble());
      const Tensor r[3] = {out, S1, z1};
      for (int i = 0; i < 3; ++i)
        if (grads[i].defined()) outs.push_back(r[i]), gs.push_back(grads[i]);
    }
    torch::autograd::variable_list out(9);
    if (outs.empty()) return out;
    auto g = torch::autograd::grad(outs, ins, gs, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    for (int i = 0; i < 5; ++i) out[i] = g[i];
    return out;
  }
};

Triple linear_attention_step_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& S,
                                      const Tensor& z, int64_t feature_map, double scale, bool normalize,
                                      double eps) {
  auto r = StepFn::apply(q, k, v, S, z, feature_map, scale, normalize, eps);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CompositeImplicitAutograd, m) {
  m.impl("linear_attention_front", &kxops::linear_attention_front);
  m.impl("linear_attention_step_front", &kxops::linear_attention_step_front);
}

TORCH_LIBRARY_IMPL(kxops, Autograd, m) {
  m.impl("linear_attention", &kxops::linear_attention_autograd);
  m.impl("linear_attention_step", &kxops::linear_attention_step_autograd);
}
