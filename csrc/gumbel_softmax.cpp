// The Gumbel / perturb-max softmax front: what kxops.gumbel_softmax, gumbel_max and perturb_max_softmax run
// (pyext/gumbel_softmax.py draws the seed, then calls the CompositeImplicitAutograd ops kxops::*_front).
// Checks the user's arguments, moves `dim` last and flattens the other dimensions into rows (the kernel
// contract, docs/gumbel_softmax_kernel_contract.md), picks a backend and calls its op; and the C++ autograd
// of the C++ kernel ops.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "front.h"

namespace kxops {
namespace {

using at::Tensor;
using front::Backend;
using front::Rows;
using std::optional;

using Triple = std::tuple<Tensor, Tensor, Tensor>;
using GsSig = Triple(const Tensor&, const optional<Tensor>&, double, bool);
using GsBwdSig = Tensor(const Tensor&, const Tensor&, double);
using GmaxSig = Tensor(const Tensor&, const Tensor&);
using PmSig = Tensor(const Tensor&, const Tensor&);
using PmBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&);

front::Op<GsSig> kGs{"kxops::gumbel_softmax"}, kGsTriton{"kxops::gumbel_softmax_triton"},
    kGsRef{"kxops::gumbel_softmax_reference"};
front::Op<GsBwdSig> kGsBwd{"kxops::gumbel_softmax_backward"};
front::Op<GmaxSig> kGmax{"kxops::gumbel_max"}, kGmaxTriton{"kxops::gumbel_max_triton"},
    kGmaxRef{"kxops::gumbel_max_reference"};
front::Op<PmSig> kPm{"kxops::perturb_max"}, kPmTriton{"kxops::perturb_max_triton"},
    kPmRef{"kxops::perturb_max_reference"};
front::Op<PmBwdSig> kPmBwd{"kxops::perturb_max_backward"};
constexpr front::FamilyOps kGsOps{"kxops::gumbel_softmax", "kxops::gumbel_softmax_triton"};
constexpr front::FamilyOps kGmaxOps{"kxops::gumbel_max", "kxops::gumbel_max_triton"};
constexpr front::FamilyOps kPmOps{"kxops::perturb_max", "kxops::perturb_max_triton"};

std::string_view sv(c10::string_view s) { return {s.data(), s.size()}; }

// The Philox key: what the public function drew from the generator, on the logits' device.
void check_seed(const char* op, const Tensor& seed, const Tensor& x) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed must be an int64 tensor, got ",
                   front::dtype_name(seed.scalar_type()));
  TORCH_CHECK_VALUE(seed.numel() == 1, op, ": seed must have exactly one element, got shape ",
                    front::shape_str(seed.sizes()));
  front::check_device(op, "seed", seed, x, "logits");
}

template <typename Fn>
Fn& pick(Backend b, Fn& kernel, Fn& triton, Fn& reference) {
  return b == Backend::Triton ? triton : (b == Backend::Reference ? reference : kernel);
}

Tensor gumbel_softmax_front(const Tensor& logits, const Tensor& seed, double tau, bool hard, int64_t dim,
                            c10::string_view backend) {
  const char* op = "gumbel_softmax";
  // tau > 0 and finite: y = softmax((logits + g) / tau); tau -> 0 approaches the one-hot sample
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau), op, ": tau must be a positive finite number, got ", tau);
  Rows r = front::to_rows(op, logits, dim, "logits");
  check_seed(op, seed, logits);
  const Backend b = front::resolve_backend(op, sv(backend), logits, kGsOps);
  if (r.N == 0) return logits.clone();
  const Tensor y = std::get<0>(pick(b, kGs, kGsTriton, kGsRef).get().call(r.x, seed.reshape({1}), tau, hard));
  return front::from_rows(r, y);
}

Tensor gumbel_max_front(const Tensor& logits, const Tensor& seed, int64_t dim, c10::string_view backend) {
  const char* op = "gumbel_max";
  Rows r = front::to_rows(op, logits, dim, "logits");
  check_seed(op, seed, logits);
  const Backend b = front::resolve_backend(op, sv(backend), logits, kGmaxOps);
  TORCH_CHECK_VALUE(r.N > 0, op, ": logits must have at least one entry along dim ", r.dim, ", got none");
  const Tensor index = pick(b, kGmax, kGmaxTriton, kGmaxRef).get().call(r.x.detach(), seed.reshape({1}));
  std::vector<int64_t> shape(r.shape.begin(), r.shape.end() - 1);
  return index.reshape(shape);
}

// The quadrature nodes z_k = Phi^-1(k / (K + 1)), float64 on x's device: cached per (K, device) in eager mode,
// built from device ops while tracing or capturing (no host copy, no tensor constant in a graph).
Tensor nodes_for(int64_t K, const Tensor& x) {
  auto make = [&](at::Device dev) {
    const Tensor k = at::arange(1, K + 1, at::TensorOptions(at::kDouble).device(dev));
    return at::special_ndtri(k / static_cast<double>(K + 1));
  };
  if (front::traced(x) || front::capturing(x)) return make(x.device());
  static front::Cache<std::pair<int64_t, std::pair<int, int>>, Tensor> cache;
  const auto key = std::make_pair(K, std::make_pair(static_cast<int>(x.device().type()),
                                                    static_cast<int>(x.device().index())));
  return cache.get(key, [&] { return make(at::kCPU).to(x.device()); });
}

Tensor perturb_max_softmax_front(const Tensor& x, c10::string_view noise_, int64_t num_quantiles, int64_t dim,
                                 c10::string_view backend) {
  const char* op = "perturb_max_softmax";
  const std::string_view noise = sv(noise_);
  TORCH_CHECK_VALUE(noise == "gaussian" || noise == "gumbel", op,
                    ": noise must be 'gaussian' or 'gumbel', got '", noise, "'");
  TORCH_CHECK_VALUE(num_quantiles >= 2, op, ": num_quantiles must be >= 2, got ", num_quantiles);
  Rows r = front::to_rows(op, x, dim);
  if (noise == "gumbel") {  // the closed form: softmax itself (the Gumbel-softmax kernel without noise, tau = 1)
    const Backend b = front::resolve_backend(op, sv(backend), x, kGsOps);
    if (r.N == 0) return x.clone();
    return front::from_rows(r, std::get<0>(pick(b, kGs, kGsTriton, kGsRef).get().call(r.x, std::nullopt, 1.0, false)));
  }
  const Backend b = front::resolve_backend(op, sv(backend), x, kPmOps);
  if (r.N == 0) return x.clone();
  return front::from_rows(r, pick(b, kPm, kPmTriton, kPmRef).get().call(r.x, nodes_for(num_quantiles, r.x)));
}

// ---- C++ autograd of the C++ kernel ops -----------------------------------------------------------------------

// y = onehot or softmax((x + g) / tau): the gradient is the soft one's (straight-through when hard), from the
// soft output alone (the noise is never saved).
struct GumbelSoftmaxFn : public torch::autograd::Function<GumbelSoftmaxFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const optional<Tensor>& seed, double tau, bool hard) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, soft, index] = kGs.get().call(x, seed, tau, hard);
    ctx->save_for_backward({hard ? soft : y});
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["hard"] = hard;
    ctx->mark_non_differentiable({index});
    // an unused output's gradient stays undefined (not a zero tensor to add: a full extra pass when hard)
    ctx->set_materialize_grads(false);
    return {y, soft, index};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Tensor soft = ctx->get_saved_variables()[0];
    Tensor g = grads[0];
    // soft is an output only when hard (else an empty placeholder): its gradient adds to y's
    if (ctx->saved_data["hard"].toBool() && grads[1].defined()) g = g.defined() ? g + grads[1] : grads[1];
    if (!g.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    return {kGsBwd.get().call(g.contiguous(), soft, ctx->saved_data["tau"].toDouble()), Tensor(), Tensor(), Tensor()};
  }
};

Triple gumbel_softmax_autograd(const Tensor& x, const optional<Tensor>& seed, double tau, bool hard) {
  auto r = GumbelSoftmaxFn::apply(x, seed, tau, hard);
  return {r[0], r[1], r[2]};
}

struct PerturbMaxFn : public torch::autograd::Function<PerturbMaxFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& nodes) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, nodes});
    return kPm.get().call(x, nodes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    return {kPmBwd.get().call(grads[0].contiguous(), s[0], s[1]), Tensor()};
  }
};

Tensor perturb_max_autograd(const Tensor& x, const Tensor& nodes) { return PerturbMaxFn::apply(x, nodes); }

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CompositeImplicitAutograd, m) {
  m.impl("gumbel_softmax_front", &kxops::gumbel_softmax_front);
  m.impl("gumbel_max_front", &kxops::gumbel_max_front);
  m.impl("perturb_max_softmax_front", &kxops::perturb_max_softmax_front);
}

TORCH_LIBRARY_IMPL(kxops, Autograd, m) {
  m.impl("gumbel_softmax", &kxops::gumbel_softmax_autograd);
  m.impl("perturb_max", &kxops::perturb_max_autograd);
}
