"""Triton sparse softmaxes: sparsemax, 1.5-entmax, alpha-entmax (bisection), top-k softmax, their losses, and
the shared backward, one program per row.

Semantics and algorithms: docs/sparse_softmax_kernel_contract.md (the reference, pyext/reference/
sparse_softmax.py, is the specification; math: ../shared/spec/softmaxes.md). This module imports only torch,
triton and the RoPE kernel module (it is installed as ``kxops.triton_kernels``). Launchers, on the contract's
normalised arguments (x (R, N) contiguous, fp16 / bf16 / fp32; row arithmetic in float32):

    entmax_forward(x, alpha, kind, n_iter, target, ignore_index, traceable=True) -> (p, loss)        Op 1
    entmax_backward(dp, p, alpha, kind, alpha_grad, traceable=True) -> (dx, dalpha)                 Op 2
    topk_softmax_forward(x, k, target, ignore_index, traceable=True) -> (p, loss)                   Op 3

p / dx in x's dtype (R, N); loss / dalpha (R,) float32, or empty (0,) float32 when not requested. traceable:
launch through torch.library.wrap_triton (inside a triton_op, for torch.compile and export); False launches
directly (eager, real tensors). CPU tensors work under TRITON_INTERPRET=1. Every launcher takes block_cap
(default TUNING["block_cap"]): the longest row held on chip.

Paths (constexpr ONCHIP):
- on chip (next_pow2(N) <= block_cap): the row is loaded once into registers as one BLOCK = next_pow2(N) block
  (float32 x for the entmaxes, order-preserving uint32 keys for top-k, p and dp for the backward), so
  that every Newton / bisection / select pass and the final write work on registers; num_warps grows with the
  block (TUNING["warps"]) to keep 16 elements per thread (sm_90 ptxas: at most ~100 bytes of spills per thread
  at the cap, 16384 with 32 warps; nothing spills below it).
- chunked (longer rows): every pass loops over the row in chunks of TUNING["chunk"] (or block_cap when
  smaller), re-reading global memory (L2) each pass; per-chunk partial sums are kept as vectors and reduced
  once per pass. A symbolic N (tracing) always takes this path (right for any N).
The kind-3 backward's g = p is written max(p, 0) (the same for any softmax output): with plain p, triton 3.8's
LLVM lowering of the chunked float32 variant segfaults. Newton (kinds 0, 1) and the bisection (kind 2) are data-dependent while loops over per-row scalars; top-k is at most 32 passes of the
bitwise select ("count keys >= candidate", one bit each; it stops early once exactly k keys are >= the
candidate: those are the selected set), then the index-ordered count of the entries equal to v (tl.cumsum
within a block, a running count across chunks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _rows
from .rope import round_to_bf16

__all__ = ["entmax_forward", "entmax_backward", "topk_softmax_forward", "TUNING", "MAX_PASSES"]

TUNING = {
    # the longest row held in registers (a power of two); longer rows take the chunked path
    "block_cap": 16384,
    # the chunk of the chunked path (capped by block_cap) and its num_warps
    "chunk": 4096,
    "chunk_warps": 8,
    # num_warps of the on-chip path by BLOCK (the smallest entry >= BLOCK): 16 elements per thread (at 32 per
    # thread the Newton pass needs ~170-220 registers: sm_90's 64 per thread at 1024 threads spill heavily, so
    # the cap stays at 16384 = 32 warps x 32 lanes x 16)
    "warps": ((512, 1), (1024, 2), (2048, 4), (4096, 8), (8192, 16), (16384, 32), (32768, 32)),
}

MAX_PASSES = 100  # the Newton loop's bound (kinds 0 and 1); the contract's MAX_PASSES


# ----------------------------------------------------------------------------------------------
# jit helpers

@triton.jit
def _x_chunk(X, row, c0, N, xo, ONCHIP: tl.constexpr, BLOCK: tl.constexpr):
    """float32 x of the chunk starting at column c0 (-inf beyond N); the on-chip row xo when ONCHIP."""
    if ONCHIP:
        x = xo.to(tl.float32)
    else:
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(X + (row + cols), mask=cols < N, other=float("-inf")).to(tl.float32)
    return x


@triton.jit
def _span(N, ONCHIP: tl.constexpr, BLOCK: tl.constexpr):
    """The end of the chunk loops: one chunk (the on-chip block) when ONCHIP, else the row."""
    if ONCHIP:
        n = BLOCK
    else:
        n = N
    return n


@triton.jit
def _row_max(X, row, N, xo, ONCHIP: tl.constexpr, BLOCK: tl.constexpr):
    mv = tl.full([BLOCK], float("-inf"), tl.float32)
    for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
        mv = tl.maximum(mv, _x_chunk(X, row, c0, N, xo, ONCHIP, BLOCK))
    return tl.max(mv, 0)


@triton.jit
def _pow_pos(u, e):
    """relu(u)^e as exp2(e * log2(u)) for u > 0, 0 for u <= 0 (and -inf)."""
    pos = u > 0
    return tl.where(pos, tl.exp2(e * tl.log2(tl.where(pos, u, 1.0))), 0.0)


@triton.jit
def _store(PTR, row, c0, N, v, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    if EMULATE_RNE:
        # interpreter only: it truncates fp32 -> bf16 casts, the GPU rounds to nearest even
        v = round_to_bf16(v)
    cols = c0 + tl.arange(0, BLOCK)
    tl.store(PTR + (row + cols), v.to(PTR.dtype.element_ty), mask=cols < N)


@triton.jit
def _key(x):
    """The order-preserving uint32 key of float32 x: bits b -> b ^ (b >> 31 ? 0xffffffff : 0x80000000), with
    -0.0 turned into +0.0 first."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return b ^ (((b >> 31) * 0x7FFFFFFF) | 0x80000000)


@triton.jit
def _unkey(key):
    """float32 of a key (the inverse of _key)."""
    b = key ^ tl.where(key >= 0x80000000, 0x80000000, 0xFFFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _key_chunk(X, row, c0, N, ko, ONCHIP: tl.constexpr, BLOCK: tl.constexpr):
    """The keys of a chunk, 0 beyond N (below every value's key); the on-chip keys ko when ONCHIP."""
    if ONCHIP:
        key = ko
    else:
        cols = c0 + tl.arange(0, BLOCK)
        inr = cols < N
        x = tl.load(X + (row + cols), mask=inr, other=0.0).to(tl.float32)
        key = tl.where(inr, _key(x), 0)
    return key


@triton.jit
def _target_x(X, TGT, r, row, ignore_index):
    """(ignored, x_t) of row r."""
    tgt = tl.load(TGT + r)
    ignored = tgt == ignore_index
    xt = tl.load(X + (row + tl.where(ignored, 0, tgt))).to(tl.float32)
    return ignored, xt


@triton.jit
def _g(p, a, KIND: tl.constexpr):
    """The backward's g_i of p (float32): kind 0 [p > 0], 1 sqrt(p), 2 p^(2-a) (0 off the support), 3 p."""
    if KIND == 0:
        g = tl.where(p > 0, 1.0, 0.0)
    elif KIND == 1:
        g = tl.sqrt(tl.maximum(p, 0.0))
    elif KIND == 2:
        g = _pow_pos(p, 2.0 - a)
    else:
        g = tl.maximum(p, 0.0)  # = p (plain p crashes the chunked fp32 variant's LLVM lowering, triton 3.8)
    return g


# ----------------------------------------------------------------------------------------------
# kernels

@triton.jit
def entmax_fwd_kernel(
    P,  # (R, N) x's dtype
    LOSS,  # HAS_TARGET: (R,) float32
    X,  # (R, N) contiguous
    ALPHA,  # KIND 2: (R,) float32
    TGT,  # HAS_TARGET: (R,) int64
    N,
    n_iter,
    ignore_index,
    KIND: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    ONCHIP: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_ITERS: tl.constexpr,
):
    """Op 1 on row r: kinds 0, 1 the safeguarded Newton on the support (exact tau), kind 2 the bisection."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    if ONCHIP:
        xo = tl.load(X + (row + offs), mask=offs < N, other=float("-inf")).to(tl.float32)  # the row
    else:
        xo = tl.zeros([BLOCK], dtype=tl.float32)  # unused
    m = _row_max(X, row, N, xo, ONCHIP, BLOCK)
    dead = m == float("-inf")
    ms = tl.where(dead, 0.0, m)
    if KIND == 2:
        cc = tl.load(ALPHA + r).to(tl.float32) - 1.0
        e = 1.0 / cc
        lo = tl.full([], -1.0, tl.float32)
        hi = -tl.exp2(-cc * tl.log2(tl.full([], 1.0, tl.float32) * N))  # -(1/N)^c
        it = tl.full([], 0, tl.int32)
        mid = (lo + hi) * 0.5
        go = (it < n_iter) & (mid > lo) & (mid < hi) & (m > float("-inf"))
        while go:
            fv = tl.zeros([BLOCK], dtype=tl.float32)
            for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
                z = cc * (_x_chunk(X, row, c0, N, xo, ONCHIP, BLOCK) - ms)
                fv += _pow_pos(z - mid, e)
            up = tl.sum(fv, 0) >= 1.0
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid)
            it += 1
            mid = (lo + hi) * 0.5
            go = (it < n_iter) & (mid > lo) & (mid < hi)
        tau = lo
        if ONCHIP:
            pu = _pow_pos(cc * (xo.to(tl.float32) - ms) - tau, e)
            s = tl.sum(pu, 0)
        else:
            sv = tl.zeros([BLOCK], dtype=tl.float32)
            for c0 in range(0, N, BLOCK):
                sv += _pow_pos(cc * (_x_chunk(X, row, c0, N, xo, ONCHIP, BLOCK) - ms) - tau, e)
            s = tl.sum(sv, 0)
        inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, s))
        if ONCHIP:
            _store(P, row, 0, N, pu * inv, EMULATE_RNE, BLOCK)
        else:
            for c0 in range(0, N, BLOCK):
                pu = _pow_pos(cc * (_x_chunk(X, row, c0, N, xo, ONCHIP, BLOCK) - ms) - tau, e)
                _store(P, row, c0, N, pu * inv, EMULATE_RNE, BLOCK)
    else:
        if KIND == 0:
            cc = 1.0
        else:
            cc = 0.5
        t = tl.full([], -1.0, tl.float32)  # F(-1) >= 1: t <= tau
        tau = t
        it = tl.full([], 0, tl.int32)
        go = m > float("-inf")
        while go:
            cv = tl.zeros([BLOCK], dtype=tl.int32)
            s1v = tl.zeros([BLOCK], dtype=tl.float32)
            s2v = tl.zeros([BLOCK], dtype=tl.float32)
            mnv = tl.full([BLOCK], float("inf"), tl.float32)
            for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
                z = cc * (_x_chunk(X, row, c0, N, xo, ONCHIP, BLOCK) - ms)
                sel = z > t
                zz = tl.where(sel, z, 0.0)
                cv += sel.to(tl.int32)
                s1v += zz
                s2v += zz * zz
                mnv = tl.minimum(mnv, tl.where(sel, z, float("inf")))
            cnt_i = tl.sum(cv, 0)
            s1 = tl.sum(s1v, 0)
            s2 = tl.sum(s2v, 0)
            zmin = tl.min(mnv, 0)
            cnt = tl.maximum(cnt_i, 1).to(tl.float32)  # >= 1: the largest entry is always in {z > t}
            if KIND == 0:
                tc = (s1 - 1.0) / cnt
                newton = tc
            else:
                mean = s1 / cnt
                var = tl.maximum(s2 / cnt - mean * mean, 0.0)
                tc = mean - tl.sqrt(tl.maximum(1.0 / cnt - var, 0.0))
                newton = t + (s2 - 2.0 * t * s1 + cnt * t * t - 1.0) / (2.0 * (s1 - cnt * t))
            tau = tc
            t = tl.maximum(newton, zmin)
            it += 1
            go = (zmin <= tc) & (it < MAX_ITERS)
        # p = relu(z - tau)^E (no renormalisation), and the loss sums
        qv = tl.zeros([BLOCK], dtype=tl.float32)  # sum p^2 (kind 0) or p^1.5 (kind 1)
        pxv = tl.zeros([BLOCK], dtype=tl.float32)  # sum_{p > 0} p (x - m)
        for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
            xs = _x_chunk(X, row, c0, N, xo, ONCHIP, BLOCK) - ms
            u = tl.maximum(cc * xs - tau, 0.0)
            if KIND == 0:
                pv = u
            else:
                pv = u * u
            pv = tl.where(dead, 0.0, pv)
            _store(P, row, c0, N, pv, EMULATE_RNE, BLOCK)
            if HAS_TARGET:
                if KIND == 0:
                    qv += pv * pv
                else:
                    qv += pv * u  # p^1.5 = p * sqrt(p), sqrt(p) = u
                pxv += pv * tl.where(pv > 0, xs, 0.0)  # no 0 * -inf
        if HAS_TARGET:
            sq = tl.sum(qv, 0)
            px = tl.sum(pxv, 0)
            if KIND == 0:
                omega = (1.0 - sq) * 0.5
            else:
                omega = (1.0 - sq) / 0.75
            ignored, xt = _target_x(X, TGT, r, row, ignore_index)
            loss = omega + px - (xt - ms)
            loss = tl.where(dead, float("inf"), loss)
            loss = tl.where(ignored, 0.0, loss)
            tl.store(LOSS + r, loss)


@triton.jit
def topk_fwd_kernel(
    P,  # (R, N) x's dtype
    LOSS,  # HAS_TARGET: (R,) float32
    X,  # (R, N) contiguous
    TGT,  # HAS_TARGET: (R,) int64
    N,
    k,
    ignore_index,
    HAS_TARGET: tl.constexpr,
    ONCHIP: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Op 3 on row r: the k-th largest key by 32 bitwise select passes, the first `need` ties by index, the
    softmax over the selected set."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    if ONCHIP:
        inr = offs < N
        x0 = tl.load(X + (row + offs), mask=inr, other=0.0).to(tl.float32)
        ko = tl.where(inr, _key(x0), 0)  # the row, as keys (0 beyond N: below every value's key)
    else:
        ko = tl.zeros([BLOCK], dtype=tl.uint32)  # unused
    # the max (the largest key; the all -inf row: every key is -inf's)
    mk = tl.zeros([BLOCK], dtype=tl.uint32)
    for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
        mk = tl.maximum(mk, _key_chunk(X, row, c0, N, ko, ONCHIP, BLOCK))
    m = _unkey(tl.max(mk, 0))
    dead = m == float("-inf")
    ms = tl.where(dead, 0.0, m)
    # v: the largest key K with #{key >= K} >= k, one bit per pass from the top. Early exit: once exactly k keys
    # are >= cand, those k are the selected set (cand <= v; the selection below then takes every key >= cand:
    # need = #{key == cand}), so the remaining bits change nothing.
    cand = tl.full([], 0, tl.uint32)
    bit = tl.full([], 0x80000000, tl.uint32)
    cnt = tl.full([], 0, tl.int32) + N  # #{key >= cand}
    go = cnt != k
    while go:
        trial = cand | bit
        cv = tl.zeros([BLOCK], dtype=tl.int32)
        for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
            cv += (_key_chunk(X, row, c0, N, ko, ONCHIP, BLOCK) >= trial).to(tl.int32)
        c = tl.sum(cv, 0)
        take = c >= k
        cand = tl.where(take, trial, cand)
        cnt = tl.where(take, c, cnt)
        bit = bit >> 1
        go = (cnt != k) & (bit != 0)
    gv = tl.zeros([BLOCK], dtype=tl.int32)
    for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
        gv += (_key_chunk(X, row, c0, N, ko, ONCHIP, BLOCK) > cand).to(tl.int32)
    need = k - tl.sum(gv, 0)  # the entries equal to cand to select, the lowest indices first
    # s = sum_S exp(x - m)
    if ONCHIP:
        eq = ko == cand
        sel = (ko > cand) | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
        ev = tl.where(sel, tl.exp(_unkey(ko) - ms), 0.0)
        s = tl.sum(ev, 0)
    else:
        sv = tl.zeros([BLOCK], dtype=tl.float32)
        seen = tl.full([], 0, tl.int32)  # entries equal to v in the chunks before
        for c0 in range(0, N, BLOCK):
            key = _key_chunk(X, row, c0, N, ko, ONCHIP, BLOCK)
            eq = key == cand
            eqi = eq.to(tl.int32)
            sel = (key > cand) | (eq & (tl.cumsum(eqi, 0) + seen <= need))
            sv += tl.where(sel, tl.exp(_unkey(key) - ms), 0.0)
            seen += tl.sum(eqi, 0)
        s = tl.sum(sv, 0)
    inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, s))
    if ONCHIP:
        _store(P, row, 0, N, ev * inv, EMULATE_RNE, BLOCK)
    else:
        seen = tl.full([], 0, tl.int32)
        for c0 in range(0, N, BLOCK):
            key = _key_chunk(X, row, c0, N, ko, ONCHIP, BLOCK)
            eq = key == cand
            eqi = eq.to(tl.int32)
            sel = (key > cand) | (eq & (tl.cumsum(eqi, 0) + seen <= need))
            _store(P, row, c0, N, tl.where(sel, tl.exp(_unkey(key) - ms), 0.0) * inv, EMULATE_RNE, BLOCK)
            seen += tl.sum(eqi, 0)
    if HAS_TARGET:
        ignored, xt = _target_x(X, TGT, r, row, ignore_index)
        loss = tl.log(tl.where(dead, 1.0, s)) + ms - xt
        loss = tl.where(dead, float("inf"), loss)
        loss = tl.where(ignored, 0.0, loss)
        tl.store(LOSS + r, loss)


@triton.jit
def entmax_bwd_kernel(
    DX,  # (R, N) p's dtype
    DALPHA,  # ALPHA_GRAD: (R,) float32
    DP,  # (R, N) contiguous
    P,  # (R, N) contiguous
    ALPHA,  # KIND 2: (R,) float32
    N,
    KIND: tl.constexpr,
    ALPHA_GRAD: tl.constexpr,
    ONCHIP: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Op 2 on row r: the sums over the support (one read), then dx = g (dp - q) (a second read, or the
    registers when ONCHIP)."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    if KIND == 2:
        a = tl.load(ALPHA + r).to(tl.float32)
    else:
        a = 0.0
    if ONCHIP:
        inr = offs < N
        po = tl.load(P + (row + offs), mask=inr, other=0.0).to(tl.float32)
        dpo = tl.load(DP + (row + offs), mask=inr, other=0.0).to(tl.float32)
    else:
        po = tl.zeros([BLOCK], dtype=tl.float32)  # unused
        dpo = po
    gv = tl.zeros([BLOCK], dtype=tl.float32)
    gdv = tl.zeros([BLOCK], dtype=tl.float32)
    entv = tl.zeros([BLOCK], dtype=tl.float32)
    av = tl.zeros([BLOCK], dtype=tl.float32)
    cv = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
        if ONCHIP:
            p = po.to(tl.float32)
            dp = dpo.to(tl.float32)
        else:
            cols = c0 + offs
            p = tl.load(P + (row + cols), mask=cols < N, other=0.0).to(tl.float32)
            dp = tl.load(DP + (row + cols), mask=cols < N, other=0.0).to(tl.float32)
        g = _g(p, a, KIND)
        gv += g
        gdv += g * dp
        if ALPHA_GRAD:
            on = p > 0
            plogp = tl.where(on, p * tl.log(tl.where(on, p, 1.0)), 0.0)
            entv += plogp
            av += dp * p
            cv += dp * plogp
    G = tl.sum(gv, 0)
    gdp = tl.sum(gdv, 0)
    q = tl.where(G > 0, gdp / tl.where(G > 0, G, 1.0), 0.0)
    for c0 in range(0, _span(N, ONCHIP, BLOCK), BLOCK):
        if ONCHIP:
            p = po.to(tl.float32)
            dp = dpo.to(tl.float32)
        else:
            cols = c0 + offs
            p = tl.load(P + (row + cols), mask=cols < N, other=0.0).to(tl.float32)
            dp = tl.load(DP + (row + cols), mask=cols < N, other=0.0).to(tl.float32)
        _store(DX, row, c0, N, _g(p, a, KIND) * (dp - q), EMULATE_RNE, BLOCK)
    if ALPHA_GRAD:
        ent = tl.sum(entv, 0)
        A = tl.sum(av, 0)
        C = tl.sum(cv, 0)
        c = a - 1.0
        da = (A - q) / (c * c) - (C - q * ent) / c
        tl.store(DALPHA + r, tl.where(G > 0, da, 0.0))


# ----------------------------------------------------------------------------------------------
# launchers

# The interpreter (TRITON_INTERPRET=1, decided when @triton.jit runs) truncates fp32 -> bf16 casts.
_INTERPRETED = not isinstance(entmax_fwd_kernel, triton.runtime.jit.JITFunction)

_check_x = _rows.check_x


def _config(N, block_cap=None):
    return _rows.row_config("sparse_softmax", N, TUNING, block_cap)


def _check_target(name, target, R):
    if target is None:
        return None
    if target.shape != (R,):
        raise ValueError(f"{name} (triton): target must be (R,)")
    return target.to(torch.int64).contiguous()


def _check_alpha(name, alpha, R):
    if alpha is None:
        raise ValueError(f"{name} (triton): kind 2 needs alpha")
    if alpha.shape != (R,):
        raise ValueError(f"{name} (triton): alpha must be (R,)")
    return alpha.to(torch.float32).contiguous()


def entmax_forward(x, alpha, kind, n_iter, target, ignore_index, traceable=True, block_cap=None):
    """(p, loss): the contract's Op 1 on x (R, N). kind 0 sparsemax, 1 entmax15 (exact tau by the safeguarded
    Newton on the support), 2 alpha-entmax by bisection (alpha (R,) float32, n_iter halvings at most); target
    (R,) int64 (kinds 0, 1) gives loss (R,) float32, else loss is empty (0,)."""
    x = _check_x("entmax", x)
    kind = int(kind)
    if kind not in (0, 1, 2):
        raise ValueError(f"entmax (triton): kind must be 0, 1 or 2, got {kind}")
    R, N = x.shape
    if kind == 2:
        alpha = _check_alpha("entmax", alpha, R)
    if target is not None and kind == 2:
        raise ValueError("entmax (triton): a loss (target) is defined for kinds 0 and 1 only")
    target = _check_target("entmax", target, R)
    p = torch.empty_like(x)
    loss = torch.empty(R if target is not None else 0, dtype=torch.float32, device=x.device)
    if R == 0:
        return p, loss
    onchip, block, warps = _config(N, block_cap)
    kernel = torch.library.wrap_triton(entmax_fwd_kernel) if traceable else entmax_fwd_kernel
    kernel[(R,)](p, loss, x, alpha if alpha is not None else x, target if target is not None else x, N,
                 int(n_iter), int(ignore_index), KIND=kind, HAS_TARGET=target is not None, ONCHIP=onchip,
                 EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16, BLOCK=block, MAX_ITERS=MAX_PASSES,
                 num_warps=warps)
    return p, loss


def topk_softmax_forward(x, k, target, ignore_index, traceable=True, block_cap=None):
    """(p, loss): the contract's Op 3 on x (R, N): softmax over the k largest entries of each row (ties at the
    k-th value: the lowest indices), 0 elsewhere; target (R,) int64 gives loss (R,) float32, else (0,)."""
    x = _check_x("topk_softmax", x)
    R, N = x.shape
    k = int(k)
    if not 1 <= k <= N:
        raise ValueError(f"topk_softmax (triton): k must be in [1, N = {N}], got {k}")
    target = _check_target("topk_softmax", target, R)
    p = torch.empty_like(x)
    loss = torch.empty(R if target is not None else 0, dtype=torch.float32, device=x.device)
    if R == 0:
        return p, loss
    onchip, block, warps = _config(N, block_cap)
    kernel = torch.library.wrap_triton(topk_fwd_kernel) if traceable else topk_fwd_kernel
    kernel[(R,)](p, loss, x, target if target is not None else x, N, k, int(ignore_index),
                 HAS_TARGET=target is not None, ONCHIP=onchip, EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16,
                 BLOCK=block, num_warps=warps)
    return p, loss


def entmax_backward(dp, p, alpha, kind, alpha_grad, traceable=True, block_cap=None):
    """(dx, dalpha): the contract's Op 2. dx = g (dp - q) (p's dtype), q = sum g dp / sum g over the support;
    kind 0 sparsemax, 1 entmax15, 2 alpha-entmax (alpha (R,) float32; alpha_grad: dalpha (R,) float32, else
    empty (0,)), 3 softmax (top-k)."""
    p = _check_x("entmax_backward", p)
    kind = int(kind)
    if kind not in (0, 1, 2, 3):
        raise ValueError(f"entmax_backward (triton): kind must be 0, 1, 2 or 3, got {kind}")
    if dp.shape != p.shape:
        raise ValueError("entmax_backward (triton): dp must be p's shape")
    dp = dp.to(p.dtype).contiguous()
    R, N = p.shape
    alpha_grad = bool(alpha_grad)
    if alpha_grad and kind != 2:
        raise ValueError("entmax_backward (triton): alpha_grad is for kind 2 only")
    if kind == 2:
        alpha = _check_alpha("entmax_backward", alpha, R)
    dx = torch.empty_like(p)
    dalpha = torch.empty(R if alpha_grad else 0, dtype=torch.float32, device=p.device)
    if R == 0:
        return dx, dalpha
    onchip, block, warps = _config(N, block_cap)
    kernel = torch.library.wrap_triton(entmax_bwd_kernel) if traceable else entmax_bwd_kernel
    kernel[(R,)](dx, dalpha, dp, p, alpha if kind == 2 else p, N, KIND=kind, ALPHA_GRAD=alpha_grad, ONCHIP=onchip,
                 EMULATE_RNE=_INTERPRETED and p.dtype == torch.bfloat16, BLOCK=block, num_warps=warps)
    return dx, dalpha
