"""Sparse softmaxes in pure PyTorch: sparsemax, entmax15, alpha-entmax, top-k softmax and their losses,
the specification every kxops backend is proven equal to.

Follows ../shared/spec/softmaxes.md (Martins and Astudillo's sparsemax; Peters, Niculae and Martins'
entmax; Su Jianlin's top-k Sparse Softmax, kexue.fm 8046): sort-based closed forms for sparsemax and
entmax15, bisection for any alpha (as the entmax package's entmax_bisect), a stable sort for the top-k
set. Differentiable by autograd (bisection through one implicit Newton step, which carries the exact
implicit-function gradient for x and alpha).

Conventions (docs/sparse_softmax_kernel_contract.md): rows along `dim`; -inf entries are masked; an all
-inf row gives p = 0 (and a loss of +inf unless ignored). Losses take x (..., C) with the classes last
and an integer target (...) with ignore_index, as the entmax package's losses (per-row values for
reduction="none"); "mean" divides by the number of rows not ignored (torch.nn.functional.cross_entropy's
rule: NaN when every row is ignored).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

REDUCTIONS = ("mean", "sum", "none")
SPARSEMAX, ENTMAX15, BISECT, SOFTMAX = 0, 1, 2, 3


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """16-bit inputs are computed in float32 (and the results rounded to their dtype), as torch.softmax does:
    a sort-based cumulative sum in bfloat16 would be no specification at all."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _shifted(x: torch.Tensor, dim: int, c: float):
    """z = c * (x - max) with max detached (every output is shift-invariant), -inf and entries that can
    never be in the support (z < -1 - margin) clamped to a finite value (their gradient is 0 either way, and
    no -inf reaches a cumulative sum); and the all -inf rows."""
    m = x.detach().amax(dim, keepdim=True)
    dead = m == float("-inf")
    m = torch.where(dead, torch.zeros_like(m), m)
    z = ((x - m) * c).clamp_min(-2.0)
    return z, dead


def _ix_like(z: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * z.dim()
    shape[dim] = -1
    return torch.arange(1, z.size(dim) + 1, dtype=z.dtype, device=z.device).view(shape)


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax along dim (the spec's sort-based closed form): p = relu(x - lambda)."""
    z, dead = _shifted(_upcast(x), dim, 1.0)
    zs = z.sort(dim, descending=True).values
    lam_k = (zs.cumsum(dim) - 1) / _ix_like(z, dim)
    support = (zs > lam_k).sum(dim, keepdim=True)
    lam = lam_k.gather(dim, support - 1)
    # the strict support (z > lambda, the spec's S): an entry exactly at the threshold gets no gradient, where
    # clamp_min would pass it one (the Jacobian is undefined there; every backend takes this side, as entmax's)
    p = torch.where(z > lam, z - lam, torch.zeros_like(z))
    return torch.where(dead, torch.zeros_like(z), p).to(x.dtype)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax along dim (sort-based closed form): z = (x - max) / 2, p = relu(z - tau)^2 with
    tau_k = mean_k - sqrt(1/k - var_k) over the k largest, k the largest with tau_k <= z_(k)."""
    z, dead = _shifted(_upcast(x), dim, 0.5)
    zs = z.sort(dim, descending=True).values
    rho = _ix_like(z, dim)
    mean = zs.cumsum(dim) / rho
    mean_sq = (zs * zs).cumsum(dim) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    pos = delta > 0  # sqrt(0)'s infinite derivative would turn the zero gradient of unused k into NaN
    tau = mean - torch.where(pos, torch.where(pos, delta, torch.ones_like(delta)).sqrt(), torch.zeros_like(delta))
    support = (tau <= zs).sum(dim, keepdim=True)
    tau_star = tau.gather(dim, support - 1)
    return torch.where(dead, torch.zeros_like(z), (z - tau_star).clamp_min(0) ** 2).to(x.dtype)


def _alpha_like(alpha, x: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(alpha, torch.Tensor):
        return torch.full((), float(alpha), dtype=x.dtype, device=x.device)
    return alpha.to(x.dtype)


def entmax_bisect(x: torch.Tensor, alpha: Union[float, torch.Tensor] = 1.5, dim: int = -1,
                  n_iter: int = 50) -> torch.Tensor:
    """alpha-entmax along dim by bisection (the entmax package's entmax_bisect): z = (alpha - 1) (x - max),
    p = relu(z - tau)^(1 / (alpha - 1)) / sum, tau in [-1, -(1/n)^(alpha-1)] halved n_iter times.
    alpha: a float or a tensor broadcastable to x with size 1 along dim; differentiable in x and alpha."""
    out_dtype = x.dtype
    x = _upcast(x)
    a = _alpha_like(alpha, x, dim)
    n = x.size(dim)
    m = x.detach().amax(dim, keepdim=True)
    dead = m == float("-inf")
    m = torch.where(dead, torch.zeros_like(m), m)
    c = a - 1
    e = 1 / c
    # entries below max - 2 / c never reach the support (tau >= -1): clamped before the product with c, so that
    # no -inf * 0 reaches alpha's gradient
    z = torch.maximum(x - m, -2 / c.detach()) * c
    z = torch.where(dead, torch.zeros_like(z), z)  # all -inf rows: a finite stand-in, zeroed at the end
    zd = z.detach()
    ed = e.detach()

    def mass(t):
        return ((zd - t).clamp_min(0) ** ed).sum(dim, keepdim=True)

    with torch.no_grad():
        lo = -torch.ones_like(m * c.detach())
        hi = -(1.0 / n) ** c.detach() * torch.ones_like(lo)
        for _ in range(n_iter):
            mid = (lo + hi) / 2
            up = mass(mid) >= 1
            lo = torch.where(up, mid, lo)
            hi = torch.where(up, hi, mid)
    # tau stays the bisected lo (entmax_bisect's value: p renormalised at lo); its gradient is the implicit one,
    # -dF/d(x, alpha) / dF/dtau, carried by a Newton step on F(tau) = sum relu(z - tau)^e - 1 whose value is
    # taken back out.
    u = (z - lo).clamp_min(0)
    pos = u > 0
    us = torch.where(pos, u, torch.ones_like(u))
    F = torch.where(pos, us ** e, torch.zeros_like(u)).sum(dim, keepdim=True) - 1
    dF = (e * torch.where(pos, us ** (e - 1), torch.zeros_like(u))).sum(dim, keepdim=True)
    step = F / dF
    tau = lo + (step - step.detach())
    u = (z - tau).clamp_min(0)
    pos = u > 0
    p = torch.where(pos, torch.where(pos, u, torch.ones_like(u)) ** e, torch.zeros_like(u))
    p = p / p.sum(dim, keepdim=True).detach().clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where(dead, torch.zeros_like(p), p).to(out_dtype)


def topk_mask(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """The top-k set: a stable descending sort's first k (ties broken by the lower index)."""
    idx = x.detach().sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return torch.zeros_like(x, dtype=torch.bool).scatter(dim, idx, True)


def topk_softmax(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Su's top-k Sparse Softmax along dim: softmax over the k largest entries, 0 elsewhere."""
    sel = topk_mask(x, k, dim)
    xu = _upcast(x)
    m = xu.detach().amax(dim, keepdim=True)
    dead = m == float("-inf")
    m = torch.where(dead, torch.zeros_like(m), m)
    e = torch.where(sel, (xu - m).exp(), torch.zeros_like(xu))
    s = e.sum(dim, keepdim=True)
    return torch.where(dead, torch.zeros_like(xu), e / torch.where(dead, torch.ones_like(s), s)).to(x.dtype)


# ---- losses: x (..., C), target (...) -------------------------------------------------------------------------

def _gather_target(x: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    t = torch.where(keep, target, torch.zeros_like(target)).long()
    return x.gather(-1, t.unsqueeze(-1)).squeeze(-1)


def _reduce(rows: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum()


def _entmax_loss_rows(x, target, ignore_index, kind):
    """The entmax package's loss per row: omega(p) + p . x - x_t, with x shifted by the row max (p sums to 1)."""
    x = _upcast(x)
    p = sparsemax(x) if kind == SPARSEMAX else entmax15(x)
    m = x.detach().amax(-1, keepdim=True)
    dead = m == float("-inf")
    xs = x - torch.where(dead, torch.zeros_like(m), m)
    on = p > 0
    px = torch.where(on, p * torch.where(on, xs, torch.zeros_like(xs)), torch.zeros_like(xs)).sum(-1)
    if kind == SPARSEMAX:
        omega = (1 - (p * p).sum(-1)) / 2
    else:
        omega = (1 - (p * p.clamp_min(0).sqrt()).sum(-1)) / 0.75
    keep = target != ignore_index
    xt = _gather_target(xs, target, keep)
    rows = omega + px - xt
    rows = torch.where(dead.squeeze(-1), torch.full_like(rows, float("inf")), rows)
    return torch.where(keep, rows, torch.zeros_like(rows)), keep


def sparsemax_loss(x: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                   reduction: str = "mean") -> torch.Tensor:
    """Sparsemax loss (Martins and Astudillo): 1/2 - x_t + sum_S (x_i^2 - tau^2) / 2, gradient p - onehot(t)."""
    rows, keep = _entmax_loss_rows(x, target, ignore_index, SPARSEMAX)
    return _reduce(rows, keep, reduction).to(x.dtype)


def entmax15_loss(x: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """1.5-entmax loss (Peters et al.): (1 - sum p^1.5) / 0.75 + p . x - x_t, gradient p - onehot(t)."""
    rows, keep = _entmax_loss_rows(x, target, ignore_index, ENTMAX15)
    return _reduce(rows, keep, reduction).to(x.dtype)


def topk_softmax_cross_entropy(x: torch.Tensor, target: torch.Tensor, k: int, ignore_index: int = -100,
                               reduction: str = "mean") -> torch.Tensor:
    """Su's Sparse Softmax cross-entropy: log sum_{top-k} exp(x) - x_t (the target is not forced into the set)."""
    return _topk_ce_rows(x, target, k, ignore_index, reduction).to(x.dtype)


def _topk_ce_rows(x, target, k, ignore_index, reduction):
    sel = topk_mask(x, k)
    x = _upcast(x)
    m = x.detach().amax(-1, keepdim=True)
    dead = (m == float("-inf")).squeeze(-1)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    xs = x - m
    live = torch.where(dead.unsqueeze(-1), torch.zeros_like(xs), xs)  # no -inf - -inf in the gradient
    lse = torch.where(sel, live, torch.full_like(xs, float("-inf"))).logsumexp(-1)
    keep = target != ignore_index
    rows = lse - _gather_target(xs, target, keep)
    rows = torch.where(dead, torch.full_like(rows, float("inf")), rows)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    return _reduce(rows, keep, reduction)


# ---- the kernel contract's ops, on normalised arguments (x (R, N)) -------------------------------------------

def entmax_ref(x: torch.Tensor, alpha: Optional[torch.Tensor], kind: int, n_iter: int, target: Optional[torch.Tensor],
               ignore_index: int):
    """kxops::entmax_reference: (p (R, N), loss (R,) or (0,) in the state dtype)."""
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    if kind == SPARSEMAX:
        p = sparsemax(x)
    elif kind == ENTMAX15:
        p = entmax15(x)
    else:
        p = entmax_bisect(x, alpha.unsqueeze(-1), -1, n_iter)
    if target is None:
        return p, x.new_empty((0,), dtype=state)
    rows, _ = _entmax_loss_rows(x, target, ignore_index, kind)
    return p, rows.to(state)


def topk_softmax_ref(x: torch.Tensor, k: int, target: Optional[torch.Tensor], ignore_index: int):
    """kxops::topk_softmax_reference: (p (R, N), loss (R,) or (0,) in the state dtype)."""
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = topk_softmax(x, k)
    if target is None:
        return p, x.new_empty((0,), dtype=state)
    return p, _topk_ce_rows(x, target, k, ignore_index, "none").to(state)


def entmax_backward_ref(dp: torch.Tensor, p: torch.Tensor, alpha: Optional[torch.Tensor], kind: int,
                        alpha_grad: bool):
    """The contract's backward formula (Op 2) in the state dtype, for the kernels' own tests; the public tests
    use autograd of the forward references above instead."""
    state = torch.float64 if p.dtype == torch.float64 else torch.float32
    p_, dp_ = p.to(state), dp.to(state)
    on = p_ > 0
    zero = torch.zeros_like(p_)
    if kind == SPARSEMAX:
        g = on.to(state)
    elif kind == ENTMAX15:
        g = p_.clamp_min(0).sqrt()
    elif kind == SOFTMAX:
        g = p_
    else:
        a = alpha.to(state).unsqueeze(-1)
        g = torch.where(on, torch.where(on, p_, torch.ones_like(p_)) ** (2 - a), zero)
    G = g.sum(-1, keepdim=True)
    q = torch.where(G > 0, (g * dp_).sum(-1, keepdim=True) / torch.where(G > 0, G, torch.ones_like(G)), zero[..., :1])
    dx = (g * (dp_ - q)).to(p.dtype)
    if not alpha_grad:
        return dx, p_.new_empty((0,))
    c = alpha.to(state) - 1
    plogp = torch.where(on, p_ * torch.where(on, p_, torch.ones_like(p_)).log(), zero)
    ent = plogp.sum(-1)
    A = (dp_ * p_).sum(-1)
    B = q.squeeze(-1)
    C = (dp_ * plogp).sum(-1)
    dalpha = (A - B) / c ** 2 - (C - B * ent) / c
    return dx, torch.where(G.squeeze(-1) > 0, dalpha, torch.zeros_like(dalpha))
