// The GlobalPointer front: what kxops.global_pointer_loss runs (pyext/global_pointer.py calls the
// CompositeImplicitAutograd op kxops::global_pointer_loss_front). Checks the user's arguments, normalises
// them to the kernel contract (docs/global_pointer_kernel_contract.md: sparse gold spans become sorted
// flat spans per (batch, type) row with row offsets, dense labels the state dtype), picks a backend and
// calls its op; and the C++ autograd of the C++ kernel op.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "front.h"
#include "rope.h"

namespace kxops {
namespace {

using at::Tensor;
using front::Backend;
using std::optional;

constexpr front::FamilyOps kOps{"kxops::global_pointer_loss", "kxops::global_pointer_loss_triton"};
constexpr int64_t kMaxHeadDim = 256;
constexpr const char* kOp = "global_pointer_loss";

using Triple = std::tuple<Tensor, Tensor, Tensor>;
using LossSig = Triple(const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                       const optional<Tensor>&, const optional<Tensor>&, int64_t, double, bool,
                       const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, int64_t, double, bool, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&);

front::Op<LossSig> kLoss{"kxops::global_pointer_loss"}, kLossTriton{"kxops::global_pointer_loss_triton"},
    kLossRef{"kxops::global_pointer_loss_reference"};
front::Op<BwdSig> kLossBwd{"kxops::global_pointer_loss_backward"};

at::ScalarType state_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The kernel contract's arguments besides q and k.
struct Normalised {
  optional<Tensor> mask, start_bias, end_bias, inv_freq, pos_offsets, pos_index, targets;
  int64_t H = 1;
  double scale = 1.0;
  bool tril = true;
};

optional<Tensor> bias_arg(const char* arg, const optional<Tensor>& b, const Tensor& q, int64_t B, int64_t L,
                          int64_t& H) {
  if (!b) return std::nullopt;
  front::check_float(kOp, arg, *b);
  front::check_device(kOp, arg, *b, q, "q");
  const int64_t Hq = q.size(2);
  TORCH_CHECK_VALUE(b->dim() == 3 && b->size(0) == B && b->size(2) == L && (Hq == 1 || b->size(1) == Hq), kOp, ": ",
                    arg, " must be (batch=", B, ", types", Hq == 1 ? "" : "=" + std::to_string(Hq), ", L=", L,
                    "), got shape ", front::shape_str(b->sizes()));
  if (Hq == 1) {
    TORCH_CHECK_VALUE(H == -1 || H == b->size(1), kOp, ": start_bias and end_bias must have one number of types, got ",
                      H, " and ", b->size(1));
    H = b->size(1);
  }
  return b->to(state_dtype(q)).contiguous();
}

// Sparse gold spans (N, 4) [batch, type, start, end] -> (row offsets (B*H + 1,), sorted flat spans (N,)),
// both int32; a span listed twice stays twice (the kernels treat the labels as a set).
std::pair<Tensor, Tensor> sparse_labels(const Tensor& labels, const Tensor& q, int64_t B, int64_t H, int64_t L,
                                        bool tril) {
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(1) == 4, kOp,
                    ": integer labels must be (N, 4) gold spans [batch, type, start, end], got shape ",
                    front::shape_str(labels.sizes()));
  front::check_device(kOp, "labels", labels, q, "q");
  TORCH_CHECK_VALUE(L * L < (int64_t{1} << 31), kOp, ": L * L must fit in int32 for sparse labels, got L=", L);
  const Tensor lab = labels.to(at::kLong);
  if (!front::traced(lab) && !front::capturing(lab) && lab.size(0) > 0) {
    const Tensor lo = std::get<0>(lab.min(0)), hi = std::get<0>(lab.max(0));
    const Tensor bad_order = tril ? (lab.select(1, 2) > lab.select(1, 3)).any().to(at::kLong).reshape({1})
                                  : at::zeros({1}, lab.options());
    const Tensor h = at::cat({lo, hi, bad_order}).cpu();  // the one host sync
    const int64_t* v = h.const_data_ptr<int64_t>();
    const char* names[] = {"batch", "type", "start", "end"};
    const int64_t limits[] = {B, H, L, L};
    for (int c = 0; c < 4; ++c)
      TORCH_CHECK_VALUE(v[c] >= 0 && v[4 + c] < limits[c], kOp, ": labels[:, ", c, "] (", names[c],
                        ") must be in [0, ", limits[c], "), got values in [", v[c], ", ", v[4 + c], "]");
    TORCH_CHECK_VALUE(v[8] == 0, kOp, ": a gold span has start > end, which tril=True never scores");
  }
  const Tensor row = lab.select(1, 0) * H + lab.select(1, 1);
  const Tensor key = row * (L * L) + lab.select(1, 2) * L + lab.select(1, 3);
  const Tensor sorted = std::get<0>(key.sort());
  const Tensor rows = at::div(sorted, L * L, "floor");
  const Tensor index = (sorted - rows * (L * L)).to(at::kInt);
  const Tensor offsets = at::searchsorted(rows, at::arange(B * H + 1, rows.options())).to(at::kInt);
  return {offsets.contiguous(), index.contiguous()};
}

Tensor dense_labels(const Tensor& labels, const Tensor& q, int64_t B, int64_t H, int64_t L) {
  TORCH_CHECK_VALUE(labels.dim() == 4 && labels.size(0) == B && labels.size(1) == H && labels.size(2) == L &&
                        labels.size(3) == L,
                    kOp, ": dense labels must be (batch=", B, ", types=", H, ", L=", L, ", L=", L, "), got shape ",
                    front::shape_str(labels.sizes()));
  front::check_device(kOp, "labels", labels, q, "q");
  const Tensor t = labels.to(state_dtype(q)).contiguous();
  if (!front::traced(t) && !front::capturing(t) && t.numel() > 0) {
    const Tensor h = at::stack({t.min(), t.max()}).to(at::kDouble).cpu();
    const double* v = h.const_data_ptr<double>();
    TORCH_CHECK_VALUE(v[0] >= 0 && v[1] <= 1, kOp, ": dense labels must be in [0, 1], got values in [", v[0], ", ",
                      v[1], "]");
  }
  return t;
}

Tensor run(const Tensor& q, const Tensor& k, const Tensor& labels, const optional<Tensor>& mask, bool rope,
           double base, bool tril, optional<double> scale, const optional<Tensor>& start_bias,
           const optional<Tensor>& end_bias, std::string_view reduction, std::string_view backend_name) {
  front::check_float(kOp, "q", q);
  front::check_float(kOp, "k", k);
  TORCH_CHECK_VALUE(q.dim() == 4, kOp, ": q must be (batch, L, types or 1, head_size), got shape ",
                    front::shape_str(q.sizes()));
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), kOp, ": k must have q's shape ", front::shape_str(q.sizes()), ", got ",
                    front::shape_str(k.sizes()));
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), kOp, ": q and k must have one dtype, got ",
                   front::dtype_name(q.scalar_type()), " and ", front::dtype_name(k.scalar_type()));
  front::check_device(kOp, "k", k, q, "q");
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxHeadDim, kOp, ": head_size must be in [1, ", kMaxHeadDim, "], got ", d);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", kOp,
                    ": reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
  const Backend backend = front::resolve_backend(kOp, backend_name, q, kOps);
  const bool on_device = front::traced(q) || front::capturing(q);

  Normalised n;
  n.tril = tril;
  n.scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  int64_t H = Hq == 1 ? -1 : Hq;
  n.start_bias = bias_arg("start_bias", start_bias, q, B, L, H);
  n.end_bias = bias_arg("end_bias", end_bias, q, B, L, H);
  n.H = H == -1 ? 1 : H;
  if (mask) {
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, kOp, ": mask must be (batch=", B,
                      ", L=", L, "), got shape ", front::shape_str(mask->sizes()));
    front::check_device(kOp, "mask", *mask, q, "q");
    n.mask = (mask->scalar_type() == at::kBool ? *mask : mask->ne(0)).contiguous();
  }
  if (rope) {
    TORCH_CHECK_VALUE(d % 2 == 0, kOp, ": rope=True needs an even head_size, got ", d);
    TORCH_CHECK_VALUE(base > 0, kOp, ": base must be positive, got ", base);
    n.inv_freq = rope_frequencies(d, base, state_dtype(q), q.device(), on_device);
  }
  if (labels.is_floating_point()) {
    n.targets = dense_labels(labels, q, B, n.H, L);
  } else {
    TORCH_CHECK_TYPE(front::is_int_dtype(labels.scalar_type()), kOp,
                     ": labels must be int64 gold spans (N, 4) or floating dense labels (B, H, L, L), got ",
                     front::dtype_name(labels.scalar_type()));
    auto [off, idx] = sparse_labels(labels, q, B, n.H, L, tril);
    n.pos_offsets = off;
    n.pos_index = idx;
  }
  const Tensor qc = q.stride(3) == 1 || d == 1 ? q : q.contiguous();
  const Tensor kc = k.stride(3) == 1 || d == 1 ? k : k.contiguous();
  auto& op = backend == Backend::Triton ? kLossTriton : (backend == Backend::Reference ? kLossRef : kLoss);
  Tensor loss = std::get<0>(op.get().call(qc, kc, n.mask, n.start_bias, n.end_bias, n.inv_freq, n.H, n.scale, n.tril,
                                          n.pos_offsets, n.pos_index, n.targets));
  if (reduction == "mean") return loss.mean();
  if (reduction == "sum") return loss.sum();
  return loss;
}

Tensor global_pointer_loss_front(const Tensor& q, const Tensor& k, const Tensor& labels, const optional<Tensor>& mask,
                                 bool rope, double base, bool tril, optional<double> scale,
                                 const optional<Tensor>& start_bias, const optional<Tensor>& end_bias,
                                 c10::string_view reduction, c10::string_view backend) {
  return run(q, k, labels, mask, rope, base, tril, scale, start_bias, end_bias,
             std::string_view(reduction.data(), reduction.size()), std::string_view(backend.data(), backend.size()));
}

// ---- C++ autograd of the C++ kernel op -----------------------------------------------------------------

torch::autograd::variable_list opt_list(std::initializer_list<optional<Tensor>> ts) {
  torch::autograd::variable_list out;
  for (const auto& t : ts) out.push_back(t.value_or(Tensor()));
  return out;
}

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

struct GlobalPointerLossFn : public torch::autograd::Function<GlobalPointerLossFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& q,
                                                const Tensor& k, const optional<Tensor>& mask,
                                                const optional<Tensor>& start_bias, const optional<Tensor>& end_bias,
                                                const optional<Tensor>& inv_freq, int64_t H, double scale, bool tril,
                                                const optional<Tensor>& pos_offsets,
                                                const optional<Tensor>& pos_index, const optional<Tensor>& targets) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, lse_neg, lse_pos] =
        kLoss.get().call(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets);
    ctx->save_for_backward(
        opt_list({q, k, mask, start_bias, end_bias, inv_freq, pos_offsets, pos_index, targets, lse_neg, lse_pos}));
    ctx->saved_data["H"] = H;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["tril"] = tril;
    ctx->mark_non_differentiable({lse_neg, lse_pos});
    return {loss, lse_neg, lse_pos};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    torch::autograd::variable_list out(12);
    if (!grads[0].defined()) return out;
    auto [dq, dk, dstart, dend] = kLossBwd.get().call(
        grads[0].contiguous(), s[0], s[1], opt(s[2]), opt(s[3]), opt(s[4]), opt(s[5]), ctx->saved_data["H"].toInt(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["tril"].toBool(), opt(s[6]), opt(s[7]), opt(s[8]), s[9],
        s[10]);
    out[0] = dq, out[1] = dk;
    if (s[3].defined()) out[3] = dstart;
    if (s[4].defined()) out[4] = dend;
    return out;
  }
};

Triple global_pointer_loss_autograd(const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
                                    const optional<Tensor>& start_bias, const optional<Tensor>& end_bias,
                                    const optional<Tensor>& inv_freq, int64_t H, double scale, bool tril,
                                    const optional<Tensor>& pos_offsets, const optional<Tensor>& pos_index,
                                    const optional<Tensor>& targets) {
  auto r = GlobalPointerLossFn::apply(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets,
                                      pos_index, targets);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CompositeImplicitAutograd, m) {
  m.impl("global_pointer_loss_front", &kxops::global_pointer_loss_front);
}

TORCH_LIBRARY_IMPL(kxops, Autograd, m) { m.impl("global_pointer_loss", &kxops::global_pointer_loss_autograd); }
