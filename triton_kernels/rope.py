"""Triton rotary position embedding (RoPE) kernel and its host launcher.

Semantics: docs/rope_kernel_contract.md (the reference implementation is the specification).
This module imports only torch and triton (it is installed as ``kxops.triton_kernels``).

Design (memory bound: every element of q/k is read once and written once):
- grid = (cdiv(S, BLOCK_T), B). A program owns BLOCK_T consecutive tokens of one batch row.
- cos/sin depend on (token, pair) only: the program computes the positions of its tokens and a
  (BLOCK_T, BLOCK_D) float32 cos/sin tile ONCE, then loops over the heads of x (and of k, in the
  same launch) in chunks of BLOCK_H heads with a (BLOCK_T, BLOCK_H, BLOCK_D) tile, reusing the
  tile. Per-element trig would make the kernel compute bound.
- No strided even/odd de-interleave: out[j] = x[j] * cos[pair(j)] + x[partner(j)] * ssin[j],
  where ssin[j] = -sin for the first element of a pair and +sin for the second (the sign is
  folded into the cos/sin tile once per token block). Rotate-half: the partner tile j +/- R/2 is
  a second load of the same cache lines (L1 hits; both loads stay 16-byte vectorised since R and
  D are constexpr). Interleaved: the partner j ^ 1 is swapped in registers (split/join of the
  loaded tile), a j ^ 1 gather would not vectorise.
- In place (out is x) with rotate-half, the partner element may be owned by another warp: a CTA
  barrier separates each chunk's loads from its stores (only compiled in for in-place calls);
  in place, the pass-through columns d >= R are neither read nor written.
- All arithmetic in float32, one rounding to the storage dtype; columns d >= R are selected in
  the storage dtype (bit-exact copy). 64-bit offsets throughout (B*S*H*D may exceed 2^31).
- Block sizes from a small heuristic in rope_launch (no autotune: it fails in the interpreter).
"""

import torch
import triton
import triton.language as tl

__all__ = ["rope_launch", "rope_kernel"]


@triton.jit
def cos_sin(theta):
    """cos and sin of a float32 angle tile, after range reduction (shared with linear_attention.py)."""
    # Range reduction to about [-pi, pi]: on GPU tl.sin/tl.cos may lower to approximate
    # instructions that are only accurate near 0, and angles reach thousands of radians.
    # Cody-Waite with 2*pi split into float32 pieces of 5 + 5 + 24 significant bits:
    # n * 6.25 and n * 0.033203125 are exact for |n| < 2^19 (|theta| < 3.3e6) and each
    # subtraction is exact or nearly so; the reduced angle stays within ~3e-7 of
    # (theta mod 2*pi) for the float32 theta (far below ulp(theta) for large angles).
    n = tl.floor(theta * 0.15915494309189535 + 0.5)
    r = theta - n * 6.25
    r = r - n * 0.033203125
    r = r + n * 1.7817820413768004e-05  # 2*pi - 6.25 - 0.033203125 < 0
    return tl.cos(r), tl.sin(r)


@triton.jit
def round_to_bf16(x):
    """float32 x rounded to the nearest-even bfloat16 value, still float32 (NaN kept as is).

    For the interpreter only, which truncates fp32 -> bf16 casts (the compiled cvt rounds to
    nearest even): after this the cast is exact, so interpreter runs round like the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _apply_rotary_heads(
    OUT,
    X,
    base_x,  # (BLOCK_T, 1, 1) int64: batch/token part of the element offset in X
    base_out,  # (BLOCK_T, 1, 1) int64: same for OUT
    mask_t,  # (BLOCK_T, 1, 1)
    cos3,  # (BLOCK_T, 1, BLOCK_D) float32
    ssin3,  # (BLOCK_T, 1, BLOCK_D) float32, sign of the pair element folded in
    nheads,
    stride_x_head,
    stride_x_dim,
    stride_out_head,
    stride_out_dim,
    ROTARY_DIM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    IN_PLACE: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    HALF = ROTARY_DIM // 2  # constexpr arithmetic stays constexpr
    offs_d = tl.arange(0, BLOCK_D)
    # ROTARY_DIM / HEAD_DIM are constexpr: the D masks are compile-time patterns (all-true when
    # R == D == BLOCK_D), so the contiguity analysis keeps 16-byte vector loads/stores, also for
    # the rotate-half partner (contiguous runs of R/2 elements).
    rot_d = (offs_d < ROTARY_DIM)[None, None, :]
    if IN_PLACE:
        # out is x: the pass-through columns d >= R already hold their values, neither read
        # nor written (saves (D - R) / D of the traffic for partial rotary).
        in_d = rot_d
    else:
        in_d = (offs_d < HEAD_DIM)[None, None, :]
    offs_d3 = offs_d.to(tl.int64)[None, None, :]
    x_d = offs_d3 * stride_x_dim
    o_d = offs_d3 * stride_out_dim
    if not INTERLEAVED:
        offs_p = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
        x_p = offs_p.to(tl.int64)[None, None, :] * stride_x_dim
    for h0 in range(0, nheads, BLOCK_H):
        # 64-bit head offsets: h * stride_head can exceed 2^31 for large (transposed) layouts.
        offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask_h = (offs_h < nheads)[None, :, None]
        mask_th = mask_t & mask_h
        x_ptrs = X + (base_x + offs_h[None, :, None] * stride_x_head)
        x_raw = tl.load(x_ptrs + x_d, mask=mask_th & in_d, other=0.0)
        # all arithmetic in float32 (bf16 math is also wrong in the interpreter), one rounding.
        x_f = x_raw.to(tl.float32)
        if INTERLEAVED:
            # partner j ^ 1 swapped in registers (the pair sits in one thread's vector): no
            # second load (a j ^ 1 gather would not vectorise) and no cross-thread dependency.
            x_a, x_b = tl.split(tl.reshape(x_f, [BLOCK_T, BLOCK_H, BLOCK_D // 2, 2]))
            xp = tl.reshape(tl.join(x_b, x_a), [BLOCK_T, BLOCK_H, BLOCK_D])
        else:
            # partner load j +/- R/2 (same cache lines, L1 hit), only inside the rotary part.
            xp = tl.load(x_ptrs + x_p, mask=mask_th & rot_d, other=0.0).to(tl.float32)
            if IN_PLACE:
                # out is x and the partner element may belong to another thread or warp (a head
                # row spread over several warps): every load of this chunk must be performed
                # before any store of it; bar.sync orders the CTA's memory accesses.
                tl.debug_barrier()
        rot = x_f * cos3 + xp * ssin3
        if EMULATE_RNE:
            # Interpreter only (compiled out on GPU, where the fp32 -> bf16 cvt already rounds to
            # nearest even): the interpreter truncates fp32 -> bf16, so round the fp32 bits to
            # the nearest bf16 value here (NaN kept as is); the cast below is then exact.
            rot = round_to_bf16(rot)
        # pass-through columns (d >= R) are selected in the storage dtype: bit-exact copy
        # (no x*1 + 0 arithmetic, which would turn -0 into +0 and inf partners into NaN).
        out = tl.where(rot_d, rot.to(x_raw.dtype), x_raw)
        o_ptrs = OUT + (base_out + offs_h[None, :, None] * stride_out_head) + o_d
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=mask_th & in_d)


@triton.jit
def rope_kernel(
    OUT,
    X,
    K_OUT,
    K,
    POS,
    OFFSETS,
    CU_SEQLENS,
    INV_FREQ,
    AXIS,
    seqlen,
    nheads,
    nheads_k,
    nseq,
    offset,  # int added to every default position (int offsets)
    stride_out_batch,
    stride_out_seqlen,
    stride_out_head,
    stride_out_dim,
    stride_x_batch,
    stride_x_seqlen,
    stride_x_head,
    stride_x_dim,
    stride_k_out_batch,
    stride_k_out_seqlen,
    stride_k_out_head,
    stride_k_out_dim,
    stride_k_batch,
    stride_k_seqlen,
    stride_k_head,
    stride_k_dim,
    stride_pos_batch,  # 0 when positions has Bp == 1 (broadcast over the batch)
    stride_pos_seqlen,
    stride_pos_axis,
    ROTARY_DIM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_AXIS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_K: tl.constexpr,
    IN_PLACE: tl.constexpr,  # OUT is X (same view): rotate-half needs a barrier, tail untouched
    K_IN_PLACE: tl.constexpr,  # K_OUT is K
    SEARCH_ITERS: tl.constexpr,  # binary-search steps over cu_seqlens (>= bit_length(nseq + 1))
    EMULATE_RNE: tl.constexpr,  # interpreter + bf16 only: see _apply_rotary_heads
    BLOCK_T: tl.constexpr,
    # heads per tile, the same for x and k: one 3-D tile shape gives one register layout for
    # both loops and for the shared cos/sin tile (mixed shapes raised register use by ~50-75%)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    # 64-bit batch/token indices before any stride product (B*S*H*D can exceed 2^31).
    pid_b = tl.program_id(1).to(tl.int64)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < seqlen

    HALF = ROTARY_DIM // 2  # constexpr arithmetic stays constexpr
    offs_d = tl.arange(0, BLOCK_D)
    rot_d = offs_d < ROTARY_DIM
    if INTERLEAVED:
        pair = offs_d // 2
        first = (offs_d % 2) == 0
    else:
        pair = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
        first = offs_d < HALF

    # ---- per-pair frequency (and axis): tiny, L1/L2 resident, loaded once per program ----
    inv_freq = tl.load(INV_FREQ + pair, mask=rot_d, other=0.0).to(tl.float32)

    # ---- positions of the BLOCK_T tokens (loaded / searched once per program) ----
    if HAS_POS:
        pos_base = pid_b * stride_pos_batch + offs_t * stride_pos_seqlen
        if HAS_AXIS:
            ax = tl.load(AXIS + pair, mask=rot_d, other=0).to(tl.int64)
            # (BLOCK_T, BLOCK_D) gather of a handful of distinct values per token: cached.
            pos = tl.load(
                POS + (pos_base[:, None] + ax[None, :] * stride_pos_axis),
                mask=mask_t[:, None] & rot_d[None, :],
                other=0,
            )
            pos_f = pos.to(tl.float32)
        else:
            pos = tl.load(POS + pos_base, mask=mask_t, other=0)
            pos_f = pos.to(tl.float32)[:, None]
    else:
        if IS_VARLEN:
            # sequence of token s = upper_bound(cu_seqlens, s) - 1, vectorised over the block's
            # tokens (handles empty sequences: cu[n] == cu[n + 1]).
            lo = tl.zeros([BLOCK_T], dtype=tl.int32)
            hi = tl.zeros([BLOCK_T], dtype=tl.int32) + (nseq + 1)
            tok = offs_t.to(tl.int32)
            for _ in range(SEARCH_ITERS):
                active = lo < hi
                mid = (lo + hi) // 2
                v = tl.load(CU_SEQLENS + mid, mask=active & mask_t, other=0)
                go_right = active & (v <= tok)
                lo = tl.where(go_right, mid + 1, lo)
                hi = tl.where(active & (v > tok), mid, hi)
            seq = tl.maximum(lo - 1, 0)
            start = tl.load(CU_SEQLENS + seq, mask=mask_t, other=0)
            pos = offs_t - start.to(tl.int64) + offset
            if HAS_OFFSETS:
                pos += tl.load(OFFSETS + seq, mask=mask_t, other=0)
        else:
            pos = offs_t + offset
            if HAS_OFFSETS:
                pos += tl.load(OFFSETS + pid_b)
        pos_f = pos.to(tl.float32)[:, None]

    # ---- cos/sin tile, float32, once per token block (reused for every head of q and k) ----
    theta = pos_f * inv_freq[None, :]
    c, s = cos_sin(theta)
    if CONJUGATE:
        s = -s
    # fold the rotation sign in: out_a = x_a*c - x_b*s, out_b = x_b*c + x_a*s
    ssin = tl.where(first, -s, s)
    cos3 = c[:, None, :]
    ssin3 = ssin[:, None, :]

    mask_t3 = mask_t[:, None, None]
    t3 = offs_t[:, None, None]
    _apply_rotary_heads(
        OUT,
        X,
        pid_b * stride_x_batch + t3 * stride_x_seqlen,
        pid_b * stride_out_batch + t3 * stride_out_seqlen,
        mask_t3,
        cos3,
        ssin3,
        nheads,
        stride_x_head,
        stride_x_dim,
        stride_out_head,
        stride_out_dim,
        ROTARY_DIM,
        HEAD_DIM,
        INTERLEAVED,
        IN_PLACE,
        EMULATE_RNE,
        BLOCK_T,
        BLOCK_H,
        BLOCK_D,
    )
    if HAS_K:
        # k (GQA: its own head count) in the same launch: the cos/sin tile is shared.
        _apply_rotary_heads(
            K_OUT,
            K,
            pid_b * stride_k_batch + t3 * stride_k_seqlen,
            pid_b * stride_k_out_batch + t3 * stride_k_out_seqlen,
            mask_t3,
            cos3,
            ssin3,
            nheads_k,
            stride_k_head,
            stride_k_dim,
            stride_k_out_head,
            stride_k_out_dim,
            ROTARY_DIM,
            HEAD_DIM,
            INTERLEAVED,
            K_IN_PLACE,
            EMULATE_RNE,
            BLOCK_T,
            BLOCK_H,
            BLOCK_D,
        )


# The interpreter (TRITON_INTERPRET=1, decided when @triton.jit runs) truncates fp32 -> bf16
# casts; the compiled kernel rounds to nearest even. EMULATE_RNE restores RNE in the interpreter.
_INTERPRETED = not isinstance(rope_kernel, triton.runtime.jit.JITFunction)

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
# elements of one (BLOCK_T, BLOCK_H, BLOCK_D) tile: 4096 bf16 = 8 KiB per load, 32 elements per
# thread with 4 warps -> four 16-byte vector loads per thread per tile, enough bytes in flight.
_TILE_ELEMS = 4096


def _pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 is a jit function, slow to call)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _check_tensor(name, t):
    if t.dtype not in _SUPPORTED:
        raise ValueError(
            f"rope (triton): unsupported dtype {t.dtype} for {name}; "
            "supported: float16, bfloat16, float32"
        )


def rope_launch(
    x,
    out,
    k,
    k_out,
    positions,
    offsets,
    offset: int,
    cu_seqlens,
    inv_freq,
    axis,
    rotary_dim: int,
    interleaved: bool,
    conjugate: bool,
    in_place: bool,
    traceable: bool = True,
) -> None:
    """Apply RoPE to x (-> out) and optionally k (-> k_out) in ONE launch (contract semantics).

    x, out: (B, S, H, D), any strides; k, k_out: None or (B, S, Hk, D). in_place: out is x and k_out is
    k (the in-place ops); otherwise out and k_out are fresh tensors (the functional ops).
    positions: None or int64 (Bp, S, A), Bp in {1, B}. offsets: None or int64 (B,) / (nseq,).
    offset: int added to every default position (0 when positions are given).
    cu_seqlens: None or int32 (nseq + 1,) (B == 1). inv_freq: fp32 (R/2,). axis: None or int32.
    traceable: launch through torch.library.wrap_triton (inside triton_op, so that torch.compile and
    export can trace the kernel); False launches the kernel directly (eager, real tensors).
    The host work per call is what decoding pays: nothing here allocates or syncs for arguments that
    are already right.
    """
    _check_tensor("x", x)
    B, S, H, D = x.shape
    has_k = k is not None and k.numel() > 0
    if k is not None:
        _check_tensor("k", k)
    if tuple(out.shape) != (B, S, H, D) or out.dtype != x.dtype or (
            k is not None and (k_out is None or k_out.shape != k.shape or k_out.dtype != k.dtype)):
        raise ValueError("rope (triton): outputs must match their inputs in shape and dtype")
    Hk = k.shape[2] if has_k else 0
    R = int(rotary_dim)
    if R % 2 != 0 or R < 2 or R > D:
        raise ValueError(f"rope (triton): invalid rotary_dim {R} for head_dim {D}")
    if x.numel() == 0 and not has_k:
        return
    if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or inv_freq.shape[0] < R // 2:
        raise ValueError("rope (triton): inv_freq must be a float32 vector of at least rotary_dim/2 entries")
    inv_freq = inv_freq.contiguous()

    has_pos = positions is not None
    is_varlen = (cu_seqlens is not None) and not has_pos
    has_offsets = (offsets is not None) and not has_pos
    has_axis = has_pos and axis is not None and positions.shape[2] > 1
    if has_pos:
        if positions.dtype != torch.int64:
            positions = positions.to(torch.int64)
        sp = positions.stride()
        stride_pos = (sp[0] if positions.shape[0] > 1 else 0, sp[1], sp[2])
    else:
        stride_pos = (0, 0, 0)
    if has_axis:
        axis = axis.to(torch.int32).contiguous()
    if has_offsets:
        offsets = offsets.to(torch.int64).contiguous()
    nseq = 0
    search_iters = 1
    if is_varlen:
        if B != 1:
            raise ValueError("rope (triton): cu_seqlens requires batch size 1")
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
        nseq = cu_seqlens.shape[0] - 1
        search_iters = max(1, (nseq + 1).bit_length())
    in_place = bool(in_place) and x.numel() > 0

    # placeholders for absent pointers (never dereferenced: guarded by constexpr flags)
    dummy = inv_freq
    k_arg = k if has_k else x
    k_out_arg = k_out if has_k else out

    # ---- block-size heuristic (no autotune: it does not run in the interpreter) ----
    BLOCK_D = max(2, _pow2(D))
    # heads per tile (x and k alike): as many as fit in the element budget while leaving room
    # for >= 4 tokens per tile, and no more than the head count (masked lanes would idle).
    BLOCK_H = max(1, min(_pow2(max(H, Hk, 1)), _TILE_ELEMS // (BLOCK_D * 4)))
    # tokens per program: fill the tile budget; more tokens per program only lowers the number
    # of programs (capped at 64 and at S).
    BLOCK_T = max(1, min(64, _pow2(S), _TILE_ELEMS // (BLOCK_D * BLOCK_H)))
    tile = BLOCK_T * BLOCK_H * BLOCK_D
    num_warps = 4 if tile >= 2048 else (2 if tile >= 512 else 1)

    grid = ((S + BLOCK_T - 1) // BLOCK_T, B)
    # wrap_triton: torch.compile / triton_op trace the launch instead of running it
    kernel = torch.library.wrap_triton(rope_kernel) if traceable else rope_kernel
    kernel[grid](
        out,
        x,
        k_out_arg,
        k_arg,
        positions if has_pos else dummy,
        offsets if has_offsets else dummy,
        cu_seqlens if is_varlen else dummy,
        inv_freq,
        axis if has_axis else dummy,
        S,
        H,
        Hk,
        nseq,
        int(offset) if not has_pos else 0,
        *out.stride(),
        *x.stride(),
        *k_out_arg.stride(),
        *k_arg.stride(),
        *stride_pos,
        ROTARY_DIM=R,
        HEAD_DIM=D,
        INTERLEAVED=bool(interleaved),
        CONJUGATE=bool(conjugate),
        HAS_POS=has_pos,
        HAS_AXIS=has_axis,
        IS_VARLEN=is_varlen,
        HAS_OFFSETS=has_offsets,
        HAS_K=has_k,
        IN_PLACE=in_place,
        K_IN_PLACE=in_place and has_k,
        SEARCH_ITERS=search_iters,
        EMULATE_RNE=_INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_T=BLOCK_T,
        BLOCK_H=BLOCK_H,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
