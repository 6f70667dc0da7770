"""Triton Gumbel-softmax, Gumbel-max and Gaussian perturb-max softmax, one program per row.

Semantics: docs/gumbel_softmax_kernel_contract.md (the reference, pyext/reference/gumbel_softmax.py, is the
specification, including its Philox4x32-10; math: ../shared/spec/softmaxes.md). This module imports only torch,
triton and the RoPE kernel module (it is installed as ``kxops.triton_kernels``). Launchers, on the contract's
normalised arguments (x (R, N) contiguous, fp16 / bf16 / fp32; seed a one-element int64 tensor on x's device, read
by the kernel only):

    gumbel_softmax_forward(x, seed, tau, hard, traceable=True, block_cap=None) -> (y, soft, index)     Op 1
    gumbel_softmax_backward(dy, y, tau, traceable=True, block_cap=None) -> dx                          Op 2
    gumbel_max_forward(x, seed, traceable=True, block_cap=None) -> index                               Op 3
    perturb_max_forward(x, nodes, traceable=True) -> p                                                 Op 4
    perturb_max_backward(dp, x, nodes, traceable=True) -> dx                                           Op 5

traceable: launch through torch.library.wrap_triton (inside a triton_op, for torch.compile and export); False
launches directly (eager, real tensors). CPU tensors work under TRITON_INTERPRET=1.

Gumbel-softmax (ops 1-3), row arithmetic in float32:
- the noise of entry i of row r is word (i & 3) of tl.randint4x(seed, r * G + (i >> 2)), G = ceil(N / 4) (the
  counter (c_lo, c_hi, 0, 0), key = the seed's 64 bits): one randint4x per group of four entries, its words
  laid over the group by reshape(join(join(w0, w2), join(w1, w3))) (w0..w3 on consecutive entries; the joins
  keep a group in one thread's registers, so with 16-divisible N and pointers the x loads are 4-wide and no
  layout conversion is needed; other N take a shared-memory conversion). u = (2 (w >> 9) + 1) 2^-24,
  g = -log(-log u).
- on chip (next_pow2(N) <= block_cap): the row is read once into registers (v = x + g), max / first argmax, exp,
  sum and the write work on registers. Chunked (longer rows, or a symbolic N when tracing): a first pass keeps,
  per lane, the running max, the first index reaching it and the sum of exp((v - max) / tau) rescaled online; a
  second pass re-reads x, regenerates the same noise from the counters and writes y (and soft). Gumbel-max is the
  same kernel without the writes (and without the sum).
- the backward dx = y (dy - sum dy y) / tau: on chip one read, chunked two.
1/tau is passed as a float32 multiplier (s = (v - m) * (1 / tau)).

Perturb-max (ops 4, 5), float64 inside: one program per row, (BI, BJ) tiles of L(x_i - x_j + z_k) for every node,
O(K N^2) per row. log Phi / its derivative r follow the contract's table, with erfc from Cephes' ndtr.c rational
approximations (tl.erf where 1 - erf does not cancel): see _log_phi. The forward keeps q_i in a float64 (R, N)
workspace; the backward keeps e_ik = exp(S_ik) in an (R, N, K) workspace and q_i, A_i = (1/K) sum_k e_ik T_ik in
(R, N) ones (all allocated by the launchers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _rows
from .rope import round_to_bf16

__all__ = ["gumbel_softmax_forward", "gumbel_softmax_backward", "gumbel_max_forward", "perturb_max_forward",
           "perturb_max_backward", "TUNING"]

TUNING = {
    # the longest row held in registers (a power of two) by the forward / Gumbel-max; longer rows are chunked.
    # sm_90 ptxas (N, pointers 16-divisible): 32768 at 32 warps is 64 registers with ~230 (soft) / ~300 (hard)
    # bytes of spills per thread in fp32, none in bf16 / fp16; 16384 spills nothing (47 registers)
    "block_cap": 32768,
    # the same for the backward (it holds y and dy): 32768 spills 64 (fp32) / 44 (bf16) bytes per thread
    "bwd_block_cap": 32768,
    # the chunk of the chunked path (capped by block_cap) and its num_warps
    "chunk": 4096,
    "chunk_warps": 8,
    # num_warps of the on-chip path by BLOCK (the smallest entry >= BLOCK)
    "warps": ((512, 1), (1024, 2), (2048, 4), (4096, 8), (8192, 16), (16384, 32), (32768, 32)),
    # perturb-max tiles (i, j) and num_warps: 32 x 32 float64 at 8 warps, ~125 registers, no spills
    "pm_bi": 32,
    "pm_bj": 32,
    "pm_warps": 8,
}


# ----------------------------------------------------------------------------------------------
# jit helpers: Gumbel noise

@triton.jit
def _gumbel(seed, crow, c0, BLOCK: tl.constexpr):
    """(BLOCK,) float32 Gumbel noise of the block starting at column c0 (a multiple of 4) of the row whose first
    counter is crow (int64 r * G): Philox block c0 / 4 + g gives entries c0 + 4 g .. c0 + 4 g + 3."""
    c = crow + (c0 // 4 + tl.arange(0, BLOCK // 4)).to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(seed, c)
    # (w0, w1, w2, w3) of each block on consecutive entries: join puts the pair in one thread's registers
    w = tl.reshape(tl.join(tl.join(w0.to(tl.uint32, bitcast=True), w2.to(tl.uint32, bitcast=True)),
                           tl.join(w1.to(tl.uint32, bitcast=True), w3.to(tl.uint32, bitcast=True))), [BLOCK])
    u = ((w >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: exact, in [2^-24, 1 - 2^-24]
    return -tl.log(-tl.log(u))


@triton.jit
def _v_block(X, seed, row, crow, c0, N, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """(v, cols): v = x + g (float32, -inf beyond N) of the BLOCK entries starting at column c0."""
    cols = c0 + tl.arange(0, BLOCK)
    v = tl.load(X + (row + cols), mask=cols < N, other=float("-inf")).to(tl.float32)
    if NOISE:
        v = v + _gumbel(seed, crow, c0, BLOCK)
    return v, cols


@triton.jit
def _store(PTR, row, cols, N, v, EMULATE_RNE: tl.constexpr):
    if EMULATE_RNE:
        # interpreter only: it truncates fp32 -> bf16 casts, the GPU rounds to nearest even
        v = round_to_bf16(v)
    tl.store(PTR + (row + cols), v.to(PTR.dtype.element_ty), mask=cols < N)


# ----------------------------------------------------------------------------------------------
# Gumbel-softmax kernels

@triton.jit
def gumbel_fwd_kernel(
    Y,  # WRITE: (R, N) x's dtype
    SOFT,  # WRITE and HARD: (R, N) x's dtype
    IDX,  # (R,) int64
    X,  # (R, N) contiguous
    SEED,  # NOISE: (1,) int64
    N,
    G,  # ceil(N / 4): Philox blocks per row
    inv_tau,  # 1 / tau (float32)
    NOISE: tl.constexpr,
    HARD: tl.constexpr,
    WRITE: tl.constexpr,
    ONCHIP: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Ops 1 and 3 on row r: v = x + g, m = max v, index = the first i with v_i = m, y = softmax((v - m) / tau)
    (or the one-hot of index, soft = the softmax); all -inf row: y = soft = 0, index = -1."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    crow = r.to(tl.int64) * G
    if NOISE:
        seed = tl.load(SEED)
    else:
        seed = 0
    BIG: tl.constexpr = 2147483647
    if ONCHIP:
        v, cols = _v_block(X, seed, row, crow, 0, N, NOISE, BLOCK)
        m = tl.max(v, 0)
        dead = m == float("-inf")
        idx = tl.where(dead, -1, tl.min(tl.where(v == m, cols, BIG), 0))
        tl.store(IDX + r, idx.to(tl.int64))
        if WRITE:
            e = tl.exp((v - tl.where(dead, 0.0, m)) * inv_tau)  # v = -inf: 0
            s = tl.sum(e, 0)
            inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, s))
            if HARD:
                _store(Y, row, cols, N, tl.where(cols == idx, 1.0, 0.0), False)
                _store(SOFT, row, cols, N, e * inv, EMULATE_RNE)
            else:
                _store(Y, row, cols, N, e * inv, EMULATE_RNE)
    else:
        # pass 1: per lane the running max, the first column reaching it, the rescaled sum
        mv = tl.full([BLOCK], float("-inf"), tl.float32)
        iv = tl.zeros([BLOCK], dtype=tl.int32)
        sv = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, N, BLOCK):
            v, cols = _v_block(X, seed, row, crow, c0, N, NOISE, BLOCK)
            iv = tl.where(v > mv, cols, iv)  # strict: a lane keeps its first maximum
            new = tl.maximum(mv, v)
            if WRITE:
                live = new > float("-inf")
                base = tl.where(live, new, 0.0)
                # mv, v <= new; when new is -inf both are -inf: the scale is irrelevant (sv = 0), e = 0
                sv = sv * tl.exp((mv - base) * inv_tau) + tl.exp((v - base) * inv_tau)
            mv = new
        m = tl.max(mv, 0)
        dead = m == float("-inf")
        idx = tl.where(dead, -1, tl.min(tl.where(mv == m, iv, BIG), 0))
        tl.store(IDX + r, idx.to(tl.int64))
        if WRITE:
            ms = tl.where(dead, 0.0, m)
            s = tl.sum(sv * tl.exp((mv - ms) * inv_tau), 0)  # sv = 0 where mv = -inf
            inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, s))
            # pass 2: the same noise again (the counters), y / soft written
            for c0 in range(0, N, BLOCK):
                v, cols = _v_block(X, seed, row, crow, c0, N, NOISE, BLOCK)
                p = tl.exp((v - ms) * inv_tau) * inv
                if HARD:
                    _store(Y, row, cols, N, tl.where(cols == idx, 1.0, 0.0), False)
                    _store(SOFT, row, cols, N, p, EMULATE_RNE)
                else:
                    _store(Y, row, cols, N, p, EMULATE_RNE)


@triton.jit
def gumbel_bwd_kernel(
    DX,  # (R, N) y's dtype
    DY,  # (R, N) contiguous
    Y,  # (R, N) contiguous
    N,
    inv_tau,
    ONCHIP: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Op 2 on row r: dx = y (dy - sum dy y) / tau."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    offs = tl.arange(0, BLOCK)
    if ONCHIP:
        inr = offs < N
        y = tl.load(Y + (row + offs), mask=inr, other=0.0).to(tl.float32)
        dy = tl.load(DY + (row + offs), mask=inr, other=0.0).to(tl.float32)
        s = tl.sum(dy * y, 0)
        dx = y * (dy - s) * inv_tau
        if EMULATE_RNE:
            dx = round_to_bf16(dx)
        tl.store(DX + (row + offs), dx.to(DX.dtype.element_ty), mask=inr)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, N, BLOCK):
            cols = c0 + offs
            inr = cols < N
            y = tl.load(Y + (row + cols), mask=inr, other=0.0).to(tl.float32)
            dy = tl.load(DY + (row + cols), mask=inr, other=0.0).to(tl.float32)
            acc += dy * y
        s = tl.sum(acc, 0)
        for c0 in range(0, N, BLOCK):
            cols = c0 + offs
            inr = cols < N
            y = tl.load(Y + (row + cols), mask=inr, other=0.0).to(tl.float32)
            dy = tl.load(DY + (row + cols), mask=inr, other=0.0).to(tl.float32)
            dx = y * (dy - s) * inv_tau
            if EMULATE_RNE:
                dx = round_to_bf16(dx)
            tl.store(DX + (row + cols), dx.to(DX.dtype.element_ty), mask=inr)


# ----------------------------------------------------------------------------------------------
# jit helpers: log Phi in float64

@triton.jit
def _tail_ratio(t):
    """erfc(t) exp(t^2) in float64 for t >= 1 (Cephes ndtr.c: P/Q for t < 8, R/S beyond; relative error ~1e-14)."""
    p = t * 2.46196981473530512524E-10 + 5.64189564831068821977E-1
    p = p * t + 7.46321056442269912687E0
    p = p * t + 4.86371970985681366614E1
    p = p * t + 1.96520832956077098242E2
    p = p * t + 5.26445194995477358631E2
    p = p * t + 9.34528527171957607540E2
    p = p * t + 1.02755188689515710272E3
    p = p * t + 5.57535335369399327526E2
    q = t + 1.32281951154744992508E1
    q = q * t + 8.67072140885989742329E1
    q = q * t + 3.54937778887819891062E2
    q = q * t + 9.75708501743205489753E2
    q = q * t + 1.82390916687909736289E3
    q = q * t + 2.24633760818710981792E3
    q = q * t + 1.65666309194161350182E3
    q = q * t + 5.57535340817727675546E2
    a = t * 5.64189583547755073984E-1 + 1.27536670759978104416E0
    a = a * t + 5.01905042251180477414E0
    a = a * t + 6.16021097993053585195E0
    a = a * t + 7.40974269950448939160E0
    a = a * t + 2.97886665372100240670E0
    b = t + 2.26052863220117276590E0
    b = b * t + 9.39603524938001434673E0
    b = b * t + 1.20489539808096656605E1
    b = b * t + 1.70814450747565897222E1
    b = b * t + 9.60896809063285878198E0
    b = b * t + 3.36907645100081516050E0
    return tl.where(t < 8.0, p / q, a / b)


@triton.jit
def _log_phi(d, WANT_R: tl.constexpr):
    """(L, r): L = log Phi(d), r = phi(d) / Phi(d), float64, by the contract's table (d > 38: 0, 0):
    d >= -sqrt 2:        L = log((1 + erf(d / sqrt 2)) / 2)          (1 + erf does not cancel there; absolute
                                                                     error ~1e-16, all L is used for: exp(sum L))
    -37.5 < d < -sqrt 2: L = -d^2/2 + log(erfc(t) exp(t^2) / 2), t = -d / sqrt 2 (the Cephes ratio),
                         r = sqrt(2 / pi) / ratio
    d <= -37.5:          L = -d^2/2 - log(-d) - log(2 pi)/2,  r = -d."""
    t = d * -0.70710678118654752440
    tail = t > 1.0
    far = d <= -37.5
    ratio = _tail_ratio(tl.where(tail, t, 1.0))
    central = 0.5 + 0.5 * tl.erf(d * 0.70710678118654752440)
    lg = tl.log(tl.where(far, -d, tl.where(tail, 0.5 * ratio, central)))
    h = -0.5 * d * d
    L = tl.where(far, h - lg - 0.91893853320467274178, tl.where(tail, h + lg, lg))
    top = d > 38.0
    L = tl.where(top, 0.0, L)
    if WANT_R:
        rc = tl.exp(tl.where(tail, 0.0, h - 0.91893853320467274178 - L))
        r = tl.where(far, -d, tl.where(tail, 0.79788456080286535588 / ratio, rc))
        r = tl.where(top, 0.0, r)
    else:
        r = L
    return L, r


@triton.jit
def _pm_row(X, row, cols, N):
    """(x float64 with -inf entries set to 0, present) of the columns cols."""
    x = tl.load(X + (row + cols), mask=cols < N, other=float("-inf")).to(tl.float64)
    fin = x > float("-inf")
    return tl.where(fin, x, 0.0), fin


@triton.jit
def _pm_sums(X, NODES, row, xi, fi, ci, k, N, WANT_R: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """(S_i, T_i) for node k over the tile rows i: sums over j in F, j != i, of L(x_i - x_j + z_k) and (WANT_R)
    r(x_i - x_j + z_k)."""
    z = tl.load(NODES + k)
    accl = tl.zeros([BI, BJ], dtype=tl.float64)
    accr = tl.zeros([BI, BJ], dtype=tl.float64)
    for j0 in range(0, N, BJ):
        cj = j0 + tl.arange(0, BJ)
        xj, fj = _pm_row(X, row, cj, N)
        pair = fi[:, None] & fj[None, :] & (ci[:, None] != cj[None, :])
        L, rr = _log_phi(xi[:, None] - xj[None, :] + z, WANT_R)
        accl += tl.where(pair, L, 0.0)
        if WANT_R:
            accr += tl.where(pair, rr, 0.0)
    return tl.sum(accl, 1), tl.sum(accr, 1)


# ----------------------------------------------------------------------------------------------
# perturb-max kernels

@triton.jit
def perturb_max_fwd_kernel(
    P,  # (R, N) x's dtype
    QW,  # (R, N) float64 workspace: q
    X,  # (R, N) contiguous
    NODES,  # (K,) float64
    N,
    K,
    EMULATE_RNE: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
):
    """Op 4 on row r: q_i = (1/K) sum_k exp(S_ik) for i in F, p = q / sum q."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    qv = tl.zeros([BI], dtype=tl.float64)
    for i0 in range(0, N, BI):
        ci = i0 + tl.arange(0, BI)
        xi, fi = _pm_row(X, row, ci, N)
        q = tl.zeros([BI], dtype=tl.float64)
        for k in range(0, K):
            s, _ = _pm_sums(X, NODES, row, xi, fi, ci, k, N, False, BI, BJ)
            q += tl.exp(s)
        q = tl.where(fi, q / K, 0.0)
        tl.store(QW + (row + ci), q, mask=ci < N)
        qv += q
    Q = tl.sum(qv, 0)
    inv = tl.where(Q > 0, 1.0 / tl.where(Q > 0, Q, 1.0), 0.0)
    tl.debug_barrier()  # q written by other threads
    for i0 in range(0, N, BI):
        ci = i0 + tl.arange(0, BI)
        p = (tl.load(QW + (row + ci), mask=ci < N, other=0.0) * inv).to(tl.float32)
        if EMULATE_RNE:
            p = round_to_bf16(p)
        tl.store(P + (row + ci), p.to(P.dtype.element_ty), mask=ci < N)


@triton.jit
def perturb_max_bwd_kernel(
    DX,  # (R, N) x's dtype
    EW,  # (R, N, K) float64 workspace: e_ik = exp(S_ik)
    QW,  # (R, N) float64 workspace: q_i
    AW,  # (R, N) float64 workspace: A_i = (1/K) sum_k e_ik T_ik
    DP,  # (R, N) contiguous
    X,  # (R, N) contiguous
    NODES,  # (K,) float64
    N,
    K,
    EMULATE_RNE: tl.constexpr,
    BI: tl.constexpr,
    BJ: tl.constexpr,
):
    """Op 5 on row r: h_i = (dp_i - sum_j dp_j p_j) / Q, W_ik = h_i e_ik / K,
    dx_m = h_m A_m - sum_k sum_{i in F, i != m} W_ik r(x_i - x_m + z_k)."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * N
    qv = tl.zeros([BI], dtype=tl.float64)
    dqv = tl.zeros([BI], dtype=tl.float64)
    for i0 in range(0, N, BI):
        ci = i0 + tl.arange(0, BI)
        inr = ci < N
        xi, fi = _pm_row(X, row, ci, N)
        q = tl.zeros([BI], dtype=tl.float64)
        a = tl.zeros([BI], dtype=tl.float64)
        for k in range(0, K):
            s, tt = _pm_sums(X, NODES, row, xi, fi, ci, k, N, True, BI, BJ)
            e = tl.where(fi, tl.exp(s), 0.0)
            tl.store(EW + ((row + ci) * K + k), e, mask=inr)
            q += e
            a += e * tt
        q = q / K
        tl.store(QW + (row + ci), q, mask=inr)
        tl.store(AW + (row + ci), a / K, mask=inr)
        dp = tl.load(DP + (row + ci), mask=inr, other=0.0).to(tl.float64)
        qv += q
        dqv += tl.where(fi, dp * q, 0.0)
    Q = tl.sum(qv, 0)
    pos = Q > 0
    invq = tl.where(pos, 1.0 / tl.where(pos, Q, 1.0), 0.0)
    sdp = tl.sum(dqv, 0) * invq  # sum_j dp_j p_j
    tl.debug_barrier()  # e, q, A written by other threads
    for m0 in range(0, N, BI):
        cm = m0 + tl.arange(0, BI)
        inm = cm < N
        xm, fm = _pm_row(X, row, cm, N)
        dpm = tl.load(DP + (row + cm), mask=inm, other=0.0).to(tl.float64)
        hm = tl.where(fm, (dpm - sdp) * invq, 0.0)
        acc = tl.zeros([BI, BJ], dtype=tl.float64)
        for k in range(0, K):
            z = tl.load(NODES + k)
            for i0 in range(0, N, BJ):
                ci = i0 + tl.arange(0, BJ)
                ini = ci < N
                xi, fi = _pm_row(X, row, ci, N)
                dpi = tl.load(DP + (row + ci), mask=ini, other=0.0).to(tl.float64)
                ei = tl.load(EW + ((row + ci) * K + k), mask=ini, other=0.0)
                w = tl.where(fi, (dpi - sdp) * invq * ei, 0.0)  # K W_ik
                pair = fm[:, None] & fi[None, :] & (cm[:, None] != ci[None, :])
                _, rr = _log_phi(xi[None, :] - xm[:, None] + z, True)
                acc += tl.where(pair, w[None, :] * rr, 0.0)
        am = tl.load(AW + (row + cm), mask=inm, other=0.0)
        dx = tl.where(fm, hm * am - tl.sum(acc, 1) / K, 0.0).to(tl.float32)
        if EMULATE_RNE:
            dx = round_to_bf16(dx)
        tl.store(DX + (row + cm), dx.to(DX.dtype.element_ty), mask=inm)


# ----------------------------------------------------------------------------------------------
# launchers

# The interpreter (TRITON_INTERPRET=1, decided when @triton.jit runs) truncates fp32 -> bf16 casts.
_INTERPRETED = not isinstance(gumbel_fwd_kernel, triton.runtime.jit.JITFunction)

_SUPPORTED = _rows.SUPPORTED
_pow2 = _rows.pow2
_check_x = _rows.check_x


def _config(N, block_cap=None, cap_key="block_cap"):
    return _rows.row_config("gumbel_softmax", N, TUNING, block_cap, cap_key)


def _check_seed(name, seed, x):
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"{name} (triton): seed must be an int64 tensor of one element")
    if seed.device != x.device:
        raise ValueError(f"{name} (triton): seed must be on x's device")
    return seed.reshape(1).contiguous()


def _inv_tau(tau):
    tau = float(tau)
    if not tau > 0:
        raise ValueError(f"gumbel_softmax (triton): tau must be > 0, got {tau}")
    return 1.0 / tau


def _gumbel_launch(name, x, seed, tau, hard, write, traceable, block_cap):
    x = _check_x(name, x)
    if seed is not None:
        seed = _check_seed(name, seed, x)
    R, N = x.shape
    inv_tau = _inv_tau(tau)
    hard = bool(hard) and write
    y = torch.empty_like(x) if write else torch.empty((0,), dtype=x.dtype, device=x.device)
    soft = torch.empty_like(x) if hard else torch.empty((0,), dtype=x.dtype, device=x.device)
    index = torch.empty((R,), dtype=torch.int64, device=x.device)
    if R == 0:
        return y, soft, index
    onchip, block, warps = _config(N, block_cap)
    kernel = torch.library.wrap_triton(gumbel_fwd_kernel) if traceable else gumbel_fwd_kernel
    kernel[(R,)](y if write else x, soft if hard else x, index, x, seed if seed is not None else index, N,
                 (N + 3) // 4, inv_tau, NOISE=seed is not None, HARD=hard, WRITE=write, ONCHIP=onchip,
                 EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16, BLOCK=block, num_warps=warps)
    return y, soft, index


def gumbel_softmax_forward(x, seed, tau, hard, traceable=True, block_cap=None):
    """(y, soft, index): the contract's Op 1 on x (R, N). seed: (1,) int64 on x's device (read by the kernel), or
    None (no noise). y (R, N) x's dtype (the exact one-hot of index when hard); soft (R, N) when hard, else an empty
    (0,) tensor; index (R,) int64 (-1 for an all -inf row)."""
    return _gumbel_launch("gumbel_softmax", x, seed, tau, hard, True, traceable, block_cap)


def gumbel_max_forward(x, seed, traceable=True, block_cap=None):
    """index (R,) int64: the contract's Op 3 (Op 1's index without the writes)."""
    if seed is None:
        raise ValueError("gumbel_max (triton): seed is required")
    return _gumbel_launch("gumbel_max", x, seed, 1.0, False, False, traceable, block_cap)[2]


def gumbel_softmax_backward(dy, y, tau, traceable=True, block_cap=None):
    """dx (R, N) in y's dtype: the contract's Op 2, dx = y (dy - sum dy y) / tau (y: the soft output)."""
    y = _check_x("gumbel_softmax_backward", y)
    if dy.shape != y.shape:
        raise ValueError("gumbel_softmax_backward (triton): dy must be y's shape")
    if dy.dtype not in _SUPPORTED:
        dy = dy.to(y.dtype)
    dy = dy.contiguous()
    R, N = y.shape
    inv_tau = _inv_tau(tau)
    dx = torch.empty_like(y)
    if R == 0:
        return dx
    onchip, block, warps = _config(N, block_cap, "bwd_block_cap")
    kernel = torch.library.wrap_triton(gumbel_bwd_kernel) if traceable else gumbel_bwd_kernel
    kernel[(R,)](dx, dy, y, N, inv_tau, ONCHIP=onchip, EMULATE_RNE=_INTERPRETED and y.dtype == torch.bfloat16,
                 BLOCK=block, num_warps=warps)
    return dx


def _check_nodes(name, nodes, x):
    if nodes.dtype != torch.float64 or nodes.dim() != 1 or nodes.numel() < 2:
        raise ValueError(f"{name} (triton): nodes must be float64 (K,), K >= 2")
    if nodes.device != x.device:
        raise ValueError(f"{name} (triton): nodes must be on x's device")
    return nodes.contiguous()


def _pm_tiles(N):
    if isinstance(N, int):
        p = max(16, _pow2(N))
        return min(TUNING["pm_bi"], p), min(TUNING["pm_bj"], p)
    return TUNING["pm_bi"], TUNING["pm_bj"]


def perturb_max_forward(x, nodes, traceable=True):
    """p (R, N) x's dtype: the contract's Op 4 (Gaussian perturb-max by quadrature, float64 inside)."""
    x = _check_x("perturb_max", x)
    nodes = _check_nodes("perturb_max", nodes, x)
    R, N = x.shape
    K = nodes.shape[0]
    p = torch.empty_like(x)
    if R == 0:
        return p
    qw = torch.empty((R, N), dtype=torch.float64, device=x.device)
    bi, bj = _pm_tiles(N)
    kernel = torch.library.wrap_triton(perturb_max_fwd_kernel) if traceable else perturb_max_fwd_kernel
    kernel[(R,)](p, qw, x, nodes, N, K, EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16, BI=bi, BJ=bj,
                 num_warps=TUNING["pm_warps"])
    return p


def perturb_max_backward(dp, x, nodes, traceable=True):
    """dx (R, N) x's dtype: the contract's Op 5 (recomputes the forward; float64 inside; an (R, N, K) float64
    workspace)."""
    x = _check_x("perturb_max_backward", x)
    nodes = _check_nodes("perturb_max_backward", nodes, x)
    if dp.shape != x.shape:
        raise ValueError("perturb_max_backward (triton): dp must be x's shape")
    dp = dp.contiguous()
    R, N = x.shape
    K = nodes.shape[0]
    dx = torch.empty_like(x)
    if R == 0:
        return dx
    ew = torch.empty((R, N, K), dtype=torch.float64, device=x.device)
    qw = torch.empty((R, N), dtype=torch.float64, device=x.device)
    aw = torch.empty((R, N), dtype=torch.float64, device=x.device)
    bi, bj = _pm_tiles(N)
    kernel = torch.library.wrap_triton(perturb_max_bwd_kernel) if traceable else perturb_max_bwd_kernel
    kernel[(R,)](dx, ew, qw, aw, dp, x, nodes, N, K, EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16,
                 BI=bi, BJ=bj, num_warps=TUNING["pm_warps"])
    return dx
