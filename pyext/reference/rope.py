"""Rotary position embedding in pure PyTorch: the specification every kxops backend is proven equal to.

Follows ../shared/spec/rope.md (Su Jianlin, kexue.fm 8265, 8397, 10040, 10352). Shapes:
x: (batch, seq, heads, head_dim); positions: (batch or 1, seq, axes) int64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

AXIS_LAYOUTS = ("halves", "alternating", "mrope")


def default_sections(num_pairs: int, num_axes: int) -> list[int]:
    """Pairs per axis for an even split; the first axes take the remainder ([11, 11, 10] for 32/3)."""
    q, r = divmod(num_pairs, num_axes)
    return [q + (a < r) for a in range(num_axes)]


def rope_schedule(rotary_dim: int, base: float = 10000.0, num_axes: int = 1, axis_layout: str = "halves",
                  sections: Optional[Sequence[int]] = None, dtype=torch.float64, device=None):
    """Frequency and axis of every rotary pair: (inv_freq (rotary_dim/2,), axis (rotary_dim/2,) int32 or None).

    - 1-D: inv_freq_i = base^(-2i/rotary_dim).
    - "halves" (kexue.fm 8397, 10040): contiguous parts of `sections[a]` pairs follow axis a, each part
      with the 1-D schedule of its own size (2 * sections[a]).
    - "alternating" (kexue.fm 10352): pairs are dealt round-robin to the axes that still have room in
      `sections` (pair i follows axis i mod A for an even split), with the full 1-D schedule, so that
      x = y = n reduces to 1-D RoPE at n. With sections such as [24, 20, 20] this is Qwen3-VL's
      interleaved M-RoPE.
    - "mrope" (Qwen2-VL's M-RoPE): contiguous parts of `sections[a]` pairs with the full 1-D schedule.
    """
    inv_freq, axis = schedule_lists(rotary_dim, base, num_axes, axis_layout, sections)
    inv_freq = torch.tensor(inv_freq, dtype=torch.float64).to(dtype=dtype, device=device)
    return inv_freq, None if axis is None else torch.tensor(axis, dtype=torch.int32, device=device)


def schedule_lists(rotary_dim: int, base: float, num_axes: int, axis_layout: str, sections):
    """rope_schedule as Python lists (float64 values): no tensor ops, so torch.compile folds it."""
    half = rotary_dim // 2
    full = [base ** (-2.0 * i / rotary_dim) for i in range(half)]
    if num_axes == 1 and sections is None:
        return full, None
    secs = list(sections) if sections is not None else default_sections(half, num_axes)
    if axis_layout == "alternating":
        left, axis = list(secs), []
        while len(axis) < half:
            for a in range(len(secs)):
                if left[a] > 0 and len(axis) < half:
                    axis.append(a)
                    left[a] -= 1
        return full, axis
    axis = [a for a, n in enumerate(secs) for _ in range(n)]
    if axis_layout == "mrope":
        return full, axis
    return [base ** (-2.0 * j / (2 * n)) for n in secs for j in range(n)], axis


def token_positions(batch: int, seq: int, positions=None, offsets=None, cu_seqlens=None, offset: int = 0,
                    device=None) -> torch.Tensor:
    """Every token's position as an int64 (batch or 1, seq, axes) tensor (the contract's position rule)."""
    if positions is not None:
        return positions.long()
    if device is None:
        device = offsets.device if offsets is not None else (cu_seqlens.device if cu_seqlens is not None else None)
    s = torch.arange(seq, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        seq_id = torch.searchsorted(cu, s, right=True) - 1   # empty sequences are skipped
        pos = s - cu[seq_id] + offset
        if offsets is not None:
            pos = pos + offsets.long()[seq_id]
        return pos.view(1, seq, 1)
    s = s + offset
    if offsets is not None:
        return (s[None, :] + offsets.long()[:, None])[..., None]
    return s.view(1, seq, 1)


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor, axis: Optional[torch.Tensor]) -> torch.Tensor:
    """pos (Bp, S, A) int -> angles (Bp, S, R/2) in inv_freq's dtype (float32 in kernels, float64 for ref64)."""
    p = pos.to(inv_freq.dtype)
    p = p[..., :1] if axis is None else p.index_select(-1, axis.long())
    return p * inv_freq


def rope_rotate(x: torch.Tensor, ang: torch.Tensor, rotary_dim: int, interleaved: bool,
                conjugate: bool = False) -> torch.Tensor:
    """x (B, S, H, D) rotated by ang (B|1, S, R/2); cos/sin cast to x.dtype as users' eager code does.
    The coordinates past rotary_dim are passed through unchanged."""
    c = ang.cos().to(x.dtype)[:, :, None]
    s = ang.sin().to(x.dtype)[:, :, None]
    if conjugate:
        s = -s
    xr, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
    else:
        x0, x1 = xr.chunk(2, -1)
        y = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), -1)
    return torch.cat((y, tail), -1) if tail.shape[-1] else y


def rope_ref(x: torch.Tensor, positions=None, offsets=None, cu_seqlens=None, *, inv_freq: torch.Tensor,
             axis: Optional[torch.Tensor] = None, rotary_dim: Optional[int] = None, interleaved: bool = False,
             conjugate: bool = False, offset: int = 0) -> torch.Tensor:
    """The reference on normalised arguments (x 4-D; see docs/rope_kernel_contract.md). Angles are computed
    in inv_freq's dtype: pass a float64 table and float64 x for the float64 ground truth."""
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    pos = token_positions(x.shape[0], x.shape[1], positions, offsets, cu_seqlens, offset, x.device).to(x.device)
    return rope_rotate(x, rope_angles(pos, inv_freq.to(x.device), axis), rotary_dim, interleaved, conjugate)


def rope(x: torch.Tensor, positions=None, *, base: float = 10000.0, inv_freq=None, rotary_dim=None,
         interleaved: bool = False, axis_layout: str = "halves", sections=None, offsets=None, cu_seqlens=None,
         inplace: bool = False) -> torch.Tensor:
    """kxops.rope's arguments, computed by the specification: eager PyTorch, differentiable, no argument
    checks (kxops.rope makes them)."""
    return _rope_api(x, None, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections, offsets,
                     cu_seqlens, inplace)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions=None, **kw):
    """rope() of q and k; returns (q_out, k_out)."""
    return _rope_api(q, k, positions, kw.pop("base", 10000.0), kw.pop("inv_freq", None), kw.pop("rotary_dim", None),
                     kw.pop("interleaved", False), kw.pop("axis_layout", "halves"), kw.pop("sections", None),
                     kw.pop("offsets", None), kw.pop("cu_seqlens", None), kw.pop("inplace", False), **kw)


def _rope_api(q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections, offsets, cu_seqlens,
              inplace):
    packed = cu_seqlens is not None
    R = rotary_dim if rotary_dim is not None else (q.shape[-1] if inv_freq is None else 2 * inv_freq.shape[0])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    offset = 0
    if isinstance(offsets, int):
        offset, offsets = offsets, None
    pos = None
    if positions is not None:  # to (batch or 1, seq, axes); packed: (1, total_tokens, axes)
        p = positions
        if packed:
            p = p[None, :, None] if p.dim() == 1 else p[None]
        else:
            p = p[None, :, None] if p.dim() == 1 else (p[..., None] if p.dim() == 2 else p)
        pos, cu_seqlens = p.long(), None
    num_axes = len(sections) if sections is not None else (1 if pos is None else pos.shape[-1])
    table, axis = rope_schedule(R, base, num_axes, axis_layout, sections, acc, q.device)
    table = table if inv_freq is None else inv_freq.to(acc)
    outs = []
    for t in (q, k):
        if t is None:
            continue
        y = rope_ref(t[None] if packed else t, pos, offsets, cu_seqlens, inv_freq=table,
                     axis=None if pos is None else axis, rotary_dim=R, interleaved=interleaved, offset=offset)
        y = y[0] if packed else y
        outs.append(t.copy_(y) if inplace else y)
    return outs[0] if k is None else tuple(outs)


def grid_positions(h: int, w: int, start=0, device=None) -> torch.Tensor:
    """(h*w, 2) row-major 2-D positions (start + r, start + c) of an h x w image."""
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    return torch.stack((r, c), -1) + torch.as_tensor(start, device=device)


def text_image_positions(segments: Sequence, device=None) -> torch.Tensor:
    """(S, 2) positions of a sequence of text and image segments (kexue.fm 10040 / 10352).

    `segments` lists ("text", n) and ("image", h, w) items in order. Text token n gets (n, n); an h x w
    image after text ending at position L gets patch (r, c) (0-based) -> (L + 1 + (wh - h)/2 + r,
    L + 1 + (wh - w)/2 + c) with wh = max(h, w), and the next text token continues at L + wh + 1.
    (wh - h)/2 is rounded down for odd differences since the kernels take integer positions.
    """
    out, nxt = [], 0
    for seg in segments:
        if seg[0] == "text":
            n = int(seg[1])
            p = torch.arange(nxt, nxt + n)
            out.append(torch.stack((p, p), -1))
            nxt += n
        elif seg[0] == "image":
            h, w = int(seg[1]), int(seg[2])
            wh = max(h, w)
            b1, b2 = nxt + (wh - h) // 2, nxt + (wh - w) // 2
            out.append(grid_positions(h, w) + torch.tensor([b1, b2]))
            nxt += wh
        else:
            raise ValueError(f"text_image_positions: segments must be ('text', n) or ('image', h, w), got {seg!r}")
    return torch.cat(out).to(device)

