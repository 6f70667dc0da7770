// The GlobalPointer front: what kxops.global_pointer_loss, global_pointer, global_pointer_decode and the row
// losses (multilabel_categorical_crossentropy, sparse_...) run (pyext/global_pointer.py calls the
// CompositeImplicitAutograd ops kxops::*_front). Checks the user's arguments, normalises
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

#define KX_GP_SCORE_PARAMS                                                                                   \
  const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, \
      const optional<Tensor>&, int64_t, double, bool
using LogitsSig = Tensor(KX_GP_SCORE_PARAMS);
using LogitsBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, KX_GP_SCORE_PARAMS);
using DecodeSig = std::tuple<Tensor, Tensor>(KX_GP_SCORE_PARAMS, double);
#undef KX_GP_SCORE_PARAMS
using MlceSig = Triple(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, bool);
using MlceBwdSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, bool,
                          const Tensor&, const Tensor&);
front::Op<LogitsSig> kLogits{"kxops::global_pointer"}, kLogitsTriton{"kxops::global_pointer_triton"},
    kLogitsRef{"kxops::global_pointer_reference"};
front::Op<LogitsBwdSig> kLogitsBwd{"kxops::global_pointer_backward"};
front::Op<DecodeSig> kDecode{"kxops::global_pointer_decode"}, kDecodeTriton{"kxops::global_pointer_decode_triton"},
    kDecodeRef{"kxops::global_pointer_decode_reference"};
front::Op<MlceSig> kMlce{"kxops::multilabel_categorical_crossentropy"},
    kMlceTriton{"kxops::multilabel_categorical_crossentropy_triton"},
    kMlceRef{"kxops::multilabel_categorical_crossentropy_reference"};
front::Op<MlceBwdSig> kMlceBwd{"kxops::multilabel_categorical_crossentropy_backward"};
constexpr front::FamilyOps kLogitsOps{"kxops::global_pointer", "kxops::global_pointer_triton"};
constexpr front::FamilyOps kDecodeOps{"kxops::global_pointer_decode", "kxops::global_pointer_decode_triton"};
constexpr front::FamilyOps kMlceOps{"kxops::multilabel_categorical_crossentropy",
                                    "kxops::multilabel_categorical_crossentropy_triton"};

at::ScalarType state_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The kernel contract's arguments besides q and k.
struct Normalised {
  optional<Tensor> mask, start_bias, end_bias, inv_freq, pos_offsets, pos_index, targets;
  int64_t H = 1;
  double scale = 1.0;
  bool tril = true;
};

optional<Tensor> bias_arg(const char* kOp, const char* arg, const optional<Tensor>& b, const Tensor& q, int64_t B,
                          int64_t L, int64_t& H) {
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

// q, k and the options every span op shares, checked and normalised (the labels are the loss's own).
struct Prepared {
  Tensor q, k;
  Normalised n;
  Backend backend;
};

Prepared prepare(const char* op, const front::FamilyOps& ops, const Tensor& q, const Tensor& k,
                 const optional<Tensor>& mask, bool rope, double base, bool tril, optional<double> scale,
                 const optional<Tensor>& start_bias, const optional<Tensor>& end_bias,
                 std::string_view backend_name) {
  front::check_float(op, "q", q);
  front::check_float(op, "k", k);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be (batch, L, types or 1, head_size), got shape ",
                    front::shape_str(q.sizes()));
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape ", front::shape_str(q.sizes()), ", got ",
                    front::shape_str(k.sizes()));
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": q and k must have one dtype, got ",
                   front::dtype_name(q.scalar_type()), " and ", front::dtype_name(k.scalar_type()));
  front::check_device(op, "k", k, q, "q");
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxHeadDim, op, ": head_size must be in [1, ", kMaxHeadDim, "], got ", d);
  Prepared p;
  p.backend = front::resolve_backend(op, backend_name, q, ops);
  const bool on_device = front::traced(q) || front::capturing(q);
  Normalised& n = p.n;
  n.tril = tril;
  n.scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  int64_t H = Hq == 1 ? -1 : Hq;
  n.start_bias = bias_arg(op, "start_bias", start_bias, q, B, L, H);
  n.end_bias = bias_arg(op, "end_bias", end_bias, q, B, L, H);
  n.H = H == -1 ? 1 : H;
  if (mask) {
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, op, ": mask must be (batch=", B,
                      ", L=", L, "), got shape ", front::shape_str(mask->sizes()));
    front::check_device(op, "mask", *mask, q, "q");
    n.mask = (mask->scalar_type() == at::kBool ? *mask : mask->ne(0)).contiguous();
  }
  if (rope) {
    TORCH_CHECK_VALUE(d % 2 == 0, op, ": rope=True needs an even head_size, got ", d);
    TORCH_CHECK_VALUE(base > 0, op, ": base must be positive, got ", base);
    n.inv_freq = rope_frequencies(d, base, state_dtype(q), q.device(), on_device);
  }
  p.q = q.stride(3) == 1 || d == 1 ? q : q.contiguous();
  p.k = k.stride(3) == 1 || d == 1 ? k : k.contiguous();
  return p;
}

Tensor reduce(const Tensor& loss, std::string_view reduction) {
  if (reduction == "mean") return loss.mean();
  if (reduction == "sum") return loss.sum();
  return loss;
}

void check_reduction(const char* op, std::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", op,
                    ": reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
}

Tensor run(const Tensor& q, const Tensor& k, const Tensor& labels, const optional<Tensor>& mask, bool rope,
           double base, bool tril, optional<double> scale, const optional<Tensor>& start_bias,
           const optional<Tensor>& end_bias, std::string_view reduction, std::string_view backend_name) {
  Prepared p = prepare(kOp, kOps, q, k, mask, rope, base, tril, scale, start_bias, end_bias, backend_name);
  check_reduction(kOp, reduction);
  const int64_t B = q.size(0), L = q.size(1);
  Normalised& n = p.n;
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
  auto& op = p.backend == Backend::Triton ? kLossTriton : (p.backend == Backend::Reference ? kLossRef : kLoss);
  return reduce(std::get<0>(op.get().call(p.q, p.k, n.mask, n.start_bias, n.end_bias, n.inv_freq, n.H, n.scale,
                                          n.tril, n.pos_offsets, n.pos_index, n.targets)),
                reduction);
}

// ---- the logits and decoding ------------------------------------------------------------------------------

Tensor global_pointer_front(const Tensor& q, const Tensor& k, const optional<Tensor>& mask, bool rope, double base,
                            bool tril, optional<double> scale, const optional<Tensor>& start_bias,
                            const optional<Tensor>& end_bias, c10::string_view backend) {
  Prepared p = prepare("global_pointer", kLogitsOps, q, k, mask, rope, base, tril, scale, start_bias, end_bias,
                       std::string_view(backend.data(), backend.size()));
  const Normalised& n = p.n;
  auto& op = p.backend == Backend::Triton ? kLogitsTriton : (p.backend == Backend::Reference ? kLogitsRef : kLogits);
  return op.get().call(p.q, p.k, n.mask, n.start_bias, n.end_bias, n.inv_freq, n.H, n.scale, n.tril);
}

std::tuple<Tensor, Tensor> global_pointer_decode_front(const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
                                                       double threshold, bool rope, double base, bool tril,
                                                       optional<double> scale, const optional<Tensor>& start_bias,
                                                       const optional<Tensor>& end_bias, c10::string_view backend) {
  Prepared p = prepare("global_pointer_decode", kDecodeOps, q, k, mask, rope, base, tril, scale, start_bias, end_bias,
                       std::string_view(backend.data(), backend.size()));
  const Normalised& n = p.n;
  auto& op = p.backend == Backend::Triton ? kDecodeTriton : (p.backend == Backend::Reference ? kDecodeRef : kDecode);
  auto detached = [](const optional<Tensor>& t) { return t ? optional<Tensor>(t->detach()) : t; };
  auto [spans, scores] = op.get().call(p.q.detach(), p.k.detach(), n.mask, detached(n.start_bias),
                                       detached(n.end_bias), n.inv_freq, n.H, n.scale, n.tril, threshold);
  return {spans, scores};
}

// ---- the row losses ---------------------------------------------------------------------------------------

Tensor multilabel_categorical_crossentropy_front(const Tensor& x, const optional<Tensor>& targets,
                                                 const optional<Tensor>& positives, bool mask_zero,
                                                 c10::string_view reduction_, c10::string_view backend_) {
  const bool sparse = positives.has_value();
  const char* op = sparse ? "sparse_multilabel_categorical_crossentropy" : "multilabel_categorical_crossentropy";
  const std::string_view reduction(reduction_.data(), reduction_.size());
  front::check_float(op, "logits", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": logits must have a class dimension, got a scalar");
  check_reduction(op, reduction);
  const int64_t C = x.size(-1);
  const Backend backend = front::resolve_backend(op, std::string_view(backend_.data(), backend_.size()), x, kMlceOps);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const int64_t R = c10::multiply_integers(lead);
  optional<Tensor> t, pos;
  if (sparse) {
    const Tensor& p = *positives;
    front::check_int(op, "positive_indices", p);
    front::check_device(op, "positive_indices", p, x, "logits");
    TORCH_CHECK_VALUE(p.dim() == x.dim() && p.sizes().slice(0, p.dim() - 1) == lead, op,
                      ": positive_indices must be (..., P) with logits' leading dims ", front::shape_str(lead),
                      ", got shape ", front::shape_str(p.sizes()));
    Tensor pl = p.to(at::kLong).reshape({R, p.size(-1)}).contiguous();
    if (!front::traced(pl) && !front::capturing(pl) && pl.numel() > 0) {
      const Tensor h = at::stack({pl.min(), pl.max()}).cpu();
      const int64_t* v = h.const_data_ptr<int64_t>();
      TORCH_CHECK_VALUE(v[0] >= 0 && v[1] < C, op, ": positive_indices must be in [0, ", C, "), got values in [", v[0],
                        ", ", v[1], "]");
    }
    pos = pl;
  } else {
    TORCH_CHECK_VALUE(targets.has_value(), op, ": targets are required");
    const Tensor& tt = *targets;
    TORCH_CHECK_VALUE(tt.sizes() == x.sizes(), op, ": targets must have logits' shape ", front::shape_str(x.sizes()),
                      ", got ", front::shape_str(tt.sizes()));
    front::check_device(op, "targets", tt, x, "logits");
    TORCH_CHECK_TYPE(tt.is_floating_point() || tt.scalar_type() == at::kBool || front::is_int_dtype(tt.scalar_type()),
                     op, ": targets must be 0/1 or soft labels in [0, 1], got ", front::dtype_name(tt.scalar_type()));
    Tensor tc = tt.to(state_dtype(x)).reshape({R, C}).contiguous();
    if (!front::traced(tc) && !front::capturing(tc) && tc.numel() > 0) {
      const Tensor h = at::stack({tc.min(), tc.max()}).to(at::kDouble).cpu();
      const double* v = h.const_data_ptr<double>();
      TORCH_CHECK_VALUE(v[0] >= 0 && v[1] <= 1, op, ": targets must be in [0, 1], got values in [", v[0], ", ", v[1],
                        "]");
    }
    t = tc;
  }
  const Tensor x2 = x.reshape({R, C}).contiguous();
  auto& fn = backend == Backend::Triton ? kMlceTriton : (backend == Backend::Reference ? kMlceRef : kMlce);
  Tensor loss = std::get<0>(fn.get().call(x2, t, pos, sparse && mask_zero)).reshape(lead);
  return reduce(loss, reduction);
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

struct GlobalPointerFn : public torch::autograd::Function<GlobalPointerFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k,
                        const optional<Tensor>& mask, const optional<Tensor>& start_bias,
                        const optional<Tensor>& end_bias, const optional<Tensor>& inv_freq, int64_t H, double scale,
                        bool tril) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward(opt_list({q, k, mask, start_bias, end_bias, inv_freq}));
    ctx->saved_data["H"] = H;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["tril"] = tril;
    return kLogits.get().call(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    torch::autograd::variable_list out(9);
    if (!grads[0].defined()) return out;
    auto [dq, dk, dstart, dend] = kLogitsBwd.get().call(
        grads[0].contiguous(), s[0], s[1], opt(s[2]), opt(s[3]), opt(s[4]), opt(s[5]), ctx->saved_data["H"].toInt(),
        ctx->saved_data["scale"].toDouble(), ctx->saved_data["tril"].toBool());
    out[0] = dq, out[1] = dk;
    if (s[3].defined()) out[3] = dstart;
    if (s[4].defined()) out[4] = dend;
    return out;
  }
};

Tensor global_pointer_autograd(const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
                               const optional<Tensor>& start_bias, const optional<Tensor>& end_bias,
                               const optional<Tensor>& inv_freq, int64_t H, double scale, bool tril) {
  return GlobalPointerFn::apply(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril);
}

struct MlceFn : public torch::autograd::Function<MlceFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const optional<Tensor>& targets, const optional<Tensor>& positives,
                                                bool mask_zero) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, lse_neg, lse_pos] = kMlce.get().call(x, targets, positives, mask_zero);
    ctx->save_for_backward(opt_list({x, targets, positives, lse_neg, lse_pos}));
    ctx->saved_data["mask_zero"] = mask_zero;
    ctx->mark_non_differentiable({lse_neg, lse_pos});
    return {loss, lse_neg, lse_pos};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    torch::autograd::variable_list out(4);
    if (!grads[0].defined()) return out;
    out[0] = kMlceBwd.get().call(grads[0].contiguous(), s[0], opt(s[1]), opt(s[2]),
                                 ctx->saved_data["mask_zero"].toBool(), s[3], s[4]);
    return out;
  }
};

Triple mlce_autograd(const Tensor& x, const optional<Tensor>& targets, const optional<Tensor>& positives,
                     bool mask_zero) {
  auto r = MlceFn::apply(x, targets, positives, mask_zero);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace kxops

TORCH_LIBRARY_IMPL(kxops, CompositeImplicitAutograd, m) {
  m.impl("global_pointer_loss_front", &kxops::global_pointer_loss_front);
  m.impl("global_pointer_front", &kxops::global_pointer_front);
  m.impl("global_pointer_decode_front", &kxops::global_pointer_decode_front);
  m.impl("multilabel_categorical_crossentropy_front", &kxops::multilabel_categorical_crossentropy_front);
}

TORCH_LIBRARY_IMPL(kxops, Autograd, m) {
  m.impl("global_pointer_loss", &kxops::global_pointer_loss_autograd);
  m.impl("global_pointer", &kxops::global_pointer_autograd);
  m.impl("multilabel_categorical_crossentropy", &kxops::mlce_autograd);
}
