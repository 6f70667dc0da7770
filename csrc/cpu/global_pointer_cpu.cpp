// GlobalPointer on CPU: the span loss (kxops::global_pointer_loss, _backward), the span logits
// (kxops::global_pointer, _backward), decoding (kxops::global_pointer_decode) and the row losses on
// materialised logits (kxops::multilabel_categorical_crossentropy, _backward); semantics and backward
// formulas: docs/global_pointer_kernel_contract.md.
//
// Work items are the (batch, type) rows (or, when q and k are shared by every type, the batch rows, so
// that one item owns its dq and dk). q and k are first rotated (RoPE) and q scaled, into double buffers
// of (B, Hq, L, d): O(L d), never O(L^2). A row is then walked in tiles of kTile starts i x every end j
// (j >= i0 when tril): the tile of scores is one BLAS product of the rotated q and k, the biases, masks and
// labels are applied in place, and the tile is folded into the row's two log-sum-exps (max of the tile,
// then one pass of exponentials), both started at the threshold class (score 0). Sparse labels are the
// row's sorted flat spans, met in order by a pointer walk. The backward recomputes each tile, turns it into
// ds in place, and accumulates dq += ds k, dk += ds^T q with two more products, and the bias gradients as
// its row and column sums; RoPE is undone at the end.
//
// Arithmetic in double (the scores, the sums; the products are ATen's BLAS on the buffers); the rotation's cos / sin are those of the state dtype's
// angle, as the reference computes them, and the outputs are rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "sincos.h"

namespace kxops {
namespace {

using at::Tensor;
using std::optional;

constexpr int64_t kTile = 32;  // starts i per score tile
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
#define KX_EXP_INLINE inline __attribute__((always_inline))

// Matrix products on the work item's own buffers (ATen's BLAS through tensors over them: the library's
// gemm symbols are not exported). Row-major, leading dimensions given; run inside a parallel region
// (single-threaded there), below autograd.
Tensor view(const double* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<double*>(p), {rows, cols}, {ld, 1}, at::TensorOptions(at::kDouble));
}

// cos / sin of every (position, pair) angle, (L, d/2) each: the angle in the state dtype (float32:
// float(pos) * inv_freq, exactly rounded cos / sin; float64: in double), as the reference's.
void angle_tables(const Tensor& inv_freq, int64_t L, std::vector<double>& c, std::vector<double>& s) {
  const int64_t half = inv_freq.numel();
  c.resize(L * half);
  s.resize(L * half);
  if (inv_freq.scalar_type() == at::kDouble) {
    const double* f = inv_freq.const_data_ptr<double>();
    for (int64_t i = 0; i < L; ++i)
      for (int64_t p = 0; p < half; ++p) {
        const double a = static_cast<double>(i) * f[p];
        c[i * half + p] = std::cos(a);
        s[i * half + p] = std::sin(a);
      }
    return;
  }
  const float* f = inv_freq.const_data_ptr<float>();
  std::vector<float> theta(L * half), cf(L * half), sf(L * half);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t p = 0; p < half; ++p) theta[i * half + p] = static_cast<float>(i) * f[p];
  cpu::sincos_table(theta.data(), cf.data(), sf.data(), L * half, false);
  for (int64_t n = 0; n < L * half; ++n) c[n] = cf[n], s[n] = sf[n];
}

// x (B, L, Hq, d) -> (B, Hq, L, d) double, times `scale`, rotated (interleaved pairs) when c is not empty.
template <typename scalar_t>
Tensor rotated(const Tensor& x, const std::vector<double>& c, const std::vector<double>& s, double scale) {
  const int64_t B = x.size(0), L = x.size(1), Hq = x.size(2), d = x.size(3), half = d / 2;
  Tensor out = at::empty({B, Hq, L, d}, x.options().dtype(at::kDouble));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  double* op = out.data_ptr<double>();
  const int64_t sb = x.stride(0), sl = x.stride(1), sh = x.stride(2);
  const bool rope = !c.empty();
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      for (int64_t i = 0; i < L; ++i) {
        const scalar_t* src = xp + b * sb + i * sl + h * sh;
        double* dst = op + (bh * L + i) * d;
        if (rope) {
          for (int64_t p = 0; p < half; ++p) {
            const double x0 = static_cast<double>(src[2 * p]), x1 = static_cast<double>(src[2 * p + 1]);
            const double cc = c[i * half + p], ss = s[i * half + p];
            dst[2 * p] = scale * (x0 * cc - x1 * ss);
            dst[2 * p + 1] = scale * (x0 * ss + x1 * cc);
          }
        } else {
          for (int64_t e = 0; e < d; ++e) dst[e] = scale * static_cast<double>(src[e]);
        }
      }
    }
  });
  return out;
}

// What every op starts from: the angle tables and q, k rotated (q also scaled) into double (B, Hq, L, d).
struct Rotated {
  std::vector<double> c, s;
  Tensor Q, K;

  Rotated(const Tensor& q, const Tensor& k, const optional<Tensor>& inv_freq, double scale) {
    if (inv_freq) angle_tables(*inv_freq, q.size(1), c, s);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kxops_global_pointer_rotate", [&] {
      Q = rotated<scalar_t>(q, c, s, scale);
      K = rotated<scalar_t>(k, c, s, 1.0);
    });
  }
};

// The inputs of one call, as raw pointers. acc_t: the state dtype (biases, targets, outputs).
template <typename acc_t>
struct Problem {
  int64_t B = 0, L = 0, Hq = 0, H = 0, d = 0;
  const bool* mask = nullptr;      // (B, L)
  const acc_t* start = nullptr;    // (B, H, L)
  const acc_t* end = nullptr;      // (B, H, L)
  const int32_t* offsets = nullptr;  // (B*H + 1,)
  const int32_t* index = nullptr;    // (N,)
  const acc_t* targets = nullptr;    // (B, H, L, L)
  const double* Q = nullptr;       // (B, Hq, L, d), rotated and scaled
  const double* K = nullptr;       // (B, Hq, L, d), rotated
  bool tril = true;

  // The scores of starts [i0, i0 + m) x ends [j0, L) of row (b, h) into tile (m, L - j0), then masks,
  // biases and labels: invalid spans -inf in `s`; the label of each span in `t` (0/1 or soft; t null:
  // scores only).
  void tile(int64_t b, int64_t h, int64_t i0, int64_t m, int64_t j0, double* s, double* t, int64_t& ptr) const {
    const int64_t n = L - j0, hq = Hq == 1 ? 0 : h, r = b * H + h;
    const double* Qr = Q + ((b * Hq + hq) * L + i0) * d;
    const double* Kr = K + ((b * Hq + hq) * L + j0) * d;
    Tensor out = view(s, m, n, n);
    at::mm_out(out, view(Qr, m, d, d), view(Kr, n, d, d).t());
    const bool* mk = mask ? mask + b * L : nullptr;
    const acc_t* sb = start ? start + r * L : nullptr;
    const acc_t* eb = end ? end + r * L : nullptr;
    const int64_t pend = offsets ? offsets[r + 1] : 0;
    for (int64_t a = 0; a < m; ++a) {
      const int64_t i = i0 + a;
      double* srow = s + a * n;
      double* trow = t ? t + a * n : nullptr;
      const bool row_ok = !mk || mk[i];
      const double si = sb ? static_cast<double>(sb[i]) : 0.0;
      for (int64_t c = 0; c < n; ++c) {
        const int64_t j = j0 + c;
        const bool ok = row_ok && (!tril || j >= i) && (!mk || mk[j]);
        srow[c] = ok ? srow[c] + si + (eb ? static_cast<double>(eb[j]) : 0.0) : kNegInf;
      }
      if (!trow) continue;  // scores only (logits, decode)
      if (targets) {
        const acc_t* tr = targets + (r * L + i) * L + j0;
        for (int64_t c = 0; c < n; ++c) trow[c] = static_cast<double>(tr[c]);
      } else {
        std::fill(trow, trow + n, 0.0);
        if (offsets) {
          const int64_t lo = i * L + j0, hi = i * L + L;  // the flat spans of this tile row
          while (ptr < pend && index[ptr] < lo) ++ptr;
          for (; ptr < pend && index[ptr] < hi; ++ptr) trow[index[ptr] - lo] = 1.0;
        }
      }
    }
  }
};

// One online log-sum-exp: log(l) + m over the terms w e^x folded in, starting from the threshold class.
// e^x with the exponential of the state dtype: float's for float32 states (the reference's own precision,
// about 3x faster than double's here), double's for float64.
template <typename E>
KX_EXP_INLINE double exp_as(double x) {
  return static_cast<double>(std::exp(static_cast<E>(x)));
}

struct Lse {
  double m = 0.0, l = 1.0;
  // fold in the terms w[c] e^(sign * x[c]) of x finite (-inf: masked; +inf, NaN: excluded too, as the
  // reference's isfinite), w > 0; E: the type the exponentials are taken in (the sum is in double)
  template <typename E>
  void add(const double* x, const double* t, int64_t n, bool pos) {
    double mx = m;
    for (int64_t c = 0; c < n; ++c) {
      const double w = pos ? t[c] : 1.0 - t[c];
      if (w > 0 && std::isfinite(x[c])) mx = std::max(mx, pos ? -x[c] : x[c]);
    }
    double sum = l * std::exp(m - mx);
    for (int64_t c = 0; c < n; ++c) {
      const double w = pos ? t[c] : 1.0 - t[c];
      if (w > 0 && std::isfinite(x[c])) sum += w * exp_as<E>((pos ? -x[c] : x[c]) - mx);
    }
    m = mx, l = sum;
  }
  double value() const { return m + std::log(l); }
};

template <typename acc_t>
Problem<acc_t> problem(const Tensor& q, const optional<Tensor>& mask, const optional<Tensor>& start_bias,
                       const optional<Tensor>& end_bias, int64_t H, bool tril, const optional<Tensor>& pos_offsets,
                       const optional<Tensor>& pos_index, const optional<Tensor>& targets) {
  Problem<acc_t> p;
  p.B = q.size(0), p.L = q.size(1), p.Hq = q.size(2), p.H = H, p.d = q.size(3), p.tril = tril;
  if (mask) p.mask = mask->const_data_ptr<bool>();
  if (start_bias) p.start = start_bias->const_data_ptr<acc_t>();
  if (end_bias) p.end = end_bias->const_data_ptr<acc_t>();
  if (pos_offsets) p.offsets = pos_offsets->const_data_ptr<int32_t>(), p.index = pos_index->const_data_ptr<int32_t>();
  if (targets) p.targets = targets->const_data_ptr<acc_t>();
  return p;
}

void check_args(const Tensor& q, const Tensor& k, const optional<Tensor>& pos_offsets,
                const optional<Tensor>& pos_index, const optional<Tensor>& targets) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && q.stride(3) == 1 && k.stride(3) == 1,
              "kxops::global_pointer_loss (cpu): q, k must be (B, L, Hq, d) with unit last stride");
  TORCH_CHECK(pos_offsets.has_value() == pos_index.has_value() && (pos_offsets.has_value() != targets.has_value()),
              "kxops::global_pointer_loss (cpu): give (pos_offsets, pos_index) or targets");
}

std::tuple<Tensor, Tensor, Tensor> global_pointer_loss(const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
                                                       const optional<Tensor>& start_bias,
                                                       const optional<Tensor>& end_bias,
                                                       const optional<Tensor>& inv_freq, int64_t H, double scale,
                                                       bool tril, const optional<Tensor>& pos_offsets,
                                                       const optional<Tensor>& pos_index,
                                                       const optional<Tensor>& targets) {
  check_args(q, k, pos_offsets, pos_index, targets);
  const int64_t B = q.size(0), L = q.size(1);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor loss = at::empty({B, H}, q.options().dtype(acc)), lse_neg = at::empty_like(loss),
         lse_pos = at::empty_like(loss);
  const Rotated rot(q, k, inv_freq, scale);
  const std::vector<double>&c = rot.c, &s = rot.s;
  const Tensor &Q = rot.Q, &K = rot.K;
  AT_DISPATCH_FLOATING_TYPES(acc, "kxops_global_pointer_loss_cpu", [&] {
    auto p = problem<scalar_t>(q, mask, start_bias, end_bias, H, tril, pos_offsets, pos_index, targets);
    p.Q = Q.const_data_ptr<double>(), p.K = K.const_data_ptr<double>();
    scalar_t* lo = loss.data_ptr<scalar_t>();
    scalar_t* ln = lse_neg.data_ptr<scalar_t>();
    scalar_t* lp = lse_pos.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<double> sbuf(kTile * std::max<int64_t>(L, 1)), tbuf(sbuf.size());
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, h = r % H;
        Lse neg, pos;
        int64_t ptr = p.offsets ? p.offsets[r] : 0;
        for (int64_t i0 = 0; i0 < L; i0 += kTile) {
          const int64_t m = std::min(kTile, L - i0), j0 = tril ? i0 : 0, n = L - j0;
          p.tile(b, h, i0, m, j0, sbuf.data(), tbuf.data(), ptr);
          neg.add<scalar_t>(sbuf.data(), tbuf.data(), m * n, false);
          pos.add<scalar_t>(sbuf.data(), tbuf.data(), m * n, true);
        }
        const double a = neg.value(), z = pos.value();
        ln[r] = static_cast<scalar_t>(a);
        lp[r] = static_cast<scalar_t>(z);
        lo[r] = static_cast<scalar_t>(a + z);
      }
    });
  });
  return {loss, lse_neg, lse_pos};
}

// dx (B, L, Hq, d) in x's dtype from dX (B, Hq, L, d) double: times `scale`, rotated back (R^T).
template <typename scalar_t>
Tensor unrotated(const Tensor& dX, const std::vector<double>& c, const std::vector<double>& s, double scale,
                 const Tensor& like) {
  const int64_t B = dX.size(0), Hq = dX.size(1), L = dX.size(2), d = dX.size(3), half = d / 2;
  Tensor out = at::empty(like.sizes(), like.options());
  const double* src = dX.const_data_ptr<double>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const bool rope = !c.empty();
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      for (int64_t i = 0; i < L; ++i) {
        const double* x = src + (bh * L + i) * d;
        scalar_t* y = dst + ((b * L + i) * Hq + h) * d;
        if (rope) {
          for (int64_t pr = 0; pr < half; ++pr) {
            const double cc = c[i * half + pr], ss = s[i * half + pr];
            y[2 * pr] = static_cast<scalar_t>(scale * (x[2 * pr] * cc + x[2 * pr + 1] * ss));
            y[2 * pr + 1] = static_cast<scalar_t>(scale * (-x[2 * pr] * ss + x[2 * pr + 1] * cc));
          }
        } else {
          for (int64_t e = 0; e < d; ++e) y[e] = static_cast<scalar_t>(scale * x[e]);
        }
      }
    }
  });
  return out;
}

// The backward shared by the loss and the logits: each tile of scores is recomputed, turned into ds in
// place by ds_of(r, i0, m, j0, n, S, T) (T: the labels when `labels`), and accumulated into dq, dk and the
// bias gradients. Returns (dq, dk, dstart_bias, dend_bias).
template <typename DsOf>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_core(const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
                                                         const optional<Tensor>& start_bias,
                                                         const optional<Tensor>& end_bias,
                                                         const optional<Tensor>& inv_freq, int64_t H, double scale,
                                                         bool tril, const optional<Tensor>& pos_offsets,
                                                         const optional<Tensor>& pos_index,
                                                         const optional<Tensor>& targets, bool labels, DsOf ds_of) {
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), d = q.size(3);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Rotated rot(q, k, inv_freq, scale);
  const std::vector<double>&c = rot.c, &s = rot.s;
  const Tensor &Q = rot.Q, &K = rot.K;
  Tensor dQ = at::zeros_like(Q), dK = at::zeros_like(K);
  const bool bias = start_bias.has_value() || end_bias.has_value();
  Tensor dstart = start_bias ? at::zeros({B, H, L}, q.options().dtype(at::kDouble)) : Tensor();
  Tensor dend = end_bias ? at::zeros({B, H, L}, q.options().dtype(at::kDouble)) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "kxops_global_pointer_backward_cpu", [&] {
    auto p = problem<scalar_t>(q, mask, start_bias, end_bias, H, tril, pos_offsets, pos_index, targets);
    p.Q = Q.const_data_ptr<double>(), p.K = K.const_data_ptr<double>();
    double* dQp = dQ.data_ptr<double>();
    double* dKp = dK.data_ptr<double>();
    double* dsp = dstart.defined() ? dstart.data_ptr<double>() : nullptr;
    double* dep = dend.defined() ? dend.data_ptr<double>() : nullptr;
    // a work item owns the dq, dk it writes: a (batch, type) row, or a batch row when q, k are shared
    const int64_t items = Hq == 1 ? B : B * H, types = Hq == 1 ? H : 1;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<double> sbuf(kTile * std::max<int64_t>(L, 1)), tbuf(labels ? sbuf.size() : 0);
      for (int64_t it = begin; it < end; ++it) {
        for (int64_t hh = 0; hh < types; ++hh) {
          const int64_t b = Hq == 1 ? it : it / H, h = Hq == 1 ? hh : it % H, r = b * H + h, hq = Hq == 1 ? 0 : h;
          const double* Qr = p.Q + (b * Hq + hq) * L * d;
          const double* Kr = p.K + (b * Hq + hq) * L * d;
          double* dQr = dQp + (b * Hq + hq) * L * d;
          double* dKr = dKp + (b * Hq + hq) * L * d;
          int64_t ptr = p.offsets ? p.offsets[r] : 0;
          for (int64_t i0 = 0; i0 < L; i0 += kTile) {
            const int64_t m = std::min(kTile, L - i0), j0 = tril ? i0 : 0, n = L - j0;
            double* S = sbuf.data();
            double* T = labels ? tbuf.data() : nullptr;
            p.tile(b, h, i0, m, j0, S, T, ptr);
            if (!ds_of(r, i0, m, j0, n, S, T)) continue;  // an all-zero tile
            if (bias) {
              for (int64_t aa = 0; aa < m; ++aa) {
                double rs = 0.0;
                for (int64_t cc = 0; cc < n; ++cc) {
                  rs += S[aa * n + cc];
                  if (dep) dep[r * L + j0 + cc] += S[aa * n + cc];
                }
                if (dsp) dsp[r * L + i0 + aa] += rs;
              }
            }
            // dQ[i0:i0+m] += ds K[j0:L];  dK[j0:L] += ds^T Q[i0:i0+m]
            Tensor dQt = view(dQr + i0 * d, m, d, d), dKt = view(dKr + j0 * d, n, d, d);
            const Tensor dS = view(S, m, n, n);
            dQt.addmm_(dS, view(Kr + j0 * d, n, d, d));
            dKt.addmm_(dS.t(), view(Qr + i0 * d, m, d, d));
          }
        }
      }
    });
  });
  Tensor dq, dk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kxops_global_pointer_unrotate", [&] {
    dq = unrotated<scalar_t>(dQ, c, s, scale, q);
    dk = unrotated<scalar_t>(dK, c, s, 1.0, k);
  });
  auto grad_or_empty = [&](const Tensor& t) { return t.defined() ? t.to(acc) : at::empty({0}, q.options().dtype(acc)); };
  return {dq, dk, grad_or_empty(dstart), grad_or_empty(dend)};  // (two distinct empties: outputs never alias)
}

std::tuple<Tensor, Tensor, Tensor, Tensor> global_pointer_loss_backward(
    const Tensor& dloss, const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
    const optional<Tensor>& start_bias, const optional<Tensor>& end_bias, const optional<Tensor>& inv_freq, int64_t H,
    double scale, bool tril, const optional<Tensor>& pos_offsets, const optional<Tensor>& pos_index,
    const optional<Tensor>& targets, const Tensor& lse_neg, const Tensor& lse_pos) {
  check_args(q, k, pos_offsets, pos_index, targets);
  const Tensor g = dloss.to(at::kDouble).contiguous(), an = lse_neg.to(at::kDouble).contiguous(),
               ap = lse_pos.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  const double* anp = an.const_data_ptr<double>();
  const double* app = ap.const_data_ptr<double>();
  const bool f32 = q.scalar_type() != at::kDouble;
  return backward_core(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets,
                       true, [&](int64_t r, int64_t, int64_t m, int64_t, int64_t n, double* S, const double* T) {
                         const double gr = gp[r], a = anp[r], z = app[r];
                         if (gr == 0.0) return false;
                         auto ds = [&](auto e) {
                           using E = decltype(e);
                           for (int64_t x = 0; x < m * n; ++x) {  // ds, in place
                             const double sv = S[x], t = T[x];
                             S[x] = !std::isfinite(sv) ? 0.0
                                                       : gr * ((t < 1 ? (1.0 - t) * exp_as<E>(sv - a) : 0.0) -
                                                               (t > 0 ? t * exp_as<E>(-sv - z) : 0.0));
                           }
                         };
                         if (f32) ds(float{}); else ds(double{});
                         return true;
                       });
}

// ---- the logits and their backward ------------------------------------------------------------------

void check_scores(const Tensor& q, const Tensor& k) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && q.stride(3) == 1 && k.stride(3) == 1,
              "kxops::global_pointer (cpu): q, k must be (B, L, Hq, d) with unit last stride");
}

// Calls fn(r, i0, m, j0, n, S) for every tile of scores of row r = b * H + h (S: m x n, -inf where invalid),
// rows in parallel.
template <typename Fn>
void for_each_tile(const Tensor& q, const Tensor& k, const optional<Tensor>& mask, const optional<Tensor>& start_bias,
                   const optional<Tensor>& end_bias, const optional<Tensor>& inv_freq, int64_t H, double scale,
                   bool tril, Fn fn) {
  const int64_t B = q.size(0), L = q.size(1);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Rotated rot(q, k, inv_freq, scale);
  const std::vector<double>&c = rot.c, &s = rot.s;
  const Tensor &Q = rot.Q, &K = rot.K;
  AT_DISPATCH_FLOATING_TYPES(acc, "kxops_global_pointer_scores_cpu", [&] {
    auto p = problem<scalar_t>(q, mask, start_bias, end_bias, H, tril, std::nullopt, std::nullopt, std::nullopt);
    p.Q = Q.const_data_ptr<double>(), p.K = K.const_data_ptr<double>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<double> sbuf(kTile * std::max<int64_t>(L, 1));
      for (int64_t r = begin; r < end; ++r) {
        int64_t ptr = 0;
        for (int64_t i0 = 0; i0 < L; i0 += kTile) {
          const int64_t m = std::min(kTile, L - i0), j0 = tril ? i0 : 0, n = L - j0;
          p.tile(r / H, r % H, i0, m, j0, sbuf.data(), nullptr, ptr);
          fn(r, i0, m, j0, n, sbuf.data());
        }
      }
    });
  });
}

Tensor global_pointer(const Tensor& q, const Tensor& k, const optional<Tensor>& mask, const optional<Tensor>& start_bias,
                      const optional<Tensor>& end_bias, const optional<Tensor>& inv_freq, int64_t H, double scale,
                      bool tril) {
  check_scores(q, k);
  const int64_t B = q.size(0), L = q.size(1);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::empty({B, H, L, L}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "kxops_global_pointer_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
    for_each_tile(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril,
                  [&](int64_t r, int64_t i0, int64_t m, int64_t j0, int64_t n, const double* S) {
                    for (int64_t a = 0; a < m; ++a) {
                      scalar_t* row = o + (r * L + i0 + a) * L;
                      for (int64_t j = 0; j < j0; ++j) row[j] = ninf;
                      for (int64_t cc = 0; cc < n; ++cc) row[j0 + cc] = static_cast<scalar_t>(S[a * n + cc]);
                    }
                  });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> global_pointer_backward(
    const Tensor& dlogits, const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
    const optional<Tensor>& start_bias, const optional<Tensor>& end_bias, const optional<Tensor>& inv_freq, int64_t H,
    double scale, bool tril) {
  check_scores(q, k);
  const int64_t L = q.size(1);
  const Tensor g = dlogits.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  return backward_core(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, std::nullopt, std::nullopt,
                       std::nullopt, false,
                       [&](int64_t r, int64_t i0, int64_t m, int64_t j0, int64_t n, double* S, const double*) {
                         for (int64_t a = 0; a < m; ++a) {
                           const double* grow = gp + (r * L + i0 + a) * L + j0;
                           for (int64_t cc = 0; cc < n; ++cc)
                             S[a * n + cc] = S[a * n + cc] == kNegInf ? 0.0 : grow[cc];
                         }
                         return true;
                       });
}

// ---- decoding -------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> global_pointer_decode(const Tensor& q, const Tensor& k, const optional<Tensor>& mask,
                                                 const optional<Tensor>& start_bias, const optional<Tensor>& end_bias,
                                                 const optional<Tensor>& inv_freq, int64_t H, double scale, bool tril,
                                                 double threshold) {
  check_scores(q, k);
  const int64_t B = q.size(0), L = q.size(1);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // every row's hits, (i, j, score), in row-major order; rows concatenated in order afterwards
  std::vector<std::vector<std::tuple<int64_t, int64_t, double>>> hits(B * H);
  AT_DISPATCH_FLOATING_TYPES(acc, "kxops_global_pointer_decode_cpu", [&] {
    for_each_tile(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril,
                  [&](int64_t r, int64_t i0, int64_t m, int64_t j0, int64_t n, const double* S) {
                    for (int64_t a = 0; a < m; ++a)
                      for (int64_t cc = 0; cc < n; ++cc) {
                        // the comparison in the state dtype, as the reference's on its logits
                        const scalar_t v = static_cast<scalar_t>(S[a * n + cc]);
                        if (v > static_cast<scalar_t>(threshold)) hits[r].emplace_back(i0 + a, j0 + cc, S[a * n + cc]);
                      }
                  });
  });
  int64_t N = 0;
  for (const auto& h : hits) N += static_cast<int64_t>(h.size());
  Tensor spans = at::empty({N, 4}, q.options().dtype(at::kLong));
  Tensor scores = at::empty({N}, q.options().dtype(acc));
  int64_t* sp = spans.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc, "kxops_global_pointer_decode_write", [&] {
    scalar_t* sc = scores.data_ptr<scalar_t>();
    int64_t n = 0;
    for (int64_t r = 0; r < B * H; ++r)
      for (const auto& [i, j, v] : hits[r]) {
        sp[4 * n] = r / H, sp[4 * n + 1] = r % H, sp[4 * n + 2] = i, sp[4 * n + 3] = j;
        sc[n++] = static_cast<scalar_t>(v);
      }
  });
  return {spans, scores};
}

// ---- the row losses on materialised logits -----------------------------------------------------------

// Fills t (C) with the row's labels: dense targets, or 1 at the positives (mask_zero: never class 0).
template <typename acc_t>
void row_labels(int64_t r, int64_t C, const acc_t* targets, const int64_t* pos, int64_t P, bool mask_zero, double* t) {
  if (targets) {
    for (int64_t c = 0; c < C; ++c) t[c] = static_cast<double>(targets[r * C + c]);
    return;
  }
  std::fill(t, t + C, 0.0);
  for (int64_t p = 0; p < P; ++p) t[pos[r * P + p]] = 1.0;
  if (mask_zero && C > 0) t[0] = 0.0;
}

template <typename scalar_t>
void row_scores(int64_t r, int64_t C, const scalar_t* x, bool mask_zero, double* s) {
  for (int64_t c = 0; c < C; ++c) s[c] = static_cast<double>(x[r * C + c]);
  if (mask_zero && C > 0) s[0] = kNegInf;
}

std::tuple<Tensor, Tensor, Tensor> multilabel_categorical_crossentropy(const Tensor& x, const optional<Tensor>& targets,
                                                                       const optional<Tensor>& positives,
                                                                       bool mask_zero) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "kxops::multilabel_categorical_crossentropy (cpu): x must be (R, C)");
  const int64_t R = x.size(0), C = x.size(1), P = positives ? positives->size(1) : 0;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor loss = at::empty({R}, x.options().dtype(acc)), ln = at::empty_like(loss), lp = at::empty_like(loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_mlce_cpu", [&] {
    using x_t = scalar_t;
    const x_t* xp = x.const_data_ptr<x_t>();
    const int64_t* pp = positives ? positives->const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(acc, "kxops_mlce_cpu_acc", [&] {
      const scalar_t* tp = targets ? targets->const_data_ptr<scalar_t>() : nullptr;
      scalar_t *lo = loss.data_ptr<scalar_t>(), *lnp = ln.data_ptr<scalar_t>(), *lpp = lp.data_ptr<scalar_t>();
      at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
        std::vector<double> s(C), t(C);
        for (int64_t r = begin; r < end; ++r) {
          row_scores(r, C, xp, mask_zero && pp, s.data());
          row_labels(r, C, tp, pp, P, mask_zero, t.data());
          Lse neg, pos;
          neg.add<scalar_t>(s.data(), t.data(), C, false);
          pos.add<scalar_t>(s.data(), t.data(), C, true);
          const double a = neg.value(), z = pos.value();
          lnp[r] = static_cast<scalar_t>(a), lpp[r] = static_cast<scalar_t>(z), lo[r] = static_cast<scalar_t>(a + z);
        }
      });
    });
  });
  return {loss, ln, lp};
}

Tensor multilabel_categorical_crossentropy_backward(const Tensor& dloss, const Tensor& x,
                                                    const optional<Tensor>& targets,
                                                    const optional<Tensor>& positives, bool mask_zero,
                                                    const Tensor& lse_neg, const Tensor& lse_pos) {
  const int64_t R = x.size(0), C = x.size(1), P = positives ? positives->size(1) : 0;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor dx = at::empty_like(x);
  const Tensor g = dloss.to(at::kDouble).contiguous(), an = lse_neg.to(at::kDouble).contiguous(),
               ap = lse_pos.to(at::kDouble).contiguous();
  const double *gp = g.const_data_ptr<double>(), *anp = an.const_data_ptr<double>(), *app = ap.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kxops_mlce_backward_cpu", [&] {
    using x_t = scalar_t;
    const x_t* xp = x.const_data_ptr<x_t>();
    x_t* dxp = dx.data_ptr<x_t>();
    const int64_t* pp = positives ? positives->const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(acc, "kxops_mlce_backward_cpu_acc", [&] {
      const scalar_t* tp = targets ? targets->const_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
        std::vector<double> s(C), t(C);
        for (int64_t r = begin; r < end; ++r) {
          row_scores(r, C, xp, mask_zero && pp, s.data());
          row_labels(r, C, tp, pp, P, mask_zero, t.data());
          const double gr = gp[r], a = anp[r], z = app[r];
          for (int64_t c = 0; c < C; ++c) {
            const double sv = s[c], tv = t[c];
            const double v = !std::isfinite(sv) ? 0.0
                                                : gr * ((tv < 1 ? (1.0 - tv) * exp_as<scalar_t>(sv - a) : 0.0) -
                                                        (tv > 0 ? tv * exp_as<scalar_t>(-sv - z) : 0.0));
            dxp[r * C + c] = static_cast<x_t>(v);
          }
        }
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("global_pointer_loss", &global_pointer_loss);
  m.impl("global_pointer_loss_backward", &global_pointer_loss_backward);
  m.impl("global_pointer", &global_pointer);
  m.impl("global_pointer_backward", &global_pointer_backward);
  m.impl("global_pointer_decode", &global_pointer_decode);
  m.impl("multilabel_categorical_crossentropy", &multilabel_categorical_crossentropy);
  m.impl("multilabel_categorical_crossentropy_backward", &multilabel_categorical_crossentropy_backward);
}

}  // namespace kxops
