"""Triton GlobalPointer span loss: the fused multi-label categorical cross-entropy of every (batch, type) row
of L x L span scores, forward and backward, never materialising the (B, H, L, L) scores.

Semantics: docs/global_pointer_kernel_contract.md (the reference, pyext/reference/global_pointer.py:
loss_ref, is the specification; math: ../shared/spec/global_pointer.md). This module imports only torch,
triton and the RoPE kernel module (it is installed as ``kxops.triton_kernels``). Launchers, on the
contract's normalised arguments:

    loss_forward(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets,
                 traceable=True) -> (loss, lse_neg, lse_pos)                 each (B, H) float32
    loss_backward(dloss, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index,
                  targets, lse_neg, lse_pos, traceable=True) -> (dq, dk, dstart_bias, dend_bias)

    logits_forward(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, traceable=True)
        -> logits (B, H, L, L) float32, -inf on invalid spans
    logits_backward(dlogits, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, traceable=True)
        -> (dq, dk, dstart_bias, dend_bias)             ds = dlogits on valid spans (invalid ones never read)
    decode(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, threshold, traceable=True)
        -> (spans (N, 4) int64 [b, h, i, j] row-major, scores (N,) float32): (logits > float32(threshold))
    mlce_forward(x, targets, positives, mask_zero, traceable=True) -> (loss, lse_neg, lse_pos) each (R,) float32
    mlce_backward(dloss, x, targets, positives, mask_zero, lse_neg, lse_pos, traceable=True) -> dx

q, k (B, L, Hq, d), Hq = H or 1 (one q/k shared by the H types), fp16 / bf16 / fp32, unit last stride, any
other strides; mask None or (B, L) bool; biases None or (B, H, L) float32; inv_freq None (no RoPE) or (d/2,)
float32, interleaved pairs (x[2i], x[2i+1]) at positions 0..L-1; labels either CSR rows (pos_offsets int32
(B*H + 1,), pos_index int32 (N,): the flat spans i*L + j of row b*H + h, sorted and unique) or dense targets
(B, H, L, L) in [0, 1]. dq, dk: q's / k's shape and dtype, contiguous; dstart / dend (B, H, L) float32, or
empty (0,) when the bias is None. traceable: launch through torch.library.wrap_triton (inside a triton_op,
for torch.compile and export); False launches directly (eager, real tensors). CPU tensors work under
TRITON_INTERPRET=1.

Design (per row r = b*H + h; s_ij = scale * (R_i q_i) . (R_j k_j) + start_i + end_j on the valid spans):
- Tiles of s are recomputed from q and k, over the head dimension in chunks of BLOCK_K pairs: a (BLOCK,
  2*BLOCK_K) chunk of rows is loaded whole (coalesced) and split in registers into its even and odd
  coordinates, two (BLOCK, BLOCK_K) halves; RoPE is elementwise on the halves (angle pos * inv_freq[p] in
  float32, as the reference computes it; cos / sin by range reduction and polynomials: _cos_sin_tile), and
  s += qe . ke^T + qo . ko^T (tl.dot). Chunks bound the dot operands held in registers (d up to 256).
- Precision: the loss is a float32 output also for bf16 / fp16 inputs, and the rotated tiles are not
  bf16 values: all arithmetic in float32 and the products as tf32x3, three tf32 tensor-core products of
  the operands' leading and trailing bits cut in _dot (about float32 accuracy; TUNING["dot_precision"]:
  "ieee" for FMA products). Every piece is an exact tf32 value, so the interpreter's float32 matmul
  computes the GPU's products and the tests see their rounding. Triton's own "tf32x3" (truncated small
  pieces) was less accurate and spilled more registers.
- Forward: grid (i-blocks, B*H). A program folds its i-block's tiles into two online log-sum-exps, the
  negatives (weights 1 - t, scores s) and the positives (weights t, scores -s), one running (max, sum) per
  i row, starting from the threshold class's score 0 (m = 0, l = 0: its mass, 1, is added once in the
  combine). Entries of weight 0 (t exactly 1 for the negatives, 0 for the positives, invalid spans) take no
  part in the maximum and add exactly 0: no log(0), no inf * 0 (non-finite scores count as invalid spans,
  as in the reference). Each program writes one (m, l) pair per
  sum; the launcher combines the (B*H, i-blocks) partials in float64 torch ops (tiny) into
  lse = log(1 + sum), and loss = lse_neg + lse_pos, rounded once to float32.
- tril: the tiles left of the diagonal tile are skipped (j loops start at the i-block's diagonal tile;
  i loops of the dk kernel stop after it).
- Sparse labels: the row's segment of pos_index is cut to the tile's flat range [i0*L + j0, i_last*L + j_last]
  by two scalar binary searches (bit_length(N) steps); tiles without a positive (most of them) do no more;
  otherwise every entry of the tile looks its flat index up in the cut segment (bit_length(cut) vectorised
  steps). Dense targets are loaded per tile (any float dtype, upcast to float32).
- Backward (flash-attention style, no atomics: deterministic), one kernel in two launches: ds_ij =
  dloss * ((1 - t) e^(s - lse_neg) - t e^(-s - lse_pos)) on valid spans. FOR_Q: grid (i-blocks, B*Hq),
  dqt_i = sum_j ds_ij kt_j and dstart_i = sum_j ds_ij over the j tiles; else grid (j-blocks, B*Hq),
  dkt_j = sum_i ds_ij qt_i and dend_j = sum_i ds_ij over the i tiles. With Hq = 1 a program loops over the
  H types, summing their contributions to its rows in registers; scale and the rotation back (R^T) are
  applied once to the sum, with one rounding to q's dtype.
- 64-bit offsets for every product of strides (B*L*Hq*d and B*H*L*L may exceed 2^31); flat span indices
  are int32 (pos_index is: L*L < 2^31).
- Block sizes from a table on BLOCK_P (TUNING), no autotune (it fails in the interpreter).
- The logits and decoding are the forward kernel in its other MODEs (the same score tiles): "logits" stores
  the tiles (-inf on invalid spans; with tril the tiles left of the diagonal tile are stored as -inf without
  computing them); decode runs "count" (hits per span row (b, h, i)), an exclusive torch.cumsum of the
  counts and one host read of the total N, then "write" (each hit's output row: the span row's first plus a
  tl.cumsum along the tile's row). Their backward is the loss's backward kernel with LOGITS: ds is loaded
  from dlogits on the valid spans (masked loads: the invalid positions are never read), no scores recomputed.
- The row losses on materialised logits (gp_mlce_kernel): one program per row, the classes in blocks with the
  loss's online log-sum-exp (_lse_fold, _dscores); positives (R, P) int64 are matched by comparing each
  class block with the row's indices in blocks of BLOCK_PP; the forward's (m, l) are combined in float64 by
  the launcher as the loss's partials are.
"""

import torch
import triton
import triton.language as tl

from .rope import round_to_bf16

__all__ = ["loss_forward", "loss_backward", "logits_forward", "logits_backward", "decode", "mlce_forward",
           "mlce_backward", "TUNING"]

# Launch parameters per BLOCK_P (d/2 rounded up to a power of two, >= 16): (BLOCK_I, BLOCK_J, BLOCK_K,
# num_warps) of the forward, of the dq launch and of the dk launch (BLOCK_K: pairs per chunk of the score
# products). The backward holds two (BLOCK, BLOCK_P) float32 accumulators and the whole rotated rows of the
# other side besides the score tiles: smaller tiles for large d. The interpreter uses interpret_block for
# every block.
TUNING = {
    # chosen from the sm_90 compile (ptxas -v: registers, spills) of the sparse-label RoPE variants, no GPU
    # timing yet; with d = 256 (BLOCK_P 128) the backward still spills a little
    "fwd": {16: (64, 64, 16, 8), 32: (64, 64, 32, 8), 64: (64, 32, 32, 8), 128: (64, 32, 32, 8)},
    "bwd_dq": {16: (64, 32, 16, 8), 32: (64, 32, 32, 8), 64: (32, 16, 16, 4), 128: (32, 16, 32, 8)},
    "bwd_dk": {16: (32, 64, 16, 8), 32: (32, 64, 32, 8), 64: (16, 32, 32, 4), 128: (16, 32, 32, 8)},
    "num_stages": 2,
    "dot_precision": "tf32x3",
    # the row losses: (BLOCK_C classes per step, BLOCK_PP positives per comparison, num_warps); not tuned yet
    "mlce": (512, 8, 4),
    "interpret_block": 16,  # the interpreter (no GPU): every block 16 (tl.dot's minimum), chunks of 16 pairs
}


# ----------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _load_halves(X, row_off, row_ok, c0, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr):
    """Coordinates c0 .. c0 + 2*BK of BLOCK rows (row_off: int64 element offsets of the rows) as their even and
    odd coordinates, two (BLOCK, BK) float32 tiles: one coalesced load, split in registers."""
    cols = c0 + tl.arange(0, 2 * BK)
    x = tl.load(X + (row_off[:, None] + cols[None, :]), mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :],
                other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, [BLOCK, BK, 2]))
    return xe, xo


@triton.jit
def _cos_sin_tile(pos, inv_freq):
    """cos and sin of the angles pos * inv_freq (float32, as the reference computes them): (BLOCK, BLOCK_P).

    Polynomials, not tl.cos / tl.sin: those lower to libdevice's cosf / sinf, whose inlined slow path
    (Payne-Hanek, local memory) per element of a tile in the inner loop cost every register. Reduction to
    |r| <= pi/4 by Cody-Waite with pi/2 cut into 8 + 8 + 8 + 24 bit pieces (n * piece exact for |n| < 2^16,
    angles up to ~1e5, beyond any L with L*L < 2^31), then cephes' sinf / cosf polynomials: within ~1.1e-7
    of the true values (a correctly rounded float32 is within 6e-8)."""
    theta = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    n = tl.floor(theta * 0.6366197723675814 + 0.5)
    r = theta - n * 1.5703125
    r = r - n * 4.825592041015625e-4
    r = r - n * 1.2665987014770508e-6
    r = r - n * 9.920935184482005e-10
    z = r * r
    sin_r = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    quadrant = n.to(tl.int32) & 3
    swap = (quadrant & 1) != 0
    sin_t = tl.where(swap, cos_r, sin_r)
    cos_t = tl.where(swap, sin_r, cos_r)
    sin_t = tl.where(quadrant >= 2, -sin_t, sin_t)
    cos_t = tl.where((quadrant == 1) | (quadrant == 2), -cos_t, cos_t)
    return cos_t, sin_t


@triton.jit
def _rot_chunk(X, row_off, row_ok, pos, INV_FREQ, c0, HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK: tl.constexpr, BK: tl.constexpr):
    """Pairs c0/2 .. c0/2 + BK of R_pos x (rows x at row_off) as even / odd halves (x_e c - x_o s, x_e s + x_o c)."""
    xe, xo = _load_halves(X, row_off, row_ok, c0, HEAD_DIM, BLOCK, BK)
    if HAS_ROPE:
        p = c0 // 2 + tl.arange(0, BK)
        inv_freq = tl.load(INV_FREQ + p, mask=2 * p < HEAD_DIM, other=0.0).to(tl.float32)
        c, s = _cos_sin_tile(pos, inv_freq)
        ye = xe * c - xo * s
        yo = xe * s + xo * c
    else:
        ye = xe
        yo = xo
    return ye, yo


@triton.jit
def _store_rotated_back(OUT, row_off, row_ok, ge, go, pos, INV_FREQ, scale, HAS_ROPE: tl.constexpr,
                        HEAD_DIM: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """OUT rows = R_pos^T (scale * g) (g as even / odd halves), one rounding to OUT's dtype."""
    ge = ge * scale
    go = go * scale
    if HAS_ROPE:
        p = tl.arange(0, BLOCK_P)
        inv_freq = tl.load(INV_FREQ + p, mask=2 * p < HEAD_DIM, other=0.0).to(tl.float32)
        c, s = _cos_sin_tile(pos, inv_freq)
        ye = ge * c + go * s
        yo = go * c - ge * s
    else:
        ye = ge
        yo = go
    y = tl.reshape(tl.join(ye, yo), [BLOCK, 2 * BLOCK_P])
    if EMULATE_RNE:
        # interpreter only: it truncates fp32 -> bf16 casts, the GPU rounds to nearest even
        y = round_to_bf16(y)
    cols = tl.arange(0, 2 * BLOCK_P)
    tl.store(OUT + (row_off[:, None] + cols[None, :]), y.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _token_ok(MASK, b, pos, L, HAS_MASK: tl.constexpr):
    ok = pos < L
    if HAS_MASK:
        ok = ok & (tl.load(MASK + (b.to(tl.int64) * L + pos), mask=ok, other=0) != 0)
    return ok


@triton.jit
def _bias(BIAS, r, pos, L, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        v = tl.load(BIAS + (r.to(tl.int64) * L + pos), mask=pos < L, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(pos.shape, dtype=tl.float32)
    return v


@triton.jit
def _lower_bound(P, lo, hi, x, ITERS: tl.constexpr):
    """First index in [lo, hi) of sorted P with P[idx] >= x (hi if none); scalar, ITERS >= bit_length(hi - lo)."""
    for _ in range(ITERS):
        active = lo < hi
        mid = lo + ((hi - lo) >> 1)
        v = tl.load(P + mid, mask=active, other=0)
        lt = v < x
        lo = tl.where(active & lt, mid + 1, lo)
        hi = tl.where(active & (v >= x), mid, hi)
    return lo


@triton.jit
def _labels(TGT, POS_IDX, r, i, j, i0, j0, L, seg_lo, seg_hi, DENSE: tl.constexpr, SEARCH_ITERS: tl.constexpr,
            BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """t (BLOCK_I, BLOCK_J) float32 of the tile's spans (i, j): dense targets, or 1 where i*L + j is listed in
    the row's segment [seg_lo, seg_hi) of pos_index, else 0."""
    if DENSE:
        ok = (i < L)[:, None] & (j < L)[None, :]
        base = r.to(tl.int64) * L * L
        t = tl.load(TGT + (base + i.to(tl.int64)[:, None] * L + j[None, :]), mask=ok, other=0.0).to(tl.float32)
    else:
        t = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        # the tile's flat spans lie in [first, last]: cut the row's segment to them
        i_last = tl.minimum(i0 + BLOCK_I, L) - 1
        j_last = tl.minimum(j0 + BLOCK_J, L) - 1
        t_lo = _lower_bound(POS_IDX, seg_lo, seg_hi, i0 * L + j0, SEARCH_ITERS)
        t_hi = _lower_bound(POS_IDX, t_lo, seg_hi, i_last * L + j_last + 1, SEARCH_ITERS)
        cnt = t_hi - t_lo
        if cnt > 0:
            flat = i[:, None] * L + j[None, :]
            a = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32) + t_lo
            b = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32) + t_hi
            for it in range(SEARCH_ITERS):
                if (cnt >> it) > 0:  # bit_length(cnt) steps in all
                    active = a < b
                    mid = a + ((b - a) >> 1)
                    v = tl.load(POS_IDX + mid, mask=active, other=0)
                    lt = v < flat
                    a = tl.where(active & lt, mid + 1, a)
                    b = tl.where(active & (v >= flat), mid, b)
            hit = a < t_hi
            v = tl.load(POS_IDX + a, mask=hit, other=-1)
            t = tl.where(hit & (v == flat), 1.0, 0.0)
    return t


@triton.jit
def _tf32(x, ROUND: tl.constexpr):
    """float32 x cut to tf32 (10 mantissa bits), still float32: ROUND nearest, ties away (cvt.rna.tf32.f32),
    else truncated (what the tensor cores read of a float32 operand)."""
    bits = x.to(tl.uint32, bitcast=True)
    if ROUND:
        bits = bits + 0x1000
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b for float32 tiles. DOT_PREC "tf32x3": three tf32 products of the operands cut into pieces
    here, big = rna(x) and small = rna(x - big) (both exact tf32 values, so the tensor cores read them
    whole, and the interpreter's float32 matmul computes the same products), summed as
    ((small_a big_b + big_a small_b) + big_a big_b) + acc: about float32 accuracy (the dropped small_a small_b
    and the rounding of small are ~2^-22 relative). Otherwise tl.dot with that input precision."""
    if DOT_PREC == "tf32x3":
        a_big = _tf32(a, True)
        b_big = _tf32(b, True)
        r = tl.dot(_tf32(a - a_big, True), b_big, input_precision="tf32")
        r = tl.dot(a_big, _tf32(b - b_big, True), acc=r, input_precision="tf32")
        r = acc + tl.dot(a_big, b_big, acc=r, input_precision="tf32")
    else:
        r = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)
    return r


@triton.jit
def _qk(Q, q_off, in_i, i, K, k_off, in_j, j, INV_FREQ, HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
        DOT_PREC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """qt_i . kt_j of a (BLOCK_I, BLOCK_J) tile, over the head dimension in chunks of BLOCK_K pairs: the q and k
    chunks are loaded and rotated here, inside the caller's loop (L1 / L2 hits), and consumed at once, so with
    more than one chunk no dot operand stays in registers across the caller's loop (with one chunk the
    compiler hoists the loop-invariant side out of it: BLOCK x d registers in all)."""
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for c0 in range(0, HEAD_DIM, 2 * BLOCK_K):
        qe, qo = _rot_chunk(Q, q_off, in_i, i, INV_FREQ, c0, HAS_ROPE, HEAD_DIM, BLOCK_I, BLOCK_K)
        ke, ko = _rot_chunk(K, k_off, in_j, j, INV_FREQ, c0, HAS_ROPE, HEAD_DIM, BLOCK_J, BLOCK_K)
        acc = _dot(qe, tl.trans(ke), acc, DOT_PREC)
        acc = _dot(qo, tl.trans(ko), acc, DOT_PREC)
    return acc


@triton.jit
def _valid(ok_i, ok_j, i, j, TRIL: tl.constexpr):
    """(BLOCK_I, BLOCK_J) bool: both ends are tokens (ok_*: in range and unmasked), and j >= i when TRIL."""
    valid = ok_i[:, None] & ok_j[None, :]
    if TRIL:
        valid = valid & (j[None, :] >= i[:, None])
    return valid


@triton.jit
def _lse_fold(m, l, v, w):
    """Folds the terms w e^v of a (rows, BLOCK) tile into the rows' running (max m, sum l): entries of weight 0
    take no part in the maximum and add exactly 0 (no log(0), no inf * 0)."""
    m_new = tl.maximum(m, tl.max(tl.where(w > 0, v, float("-inf")), 1))
    e = tl.exp(tl.where(w > 0, v - m_new[:, None], float("-inf")))
    return m_new, l * tl.exp(m - m_new) + tl.sum(w * e, 1)


@triton.jit
def _weights(s, t, ok_i, ok_j, i, j, TRIL: tl.constexpr):
    """(w_neg, w_pos): 1 - t and t on valid spans with a finite score, exactly 0 elsewhere (+inf and NaN scores,
    e.g. from infinite biases, are excluded like the masked ones, as the reference's isfinite)."""
    valid = _valid(ok_i, ok_j, i, j, TRIL) & (tl.abs(s) < float("inf"))
    w_neg = tl.where(valid, 1.0 - t, 0.0)
    w_pos = tl.where(valid, t, 0.0)
    return w_neg, w_pos


@triton.jit
def _dscores(s, w_neg, w_pos, dl, lse_neg, lse_pos):
    """ds = dloss * (w_neg e^(s - lse_neg) - w_pos e^(-s - lse_pos)); weight-0 entries are exactly 0."""
    e_neg = tl.exp(tl.where(w_neg > 0, s - lse_neg, float("-inf")))
    e_pos = tl.exp(tl.where(w_pos > 0, -s - lse_pos, float("-inf")))
    return dl * (w_neg * e_neg - w_pos * e_pos)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def gp_loss_fwd_kernel(
    PART,  # (4, B*H, NB) float32: m_neg, l_neg, m_pos, l_pos of each i-block
    Q,
    K,
    MASK,  # (B, L) bool
    START,  # (B, H, L) float32
    END,
    INV_FREQ,  # (d/2,) float32
    POS_OFF,  # (B*H + 1,) int32
    POS_IDX,  # (N,) int32
    TGT,  # (B, H, L, L)
    OUT,  # MODE "logits": logits (B, H, L, L) float32; "write": the hits' scores (N,) float32
    ROWS,  # MODE "count": hits per span row (B*H*L,) int32; "write": the rows' first hit (B*H*L,) int64
    SPANS,  # MODE "write": (N, 4) int64
    L,
    H,
    NH,  # H // Hq: types per q/k head
    NB,
    plane,  # MODE "loss": B*H*NB, the distance between PART's planes; "write": N, the number of hits (a bound)
    scale,
    threshold,  # MODE "count", "write": a hit is a valid span with float32 score > threshold (float32)
    stride_qb,
    stride_ql,
    stride_qh,
    stride_kb,
    stride_kl,
    stride_kh,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_START: tl.constexpr,
    HAS_END: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    TRIL: tl.constexpr,
    DENSE: tl.constexpr,
    SEARCH_ITERS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MODE: tl.constexpr,  # "loss" (PART), "logits" (OUT), "count" (ROWS), "write" (SPANS, OUT from ROWS)
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One i-block of a (b, h) row's span scores, by MODE: "loss" folds them into the (m, l) partials of the
    two log-sum-exps; "logits" writes them (-inf on invalid spans); "count" writes the number of hits of each
    span row i; "write" writes each hit's [b, h, i, j] and score from the rows' exclusive scan of the counts,
    in row-major order. Every mode computes a tile's scores with the same code (decode's scores are the
    logits, bit for bit, for the same block sizes)."""
    pid_i = tl.program_id(0)
    r = tl.program_id(1)
    b = r // H
    hq = (r % H) // NH
    i0 = pid_i * BLOCK_I
    i = i0 + tl.arange(0, BLOCK_I)
    in_i = i < L
    q_off = b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh + i.to(tl.int64) * stride_ql
    k_base = b.to(tl.int64) * stride_kb + hq.to(tl.int64) * stride_kh
    ok_i = _token_ok(MASK, b, i, L, HAS_MASK)
    start_i = _bias(START, r, i, L, HAS_START)
    seg_lo = 0
    seg_hi = 0
    if MODE == "loss" and not DENSE:
        seg_lo = tl.load(POS_OFF + r)
        seg_hi = tl.load(POS_OFF + r + 1)
    row_i = r.to(tl.int64) * L + i  # the flat span rows (b, h, i)

    m_neg = tl.zeros([BLOCK_I], dtype=tl.float32)  # the threshold class's score, 0
    l_neg = tl.zeros([BLOCK_I], dtype=tl.float32)
    m_pos = tl.zeros([BLOCK_I], dtype=tl.float32)
    l_pos = tl.zeros([BLOCK_I], dtype=tl.float32)
    hits = tl.zeros([BLOCK_I], dtype=tl.int32)  # "count": the hits so far
    if MODE == "write":
        nxt = tl.load(ROWS + row_i, mask=in_i, other=0)  # the output row of each span row's next hit
    else:
        nxt = tl.zeros([BLOCK_I], dtype=tl.int64)
    if TRIL:
        j_begin = (i0 // BLOCK_J) * BLOCK_J  # the tiles left of the diagonal hold no valid span
    else:
        j_begin = 0
    if MODE == "logits":
        for j0 in range(0, j_begin, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            tl.store(OUT + (row_i[:, None] * L + j[None, :]), tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32),
                     mask=in_i[:, None] & (j < L)[None, :])
    for j0 in range(j_begin, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        in_j = j < L
        qk = _qk(Q, q_off, in_i, i, K, k_base + j.to(tl.int64) * stride_kl, in_j, j, INV_FREQ, HAS_ROPE, HEAD_DIM,
                 DOT_PREC, BLOCK_I, BLOCK_J, BLOCK_K)
        s = qk * scale + start_i[:, None] + _bias(END, r, j, L, HAS_END)[None, :]
        ok_j = _token_ok(MASK, b, j, L, HAS_MASK)
        if MODE == "loss":
            t = _labels(TGT, POS_IDX, r, i, j, i0, j0, L, seg_lo, seg_hi, DENSE, SEARCH_ITERS, BLOCK_I, BLOCK_J)
            w_neg, w_pos = _weights(s, t, ok_i, ok_j, i, j, TRIL)
            # negatives: scores s, weights 1 - t; positives: scores -s, weights t
            m_neg, l_neg = _lse_fold(m_neg, l_neg, s, w_neg)
            m_pos, l_pos = _lse_fold(m_pos, l_pos, -s, w_pos)
        elif MODE == "logits":
            valid = _valid(ok_i, ok_j, i, j, TRIL)
            tl.store(OUT + (row_i[:, None] * L + j[None, :]), tl.where(valid, s, float("-inf")),
                     mask=in_i[:, None] & in_j[None, :])
        else:
            hit = _valid(ok_i, ok_j, i, j, TRIL) & (s > threshold)
            if MODE == "count":
                hits += tl.sum(hit.to(tl.int32), 1)
            else:
                h_int = hit.to(tl.int32)
                n = nxt[:, None] + (tl.cumsum(h_int, 1) - 1).to(tl.int64)  # each hit's output row
                hit = hit & (n < plane)  # never past the count pass's total
                zero = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int64)
                tl.store(SPANS + 4 * n, zero + b, mask=hit)
                tl.store(SPANS + 4 * n + 1, zero + (r % H), mask=hit)
                tl.store(SPANS + 4 * n + 2, zero + i[:, None], mask=hit)
                tl.store(SPANS + 4 * n + 3, zero + j[None, :], mask=hit)
                tl.store(OUT + n, s, mask=hit)
                nxt += tl.sum(h_int, 1).to(tl.int64)

    if MODE == "loss":
        # fold the block's rows (every m >= 0: finite)
        mn = tl.max(m_neg, 0)
        ln = tl.sum(l_neg * tl.exp(m_neg - mn), 0)
        mp = tl.max(m_pos, 0)
        lp = tl.sum(l_pos * tl.exp(m_pos - mp), 0)
        out = PART + (r * NB + pid_i)
        tl.store(out, mn)
        tl.store(out + plane, ln)
        tl.store(out + 2 * plane, mp)
        tl.store(out + 3 * plane, lp)
    elif MODE == "count":
        tl.store(ROWS + row_i, hits, mask=in_i)


@triton.jit
def gp_loss_bwd_kernel(
    DX,  # (B, L, Hq, d) contiguous: dq (FOR_Q) or dk
    DBIAS,  # (B, H, L) float32: dstart (FOR_Q) or dend
    Q,
    K,
    MASK,
    START,
    END,
    INV_FREQ,
    POS_OFF,
    POS_IDX,
    TGT,
    DLOSS,  # (B*H,) float32
    LSE_NEG,
    LSE_POS,
    DLOGITS,  # LOGITS: (B, H, L, L) float32, contiguous
    L,
    H,
    Hq,
    NH,
    scale,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_kb,
    stride_kl,
    stride_kh,
    FOR_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_START: tl.constexpr,
    HAS_END: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    TRIL: tl.constexpr,
    DENSE: tl.constexpr,
    SEARCH_ITERS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """FOR_Q: one i-block of dq (and dstart), looping over the j tiles; else one j-block of dk (and dend),
    looping over the i tiles. With Hq = 1 the program also loops over the H types. LOGITS: the logits'
    backward, ds = dlogits on the valid spans (loaded there only, 0 elsewhere; no scores recomputed), else the
    loss's."""
    pid_x = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // Hq
    hq = pid % Hq
    q_base = b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = b.to(tl.int64) * stride_kb + hq.to(tl.int64) * stride_kh
    if FOR_Q:
        i0 = pid_x * BLOCK_I
        i = i0 + tl.arange(0, BLOCK_I)
        in_i = i < L
        ok_i = _token_ok(MASK, b, i, L, HAS_MASK)
        q_off = q_base + i.to(tl.int64) * stride_ql
        if TRIL:
            lo = (i0 // BLOCK_J) * BLOCK_J
        else:
            lo = 0
        hi = L
        step = BLOCK_J
        acc_e = tl.zeros([BLOCK_I, BLOCK_P], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_I, BLOCK_P], dtype=tl.float32)
    else:
        j0 = pid_x * BLOCK_J
        j = j0 + tl.arange(0, BLOCK_J)
        in_j = j < L
        ok_j = _token_ok(MASK, b, j, L, HAS_MASK)
        k_off = k_base + j.to(tl.int64) * stride_kl
        lo = 0
        if TRIL:
            hi = tl.minimum(j0 + BLOCK_J, L)  # spans need i <= j
        else:
            hi = L
        step = BLOCK_I
        acc_e = tl.zeros([BLOCK_J, BLOCK_P], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_J, BLOCK_P], dtype=tl.float32)

    for hh in range(NH):
        r = b * H + hq * NH + hh
        dl = 0.0
        lse_neg = 0.0
        lse_pos = 0.0
        if not LOGITS:
            dl = tl.load(DLOSS + r)
            lse_neg = tl.load(LSE_NEG + r)
            lse_pos = tl.load(LSE_POS + r)
        seg_lo = 0
        seg_hi = 0
        if not LOGITS and not DENSE:
            seg_lo = tl.load(POS_OFF + r)
            seg_hi = tl.load(POS_OFF + r + 1)
        if FOR_Q:
            start_i = _bias(START, r, i, L, HAS_START)
            dbias = tl.zeros([BLOCK_I], dtype=tl.float32)
        else:
            end_j = _bias(END, r, j, L, HAS_END)
            dbias = tl.zeros([BLOCK_J], dtype=tl.float32)
        for x0 in range(lo, hi, step):
            if FOR_Q:
                j0 = x0
                j = j0 + tl.arange(0, BLOCK_J)
                in_j = j < L
                ok_j = _token_ok(MASK, b, j, L, HAS_MASK)
                k_off = k_base + j.to(tl.int64) * stride_kl
                end_j = _bias(END, r, j, L, HAS_END)
            else:
                i0 = x0
                i = i0 + tl.arange(0, BLOCK_I)
                in_i = i < L
                ok_i = _token_ok(MASK, b, i, L, HAS_MASK)
                q_off = q_base + i.to(tl.int64) * stride_ql
                start_i = _bias(START, r, i, L, HAS_START)
            if LOGITS:
                valid = _valid(ok_i, ok_j, i, j, TRIL)
                ds = tl.load(DLOGITS + ((r.to(tl.int64) * L + i)[:, None] * L + j[None, :]), mask=valid,
                             other=0.0).to(tl.float32)
            else:
                qk = _qk(Q, q_off, in_i, i, K, k_off, in_j, j, INV_FREQ, HAS_ROPE, HEAD_DIM, DOT_PREC, BLOCK_I,
                         BLOCK_J, BLOCK_K)
                s = qk * scale + start_i[:, None] + end_j[None, :]
                t = _labels(TGT, POS_IDX, r, i, j, i0, j0, L, seg_lo, seg_hi, DENSE, SEARCH_ITERS, BLOCK_I, BLOCK_J)
                w_neg, w_pos = _weights(s, t, ok_i, ok_j, i, j, TRIL)
                ds = _dscores(s, w_neg, w_pos, dl, lse_neg, lse_pos)
            if FOR_Q:
                # the whole rotated k rows (BLOCK_J, d): reloaded (L1 hit), the chunks of _qk are gone
                ye, yo = _rot_chunk(K, k_off, in_j, j, INV_FREQ, 0, HAS_ROPE, HEAD_DIM, BLOCK_J, BLOCK_P)
                acc_e = _dot(ds, ye, acc_e, DOT_PREC)
                acc_o = _dot(ds, yo, acc_o, DOT_PREC)
                dbias += tl.sum(ds, 1)
            else:
                ye, yo = _rot_chunk(Q, q_off, in_i, i, INV_FREQ, 0, HAS_ROPE, HEAD_DIM, BLOCK_I, BLOCK_P)
                dst = tl.trans(ds)
                acc_e = _dot(dst, ye, acc_e, DOT_PREC)
                acc_o = _dot(dst, yo, acc_o, DOT_PREC)
                dbias += tl.sum(ds, 0)
        if FOR_Q:
            if HAS_START:
                tl.store(DBIAS + (r.to(tl.int64) * L + i), dbias, mask=in_i)
        else:
            if HAS_END:
                tl.store(DBIAS + (r.to(tl.int64) * L + j), dbias, mask=in_j)

    if FOR_Q:
        dx_off = ((b.to(tl.int64) * L + i.to(tl.int64)) * Hq + hq) * HEAD_DIM
        _store_rotated_back(DX, dx_off, in_i, acc_e, acc_o, i, INV_FREQ, scale, HAS_ROPE, HEAD_DIM, EMULATE_RNE,
                            BLOCK_I, BLOCK_P)
    else:
        dx_off = ((b.to(tl.int64) * L + j.to(tl.int64)) * Hq + hq) * HEAD_DIM
        _store_rotated_back(DX, dx_off, in_j, acc_e, acc_o, j, INV_FREQ, scale, HAS_ROPE, HEAD_DIM, EMULATE_RNE,
                            BLOCK_J, BLOCK_P)


@triton.jit
def gp_mlce_kernel(
    PART,  # forward: (4, R) float32, the row's m_neg, l_neg, m_pos, l_pos
    DX,  # backward: (R, C), x's dtype
    X,  # (R, C) contiguous
    TGT,  # DENSE: (R, C) float32
    POS,  # else: (R, P) int64, a set of classes in [0, C)
    DLOSS,  # backward: (R,) float32
    LSE_NEG,
    LSE_POS,
    R,
    C,
    P,
    BACKWARD: tl.constexpr,
    DENSE: tl.constexpr,
    MASK_ZERO: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_PP: tl.constexpr,
):
    """The multi-label categorical cross-entropy of one row of materialised logits x (R, C), over the classes in
    blocks of BLOCK_C as (1, BLOCK_C) tiles: forward, the online log-sum-exps of the loss kernel (_lse_fold),
    starting from the threshold class (m = 0, l = 0, its 1 added in the combine); backward, dx = _dscores.
    Non-finite x (and class 0 under MASK_ZERO) take no part. Positives: a class is one when it equals one of
    the row's P indices (compared in blocks of BLOCK_PP; duplicates count once)."""
    r = tl.program_id(0)
    row = r.to(tl.int64) * C
    m_neg = tl.zeros([1], dtype=tl.float32)
    l_neg = tl.zeros([1], dtype=tl.float32)
    m_pos = tl.zeros([1], dtype=tl.float32)
    l_pos = tl.zeros([1], dtype=tl.float32)
    dl = 0.0
    lse_neg = 0.0
    lse_pos = 0.0
    if BACKWARD:
        dl = tl.load(DLOSS + r)
        lse_neg = tl.load(LSE_NEG + r)
        lse_pos = tl.load(LSE_POS + r)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        x = tl.load(X + (row + c), mask=in_c, other=0.0).to(tl.float32)[None, :]
        if DENSE:
            t = tl.load(TGT + (row + c), mask=in_c, other=0.0).to(tl.float32)[None, :]
        else:
            t = tl.zeros([1, BLOCK_C], dtype=tl.float32)
            for p0 in range(0, P, BLOCK_PP):
                pp = p0 + tl.arange(0, BLOCK_PP)
                pv = tl.load(POS + (r.to(tl.int64) * P + pp), mask=pp < P, other=-1)
                member = tl.max((c.to(tl.int64)[:, None] == pv[None, :]).to(tl.int32), 1)
                t = tl.where(member[None, :] > 0, 1.0, t)
        ok = in_c
        if MASK_ZERO:
            ok = ok & (c != 0)  # class 0 is no class (and index 0 in the positives adds nothing)
        valid = ok[None, :] & (tl.abs(x) < float("inf"))
        w_neg = tl.where(valid, 1.0 - t, 0.0)
        w_pos = tl.where(valid, t, 0.0)
        if BACKWARD:
            dx = _dscores(x, w_neg, w_pos, dl, lse_neg, lse_pos)
            if EMULATE_RNE:
                dx = round_to_bf16(dx)
            tl.store(DX + (row + c)[None, :], dx.to(DX.dtype.element_ty), mask=in_c[None, :])
        else:
            m_neg, l_neg = _lse_fold(m_neg, l_neg, x, w_neg)
            m_pos, l_pos = _lse_fold(m_pos, l_pos, -x, w_pos)
    if not BACKWARD:
        z = tl.zeros([1], dtype=tl.int64)
        tl.store(PART + (z + r), m_neg)
        tl.store(PART + (z + R + r), l_neg)
        tl.store(PART + (z + 2 * R + r), m_pos)
        tl.store(PART + (z + 3 * R + r), l_pos)


# ----------------------------------------------------------------------------------------------
# launchers

# The interpreter (TRITON_INTERPRET=1, decided when @triton.jit runs) truncates fp32 -> bf16 casts.
_INTERPRETED = not isinstance(gp_loss_fwd_kernel, triton.runtime.jit.JITFunction)

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _blocks(kind: str, block_p: int):
    """(BLOCK_I, BLOCK_J, BLOCK_K, num_warps) of a kernel."""
    if _INTERPRETED:
        bs = TUNING["interpret_block"]
        return bs, bs, bs, 1
    return TUNING[kind][block_p]


class _Args:
    """The normalised arguments checked and turned into kernel arguments (dummies for absent tensors)."""

    def __init__(self, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets=None, pos_index=None,
                 targets=None, labels=True):
        if q.dtype not in _SUPPORTED or k.dtype != q.dtype:
            raise ValueError(f"global_pointer (triton): unsupported dtypes {q.dtype}, {k.dtype}; supported: "
                             "float16, bfloat16, float32 (the same for q and k)")
        if q.dim() != 4 or k.shape != q.shape:
            raise ValueError("global_pointer (triton): q and k must be (B, L, Hq, d) of the same shape")
        B, L, Hq, d = q.shape
        H = int(H)
        if Hq != H and not (Hq == 1 and H >= 1):
            raise ValueError(f"global_pointer (triton): Hq = {Hq} must be H = {H} or 1")
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("global_pointer (triton): q and k need a unit last stride")
        if d < 1 or d > 256 or (inv_freq is not None and d % 2):
            raise ValueError(f"global_pointer (triton): head size {d} (1..256, even with RoPE)")
        if labels and (pos_offsets is None) == (targets is None):
            raise ValueError("global_pointer (triton): give exactly one label form (pos_offsets/pos_index or targets)")
        self.B, self.L, self.Hq, self.d, self.H = B, L, Hq, d, H
        self.NH = H // Hq
        self.scale = float(scale)
        self.tril = bool(tril)
        self.q, self.k = q, k
        dummy = q
        self.has_mask = mask is not None
        if self.has_mask:
            self.mask = (mask if mask.dtype == torch.bool else mask != 0).contiguous()
        else:
            self.mask = dummy
        self.has_start, self.has_end = start_bias is not None, end_bias is not None
        self.start = start_bias.contiguous() if self.has_start else dummy
        self.end = end_bias.contiguous() if self.has_end else dummy
        self.has_rope = inv_freq is not None
        if self.has_rope and (inv_freq.dtype != torch.float32 or inv_freq.numel() != d // 2):
            raise ValueError("global_pointer (triton): inv_freq must be a float32 vector of d/2 entries")
        self.inv_freq = inv_freq.contiguous() if self.has_rope else dummy
        self.dense = targets is not None
        if not labels:  # the scores only (logits, decode): no labels read
            self.targets = self.pos_off = self.pos_idx = dummy
            self.search_iters = 1
        elif self.dense:
            self.targets = targets.contiguous()
            self.pos_off = self.pos_idx = dummy
            self.search_iters = 1
        else:
            self.targets = dummy
            self.pos_off = pos_offsets.to(torch.int32).contiguous()
            n = pos_index.numel()
            # an empty pos_index is never read (every segment is empty): any int32 pointer will do
            self.pos_idx = pos_index.to(torch.int32).contiguous() if n else self.pos_off
            # binary-search steps: bit_length of the longest possible segment (31 for a symbolic size)
            self.search_iters = max(1, n.bit_length()) if isinstance(n, int) else 31
        self.block_p = max(16, _pow2((d + 1) // 2))

    def kernel_args(self):
        return (self.q, self.k, self.mask, self.start, self.end, self.inv_freq, self.pos_off, self.pos_idx,
                self.targets)

    def strides(self):
        return (*self.q.stride()[:3], *self.k.stride()[:3])

    def constexprs(self):
        return dict(HEAD_DIM=self.d, HAS_MASK=self.has_mask, HAS_START=self.has_start, HAS_END=self.has_end,
                    HAS_ROPE=self.has_rope, TRIL=self.tril, DENSE=self.dense, SEARCH_ITERS=self.search_iters,
                    DOT_PREC=TUNING["dot_precision"], BLOCK_P=self.block_p)


def _combine(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_k l_k e^(m_k)) of the (rows, blocks) partials, in float64 (every m_k >= 0)."""
    m, l = m.double(), l.double()
    M = m.amax(1)
    return M + torch.log(torch.exp(-M) + (l * torch.exp(m - M[:, None])).sum(1))


def loss_forward(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets,
                 traceable=True):
    """(loss, lse_neg, lse_pos), each (B, H) float32: the contract's global_pointer_loss."""
    a = _Args(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets)
    B, L, H = a.B, a.L, a.H
    if B * H == 0 or L == 0:
        z = torch.zeros(B, H, dtype=torch.float32, device=q.device)
        return z, z.clone(), z.clone()
    BLOCK_I, BLOCK_J, BLOCK_K, num_warps = _blocks("fwd", a.block_p)
    NB = triton.cdiv(L, BLOCK_I)
    part = torch.empty(4, B * H, NB, dtype=torch.float32, device=q.device)
    kernel = torch.library.wrap_triton(gp_loss_fwd_kernel) if traceable else gp_loss_fwd_kernel
    kernel[(NB, B * H)](
        part, *a.kernel_args(), part, part, part, L, H, a.NH, NB, B * H * NB, a.scale, 0.0, *a.strides(),
        **a.constexprs(), MODE="loss", BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_K=min(BLOCK_K, a.block_p),
        num_warps=num_warps, num_stages=TUNING["num_stages"])
    lse_neg = _combine(part[0], part[1])
    lse_pos = _combine(part[2], part[3])
    loss = (lse_neg + lse_pos).float().view(B, H)
    return loss, lse_neg.float().view(B, H), lse_pos.float().view(B, H)


def loss_backward(dloss, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index,
                  targets, lse_neg, lse_pos, traceable=True):
    """(dq, dk, dstart_bias, dend_bias): the contract's global_pointer_loss_backward."""
    a = _Args(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets)
    B, L, Hq, d, H = a.B, a.L, a.Hq, a.d, a.H
    dq = torch.empty((B, L, Hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, L, Hq, d), dtype=k.dtype, device=k.device)
    # distinct empties when a bias is None: an op's outputs never alias one another
    dstart = torch.empty((B, H, L) if a.has_start else (0,), dtype=torch.float32, device=q.device)
    dend = torch.empty((B, H, L) if a.has_end else (0,), dtype=torch.float32, device=q.device)
    if B * H == 0 or L == 0:
        return dq.zero_(), dk.zero_(), dstart.zero_(), dend.zero_()
    dloss = dloss.to(torch.float32).contiguous()
    lse_neg = lse_neg.to(torch.float32).contiguous()
    lse_pos = lse_pos.to(torch.float32).contiguous()
    tail = (dloss, lse_neg, lse_pos, dloss, L, H, Hq, a.NH, a.scale, *a.strides())
    cx = dict(a.constexprs(), EMULATE_RNE=_INTERPRETED and q.dtype == torch.bfloat16, LOGITS=False)
    dummy = a.q

    kernel = torch.library.wrap_triton(gp_loss_bwd_kernel) if traceable else gp_loss_bwd_kernel
    for for_q, out, dbias in ((True, dq, dstart if a.has_start else dummy), (False, dk, dend if a.has_end else dummy)):
        BLOCK_I, BLOCK_J, BLOCK_K, num_warps = _blocks("bwd_dq" if for_q else "bwd_dk", a.block_p)
        kernel[(triton.cdiv(L, BLOCK_I if for_q else BLOCK_J), B * Hq)](
            out, dbias, *a.kernel_args(), *tail, FOR_Q=for_q, **cx, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
            BLOCK_K=min(BLOCK_K, a.block_p), num_warps=num_warps, num_stages=TUNING["num_stages"])
    return dq, dk, dstart, dend


def _launch_scores(a, mode, out, rows, spans, threshold, traceable, n=0):
    """gp_loss_fwd_kernel in a scores mode ("logits", "count", "write": n hits) over grid (i-blocks, B*H), with
    the forward's block sizes in every mode (decode's scores are the logits' bits)."""
    BLOCK_I, BLOCK_J, BLOCK_K, num_warps = _blocks("fwd", a.block_p)
    NB = triton.cdiv(a.L, BLOCK_I)
    kernel = torch.library.wrap_triton(gp_loss_fwd_kernel) if traceable else gp_loss_fwd_kernel
    kernel[(NB, a.B * a.H)](
        out, *a.kernel_args(), out, rows, spans, a.L, a.H, a.NH, NB, n, a.scale, threshold, *a.strides(),
        **a.constexprs(), MODE=mode, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_K=min(BLOCK_K, a.block_p),
        num_warps=num_warps, num_stages=TUNING["num_stages"])


def logits_forward(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, traceable=True):
    """The span logits (B, H, L, L) float32, -inf on invalid spans: the contract's global_pointer."""
    a = _Args(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, labels=False)
    out = torch.empty((a.B, a.H, a.L, a.L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    _launch_scores(a, "logits", out, out, out, 0.0, traceable)
    return out


def logits_backward(dlogits, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, traceable=True):
    """(dq, dk, dstart_bias, dend_bias): the contract's global_pointer_backward (ds = dlogits on valid spans, 0
    elsewhere: invalid positions are never read)."""
    a = _Args(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, labels=False)
    B, L, Hq, d, H = a.B, a.L, a.Hq, a.d, a.H
    dq = torch.empty((B, L, Hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, L, Hq, d), dtype=k.dtype, device=k.device)
    dstart = torch.empty((B, H, L) if a.has_start else (0,), dtype=torch.float32, device=q.device)
    dend = torch.empty((B, H, L) if a.has_end else (0,), dtype=torch.float32, device=q.device)
    if B * H == 0 or L == 0:
        return dq.zero_(), dk.zero_(), dstart.zero_(), dend.zero_()
    dlogits = dlogits.to(torch.float32).contiguous()
    dummy = a.q
    tail = (dlogits, dlogits, dlogits, dlogits, L, H, Hq, a.NH, a.scale, *a.strides())
    cx = dict(a.constexprs(), EMULATE_RNE=_INTERPRETED and q.dtype == torch.bfloat16, LOGITS=True)
    kernel = torch.library.wrap_triton(gp_loss_bwd_kernel) if traceable else gp_loss_bwd_kernel
    for for_q, out, dbias in ((True, dq, dstart if a.has_start else dummy), (False, dk, dend if a.has_end else dummy)):
        BLOCK_I, BLOCK_J, BLOCK_K, num_warps = _blocks("bwd_dq" if for_q else "bwd_dk", a.block_p)
        kernel[(triton.cdiv(L, BLOCK_I if for_q else BLOCK_J), B * Hq)](
            out, dbias, *a.kernel_args(), *tail, FOR_Q=for_q, **cx, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
            BLOCK_K=min(BLOCK_K, a.block_p), num_warps=num_warps, num_stages=TUNING["num_stages"])
    return dq, dk, dstart, dend


def decode(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, threshold, traceable=True):
    """(spans (N, 4) int64 [b, h, i, j] in row-major order, scores (N,) float32): every valid span whose float32
    logit exceeds float32(threshold), the contract's global_pointer_decode. Two passes of the scores kernel:
    hits per span row, an exclusive scan (torch.cumsum) and one host read of the total, then the writes."""
    a = _Args(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, labels=False)
    B, L, H = a.B, a.L, a.H
    dev = q.device
    if B * H == 0 or L == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.float32, device=dev)
    thr = float(torch.tensor(float(threshold), dtype=torch.float32))  # the threshold rounded as the logits are
    counts = torch.zeros(B * H * L, dtype=torch.int32, device=dev)
    _launch_scores(a, "count", counts, counts, counts, thr, traceable)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    n = int(ends[-1].item())
    first = ends - counts
    spans = torch.empty((n, 4), dtype=torch.int64, device=dev)
    scores = torch.empty(n, dtype=torch.float32, device=dev)
    if n:
        _launch_scores(a, "write", scores, first, spans, thr, traceable, n)
    return spans, scores


def _mlce_args(x, targets, positives, mask_zero):
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"multilabel_categorical_crossentropy (triton): unsupported dtype {x.dtype}; supported: "
                         "float16, bfloat16, float32")
    if x.dim() != 2:
        raise ValueError("multilabel_categorical_crossentropy (triton): x must be (R, C)")
    if (targets is None) == (positives is None):
        raise ValueError("multilabel_categorical_crossentropy (triton): give exactly one of targets, positives")
    x = x.contiguous()
    R, C = x.shape
    dense = targets is not None
    if dense:
        if targets.shape != x.shape:
            raise ValueError("multilabel_categorical_crossentropy (triton): targets must be x's shape (R, C)")
        tgt, pos, P = targets.to(torch.float32).contiguous(), x, 0
    else:
        if positives.dim() != 2 or positives.shape[0] != R:
            raise ValueError("multilabel_categorical_crossentropy (triton): positives must be (R, P)")
        P = positives.shape[1]
        tgt = x
        # an empty positives tensor is never read: any pointer will do
        pos = positives.to(torch.int64).contiguous() if positives.numel() else x
    BLOCK_C, BLOCK_PP, num_warps = TUNING["mlce"] if not _INTERPRETED else (TUNING["interpret_block"], 4, 1)
    if isinstance(C, int):  # a symbolic C (tracing) keeps the table's block
        BLOCK_C = min(BLOCK_C, max(16, _pow2(C)))
    cx = dict(DENSE=dense, MASK_ZERO=bool(mask_zero) and not dense, BLOCK_C=BLOCK_C,
              BLOCK_PP=BLOCK_PP, num_warps=num_warps)
    return x, tgt, pos, R, C, P, cx


def mlce_forward(x, targets, positives, mask_zero, traceable=True):
    """(loss, lse_neg, lse_pos), each (R,) float32: the contract's multilabel_categorical_crossentropy on x (R, C)
    with dense targets (R, C) or positives (R, P) (a set; mask_zero: class 0 is no class)."""
    x, tgt, pos, R, C, P, cx = _mlce_args(x, targets, positives, mask_zero)
    if R == 0:
        z = torch.zeros(0, dtype=torch.float32, device=x.device)
        return z, z.clone(), z.clone()
    part = torch.empty(4, R, dtype=torch.float32, device=x.device)
    kernel = torch.library.wrap_triton(gp_mlce_kernel) if traceable else gp_mlce_kernel
    kernel[(R,)](part, x, x, tgt, pos, part, part, part, R, C, P, BACKWARD=False, EMULATE_RNE=False, **cx)
    lse_neg = _combine(part[0][:, None], part[1][:, None])
    lse_pos = _combine(part[2][:, None], part[3][:, None])
    return (lse_neg + lse_pos).float(), lse_neg.float(), lse_pos.float()


def mlce_backward(dloss, x, targets, positives, mask_zero, lse_neg, lse_pos, traceable=True):
    """dx (x's shape and dtype) = dloss_r ((1 - t) e^(x - lse_neg) - t e^(-x - lse_pos)), 0 at non-finite x (and
    class 0 under mask_zero): the contract's multilabel_categorical_crossentropy_backward."""
    x, tgt, pos, R, C, P, cx = _mlce_args(x, targets, positives, mask_zero)
    dx = torch.empty((R, C), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    dloss = dloss.to(torch.float32).contiguous()
    lse_neg = lse_neg.to(torch.float32).contiguous()
    lse_pos = lse_pos.to(torch.float32).contiguous()
    kernel = torch.library.wrap_triton(gp_mlce_kernel) if traceable else gp_mlce_kernel
    kernel[(R,)](dloss, dx, x, tgt, pos, dloss, lse_neg, lse_pos, R, C, P, BACKWARD=True,
                 EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16, **cx)
    return dx
