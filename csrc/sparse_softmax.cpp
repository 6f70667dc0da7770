// The sparse softmax front: what kxops.sparsemax, entmax15, entmax, topk_softmax and their losses run
// (pyext/sparse_softmax.py calls the CompositeImplicitAutograd ops kxops::*_front). Checks the user's
// arguments, moves `dim` last and flattens the other dimensions into rows (the kernel contract,
// docs/sparse_softmax_kernel_contract.md), picks a backend and calls its op; and the C++ autograd of the
// C++ kernel ops.
#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "front.h"

namespace kxops {
namespace {

using at::Tensor;
using front::Backend;
using front::Rows;
using front::from_rows;
using front::to_rows;
using std::optional;

enum Kind : int64_t { kSparsemax = 0, kEntmax15 = 1, kBisect = 2, kSoftmax = 3 };

using Pair = std::tuple<Tensor, Tensor>;
using FwdSig = Pair(const Tensor&, const optional<Tensor>&, int64_t, int64_t, const optional<Tensor>&, int64_t);
using BwdSig = Pair(const Tensor&, const Tensor&, const optional<Tensor>&, int64_t, bool);
using TopkSig = Pair(const Tensor&, int64_t, const optional<Tensor>&, int64_t);
using LossBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);

front::Op<FwdSig> kEntmax{"kxops::entmax"}, kEntmaxTriton{"kxops::entmax_triton"},
    kEntmaxRef{"kxops::entmax_reference"};
front::Op<BwdSig> kEntmaxBwd{"kxops::entmax_backward"};
front::Op<TopkSig> kTopk{"kxops::topk_softmax"}, kTopkTriton{"kxops::topk_softmax_triton"},
    kTopkRef{"kxops::topk_softmax_reference"};
front::Op<LossBwdSig> kLossBwd{"kxops::sparse_softmax_loss_backward"};
constexpr front::FamilyOps kEntmaxOps{"kxops::entmax", "kxops::entmax_triton"};
constexpr front::FamilyOps kTopkOps{"kxops::topk_softmax", "kxops::topk_softmax_triton"};

at::ScalarType state_dtype(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

bool checkable(const Tensor& t) { return !front::traced(t) && !front::capturing(t) && t.numel() > 0; }

// ---- the activations ---------------------------------------------------------------------------------------

// kind 0 / 1 / 2 (alpha a tensor broadcastable to x with size 1 along dim, or the float alpha_value).
Tensor entmax_front(const Tensor& x, const optional<Tensor>& alpha, double alpha_value, int64_t kind, int64_t dim,
                    int64_t n_iter, c10::string_view backend_) {
  const char* op = kind == kSparsemax ? "sparsemax" : (kind == kEntmax15 ? "entmax15" : "entmax");
  TORCH_CHECK_VALUE(kind >= kSparsemax && kind <= kBisect, "entmax_front: kind must be 0, 1 or 2, got ", kind);
  Rows r = to_rows(op, x, dim);
  const Backend backend = front::resolve_backend(op, std::string_view(backend_.data(), backend_.size()), x, kEntmaxOps);
  if (r.N == 0) return x.clone();
  optional<Tensor> a;
  if (kind == kBisect) {
    TORCH_CHECK_VALUE(n_iter >= 1, op, ": n_iter must be >= 1, got ", n_iter);
    if (alpha) {
      front::check_float(op, "alpha", *alpha);
      front::check_device(op, "alpha", *alpha, x);
      std::vector<int64_t> want = x.sizes().vec();
      if (want.empty()) want.push_back(1);
      want[r.dim] = 1;
      const bool fits = alpha->dim() <= static_cast<int64_t>(want.size()) &&
                        at::infer_size(alpha->sizes(), want) == want;
      TORCH_CHECK_VALUE(fits, op, ": alpha must be a float or a tensor broadcastable to ", front::shape_str(want),
                        " (x's shape with 1 along dim), got shape ", front::shape_str(alpha->sizes()));
      Tensor rows = alpha->expand(want).movedim(r.dim, -1).reshape({r.R}).to(state_dtype(x)).contiguous();
      if (checkable(rows)) {
        const double lo = rows.detach().min().item<double>();  // one host sync
        TORCH_CHECK_VALUE(lo > 1, op, ": alpha must be > 1 (alpha = 1 is softmax), got a value of ", lo);
      }
      a = rows;
      // alpha's gradient divides by (alpha - 1)^2: from a 16-bit p it would carry p's rounding, amplified.
      // So the rows run in float32 here (the output is rounded to x's dtype at the end).
      if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) r.x = r.x.to(at::kFloat);
    } else {
      TORCH_CHECK_VALUE(alpha_value > 1, op, ": alpha must be > 1 (alpha = 1 is softmax), got ", alpha_value);
      // the closed forms are exact where bisection is not: a float alpha of 2 or 1.5 runs them
      if (alpha_value == 2.0) kind = kSparsemax;
      else if (alpha_value == 1.5) kind = kEntmax15;
      else a = at::full({r.R}, alpha_value, r.x.options().dtype(state_dtype(x)));
    }
  }
  auto& fn = backend == Backend::Triton ? kEntmaxTriton : (backend == Backend::Reference ? kEntmaxRef : kEntmax);
  const Tensor p = std::get<0>(fn.get().call(r.x, a, kind, kind == kBisect ? n_iter : 0, std::nullopt, -100));
  return from_rows(r, p.to(x.scalar_type()));
}

void check_k(const char* op, int64_t k, int64_t N) {
  TORCH_CHECK_VALUE(k >= 1 && k <= N, op, ": k must be in [1, ", N, "] (the size of dim), got ", k);
}

Tensor topk_softmax_front(const Tensor& x, int64_t k, int64_t dim, c10::string_view backend_) {
  const char* op = "topk_softmax";
  Rows r = to_rows(op, x, dim);
  const Backend backend = front::resolve_backend(op, std::string_view(backend_.data(), backend_.size()), x, kTopkOps);
  check_k(op, k, r.N);
  auto& fn = backend == Backend::Triton ? kTopkTriton : (backend == Backend::Reference ? kTopkRef : kTopk);
  return from_rows(r, std::get<0>(fn.get().call(r.x, k, std::nullopt, -100)));
}

// ---- the losses: x (..., C), target (...) -----------------------------------------------------------------

void check_reduction(const char* op, std::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", op,
                    ": reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
}

// target checked against x (..., C): an integer tensor of x's leading shape, values in [0, C) or ignore_index.
Tensor loss_target(const char* op, const Tensor& x, const Tensor& target, int64_t ignore_index) {
  front::check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must be (..., classes), got a scalar");
  front::check_int(op, "target", target);
  front::check_device(op, "target", target, x);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(target.sizes() == lead, op, ": target must have x's shape without the class dimension, ",
                    front::shape_str(lead), ", got ", front::shape_str(target.sizes()));
  const int64_t C = x.size(-1);
  Tensor t = target.to(at::kLong).reshape({-1}).contiguous();
  if (checkable(t)) {
    const Tensor bad = ((t < 0) | (t >= C)) & (t != ignore_index);
    const Tensor h = at::stack({bad.any().to(at::kLong), at::where(bad, t, 0).min(), at::where(bad, t, 0).max()}).cpu();
    const int64_t* v = h.const_data_ptr<int64_t>();  // one host sync
    TORCH_CHECK_VALUE(v[0] == 0, op, ": target must be in [0, ", C, ") or ignore_index=", ignore_index,
                      ", got a value of ", v[1] < 0 ? v[1] : v[2]);
  }
  return t;
}

Tensor reduce(const Tensor& rows, const Tensor& t, int64_t ignore_index, std::string_view reduction, const Tensor& x) {
  if (reduction == "none") return rows.reshape(x.sizes().slice(0, x.dim() - 1)).to(x.scalar_type());
  if (reduction == "sum") return rows.sum().to(x.scalar_type());
  // torch.nn.functional.cross_entropy's mean: over the rows not ignored (NaN when every row is)
  return (rows.sum() / (t != ignore_index).sum()).to(x.scalar_type());
}

Tensor entmax_loss_front(const Tensor& x, const Tensor& target, int64_t kind, int64_t ignore_index,
                         c10::string_view reduction_, c10::string_view backend_) {
  const char* op = kind == kSparsemax ? "sparsemax_loss" : "entmax15_loss";
  TORCH_CHECK_VALUE(kind == kSparsemax || kind == kEntmax15, "entmax_loss_front: kind must be 0 or 1, got ", kind);
  const std::string_view reduction(reduction_.data(), reduction_.size());
  check_reduction(op, reduction);
  const Tensor t = loss_target(op, x, target, ignore_index);
  TORCH_CHECK_VALUE(x.size(-1) >= 1, op, ": x must have at least one class");
  const Backend backend = front::resolve_backend(op, std::string_view(backend_.data(), backend_.size()), x, kEntmaxOps);
  const Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto& fn = backend == Backend::Triton ? kEntmaxTriton : (backend == Backend::Reference ? kEntmaxRef : kEntmax);
  return reduce(std::get<1>(fn.get().call(x2, std::nullopt, kind, 0, t, ignore_index)), t, ignore_index, reduction, x);
}

Tensor topk_softmax_cross_entropy_front(const Tensor& x, const Tensor& target, int64_t k, int64_t ignore_index,
                                        c10::string_view reduction_, c10::string_view backend_) {
  const char* op = "topk_softmax_cross_entropy";
  const std::string_view reduction(reduction_.data(), reduction_.size());
  check_reduction(op, reduction);
  const Tensor t = loss_target(op, x, target, ignore_index);
  check_k(op, k, x.size(-1));
  const Backend backend = front::resolve_backend(op, std::string_view(backend_.data(), backend_.size()), x, kTopkOps);
  const Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto& fn = backend == Backend::Triton ? kTopkTriton : (backend == Backend::Reference ? kTopkRef : kTopk);
  return reduce(std::get<1>(fn.get().call(x2, k, t, ignore_index)), t, ignore_index, reduction, x);
}

// (p - onehot(target)) * dloss per row, 0 for ignored rows: the gradient of every loss here.
Tensor sparse_softmax_loss_backward(const Tensor& dloss, const Tensor& p, const Tensor& target, int64_t ignore_index) {
  const Tensor keep = target != ignore_index;
  const Tensor g = at::where(keep, dloss.to(state_dtype(p)), 0).unsqueeze(1);
  const Tensor idx = at::where(keep, target, 0).unsqueeze(1);
  return (p.to(g.scalar_type()) * g).scatter_add(1, idx, -g).to(p.scalar_type());
}

// ---- C++ autograd of the C++ kernel ops -------------------------------------------------------------------------

// dx of (p, loss) -> (dp, dloss): the entmax backward for dp, the loss gradient for dloss.
std::pair<Tensor, Tensor> grads_of(const Tensor& dp, const Tensor& dloss, const Tensor& p, const optional<Tensor>& alpha,
                                   int64_t kind, const Tensor& target, int64_t ignore_index, bool alpha_grad) {
  Tensor dx, dalpha;
  if (dp.defined()) std::tie(dx, dalpha) = kEntmaxBwd.get().call(dp.contiguous(), p, alpha, kind, alpha_grad);
  if (dloss.defined() && target.defined()) {
    const Tensor dl = kLossBwd.get().call(dloss, p, target, ignore_index);
    dx = dx.defined() ? dx + dl : dl;
  }
  return {dx, alpha_grad ? dalpha : Tensor()};
}

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

struct EntmaxFn : public torch::autograd::Function<EntmaxFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const optional<Tensor>& alpha, int64_t kind, int64_t n_iter,
                                                const optional<Tensor>& target, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [p, loss] = kEntmax.get().call(x, alpha, kind, n_iter, target, ignore_index);
    ctx->save_for_backward({p, alpha.value_or(Tensor()), target.value_or(Tensor())});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["ignore_index"] = ignore_index;
    return {p, loss};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t kind = ctx->saved_data["kind"].toInt();
    const bool alpha_grad = kind == kBisect && s[1].defined() && ctx->needs_input_grad(1);
    auto [dx, dalpha] = grads_of(grads[0], grads[1], s[0], opt(s[1]), kind, s[2],
                                 ctx->saved_data["ignore_index"].toInt(), alpha_grad);
    return {dx, dalpha, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Pair entmax_autograd(const Tensor& x, const optional<Tensor>& alpha, int64_t kind, int64_t n_iter,
                     const optional<Tensor>& target, int64_t ignore_index) {
  auto r = EntmaxFn::apply(x, alpha, kind, n_iter, target, ignore_index);
  return {r[0], r[1]};
}

struct TopkFn : public torch::autograd::Function<TopkFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x, int64_t k,
                                                const optional<Tensor>& target, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [p, loss] = kTopk.get().call(x, k, target, ignore_index);
    ctx->save_for_backward({p, target.value_or(Tensor())});
    ctx->saved_data["ignore_index"] = ignore_index;
    return {p, loss};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dx, unused] = grads_of(grads[0], grads[1], s[0], std::nullopt, kSoftmax, s[1],
                                 ctx->saved_data["ignore_index"].toInt(), false);
    return {dx, Tensor(), Tensor(), Tensor()};
  }
};

Pair topk_autograd(const Tensor& x, int64_t k, const optional<Tensor>& target, int64_t ignore_index) {
  auto r = TopkFn::apply(x, k, target, ignore_index);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CompositeImplicitAutograd, m) {
  m.impl("entmax_front", &kxops::entmax_front);
  m.impl("topk_softmax_front", &kxops::topk_softmax_front);
  m.impl("entmax_loss_front", &kxops::entmax_loss_front);
  m.impl("topk_softmax_cross_entropy_front", &kxops::topk_softmax_cross_entropy_front);
  m.impl("sparse_softmax_loss_backward", &kxops::sparse_softmax_loss_backward);
}

TORCH_LIBRARY_IMPL(kxops, Autograd, m) {
  m.impl("entmax", &kxops::entmax_autograd);
  m.impl("topk_softmax", &kxops::topk_autograd);
}
