"""Triton linear attention: chunkwise-parallel forward and backward, and the decoding step.

Semantics: docs/linear_attention_kernel_contract.md (the reference, pyext/reference/linear_attention.py,
is the specification). This module imports only torch, triton and the RoPE kernel module (it is installed
as ``kxops.triton_kernels``). Launchers (plain functions on the contract's normalised arguments; every
output is preallocated by the caller, contiguous, and filled; nothing is returned):

    linear_attention_fwd(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                         normalize, eps, causal, out, S_out, z_out, traceable=True) -> None
        out (B, T, H, Dv) q.dtype; S_out (N, H, F, Dv), z_out (N, H, F) float32.
    linear_attention_bwd(dout, dS, dz, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved,
                         feature_map, scale, normalize, eps, causal, dq, dk, dv, dS0, dz0, traceable=True) -> None
        dq, dk (B, T, H, Dk), dv (B, T, H, Dv) q.dtype; dS0 (N, H, F, Dv), dz0 (N, H, F) float32.
    linear_attention_step(q, k, v, S, z, feature_map, scale, normalize, eps, out, S_new, z_new,
                          traceable=True) -> None
        out (B, H, Dv) q.dtype; S_new (B, H, F, Dv), z_new (B, H, F) float32.

q, k (B, T, H, Dk), v (B, T, H, Dv): any strides on B, T, H, unit last stride; fp16, bf16 or fp32.
S0/z0, dS/dz: None or contiguous float32. feature_map is the contract's int (0 identity, 1 elu1, 2 relu,
3 taylor). traceable: launch through torch.library.wrap_triton (inside a triton_op, for torch.compile and
export); False launches directly (eager, real tensors). CPU tensors work under TRITON_INTERPRET=1.

Design (per sequence n and head h; F = Dk, or Dk + 1 for taylor, whose constant feature is kept apart):
- Chunkwise-parallel form: chunks of BLOCK_C tokens. Inside a chunk the masked (Q K^T) V, Q S_prev and
  the state update K^T V are tl.dot tile products; the state S (F x BLOCK_V) and z are carried across
  the chunks in registers. Feature maps, the scale, RoPE (angles from positions * inv_freq with
  rope.py's Cody-Waite reduction) and the normalisation (den = fq . z_t, z_t a cumulative sum on
  registers) are fused; out is written once.
- Feature tiles are two halves (C, BLOCK_H): RoPE pairs (f[i], f[i + Dk/2]) or (f[2i], f[2i+1]) sit in
  the same column of the two halves, so the rotation (and its transpose in the backward) is elementwise on
  registers, with no permutation and no second pass; every feature product is a sum of two tl.dot. Without
  RoPE the halves are the columns [0, BLOCK_H) and [BLOCK_H, 2 BLOCK_H).
- Precision (the project's rule: within 2x the reference's own error plus a floor of about one ulp, also
  for the float32 states of bf16 inputs): bf16 runs on bf16 tensor cores, fp16 on tf32 ones (the state
  and 1/(den + eps) leave the fp16 range); a float32 operand is cut into leading-bit pieces, exactly
  representable, one product each (_mm): 3 pieces (exact products) wherever the result feeds a float32
  output (S, z, dS0, dz0, and gd, which feeds dz0), 2 where it feeds out/dq/dk/dv; v, dout and
  identity/relu features without RoPE are exact in the input dtype and stay whole (and in that dtype:
  RAW). float32 inputs compute in float64 (the rule leaves no room for a float32 reassociation) and
  round once. Elementwise math (feature maps, z_t, den) is float32 / float64, exact like the reference.
- Sequence-level parallelism: B * H (times the Dv blocks) programs are often fewer than the SMs (B2 H16:
  32), so a sequence is cut into NSEG segments of whole chunks (per-sequence segment lengths computed
  in-kernel from cu_seqlens: no host sync). A state pass sums rk v^T and phi(k) per segment, a tiny scan
  turns the sums into each segment's start state (and the final state), then every segment runs
  independently. NSEG = 1 when there are enough programs (no extra pass).
- Global (non-causal) form: state pass + scan give the totals, then every chunk is one Q S product.
- Backward (all recomputed from the inputs; O(T) scratch per head: a_t = 1/(den_t + eps), gd_t): a forward
  pass per segment rebuilds S_t, z_t and gives dq, a, gd and the segment's sums of rq gn^T and gd fq; a
  reverse scan over segments gives each segment's end G and Gz (and dS0, dz0); a reverse pass per segment
  rebuilds G_t, Gz_t and gives dk, dv. Dv is split into BLOCK_V blocks inside a backward program (an
  outer loop); the dq/dk parts of the blocks (the backward is linear in them) go through a scratch, only
  when Dv > BLOCK_V.
- Memory: O(T (Dk + Dv)) plus one F x Dv state per segment (accumulation dtype).
- Block sizes from plain-Python heuristics (TUNING), no autotune (it fails in the interpreter).
"""

import torch
import triton
import triton.language as tl

from .rope import cos_sin, round_to_bf16

__all__ = ["linear_attention_fwd", "linear_attention_bwd", "linear_attention_step", "TUNING"]

# Launch parameters (plain-Python heuristics; no autotune: it fails in the interpreter), chosen from the
# sm_90 compile (ptxas -v registers and spills; no GPU timing yet) of the benchmark cases, bf16 D=128:
#   identity, unnormalised: forward 208 registers, no spill; backward dq 32, dkv 248 bytes of spill;
#   elu1, normalised (chunks of 32 / 16): forward 254 registers, no spill; backward dq 180, dkv 8 bytes.
# "mapped" features (elu1, taylor, or RoPE) keep float32 feature tiles and exact 3-piece products: smaller
# chunks. Tests override them (e.g. all chunks 16, block_v_* 16, segments 2) to reach the multi-chunk,
# multi-block and multi-segment paths with tiny shapes in the interpreter.
TUNING = {
    "chunk_fwd": 64,  # tokens per chunk, identity/relu without RoPE (tl.dot tiles of C x C x BLOCK_H)
    "chunk_fwd_mapped": 32,
    "chunk_bwd": 32,  # the backward holds more tiles per chunk
    "chunk_bwd_mapped": 16,
    "block_v_fwd": 64,  # Dv block per forward program (more programs; the C x C product is recomputed)
    "block_v_bwd": 64,  # Dv block inside a backward program (Dv <= 64: no dq/dk partial-sum scratch)
    "num_warps_fwd": 8,
    "num_warps_bwd": 8,
    "num_stages": 2,  # software pipelining of the chunk loop's loads (3: more shared memory)
    # float32 inputs compute in float64 (tiles twice as wide): at most these, or D = 256 needs more than
    # the 227 KiB of shared memory a CTA may have
    "chunk_fp32": 16,
    "block_v_fp32": 32,
    "num_stages_fp32": 1,
    "segments": None,  # None: heuristic (fill the SMs); an int forces the segment count
    "min_chunks_per_segment": 4,  # a segment shorter than this does not pay for its state pass
    "waves": 2,  # target programs = waves * SM count
    # pieces of the float32 operands (the state, G, the C x C products) of the products that only feed
    # q-dtype outputs (out, dq, dk, dv): 2 (about 2^-17 relative). 1 (one bf16 rounding, as flash-linear-
    # attention does) breaks the project's rule (2x the reference's own error + 1.6e-2) in 8 of 48 bf16
    # cases of the interpreter matrix; a speed knob only. Products feeding float32 outputs (S, z, dS0, dz0
    # and gd) are always exact (3 pieces); fp16 runs on tf32 (10-bit truncation), also for the features.
    "out_pieces_bf16": 2,
    "out_pieces_fp16": 2,
}


# ----------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _acc(x, ACC64: tl.constexpr):
    """x in the accumulation dtype: float64 for float32 inputs (the project's float32 rule allows about
    the reference's own rounding error: any reassociation in float32 costs a few ulp, so the float32 path
    computes in float64 and rounds once), else float32."""
    if ACC64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _rcp(x):
    # IEEE-rounded 1/x (div.rn; the float32 "/" is approximate on GPU): 1/(den + eps) and 1/|x| round like
    # the reference's divisions. float64 division is IEEE already.
    if x.dtype == tl.float64:
        r = 1.0 / x
    else:
        r = tl.math.div_rn(tl.zeros_like(x) + 1.0, x)
    return r


@triton.jit
def _norm(x1, x2):
    """|x| over the two halves (C,), IEEE-rounded square root."""
    n2 = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)
    if n2.dtype == tl.float64:
        n = tl.sqrt(n2)
    else:
        n = tl.sqrt_rn(n2)
    return n


@triton.jit
def _operand(x, DOT_MODE: tl.constexpr, EMULATE: tl.constexpr):
    """A tile (float32, or exact in the input dtype) as a tl.dot operand: DOT_MODE 0 fp32 (ieee), 1 bf16,
    2 tf32. EMULATE (interpreter): float32 values rounded like the GPU's operands (bf16 nearest-even, tf32
    truncated: the worst case)."""
    if DOT_MODE == 1:
        if EMULATE:
            y = round_to_bf16(x.to(tl.float32))
        else:
            y = x.to(tl.bfloat16)
    elif DOT_MODE == 2:
        if EMULATE:
            y = _lead(x.to(tl.float32), DOT_MODE)
        else:
            y = x.to(tl.float32)  # fp16 operands (RAW features, v, dout) join float32 ones
    else:
        y = x
    return y


@triton.jit
def _lead(x, DOT_MODE: tl.constexpr):
    """The leading bits of float32 x that the dot operand type holds exactly (bf16 8, tf32 11 bits)."""
    if DOT_MODE == 1:
        y = (x.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        y = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return y


@triton.jit
def _dot(a, b, acc, DOT_MODE: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b for float32 tiles, float32 accumulation, on the dot unit of DOT_MODE."""
    a = _operand(a, DOT_MODE, EMULATE)
    b = _operand(b, DOT_MODE, EMULATE)
    if EMULATE or DOT_MODE == 0:
        r = tl.dot(a, b, acc=acc, input_precision="ieee")
    elif DOT_MODE == 2:
        r = tl.dot(a, b, acc=acc, input_precision="tf32")
    else:
        r = tl.dot(a, b, acc=acc)
    return r


@triton.jit
def _pieces(x, PIECES: tl.constexpr, DOT_MODE: tl.constexpr):
    """x = x1 + x2 + x3, leading-bit pieces for the dot unit: PIECES 2: x2 is the rest (rounded once more
    as an operand: about 2^-17 relative in bf16); 3: exact (bf16 8 + 8 + 8 bits, tf32 11 + 11 + 2)."""
    x2 = 0.0
    x3 = 0.0
    if PIECES == 1:
        x1 = x
    else:
        x1 = _lead(x, DOT_MODE)
        x2 = x - x1
        if PIECES == 3:
            x3 = x2
            x2 = _lead(x3, DOT_MODE)
            x3 = x3 - x2
    return x1, x2, x3


@triton.jit
def _mm(a, b, A_PIECES: tl.constexpr, B_PIECES: tl.constexpr, DOT_MODE: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b (accumulation-dtype tiles), each operand cut into A_PIECES / B_PIECES pieces for the bf16/tf32
    tensor cores: products a_i b_j down to 2^-16 (3 pieces) or 2^-8 (2) relative, exact, accumulated in
    float32, small terms first. Every piece product is one more tensor-core product: only the operands
    that feed float32 outputs (states, their gradients, gd) are cut in 3, an operand exact in the input
    dtype (v, dout, identity/relu features) stays whole. DOT_MODE 0 (fp32 inputs): one product."""
    if DOT_MODE == 0 or (A_PIECES == 1 and B_PIECES == 1):
        r = _dot(a, b, None, DOT_MODE, EMULATE)
    else:
        a1, a2, a3 = _pieces(a, A_PIECES, DOT_MODE)
        b1, b2, b3 = _pieces(b, B_PIECES, DOT_MODE)
        r = tl.zeros((a.shape[0], b.shape[1]), dtype=tl.float32)
        if A_PIECES == 3 or B_PIECES == 3:
            if A_PIECES == 3:
                r = _dot(a3, b1, r, DOT_MODE, EMULATE)
            if B_PIECES == 3:
                r = _dot(a1, b3, r, DOT_MODE, EMULATE)
            if A_PIECES >= 2 and B_PIECES >= 2:
                r = _dot(a2, b2, r, DOT_MODE, EMULATE)
        if A_PIECES >= 2:
            r = _dot(a2, b1, r, DOT_MODE, EMULATE)
        if B_PIECES >= 2:
            r = _dot(a1, b2, r, DOT_MODE, EMULATE)
        r = _dot(a1, b1, r, DOT_MODE, EMULATE)
    return r


@triton.jit
def _store_lp(PTR, x, mask, EMULATE_RNE: tl.constexpr):
    """Store float32 x in PTR's dtype, one rounding (nearest-even also in the interpreter)."""
    if EMULATE_RNE:
        x = round_to_bf16(x)
    tl.store(PTR, x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _program_ids(pid, nseg, nheads, NV: tl.constexpr):
    # one flat grid axis (axis 0 allows 2^31 programs; y/z stop at 65535 heads * sequences);
    # the Dv block varies fastest so that the programs sharing q/k tiles run together (L2 hits).
    vb = pid % NV
    rest = pid // NV
    seg = rest % nseg
    nh = rest // nseg
    return vb, seg, nh, nh // nheads, nh % nheads


@triton.jit
def _sequence(CU_SEQLENS, n, seqlen, IS_VARLEN: tl.constexpr):
    """(batch row, first token, length) of sequence n (int64)."""
    if IS_VARLEN:
        bos = tl.load(CU_SEQLENS + n).to(tl.int64)
        length = tl.load(CU_SEQLENS + n + 1).to(tl.int64) - bos
        b = n * 0
    else:
        bos = n * 0
        length = bos + seqlen
        b = n
    return b, bos, length


@triton.jit
def _segment_chunks(length, seg, nseg, BLOCK_C: tl.constexpr):
    """Chunk range [begin, end) of segment seg: nseg near-equal runs of whole chunks (end < begin: none)."""
    nchunks = (length + BLOCK_C - 1) // BLOCK_C
    per = (nchunks + nseg - 1) // nseg
    begin = seg * per
    return begin, tl.minimum(begin + per, nchunks)


@triton.jit
def _feature_columns(HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, FEATURE_MAP: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """Columns of x in the two feature halves, their masks, and their rows in the state (F, Dv).

    RoPE pair j is (col1[j], col2[j]) with frequency inv_freq[j]; taylor's constant feature is row 0."""
    j = tl.arange(0, BLOCK_H)
    if ROPE == 0:
        col1 = j
        col2 = j + BLOCK_H
        m1 = col1 < HEAD_DIM
        m2 = col2 < HEAD_DIM
    elif ROPE == 1:  # rotate-half: (f[j], f[j + Dk/2])
        col1 = j
        col2 = j + HEAD_DIM // 2
        m1 = j < HEAD_DIM // 2
        m2 = m1
    else:  # interleaved: (f[2j], f[2j + 1]); stride-2 loads of the same cache lines (not vectorised)
        col1 = 2 * j
        col2 = 2 * j + 1
        m1 = j < HEAD_DIM // 2
        m2 = m1
    if FEATURE_MAP == 3:
        row1 = col1 + 1
        row2 = col2 + 1
    else:
        row1 = col1
        row2 = col2
    return col1, col2, m1, m2, row1, row2


@triton.jit
def _phi(x, inv_n, FEATURE_MAP: tl.constexpr):
    """phi(x) elementwise (taylor: x / max(|x|, 1e-12) with inv_n the row's 1 / max(|x|, 1e-12))."""
    if FEATURE_MAP == 1:
        f = tl.where(x > 0, x + 1.0, tl.exp(x))  # elu(x) + 1
    elif FEATURE_MAP == 2:
        f = tl.maximum(x, 0.0)
    elif FEATURE_MAP == 3:
        f = x * inv_n
    else:
        f = x
    return f


@triton.jit
def _phi_grad(x1, x2, p1, p2, d1, d2, FEATURE_MAP: tl.constexpr):
    """phi'(x)^T d on the two halves (p = phi(x), unscaled)."""
    if FEATURE_MAP == 1:
        d1 = tl.where(x1 > 0, d1, d1 * p1)  # exp(x) = phi(x) where x <= 0
        d2 = tl.where(x2 > 0, d2, d2 * p2)
    elif FEATURE_MAP == 2:
        d1 = tl.where(x1 > 0, d1, 0.0)
        d2 = tl.where(x2 > 0, d2, 0.0)
    elif FEATURE_MAP == 3:
        # u = x / n: dx = (du - u (u . du)) / n; below the clamp dx = du / 1e-12 (the constant drops out)
        n = _norm(x1, x2)
        big = n > 1e-12
        ud = tl.where(big, tl.sum(p1 * d1, 1) + tl.sum(p2 * d2, 1), 0.0)[:, None]
        r = _rcp(tl.where(big, n, 1e-12))[:, None]
        d1 = (d1 - p1 * ud) * r
        d2 = (d2 - p2 * ud) * r
    return d1, d2


@triton.jit
def _tile(X, rows, cols):
    """Pointers of a (rows, cols) tile at the scalar pointer X (a chunk's first element). X varies per chunk
    and is added first, so no 2-D pointer or offset tile is loop-invariant: the compiler would hoist it and
    keep it live over the whole chunk loop (a (64, 64) int32 tile is 16 registers per thread at 8 warps)."""
    return (X + rows[:, None]) + cols[None, :]


@triton.jit
def _features(X, rows, col1, col2, mk1, mk2, cos, sin, FEATURE_MAP: tl.constexpr, ROPE: tl.constexpr,
              ACC64: tl.constexpr, RAW: tl.constexpr):
    """One chunk of x (X: the chunk's first row, rows: the rows' offsets, col1, col2: the two halves'
    columns, mk1, mk2: valid token and column): the halves of x, of phi(x) (accumulation dtype) and of
    Rot(phi(x)) (the tl.dot operand), zero outside the valid tokens and columns (padded tokens must not
    reach the state: phi(0) is 1 for elu1). RAW (identity/relu without RoPE on bf16/fp16): Rot(phi(x)) stays
    in the input dtype, where it is exact: no float32 copy of the dot operands (registers, conversions);
    the float32 phi(x) is only formed where elementwise math uses it (den, z), else the compiler drops it."""
    raw1 = tl.load(_tile(X, rows, col1), mask=mk1, other=0.0)
    raw2 = tl.load(_tile(X, rows, col2), mask=mk2, other=0.0)
    x1 = _acc(raw1, ACC64)
    x2 = _acc(raw2, ACC64)
    if FEATURE_MAP == 3:
        inv_n = _rcp(tl.maximum(_norm(x1, x2), 1e-12))[:, None]
    else:
        inv_n = 1.0
    p1 = tl.where(mk1, _phi(x1, inv_n, FEATURE_MAP), 0.0)
    p2 = tl.where(mk2, _phi(x2, inv_n, FEATURE_MAP), 0.0)
    if ROPE != 0:
        r1 = p1 * cos - p2 * sin
        r2 = p1 * sin + p2 * cos
    elif RAW:
        if FEATURE_MAP == 2:
            r1 = tl.where(raw1 > 0, raw1, tl.zeros_like(raw1))
            r2 = tl.where(raw2 > 0, raw2, tl.zeros_like(raw2))
        else:
            r1 = raw1
            r2 = raw2
    else:
        r1 = p1
        r2 = p2
    return x1, x2, p1, p2, r1, r2


@triton.jit
def _inv_freq(INV_FREQ, m1, ROPE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Frequency of each RoPE pair (column of the halves); loaded once per program (L1/L2 resident)."""
    if ROPE != 0:
        f = tl.load(INV_FREQ + tl.arange(0, BLOCK_H), mask=m1, other=0.0)
    else:
        f = 0.0
    return f


@triton.jit
def _rotation(POS, b, tok, offs, mask_t, inv_freq, stride_pos_batch, stride_pos_seqlen,
              HAS_POS: tl.constexpr, ROPE: tl.constexpr, ACC64: tl.constexpr):
    """cos/sin (C, BLOCK_H) of the chunk's angles pos * inv_freq (float32, like the reference)."""
    if ROPE != 0:
        if HAS_POS:
            pos = tl.load(POS + (b * stride_pos_batch + tok * stride_pos_seqlen), mask=mask_t, other=0)
            pos = pos.to(tl.float32)
        else:
            pos = offs.to(tl.float32)  # position of the token in its sequence
        c, s = cos_sin(pos[:, None] * inv_freq[None, :])  # float32 angles, like the reference's
        c = _acc(c, ACC64)
        s = _acc(s, ACC64)
    else:
        c = 0.0
        s = 0.0
    return c, s


@triton.jit
def _load_state(S, Z, slot, row1, row2, m1, m2, offs_v, mask_v, FEAT_DIM: tl.constexpr, V_DIM: tl.constexpr,
                FEATURE_MAP: tl.constexpr, HAS: tl.constexpr, ACC64: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """A state's Dv block from a contiguous (..., F, Dv) / (..., F) tensor at slot (zeros when not HAS), in
    the accumulation dtype: the halves s1, s2 (BLOCK_H, BLOCK_V), taylor's constant row sc, and z1, z2, zc."""
    if HAS:
        base = S + slot * (FEAT_DIM * V_DIM)
        s1 = tl.load(base + (row1[:, None] * V_DIM + offs_v[None, :]), mask=m1[:, None] & mask_v[None, :],
                     other=0.0)
        s2 = tl.load(base + (row2[:, None] * V_DIM + offs_v[None, :]), mask=m2[:, None] & mask_v[None, :],
                     other=0.0)
        zb = Z + slot * FEAT_DIM
        z1 = _acc(tl.load(zb + row1, mask=m1, other=0.0), ACC64)
        z2 = _acc(tl.load(zb + row2, mask=m2, other=0.0), ACC64)
        s1 = _acc(s1, ACC64)
        s2 = _acc(s2, ACC64)
        if FEATURE_MAP == 3:
            sc = _acc(tl.load(base + offs_v, mask=mask_v, other=0.0), ACC64)
            zc = _acc(tl.load(zb), ACC64)
        else:
            sc = _acc(tl.zeros([BLOCK_V], dtype=tl.float32), ACC64)
            zc = 0.0
    else:
        s1 = _acc(tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32), ACC64)
        s2 = _acc(tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32), ACC64)
        sc = _acc(tl.zeros([BLOCK_V], dtype=tl.float32), ACC64)
        z1 = _acc(tl.zeros([BLOCK_H], dtype=tl.float32), ACC64)
        z2 = _acc(tl.zeros([BLOCK_H], dtype=tl.float32), ACC64)
        if FEATURE_MAP == 3:
            zc = tl.sum(z1, 0)  # a scalar tensor (carried through loops)
        else:
            zc = 0.0
    return s1, s2, sc, z1, z2, zc


@triton.jit
def _store_state(S, Z, slot, s1, s2, sc, z1, z2, zc, row1, row2, m1, m2, offs_v, mask_v, write_z,
                 FEAT_DIM: tl.constexpr, V_DIM: tl.constexpr, FEATURE_MAP: tl.constexpr):
    base = S + slot * (FEAT_DIM * V_DIM)
    tl.store(base + (row1[:, None] * V_DIM + offs_v[None, :]), s1, mask=m1[:, None] & mask_v[None, :])
    tl.store(base + (row2[:, None] * V_DIM + offs_v[None, :]), s2, mask=m2[:, None] & mask_v[None, :])
    zb = Z + slot * FEAT_DIM
    tl.store(zb + row1, z1, mask=m1 & write_z)
    tl.store(zb + row2, z2, mask=m2 & write_z)
    if FEATURE_MAP == 3:
        tl.store(base + offs_v, sc, mask=mask_v)
        tl.store(zb, zc, mask=write_z)


@triton.jit
def _z_t(z1, z2, zc, pk1, pk2, ck, FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr):
    """z_t per token (C, BLOCK_H) halves and taylor's constant: z_prev + the chunk's cumulative sum of phi(k)
    when causal (elementwise on registers, exact like the reference), the state itself in the global form."""
    if CAUSAL:
        zt1 = z1[None, :] + tl.cumsum(pk1, 0)
        zt2 = z2[None, :] + tl.cumsum(pk2, 0)
        if FEATURE_MAP == 3:
            ztc = zc + tl.cumsum(ck, 0)
        else:
            ztc = 0.0
    else:
        zt1 = z1[None, :]
        zt2 = z2[None, :]
        ztc = zc
    return zt1, zt2, ztc


@triton.jit
def _qz(pq1, pq2, zt1, zt2, ztc, FEATURE_MAP: tl.constexpr):
    """phi(q_t) . z_t (C,), the den without the scale."""
    r = tl.sum(pq1 * zt1, 1) + tl.sum(pq2 * zt2, 1)
    if FEATURE_MAP == 3:
        r += ztc  # the constant feature of q is 1
    return r


@triton.jit
def _state_update(s1, s2, sc, z1, z2, zc, rk1, rk2, pk1, pk2, ck, v, FEATURE_MAP: tl.constexpr,
                  FEAT_PIECES: tl.constexpr, DOT_MODE: tl.constexpr, EMULATE: tl.constexpr):
    """S += rk^T v, z += sum phi(k) over the chunk (padded rows are zero). rk is cut in FEAT_PIECES (3
    unless exact in the input dtype) and v is exact: the state stays float32-exact with bf16 inputs."""
    s1 += _mm(tl.trans(rk1), v, FEAT_PIECES, 1, DOT_MODE, EMULATE)
    s2 += _mm(tl.trans(rk2), v, FEAT_PIECES, 1, DOT_MODE, EMULATE)
    z1 += tl.sum(pk1, 0)
    z2 += tl.sum(pk2, 0)
    if FEATURE_MAP == 3:
        sc += tl.sum(v, 0)
        zc += tl.sum(ck, 0)
    return s1, s2, sc, z1, z2, zc


@triton.jit
def _g_update(g1, g2, gc, rq1, rq2, g, w, scale, FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr,
              G_PIECES: tl.constexpr, DOT_MODE: tl.constexpr, EMULATE: tl.constexpr):
    """G += sum_t rq_t gn_t^T = sum_t (w_t r_t) g_t^T with w = scale a (scale without normalisation), r the
    unscaled rotated features and g = dout exact in the input dtype. G feeds dS0 (float32): the
    product is exact, G_PIECES = 3 for w r; without normalisation the scale is applied after the product,
    so exact features (identity/relu, no RoPE) need one piece."""
    if NORMALIZE:
        g1 += _mm(tl.trans(rq1 * w[:, None]), g, G_PIECES, 1, DOT_MODE, EMULATE)
        g2 += _mm(tl.trans(rq2 * w[:, None]), g, G_PIECES, 1, DOT_MODE, EMULATE)
    else:
        g1 += scale * _mm(tl.trans(rq1), g, G_PIECES, 1, DOT_MODE, EMULATE)
        g2 += scale * _mm(tl.trans(rq2), g, G_PIECES, 1, DOT_MODE, EMULATE)
    if FEATURE_MAP == 3:
        gc += tl.sum(g * w[:, None], 0)  # the constant feature of q is 1 (unscaled)
    return g1, g2, gc


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _la_state_kernel(
    SEG_S, SEG_Z, K, V, CU_SEQLENS, POS, INV_FREQ,
    seqlen, nheads, nseg,
    stride_k_batch, stride_k_seqlen, stride_k_head,
    stride_v_batch, stride_v_seqlen, stride_v_head,
    stride_pos_batch, stride_pos_seqlen,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, FEAT_DIM: tl.constexpr, FEATURE_MAP: tl.constexpr,
    ROPE: tl.constexpr, HAS_POS: tl.constexpr, IS_VARLEN: tl.constexpr, NV: tl.constexpr,
    FEAT_PIECES: tl.constexpr, OUT_PIECES: tl.constexpr, FEAT_OUT_PIECES: tl.constexpr, RAW: tl.constexpr, DOT_MODE: tl.constexpr,
    EMULATE: tl.constexpr, ACC64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per (sequence, head, segment, Dv block): the segment's sum of rk v^T and of phi(k) -> SEG_S, SEG_Z
    (N, H, NSEG, F, Dv) / (N, H, NSEG, F), written for every segment (zeros when empty)."""
    vb, seg, nh, n, h = _program_ids(tl.program_id(0).to(tl.int64), nseg, nheads, NV)
    b, bos, length = _sequence(CU_SEQLENS, n, seqlen, IS_VARLEN)
    c_begin, c_end = _segment_chunks(length, seg, nseg, BLOCK_C)
    col1, col2, m1, m2, row1, row2 = _feature_columns(HEAD_DIM, ROPE, FEATURE_MAP, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM
    k_rows = offs_c * stride_k_seqlen
    v_rows = offs_c * stride_v_seqlen
    inv_freq = _inv_freq(INV_FREQ, m1, ROPE, BLOCK_H)
    s1, s2, sc, z1, z2, zc = _load_state(SEG_S, SEG_Z, nh, row1, row2, m1, m2, offs_v, mask_v, FEAT_DIM, V_DIM,
                                         FEATURE_MAP, False, ACC64, BLOCK_H, BLOCK_V)
    for c in range(c_begin, c_end):
        offs = c * BLOCK_C + offs_c  # positions in the sequence
        mask_t = offs < length
        t0 = bos + c * BLOCK_C  # the chunk's first token in the batch row
        cos, sin = _rotation(POS, b, t0 + offs_c, offs, mask_t, inv_freq, stride_pos_batch, stride_pos_seqlen,
                             HAS_POS, ROPE, ACC64)
        _, _, pk1, pk2, rk1, rk2 = _features(K + (b * stride_k_batch + t0 * stride_k_seqlen + h * stride_k_head),
                                             k_rows, col1, col2, mask_t[:, None] & m1[None, :],
                                             mask_t[:, None] & m2[None, :], cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
        v = _acc(tl.load(_tile(V + (b * stride_v_batch + t0 * stride_v_seqlen + h * stride_v_head), v_rows, offs_v),
                         mask=mask_t[:, None] & mask_v[None, :], other=0.0), ACC64)
        s1, s2, sc, z1, z2, zc = _state_update(s1, s2, sc, z1, z2, zc, rk1, rk2, pk1, pk2, _acc(mask_t, ACC64),
                                               v, FEATURE_MAP, FEAT_PIECES, DOT_MODE, EMULATE)
    _store_state(SEG_S, SEG_Z, nh * nseg + seg, s1, s2, sc, z1, z2, zc, row1, row2, m1, m2, offs_v, mask_v,
                 vb == 0, FEAT_DIM, V_DIM, FEATURE_MAP)


@triton.jit
def _la_scan_kernel(SEG, INIT, TOTAL, COPY, numel, nseg, HAS_INIT: tl.constexpr, HAS_COPY: tl.constexpr,
                    REVERSE: tl.constexpr, EXCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
    """Over the segments of one (sequence, head), flat states in SEG's (accumulation) dtype: TOTAL (and
    COPY, e.g. a float32 output) = INIT + the sum of the SEG slots; with EXCLUSIVE each slot becomes
    INIT + the sum of the slots before it (after it: REVERSE)."""
    nh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if HAS_INIT:
        run = tl.load(INIT + nh * numel + offs, mask=mask, other=0.0).to(SEG.dtype.element_ty)
    else:
        run = tl.zeros([BLOCK], dtype=SEG.dtype.element_ty)
    for i in range(nseg):
        if REVERSE:
            j = nseg - 1 - i
        else:
            j = i
        ptr = SEG + (nh * nseg + j) * numel + offs
        loc = tl.load(ptr, mask=mask, other=0.0)
        if EXCLUSIVE:
            tl.store(ptr, run, mask=mask)
        run += loc
    tl.store(TOTAL + nh * numel + offs, run, mask=mask)
    if HAS_COPY:
        tl.store(COPY + nh * numel + offs, run, mask=mask)


@triton.jit
def _la_fwd_kernel(
    OUT, Q, K, V, STATE, ZSTATE, S_OUT, Z_OUT, CU_SEQLENS, POS, INV_FREQ,
    seqlen, nheads, nseg, scale, eps,
    stride_q_batch, stride_q_seqlen, stride_q_head,
    stride_k_batch, stride_k_seqlen, stride_k_head,
    stride_v_batch, stride_v_seqlen, stride_v_head,
    stride_out_batch, stride_out_seqlen, stride_out_head,
    stride_pos_batch, stride_pos_seqlen,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, FEAT_DIM: tl.constexpr, FEATURE_MAP: tl.constexpr,
    ROPE: tl.constexpr, HAS_POS: tl.constexpr, IS_VARLEN: tl.constexpr, NV: tl.constexpr,
    HAS_STATE: tl.constexpr,  # STATE/ZSTATE given (else zeros)
    STATE_PER_SEGMENT: tl.constexpr,  # STATE is (N, H, NSEG, F, Dv) (segment start states), else (N, H, F, Dv)
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    WRITE_STATE: tl.constexpr,  # causal with one segment: the final state -> S_OUT, Z_OUT
    FEAT_PIECES: tl.constexpr, OUT_PIECES: tl.constexpr, FEAT_OUT_PIECES: tl.constexpr, RAW: tl.constexpr, DOT_MODE: tl.constexpr,
    EMULATE: tl.constexpr, ACC64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out for one (sequence, head, segment, Dv block). Causal: the state starts at STATE (S0 or the
    segment's start state) and is carried over the chunks; global: STATE is the total.
        out = scale (r_q S_prev + (masked r_q r_k^T) v) / (den + eps),  den = scale phi(q) . z_t"""
    vb, seg, nh, n, h = _program_ids(tl.program_id(0).to(tl.int64), nseg, nheads, NV)
    b, bos, length = _sequence(CU_SEQLENS, n, seqlen, IS_VARLEN)
    c_begin, c_end = _segment_chunks(length, seg, nseg, BLOCK_C)
    col1, col2, m1, m2, row1, row2 = _feature_columns(HEAD_DIM, ROPE, FEATURE_MAP, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM
    q_rows = offs_c * stride_q_seqlen
    k_rows = offs_c * stride_k_seqlen
    v_rows = offs_c * stride_v_seqlen
    o_rows = offs_c * stride_out_seqlen
    inv_freq = _inv_freq(INV_FREQ, m1, ROPE, BLOCK_H)
    if STATE_PER_SEGMENT:
        slot = nh * nseg + seg
    else:
        slot = nh
    s1, s2, sc, z1, z2, zc = _load_state(STATE, ZSTATE, slot, row1, row2, m1, m2, offs_v, mask_v, FEAT_DIM, V_DIM,
                                         FEATURE_MAP, HAS_STATE, ACC64, BLOCK_H, BLOCK_V)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c in range(c_begin, c_end):
        offs = c * BLOCK_C + offs_c
        mask_t = offs < length
        mk1 = mask_t[:, None] & m1[None, :]
        mk2 = mask_t[:, None] & m2[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        ck = _acc(mask_t, ACC64)  # taylor's constant feature (of k and, unscaled, of q)
        t0 = bos + c * BLOCK_C
        cos, sin = _rotation(POS, b, t0 + offs_c, offs, mask_t, inv_freq, stride_pos_batch, stride_pos_seqlen,
                             HAS_POS, ROPE, ACC64)
        _, _, pq1, pq2, rq1, rq2 = _features(Q + (b * stride_q_batch + t0 * stride_q_seqlen + h * stride_q_head),
                                             q_rows, col1, col2, mk1, mk2, cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
        _, _, pk1, pk2, rk1, rk2 = _features(K + (b * stride_k_batch + t0 * stride_k_seqlen + h * stride_k_head),
                                             k_rows, col1, col2, mk1, mk2, cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
        v = _acc(tl.load(_tile(V + (b * stride_v_batch + t0 * stride_v_seqlen + h * stride_v_head), v_rows, offs_v),
                         mask=mask_tv, other=0.0), ACC64)
        num = (_mm(rq1, s1, FEAT_OUT_PIECES, OUT_PIECES, DOT_MODE, EMULATE)
               + _mm(rq2, s2, FEAT_OUT_PIECES, OUT_PIECES, DOT_MODE, EMULATE))
        if FEATURE_MAP == 3:
            num += sc[None, :]
        if CAUSAL:
            att = (_mm(rq1, tl.trans(rk1), FEAT_OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE)
                   + _mm(rq2, tl.trans(rk2), FEAT_OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE))
            if FEATURE_MAP == 3:
                att += ck[None, :]
            num += _mm(tl.where(causal, att, 0.0), v, OUT_PIECES, 1, DOT_MODE, EMULATE)
        num *= scale
        if NORMALIZE:
            zt1, zt2, ztc = _z_t(z1, z2, zc, pk1, pk2, ck, FEATURE_MAP, CAUSAL)
            den = scale * _qz(pq1, pq2, zt1, zt2, ztc, FEATURE_MAP)
            num = num * tl.where(mask_t, _rcp(den + eps), 0.0)[:, None]
        _store_lp(_tile(OUT + (b * stride_out_batch + t0 * stride_out_seqlen + h * stride_out_head), o_rows, offs_v), num,
                  mask_tv, EMULATE_RNE)
        if CAUSAL:
            s1, s2, sc, z1, z2, zc = _state_update(s1, s2, sc, z1, z2, zc, rk1, rk2, pk1, pk2, ck, v, FEATURE_MAP,
                                                   FEAT_PIECES, DOT_MODE, EMULATE)
    if WRITE_STATE:
        _store_state(S_OUT, Z_OUT, nh, s1, s2, sc, z1, z2, zc, row1, row2, m1, m2, offs_v, mask_v, vb == 0,
                     FEAT_DIM, V_DIM, FEATURE_MAP)


@triton.jit
def _accumulate_blocks(DF, rows, col1, col2, mk1, mk2, d1, d2, vb, NV: tl.constexpr):
    """d1, d2 plus the earlier Dv blocks' parts (scratch (B, T, H, Dk) in the accumulation dtype, DF at the
    chunk's first row); stored for the next block unless this is the last one. The backward is linear in
    the blocks' parts, so phi' runs once, on the last."""
    if NV > 1:
        d1 += tl.load(_tile(DF, rows, col1), mask=mk1 & (vb > 0), other=0.0)
        d2 += tl.load(_tile(DF, rows, col2), mask=mk2 & (vb > 0), other=0.0)
        tl.store(_tile(DF, rows, col1), d1, mask=mk1 & (vb < NV - 1))
        tl.store(_tile(DF, rows, col2), d2, mask=mk2 & (vb < NV - 1))
    return d1, d2


@triton.jit
def _la_bwd_dq_kernel(
    DQ, DF, A_BUF, GD_BUF, SEG_G, SEG_GZ, DO, Q, K, V, STATE, ZSTATE, CU_SEQLENS, POS, INV_FREQ,
    seqlen, nheads, nseg, scale, eps,
    stride_q_batch, stride_q_seqlen, stride_q_head,
    stride_k_batch, stride_k_seqlen, stride_k_head,
    stride_v_batch, stride_v_seqlen, stride_v_head,
    stride_do_batch, stride_do_seqlen, stride_do_head,
    stride_dq_batch, stride_dq_seqlen, stride_dq_head,
    stride_pos_batch, stride_pos_seqlen,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, FEAT_DIM: tl.constexpr, FEATURE_MAP: tl.constexpr,
    ROPE: tl.constexpr, HAS_POS: tl.constexpr, IS_VARLEN: tl.constexpr, NV: tl.constexpr,
    HAS_STATE: tl.constexpr, STATE_PER_SEGMENT: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    ACC_G: tl.constexpr,  # write the segment sums of rq gn^T and gd fq (SEG_G, SEG_GZ)
    FEAT_PIECES: tl.constexpr, OUT_PIECES: tl.constexpr, FEAT_OUT_PIECES: tl.constexpr, RAW: tl.constexpr, G_PIECES: tl.constexpr,
    S_PIECES: tl.constexpr,  # S_prev in S_prev g: 3 when it feeds gd (normalize), else OUT_PIECES
    DOT_MODE: tl.constexpr, EMULATE: tl.constexpr, ACC64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Backward, forward direction, per (sequence, head, segment): rebuilds S_t and z_t and gives
        a_t = 1 / (den_t + eps),  gd_t = -a_t^2 (g_t . num_t),
        d fq_t = Rot^T(a_t S_t g_t) + gd_t z_t  ->  dq_t = scale phi'(q_t)^T d fq_t,
    a_t, gd_t -> A_BUF, GD_BUF (for the reverse pass) and, with ACC_G, the segment's sums of rq gn^T and
    gd fq. gd feeds dz0 (a float32 output): g . num is formed exactly as
        g_t . num_t / scale = r_q,t . (S_prev g_t) + sum_(s <= t) (r_q,t . r_k,s)(v_s . g_t),
    whose S_prev g_t and (v_s . g_t) products d rq needs anyway. The Dv blocks are an outer loop: gd and
    d fq are sums of the blocks' parts (scratch only when NV > 1)."""
    _vb, seg, nh, n, h = _program_ids(tl.program_id(0).to(tl.int64), nseg, nheads, 1)
    b, bos, length = _sequence(CU_SEQLENS, n, seqlen, IS_VARLEN)
    c_begin, c_end = _segment_chunks(length, seg, nseg, BLOCK_C)
    col1, col2, m1, m2, row1, row2 = _feature_columns(HEAD_DIM, ROPE, FEATURE_MAP, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    q_rows = offs_c * stride_q_seqlen
    k_rows = offs_c * stride_k_seqlen
    dq_rows = offs_c * stride_dq_seqlen
    f_rows = offs_c * (nheads * HEAD_DIM)  # (B, T, H, Dk) scratch
    inv_freq = _inv_freq(INV_FREQ, m1, ROPE, BLOCK_H)
    if STATE_PER_SEGMENT:
        slot = nh * nseg + seg
    else:
        slot = nh
    causal = offs_c[:, None] >= offs_c[None, :]
    # the segment's sum of gd fq over all the Dv blocks (gd is the sum of the blocks' parts)
    gz1 = _acc(tl.zeros([BLOCK_H], dtype=tl.float32), ACC64)
    gz2 = _acc(tl.zeros([BLOCK_H], dtype=tl.float32), ACC64)
    if FEATURE_MAP == 3:
        gzc = tl.sum(gz1, 0)
    else:
        gzc = 0.0
    for vb in range(NV):
        if NV > 1:
            tl.debug_barrier()  # the previous block's scratch stores are visible to every thread
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V_DIM
        v_rows = offs_c * stride_v_seqlen
        do_rows = offs_c * stride_do_seqlen
        s1, s2, sc, z1, z2, zc = _load_state(STATE, ZSTATE, slot, row1, row2, m1, m2, offs_v, mask_v, FEAT_DIM,
                                             V_DIM, FEATURE_MAP, HAS_STATE, ACC64, BLOCK_H, BLOCK_V)
        g1 = _acc(tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32), ACC64)
        g2 = _acc(tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32), ACC64)
        gc = _acc(tl.zeros([BLOCK_V], dtype=tl.float32), ACC64)
        for c in range(c_begin, c_end):
            offs = c * BLOCK_C + offs_c
            mask_t = offs < length
            mk1 = mask_t[:, None] & m1[None, :]
            mk2 = mask_t[:, None] & m2[None, :]
            mask_tv = mask_t[:, None] & mask_v[None, :]
            ck = _acc(mask_t, ACC64)
            t0 = bos + c * BLOCK_C
            t_row = (b * seqlen + t0) * nheads + h  # the chunk's first row of the (B, T, H) scratch
            cos, sin = _rotation(POS, b, t0 + offs_c, offs, mask_t, inv_freq, stride_pos_batch, stride_pos_seqlen,
                                 HAS_POS, ROPE, ACC64)
            xq1, xq2, pq1, pq2, rq1, rq2 = _features(
                Q + (b * stride_q_batch + t0 * stride_q_seqlen + h * stride_q_head), q_rows, col1, col2, mk1, mk2,
                cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
            _, _, pk1, pk2, rk1, rk2 = _features(K + (b * stride_k_batch + t0 * stride_k_seqlen + h * stride_k_head),
                                                 k_rows, col1, col2, mk1, mk2, cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
            v = _acc(tl.load(_tile(V + (b * stride_v_batch + t0 * stride_v_seqlen + h * stride_v_head), v_rows, offs_v),
                             mask=mask_tv, other=0.0), ACC64)
            g = _acc(tl.load(_tile(DO + (b * stride_do_batch + t0 * stride_do_seqlen + h * stride_do_head), do_rows, offs_v),
                             mask=mask_tv, other=0.0), ACC64)
            # S_prev g_t (the rows of d rq) and, causal, (v_s . g_t) for s <= t: exact products
            d1 = _mm(g, tl.trans(s1), 1, S_PIECES, DOT_MODE, EMULATE)
            d2 = _mm(g, tl.trans(s2), 1, S_PIECES, DOT_MODE, EMULATE)
            if CAUSAL:
                gv = tl.where(causal, _mm(g, tl.trans(v), 1, 1, DOT_MODE, EMULATE), 0.0)
            if NORMALIZE:
                zt1, zt2, ztc = _z_t(z1, z2, zc, pk1, pk2, ck, FEATURE_MAP, CAUSAL)
                a = tl.where(mask_t, _rcp(scale * _qz(pq1, pq2, zt1, zt2, ztc, FEATURE_MAP) + eps), 0.0)
                gnum = tl.sum(rq1 * d1, 1) + tl.sum(rq2 * d2, 1)
                if FEATURE_MAP == 3:
                    gnum += tl.sum(g * sc[None, :], 1)
                if CAUSAL:
                    att = (_mm(rq1, tl.trans(rk1), FEAT_PIECES, FEAT_PIECES, DOT_MODE, EMULATE)
                           + _mm(rq2, tl.trans(rk2), FEAT_PIECES, FEAT_PIECES, DOT_MODE, EMULATE))
                    if FEATURE_MAP == 3:
                        att += ck[None, :]
                    gnum += tl.sum(att * gv, 1)  # gv is zero above the diagonal
                gd = -(a * a) * (scale * gnum)  # this Dv block's part
            # d rq_t = a_t S_t g_t = a_t (S_prev g_t + sum_(s <= t) rk_s (v_s . g_t))
            if CAUSAL:
                d1 += _mm(gv, rk1, OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE)
                d2 += _mm(gv, rk2, OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE)
            if NORMALIZE:
                d1 *= a[:, None]
                d2 *= a[:, None]
            if ROPE != 0:
                d1, d2 = d1 * cos + d2 * sin, d2 * cos - d1 * sin  # Rot^T
            if NORMALIZE:
                d1 += gd[:, None] * zt1
                d2 += gd[:, None] * zt2
            if ACC_G:
                if NORMALIZE:
                    w = a * scale
                else:
                    w = ck * scale
                g1, g2, gc = _g_update(g1, g2, gc, rq1, rq2, g, w, scale, FEATURE_MAP, NORMALIZE, G_PIECES,
                                       DOT_MODE, EMULATE)
                if NORMALIZE:
                    gz1 += scale * tl.sum(gd[:, None] * pq1, 0)
                    gz2 += scale * tl.sum(gd[:, None] * pq2, 0)
                    if FEATURE_MAP == 3:
                        gzc += scale * tl.sum(gd, 0)
            # dq: d fq of this block plus the earlier blocks', through phi' on the last block
            d1, d2 = _accumulate_blocks(DF + t_row * HEAD_DIM, f_rows, col1, col2, mk1, mk2, d1, d2, vb, NV)
            dx1, dx2 = _phi_grad(xq1, xq2, pq1, pq2, d1 * scale, d2 * scale, FEATURE_MAP)
            dq_ptr = DQ + (b * stride_dq_batch + t0 * stride_dq_seqlen + h * stride_dq_head)
            _store_lp(_tile(dq_ptr, dq_rows, col1), dx1, mk1 & (vb == NV - 1), EMULATE_RNE)
            _store_lp(_tile(dq_ptr, dq_rows, col2), dx2, mk2 & (vb == NV - 1), EMULATE_RNE)
            if NORMALIZE:
                tl.store(A_BUF + t_row + offs_c * nheads, a, mask=mask_t & (vb == 0))
                if NV > 1:
                    gd += tl.load(GD_BUF + t_row + offs_c * nheads, mask=mask_t & (vb > 0), other=0.0)
                tl.store(GD_BUF + t_row + offs_c * nheads, gd, mask=mask_t)
            if CAUSAL:
                s1, s2, sc, z1, z2, zc = _state_update(s1, s2, sc, z1, z2, zc, rk1, rk2, pk1, pk2, ck, v,
                                                       FEATURE_MAP, FEAT_PIECES, DOT_MODE, EMULATE)
        if ACC_G:
            _store_state(SEG_G, SEG_GZ, nh * nseg + seg, g1, g2, gc, gz1, gz2, gzc, row1, row2, m1, m2, offs_v,
                         mask_v, vb == NV - 1, FEAT_DIM, V_DIM, FEATURE_MAP)


@triton.jit
def _la_bwd_dkv_kernel(
    DK, DV, DF, A_BUF, GD_BUF, DS0, DZ0, DO, Q, K, V, GSTATE, GZSTATE, CU_SEQLENS, POS, INV_FREQ,
    seqlen, nheads, nseg, scale,
    stride_q_batch, stride_q_seqlen, stride_q_head,
    stride_k_batch, stride_k_seqlen, stride_k_head,
    stride_v_batch, stride_v_seqlen, stride_v_head,
    stride_do_batch, stride_do_seqlen, stride_do_head,
    stride_dk_batch, stride_dk_seqlen, stride_dk_head,
    stride_dv_batch, stride_dv_seqlen, stride_dv_head,
    stride_pos_batch, stride_pos_seqlen,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, FEAT_DIM: tl.constexpr, FEATURE_MAP: tl.constexpr,
    ROPE: tl.constexpr, HAS_POS: tl.constexpr, IS_VARLEN: tl.constexpr, NV: tl.constexpr,
    HAS_GSTATE: tl.constexpr,  # GSTATE/GZSTATE given (else zeros: dS, dz None)
    STATE_PER_SEGMENT: tl.constexpr,  # GSTATE holds each segment's end G (else one per sequence)
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    WRITE_STATE: tl.constexpr,  # causal with one segment: G_0, Gz_0 -> DS0, DZ0
    FEAT_PIECES: tl.constexpr, OUT_PIECES: tl.constexpr, FEAT_OUT_PIECES: tl.constexpr, RAW: tl.constexpr, G_PIECES: tl.constexpr,
    DOT_MODE: tl.constexpr, EMULATE: tl.constexpr, ACC64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Backward, reverse direction, per (sequence, head, segment): chunks last to first, rebuilding
    G_t = G_next + sum_(s >= t) rq_s gn_s^T (gn = a g) and Gz_t = Gz_next + sum_(s >= t) gd_s fq_s; gives
        dv_t = G_t^T rk_t,   d fk_t = Rot^T(G_t v_t) + Gz_t  ->  dk_t = phi'(k_t)^T d fk_t."""
    _vb, seg, nh, n, h = _program_ids(tl.program_id(0).to(tl.int64), nseg, nheads, 1)
    b, bos, length = _sequence(CU_SEQLENS, n, seqlen, IS_VARLEN)
    c_begin, c_end = _segment_chunks(length, seg, nseg, BLOCK_C)
    col1, col2, m1, m2, row1, row2 = _feature_columns(HEAD_DIM, ROPE, FEATURE_MAP, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    q_rows = offs_c * stride_q_seqlen
    k_rows = offs_c * stride_k_seqlen
    dk_rows = offs_c * stride_dk_seqlen
    f_rows = offs_c * (nheads * HEAD_DIM)  # (B, T, H, Dk) scratch
    inv_freq = _inv_freq(INV_FREQ, m1, ROPE, BLOCK_H)
    if STATE_PER_SEGMENT:
        slot = nh * nseg + seg
    else:
        slot = nh
    anti = offs_c[:, None] <= offs_c[None, :]  # s >= t: the transposed mask
    for vb in range(NV):
        if NV > 1:
            tl.debug_barrier()  # the previous block's scratch stores are visible to every thread
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V_DIM
        v_rows = offs_c * stride_v_seqlen
        do_rows = offs_c * stride_do_seqlen
        dv_rows = offs_c * stride_dv_seqlen
        g1, g2, gc, gz1, gz2, gzc = _load_state(GSTATE, GZSTATE, slot, row1, row2, m1, m2, offs_v, mask_v,
                                                FEAT_DIM, V_DIM, FEATURE_MAP, HAS_GSTATE, ACC64, BLOCK_H, BLOCK_V)
        for i in range(c_end - c_begin):
            c = c_end - 1 - i
            offs = c * BLOCK_C + offs_c
            mask_t = offs < length
            mk1 = mask_t[:, None] & m1[None, :]
            mk2 = mask_t[:, None] & m2[None, :]
            mask_tv = mask_t[:, None] & mask_v[None, :]
            ck = _acc(mask_t, ACC64)
            t0 = bos + c * BLOCK_C
            t_row = (b * seqlen + t0) * nheads + h
            cos, sin = _rotation(POS, b, t0 + offs_c, offs, mask_t, inv_freq, stride_pos_batch, stride_pos_seqlen,
                                 HAS_POS, ROPE, ACC64)
            _, _, pq1, pq2, rq1, rq2 = _features(Q + (b * stride_q_batch + t0 * stride_q_seqlen + h * stride_q_head),
                                                 q_rows, col1, col2, mk1, mk2, cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
            xk1, xk2, pk1, pk2, rk1, rk2 = _features(
                K + (b * stride_k_batch + t0 * stride_k_seqlen + h * stride_k_head), k_rows, col1, col2, mk1, mk2,
                cos, sin, FEATURE_MAP, ROPE, ACC64, RAW)
            v = _acc(tl.load(_tile(V + (b * stride_v_batch + t0 * stride_v_seqlen + h * stride_v_head), v_rows, offs_v),
                             mask=mask_tv, other=0.0), ACC64)
            g = _acc(tl.load(_tile(DO + (b * stride_do_batch + t0 * stride_do_seqlen + h * stride_do_head), do_rows, offs_v),
                             mask=mask_tv, other=0.0), ACC64)
            if NORMALIZE:
                # w_s = scale a_s: rq_s gn_s^T = (w_s r_s) g_s^T
                w = scale * tl.load(A_BUF + t_row + offs_c * nheads, mask=mask_t, other=0.0)
                gd = tl.load(GD_BUF + t_row + offs_c * nheads, mask=mask_t, other=0.0)
            else:
                w = scale * ck
            # d rk_t = G_t v_t = G_next v_t + sum_(s >= t) rq_s (gn_s . v_t)
            d1 = _mm(v, tl.trans(g1), 1, OUT_PIECES, DOT_MODE, EMULATE)
            d2 = _mm(v, tl.trans(g2), 1, OUT_PIECES, DOT_MODE, EMULATE)
            # dv_t = G_t^T rk_t = G_next^T rk_t + sum_(s >= t) gn_s (rq_s . rk_t)
            dv = (_mm(rk1, g1, FEAT_OUT_PIECES, OUT_PIECES, DOT_MODE, EMULATE)
                  + _mm(rk2, g2, FEAT_OUT_PIECES, OUT_PIECES, DOT_MODE, EMULATE))
            if FEATURE_MAP == 3:
                dv += ck[:, None] * gc[None, :]
            if CAUSAL:
                vg = tl.where(anti, _mm(v, tl.trans(g), 1, 1, DOT_MODE, EMULATE), 0.0) * w[None, :]
                d1 += _mm(vg, rq1, OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE)
                d2 += _mm(vg, rq2, OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE)
                att = (_mm(rk1, tl.trans(rq1), FEAT_OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE)
                       + _mm(rk2, tl.trans(rq2), FEAT_OUT_PIECES, FEAT_OUT_PIECES, DOT_MODE, EMULATE))
                if FEATURE_MAP == 3:
                    att += ck[:, None]
                dv += _mm(tl.where(anti, att, 0.0) * w[None, :], g, OUT_PIECES, 1, DOT_MODE, EMULATE)
            _store_lp(_tile(DV + (b * stride_dv_batch + t0 * stride_dv_seqlen + h * stride_dv_head), dv_rows, offs_v), dv,
                      mask_tv, EMULATE_RNE)
            if ROPE != 0:
                d1, d2 = d1 * cos + d2 * sin, d2 * cos - d1 * sin  # Rot^T
            # d fk_t += Gz_t (dz, and the den's part when normalised), once: not a Dv-block quantity
            if CAUSAL and NORMALIZE:
                gzt1 = gz1[None, :] + scale * tl.cumsum(gd[:, None] * pq1, 0, reverse=True)
                gzt2 = gz2[None, :] + scale * tl.cumsum(gd[:, None] * pq2, 0, reverse=True)
            else:
                gzt1 = gz1[None, :]
                gzt2 = gz2[None, :]
            if NV > 1:
                gzt1 = tl.where(vb == 0, gzt1, 0.0)
                gzt2 = tl.where(vb == 0, gzt2, 0.0)
            d1 += gzt1
            d2 += gzt2
            d1, d2 = _accumulate_blocks(DF + t_row * HEAD_DIM, f_rows, col1, col2, mk1, mk2, d1, d2, vb, NV)
            dx1, dx2 = _phi_grad(xk1, xk2, pk1, pk2, d1, d2, FEATURE_MAP)
            dk_ptr = DK + (b * stride_dk_batch + t0 * stride_dk_seqlen + h * stride_dk_head)
            _store_lp(_tile(dk_ptr, dk_rows, col1), dx1, mk1 & (vb == NV - 1), EMULATE_RNE)
            _store_lp(_tile(dk_ptr, dk_rows, col2), dx2, mk2 & (vb == NV - 1), EMULATE_RNE)
            if CAUSAL:
                g1, g2, gc = _g_update(g1, g2, gc, rq1, rq2, g, w, scale, FEATURE_MAP, NORMALIZE, G_PIECES,
                                       DOT_MODE, EMULATE)
                if NORMALIZE:
                    gz1 += scale * tl.sum(gd[:, None] * pq1, 0)
                    gz2 += scale * tl.sum(gd[:, None] * pq2, 0)
                    if FEATURE_MAP == 3:
                        gzc += scale * tl.sum(gd, 0)
        if WRITE_STATE:
            _store_state(DS0, DZ0, nh, g1, g2, gc, gz1, gz2, gzc, row1, row2, m1, m2, offs_v, mask_v, vb == 0,
                         FEAT_DIM, V_DIM, FEATURE_MAP)


@triton.jit
def _la_step_kernel(
    OUT, S_NEW, Z_NEW, Q, K, V, S, Z,
    nheads, scale, eps,
    stride_q_batch, stride_q_head, stride_k_batch, stride_k_head, stride_v_batch, stride_v_head,
    stride_out_batch, stride_out_head,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, FEAT_DIM: tl.constexpr, FEATURE_MAP: tl.constexpr,
    NORMALIZE: tl.constexpr, NV: tl.constexpr, ACC64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One decoding step per (batch, head, Dv block): S' = S + fk v^T, z' = z + fk, out = fq^T S' / (fq . z'
    + eps). Memory bound (the state is read and written once): no tensor-core work for one token."""
    pid = tl.program_id(0).to(tl.int64)
    vb = pid % NV
    bh = pid // NV
    bb = bh // nheads
    h = bh % nheads
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < HEAD_DIM
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM
    x_q = _acc(tl.load(Q + bb * stride_q_batch + h * stride_q_head + offs_k, mask=mk, other=0.0), ACC64)
    x_k = _acc(tl.load(K + bb * stride_k_batch + h * stride_k_head + offs_k, mask=mk, other=0.0), ACC64)
    v = _acc(tl.load(V + bb * stride_v_batch + h * stride_v_head + offs_v, mask=mask_v, other=0.0), ACC64)
    if FEATURE_MAP == 3:
        inv_q = _rcp(tl.maximum(_norm(x_q[None, :], 0.0 * x_q[None, :]), 1e-12))
        inv_k = _rcp(tl.maximum(_norm(x_k[None, :], 0.0 * x_k[None, :]), 1e-12))
        TAY = 1
    else:
        inv_q = 1.0
        inv_k = 1.0
        TAY = 0
    fq = tl.where(mk, _phi(x_q, inv_q, FEATURE_MAP), 0.0) * scale
    fk = tl.where(mk, _phi(x_k, inv_k, FEATURE_MAP), 0.0)
    rows = (offs_k + TAY) * V_DIM
    mkv = mk[:, None] & mask_v[None, :]
    s = _acc(tl.load(_tile(S + bh * (FEAT_DIM * V_DIM), rows, offs_v), mask=mkv, other=0.0), ACC64)
    s += fk[:, None] * v[None, :]
    tl.store(_tile(S_NEW + bh * (FEAT_DIM * V_DIM), rows, offs_v), s, mask=mkv)
    num = tl.sum(fq[:, None] * s, 0)
    z = _acc(tl.load(Z + bh * FEAT_DIM + offs_k + TAY, mask=mk, other=0.0), ACC64) + fk
    tl.store(Z_NEW + bh * FEAT_DIM + offs_k + TAY, z, mask=mk & (vb == 0))
    den = tl.sum(fq * z, 0)
    if FEATURE_MAP == 3:
        sc = _acc(tl.load(S + bh * (FEAT_DIM * V_DIM) + offs_v, mask=mask_v, other=0.0), ACC64) + v
        tl.store(S_NEW + bh * (FEAT_DIM * V_DIM) + offs_v, sc, mask=mask_v)
        num += scale * sc
        zc = _acc(tl.load(Z + bh * FEAT_DIM), ACC64) + 1.0
        tl.store(Z_NEW + bh * FEAT_DIM, zc, mask=vb == 0)
        den += scale * zc
    if NORMALIZE:
        num = num * _rcp(den + eps)
    _store_lp(OUT + bb * stride_out_batch + h * stride_out_head + offs_v, num, mask_v, EMULATE_RNE)


# ----------------------------------------------------------------------------------------------
# host side

# The interpreter (TRITON_INTERPRET=1, decided when @triton.jit runs) truncates fp32 -> bf16 casts and has
# no bf16/tf32 tensor cores: EMULATE rounds the dot operands, EMULATE_RNE the bf16 stores, like the GPU.
_INTERPRETED = not isinstance(_la_fwd_kernel, triton.runtime.jit.JITFunction)
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_SM_COUNT = {}


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 is a jit function, slow to call)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _sm_count(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


class _Plan:
    """Shapes, flags, block sizes and the passes shared by the forward and backward launchers."""

    def __init__(self, q, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, forward, traceable):
        if q.dtype not in _SUPPORTED:
            raise ValueError(f"linear_attention (triton): unsupported dtype {q.dtype}; "
                             "supported: float16, bfloat16, float32")
        self.traceable = traceable
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv = v.shape[-1]
        self.varlen = cu_seqlens is not None
        self.N = cu_seqlens.shape[0] - 1 if self.varlen else self.B
        self.fm = int(feature_map)
        self.F = self.Dk + (self.fm == 3)
        self.rope = 0 if inv_freq is None else (2 if interleaved else 1)
        self.has_pos = self.rope != 0 and positions is not None
        exact = self.fm in (0, 2) and self.rope == 0  # identity/relu features without RoPE: exact in q's dtype
        self.C = C = int(TUNING[("chunk_fwd" if forward else "chunk_bwd") + ("" if exact else "_mapped")])
        half = self.Dk // 2 if self.rope else (self.Dk + 1) // 2
        # tl.dot needs K, N >= 16 (the GPU's MMA shapes); padded columns are masked to zero
        self.BH = max(16, _pow2(half))
        # forward: the Dv blocks are programs; backward: an outer loop inside one program
        self.BV = max(16, min(_pow2(self.Dv), int(TUNING["block_v_fwd" if forward else "block_v_bwd"])))
        self.NV = (self.Dv + self.BV - 1) // self.BV
        self.dot_mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[q.dtype]
        self.acc64 = q.dtype == torch.float32
        self.stages = TUNING["num_stages"]
        if self.acc64:
            self.C = C = min(C, int(TUNING["chunk_fp32"]))
            self.BV = max(16, min(self.BV, int(TUNING["block_v_fp32"])))
            self.NV = (self.Dv + self.BV - 1) // self.BV
            self.stages = TUNING["num_stages_fp32"]
        self.acc = torch.float64 if self.acc64 else torch.float32
        self.feat_pieces = 1 if exact else 3
        self.raw = exact and self.dot_mode != 0
        self.out_pieces = int(TUNING["out_pieces_fp16" if self.dot_mode == 2 else "out_pieces_bf16"])
        # fp16 runs on tf32 products (the state and 1/(den + eps) leave the fp16 range), whose truncation
        # to 10 bits is coarse next to fp16's outputs: two pieces for the features too
        self.feat_out_pieces = 2 if self.dot_mode == 2 and not exact else 1
        self.emulate_rne = _INTERPRETED and q.dtype == torch.bfloat16
        # segments: fill the SMs when sequences * heads * blocks are too few, keeping segments long
        # enough (min_chunks_per_segment) to amortise their state pass
        nchunks = -(-max(self.B * self.T // max(self.N, 1), 1) // C)
        nseg = TUNING["segments"]
        if nseg is None:
            nseg = 1
            progs = self.N * self.H * (self.NV if forward else 1)
            if q.is_cuda and progs > 0:
                target = int(TUNING["waves"]) * _sm_count(q.device)
                if progs < target:
                    nseg = max(1, min(-(-target // progs), nchunks // int(TUNING["min_chunks_per_segment"])))
        self.nseg = max(1, int(nseg))
        self.warps = int(TUNING["num_warps_fwd" if forward else "num_warps_bwd"])
        self.dummy = q
        self.inv_freq = inv_freq if inv_freq is not None else q
        self.pos = positions if self.has_pos else q
        if self.has_pos:
            sp = positions.stride()
            self.stride_pos = (sp[0] if positions.shape[0] > 1 else 0, sp[1])
        else:
            self.stride_pos = (0, 0)
        self.cu = cu_seqlens if self.varlen else q

    def constexprs(self):
        return dict(HEAD_DIM=self.Dk, V_DIM=self.Dv, FEAT_DIM=self.F, FEATURE_MAP=self.fm, ROPE=self.rope,
                    HAS_POS=self.has_pos, IS_VARLEN=self.varlen, NV=self.NV, FEAT_PIECES=self.feat_pieces,
                    OUT_PIECES=self.out_pieces, FEAT_OUT_PIECES=self.feat_out_pieces, RAW=self.raw,
                    DOT_MODE=self.dot_mode,
                    EMULATE=_INTERPRETED, ACC64=self.acc64, BLOCK_C=self.C, BLOCK_H=self.BH, BLOCK_V=self.BV)

    def empty(self, *shape):
        """Scratch in the accumulation dtype."""
        return torch.empty(shape, device=self.dummy.device, dtype=self.acc)

    def launch(self, kernel, grid, *args, warps, **flags):
        kw = self.constexprs()
        kw.update(flags)
        if self.stages is not None:
            kw["num_stages"] = int(self.stages)
        # wrap_triton: torch.compile / triton_op trace the launch instead of running it
        fn = torch.library.wrap_triton(kernel) if self.traceable else kernel
        fn[grid](*args, num_warps=warps, **kw)

    def state_pass(self, k, v):
        """Segment sums of rk v^T and phi(k): (N, H, NSEG, F, Dv), (N, H, NSEG, F)."""
        seg_s, seg_z = self.empty(self.N, self.H, self.nseg, self.F, self.Dv), self.empty(self.N, self.H, self.nseg, self.F)
        self.launch(_la_state_kernel, (self.N * self.H * self.nseg * self.NV,),
                    seg_s, seg_z, k, v, self.cu, self.pos, self.inv_freq,
                    self.T, self.H, self.nseg,
                    k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2),
                    *self.stride_pos, warps=self.warps)
        return seg_s, seg_z

    def scan(self, seg, init, total, copy, exclusive, reverse):
        """total (and copy) = init + the sum of the segment slots of seg; exclusive: the slots become
        prefix (suffix: reverse) sums. seg, total in the accumulation dtype; init, copy float32."""
        numel = seg.shape[-1] * (seg.shape[-2] if seg.dim() == 5 else 1)
        BLOCK = min(1024, _pow2(numel))
        fn = torch.library.wrap_triton(_la_scan_kernel) if self.traceable else _la_scan_kernel
        fn[(self.N * self.H, -(-numel // BLOCK))](
            seg, init if init is not None else seg, total, copy if copy is not None else total, numel, self.nseg,
            HAS_INIT=init is not None, HAS_COPY=copy is not None, REVERSE=reverse, EXCLUSIVE=exclusive,
            BLOCK=BLOCK, num_warps=4)

    def states(self, k, v, S0, z0, causal, S_out=None, z_out=None):
        """The state each program starts from: (S, z, has, per_segment). Causal with one segment: S0 itself;
        else the state pass and the scan give each segment's start state (causal) or the totals (global),
        and the final state -> S_out, z_out when given."""
        if causal and self.nseg == 1:
            return S0, z0, S0 is not None, False
        seg_s, seg_z = self.state_pass(k, v)
        tot_s, tot_z = self.empty(self.N, self.H, self.F, self.Dv), self.empty(self.N, self.H, self.F)
        self.scan(seg_s, S0, tot_s, S_out, causal, False)
        self.scan(seg_z, z0, tot_z, z_out, causal, False)
        return (seg_s, seg_z, True, True) if causal else (tot_s, tot_z, True, False)


def _check_out(name, t, shape, dtype):
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"linear_attention (triton): {name} must be a contiguous {dtype} tensor of shape "
                         f"{tuple(shape)}, got {t.dtype} {tuple(t.shape)}")


def linear_attention_fwd(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved: bool, feature_map: int,
                         scale: float, normalize: bool, eps: float, causal: bool, out, S_out, z_out,
                         traceable: bool = True) -> None:
    """Forward (contract semantics): out (B, T, H, Dv) <- q, k (B, T, H, Dk), v (B, T, H, Dv); the final
    state -> S_out (N, H, F, Dv), z_out (N, H, F) float32. See the module docstring for the arguments."""
    p = _Plan(q, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, True, traceable)
    _check_out("out", out, (p.B, p.T, p.H, p.Dv), q.dtype)
    _check_out("S_out", S_out, (p.N, p.H, p.F, p.Dv), torch.float32)
    _check_out("z_out", z_out, (p.N, p.H, p.F), torch.float32)
    if p.N * p.H == 0:
        return
    causal = bool(causal)
    state, zstate, has_state, per_seg = p.states(k, v, S0, z0, causal, S_out, z_out)
    write = causal and p.nseg == 1
    if p.T == 0 and not write:
        return
    p.launch(_la_fwd_kernel, (p.N * p.H * p.nseg * p.NV,),
             out, q, k, v, state if has_state else p.dummy, zstate if has_state else p.dummy, S_out, z_out, p.cu,
             p.pos, p.inv_freq,
             p.T, p.H, p.nseg, float(scale), float(eps),
             q.stride(0), q.stride(1), q.stride(2),
             k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2),
             out.stride(0), out.stride(1), out.stride(2),
             *p.stride_pos,
             HAS_STATE=has_state, STATE_PER_SEGMENT=per_seg, CAUSAL=causal, NORMALIZE=bool(normalize),
             WRITE_STATE=write, EMULATE_RNE=p.emulate_rne, warps=p.warps)


def linear_attention_bwd(dout, dS, dz, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved: bool,
                         feature_map: int, scale: float, normalize: bool, eps: float, causal: bool,
                         dq, dk, dv, dS0, dz0, traceable: bool = True) -> None:
    """Backward (the contract's formulas), recomputing from the inputs: dq, dk (B, T, H, Dk), dv (B, T, H, Dv)
    in q's dtype and dS0 (N, H, F, Dv), dz0 (N, H, F) float32. dout (B, T, H, Dv), any strides with a unit
    last one; dS/dz None (zero) or contiguous float32."""
    p = _Plan(q, v, cu_seqlens, positions, inv_freq, interleaved, feature_map, False, traceable)
    for name, t, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, v.shape)):
        _check_out(name, t, shape, q.dtype)
    _check_out("dS0", dS0, (p.N, p.H, p.F, p.Dv), torch.float32)
    _check_out("dz0", dz0, (p.N, p.H, p.F), torch.float32)
    if p.N * p.H == 0:
        return
    causal = bool(causal)
    normalize = bool(normalize)
    if (dS is None) != (dz is None):  # one of the two final-state gradients: the other is zero
        dS = torch.zeros_like(dS0) if dS is None else dS
        dz = torch.zeros_like(dz0) if dz is None else dz
    state, zstate, has_state, per_seg = p.states(k, v, S0, z0, causal)
    # segment sums of rq gn^T (and gd fq) when G must be known at segment ends (several segments) or
    # everywhere (global); causal with one segment: the reverse pass builds G from dS alone
    acc_g = not causal or p.nseg > 1
    a_buf = p.empty(p.B, p.T, p.H) if normalize else p.dummy
    gd_buf = p.empty(p.B, p.T, p.H) if normalize else p.dummy
    scratch = p.empty(p.B, p.T, p.H, p.Dk) if p.NV > 1 else p.dummy
    seg_g = p.empty(p.N, p.H, p.nseg, p.F, p.Dv) if acc_g else p.dummy
    seg_gz = p.empty(p.N, p.H, p.nseg, p.F) if acc_g else p.dummy
    # pieces of w r in G += (w r)^T g (see _g_update): exact features need one without normalisation
    g_pieces = 3 if normalize else p.feat_pieces
    warps = p.warps
    grid = (p.N * p.H * p.nseg,)
    p.launch(_la_bwd_dq_kernel, grid,
             dq, scratch, a_buf, gd_buf, seg_g, seg_gz, dout, q, k, v,
             state if has_state else p.dummy, zstate if has_state else p.dummy, p.cu, p.pos, p.inv_freq,
             p.T, p.H, p.nseg, float(scale), float(eps),
             q.stride(0), q.stride(1), q.stride(2),
             k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2),
             dout.stride(0), dout.stride(1), dout.stride(2),
             dq.stride(0), dq.stride(1), dq.stride(2),
             *p.stride_pos,
             HAS_STATE=has_state, STATE_PER_SEGMENT=per_seg, CAUSAL=causal, NORMALIZE=normalize, ACC_G=acc_g,
             G_PIECES=g_pieces, S_PIECES=3 if normalize else p.out_pieces, EMULATE_RNE=p.emulate_rne, warps=warps)
    if acc_g:
        # G at each segment's end (causal) or the total G (global); G_0 = dS0, Gz_0 = dz0
        if causal:
            p.scan(seg_g, dS, dS0, None, True, True)
            p.scan(seg_gz, dz, dz0, None, True, True)
            gstate, gzstate, g_per_seg = seg_g, seg_gz, True
        else:
            gstate, gzstate, g_per_seg = p.empty(p.N, p.H, p.F, p.Dv), p.empty(p.N, p.H, p.F), False
            p.scan(seg_g, dS, gstate, dS0, False, True)
            p.scan(seg_gz, dz, gzstate, dz0, False, True)
        has_g = True
    else:
        gstate, gzstate, has_g, g_per_seg = dS, dz, dS is not None, False
    p.launch(_la_bwd_dkv_kernel, grid,
             dk, dv, scratch, a_buf, gd_buf, dS0, dz0, dout, q, k, v,
             gstate if has_g else p.dummy, gzstate if has_g else p.dummy, p.cu, p.pos, p.inv_freq,
             p.T, p.H, p.nseg, float(scale),
             q.stride(0), q.stride(1), q.stride(2),
             k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2),
             dout.stride(0), dout.stride(1), dout.stride(2),
             dk.stride(0), dk.stride(1), dk.stride(2),
             dv.stride(0), dv.stride(1), dv.stride(2),
             *p.stride_pos,
             HAS_GSTATE=has_g, STATE_PER_SEGMENT=g_per_seg, CAUSAL=causal, NORMALIZE=normalize,
             WRITE_STATE=not acc_g, G_PIECES=g_pieces, EMULATE_RNE=p.emulate_rne, warps=warps)


def linear_attention_step(q, k, v, S, z, feature_map: int, scale: float, normalize: bool, eps: float,
                          out, S_new, z_new, traceable: bool = True) -> None:
    """One decoding step: q, k (B, H, Dk), v (B, H, Dv) (unit last stride), S (B, H, F, Dv), z (B, H, F)
    contiguous float32 -> out (B, H, Dv) in q's dtype, S_new, z_new (new tensors; S, z are not modified)."""
    if q.dtype not in _SUPPORTED:
        raise ValueError(f"linear_attention_step (triton): unsupported dtype {q.dtype}; "
                         "supported: float16, bfloat16, float32")
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    F = Dk + (int(feature_map) == 3)
    _check_out("out", out, (B, H, Dv), q.dtype)
    _check_out("S_new", S_new, (B, H, F, Dv), torch.float32)
    _check_out("z_new", z_new, (B, H, F), torch.float32)
    if B * H == 0:
        return
    BLOCK_K = _pow2(Dk)
    # a (BLOCK_K, BLOCK_V) float32 state tile of at most 8192 elements: 32 per thread with 8 warps
    BLOCK_V = max(1, min(_pow2(Dv), 8192 // BLOCK_K))
    NV = (Dv + BLOCK_V - 1) // BLOCK_V
    tile = BLOCK_K * BLOCK_V
    kernel = torch.library.wrap_triton(_la_step_kernel) if traceable else _la_step_kernel
    kernel[(B * H * NV,)](
        out, S_new, z_new, q, k, v, S, z,
        H, float(scale), float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=Dk, V_DIM=Dv, FEAT_DIM=F, FEATURE_MAP=int(feature_map), NORMALIZE=bool(normalize), NV=NV,
        ACC64=q.dtype == torch.float32, EMULATE_RNE=_INTERPRETED and q.dtype == torch.bfloat16,
        BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V,
        num_warps=8 if tile >= 4096 else (4 if tile >= 1024 else 1))
