"""kxops.rope / kxops.rope_qk: fused rotary position embedding, 1-D and N-D.

The public functions validate the user's arguments, normalise them to the kernel contract
(docs/rope_kernel_contract.md) and call one backend: the C++ CPU / CUDA ops `kxops::rope*` or the
Triton ops `kxops::rope*_triton`, all registered with fake implementations and autograd so that
torch.compile(fullgraph=True) runs through them; "reference" runs kxops.reference.rope.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backends
from .reference import rope_impl as _ref

__all__ = ["rope", "rope_qk", "grid_positions", "text_image_positions"]

grid_positions = _ref.grid_positions
text_image_positions = _ref.text_image_positions


# ----------------------------------------------------------------------------------------------
# Op registration: fake (shape only) implementations and autograd for every backend's ops.
# Backward of y = R(theta) x is dx = R(-theta) dy: the same op with `conjugate` flipped.

def _fake_rope(x, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, conjugate):
    return x.new_empty(x.shape)


def _fake_rope_qk(q, k, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _fake_inplace(*args):
    return None


def _setup_context(ctx, inputs, output):
    n = len(inputs) - 8  # 1 tensor (rope) or 2 (rope_qk) before the shared arguments
    positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, conjugate = inputs[n:]
    ctx.save_for_backward(positions, offsets, cu_seqlens, inv_freq, axis)
    ctx.cfg = (rotary_dim, interleaved, not conjugate)
    ctx.n = n


def _make_backward(op):
    def backward(ctx, *grads):
        extra = (*ctx.saved_tensors, *ctx.cfg)
        dx = op(*grads, *extra)
        dx = dx if isinstance(dx, tuple) else (dx,)
        return (*dx, *([None] * 8))
    return backward


def _register(names, fake=True):
    rope, rope_, rope_qk, rope_qk_ = names
    if fake:  # triton_op derives its own fake implementation
        torch.library.register_fake(rope)(_fake_rope)
        torch.library.register_fake(rope_qk)(_fake_rope_qk)
        torch.library.register_fake(rope_)(_fake_inplace)
        torch.library.register_fake(rope_qk_)(_fake_inplace)
    for name in (rope, rope_qk):
        op = getattr(torch.ops.kxops, name.split("::")[1])
        torch.library.register_autograd(name, _make_backward(op), setup_context=_setup_context)


_CPP_OPS = ("kxops::rope", "kxops::rope_", "kxops::rope_qk", "kxops::rope_qk_")
_register(_CPP_OPS)

_TRITON_OPS = None
if _backends.triton_importable():
    from .triton_kernels.rope import rope_launch as _triton_launch
    from torch.library import triton_op as _triton_op

    @_triton_op("kxops::rope_triton", mutates_args=())
    def _rope_triton(x: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor],
                     cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                     interleaved: bool, conjugate: bool) -> Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _triton_launch(x, out, None, None, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim,
                       interleaved, conjugate)
        return out

    @_triton_op("kxops::rope_triton_", mutates_args=("x",))
    def _rope_triton_(x: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor],
                      cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                      interleaved: bool, conjugate: bool) -> None:
        _triton_launch(x, x, None, None, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim,
                       interleaved, conjugate)

    @_triton_op("kxops::rope_qk_triton", mutates_args=())
    def _rope_qk_triton(q: Tensor, k: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor],
                        cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                        interleaved: bool, conjugate: bool) -> tuple[Tensor, Tensor]:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        _triton_launch(q, q_out, k, k_out, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim,
                       interleaved, conjugate)
        return q_out, k_out

    @_triton_op("kxops::rope_qk_triton_", mutates_args=("q", "k"))
    def _rope_qk_triton_(q: Tensor, k: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor],
                         cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                         interleaved: bool, conjugate: bool) -> None:
        _triton_launch(q, q, k, k, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim,
                       interleaved, conjugate)

    _TRITON_OPS = ("kxops::rope_triton", "kxops::rope_triton_", "kxops::rope_qk_triton", "kxops::rope_qk_triton_")
    _register(_TRITON_OPS, fake=False)


_OPS_CACHE: dict = {}


def _ops(backend: str):
    """(rope, rope_, rope_qk, rope_qk_) overloads of a backend (cached: the lookups cost ~5 us a call)."""
    ops = _OPS_CACHE.get(backend)
    if ops is None:
        names = _TRITON_OPS if backend == "triton" else _CPP_OPS
        ops = _OPS_CACHE[backend] = tuple(getattr(torch.ops.kxops, n.split("::")[1]).default for n in names)
    return ops


class _RopeInplace(torch.autograd.Function):
    """In-place rotation that autograd can see through (a mutable custom op cannot carry a formula)."""

    @staticmethod
    def forward(ctx, backend, q, k, packed, positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim, interleaved):
        _, rope_, _, rope_qk_ = _ops(backend)
        q4 = q.unsqueeze(0) if packed else q
        args = (positions, offsets, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, False)
        if k is None:
            rope_(q4, *args)
            ctx.mark_dirty(q)
        else:
            rope_qk_(q4, k.unsqueeze(0) if packed else k, *args)
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(positions, offsets, cu_seqlens, inv_freq, axis)
        ctx.cfg = (backend, packed, rotary_dim, interleaved)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        backend, packed, rotary_dim, interleaved = ctx.cfg
        rope, _, rope_qk, _ = _ops(backend)
        args = (*ctx.saved_tensors, rotary_dim, interleaved, True)
        v = (lambda t: t.unsqueeze(0)) if packed else (lambda t: t)
        if dk is None:
            dq = rope(v(dq), *args)
        else:
            dq, dk = rope_qk(v(dq), v(dk), *args)
        if packed:
            dq, dk = dq[0], (None if dk is None else dk[0])
        return None, dq, dk, *([None] * 8)


# ----------------------------------------------------------------------------------------------
# Argument validation and normalisation.

_TABLES: dict = {}


def _tables(rotary_dim, base, num_axes, axis_layout, sections, dtype, device):
    """inv_freq and axis tables, cached per device (a tiny host-to-device copy per call otherwise)."""
    if torch.compiler.is_compiling():  # plain Python lists: compiled graphs fold them into constants
        return _ref.rope_schedule(rotary_dim, base, num_axes, axis_layout, sections, dtype, device)
    key = (rotary_dim, base, num_axes, axis_layout, sections, dtype, device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _ref.rope_schedule(rotary_dim, base, num_axes, axis_layout, sections, dtype, device)
    return t


def _is_int_tensor(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_float(name: str, arg: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: {arg} must be a floating-point tensor (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")


def _check_device(name: str, arg: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name}: {arg} must be on x's device {x.device}, got {t.device}")


def _resolve_backend(name: str, backend: str, x: Tensor) -> str:
    if backend not in ("auto", "cpu", "cuda", "triton", "reference"):
        raise ValueError(f"{name}: backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', "
                         f"got {backend!r}")
    dev = x.device.type
    if backend in ("cuda", "triton") and x.dtype == torch.float64:
        raise TypeError(f"{name}: float64 is supported by the 'cpu' and 'reference' backends only")
    if backend == "auto":
        if dev == "cpu":
            return "cpu"
        if dev == "cuda" and x.dtype != torch.float64:
            return "cuda" if _backends.has_cuda_kernels() else ("triton" if _backends.triton_importable() else "reference")
        return "reference"
    if backend == "cpu" and dev != "cpu":
        raise ValueError(f"{name}: backend='cpu' needs CPU tensors, got {x.device}")
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"{name}: backend='cuda' needs CUDA tensors, got {x.device}")
        if not _backends.has_cuda_kernels():
            raise RuntimeError(f"{name}: kxops was built without CUDA kernels (available: {_backends.backends()})")
    if backend == "triton":
        if _TRITON_OPS is None:
            raise RuntimeError(f"{name}: triton is not installed (available: {_backends.backends()})")
        if dev != "cuda" and not _backends.triton_interpreting():
            raise ValueError(f"{name}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    return backend


def _normalise_positions(name, positions, x4, packed):
    B, S = x4.shape[0], x4.shape[1]
    if not isinstance(positions, Tensor):
        raise TypeError(f"{name}: positions must be an integer tensor, got {type(positions).__name__}")
    if not _is_int_tensor(positions):
        raise TypeError(f"{name}: positions must be an integer tensor, got {positions.dtype}")
    _check_device(name, "positions", positions, x4)
    p = positions
    if packed:
        ok = (p.dim() == 1 and p.shape[0] == S) or (p.dim() == 2 and p.shape[0] == S)
        expected = f"(total_tokens={S},) or (total_tokens, axes)"
        p = p.view(1, S, -1) if ok else p
    else:
        ok = ((p.dim() == 1 and p.shape[0] == S) or (p.dim() in (2, 3) and p.shape[0] in (1, B) and p.shape[1] == S))
        expected = f"(seq={S},), (batch={B} or 1, seq) or (batch or 1, seq, axes)"
        if ok:
            p = p.view(1, S, 1) if p.dim() == 1 else (p[..., None] if p.dim() == 2 else p)
    if not ok or p.shape[-1] < 1:
        raise ValueError(f"{name}: positions must be {expected}, got shape {tuple(positions.shape)}")
    return p.long()


def _check_cu_seqlens(name, cu, total, x):
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: cu_seqlens must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: cu_seqlens must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: cu_seqlens must be a 1-D (batch + 1,) tensor, got shape {tuple(cu.shape)}")
    _check_device(name, "cu_seqlens", cu, x)
    if torch.compiler.is_compiling():
        return cu.contiguous()  # the value checks below read the data: a host sync and a graph break
    # one host sync for the three checks; the messages are worked out only on failure
    if bool((cu[0] != 0) | (cu[-1] != total) | (cu[1:] < cu[:-1]).any()):
        if bool(cu[0] != 0) or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name}: cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
        raise ValueError(f"{name}: cu_seqlens must end at total_tokens={total}, got {int(cu[-1])}")
    return cu.contiguous()


def _rope(name, q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections, offsets,
          cu_seqlens, inplace, backend):
    qn = "x" if k is None else "q"
    _check_float(name, qn, q)
    packed = cu_seqlens is not None
    want = "(total_tokens, heads, head_dim) with cu_seqlens" if packed else "(batch, seq, heads, head_dim)"
    if q.dim() != (3 if packed else 4):
        raise ValueError(f"{name}: {qn} must be {want}, got shape {tuple(q.shape)}")
    D = q.shape[-1]
    if k is not None:
        _check_float(name, "k", k)
        if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != D:
            raise ValueError(f"{name}: k must be {want} matching q {tuple(q.shape)} except in heads, "
                             f"got {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"{name}: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
        _check_device(name, "k", k, q)
    if D % 2:
        raise ValueError(f"{name}: {qn} must have an even head dimension, got {D}")
    if inv_freq is not None:
        _check_float(name, "inv_freq", inv_freq)
        _check_device(name, "inv_freq", inv_freq, q)
        if inv_freq.dim() != 1:
            raise ValueError(f"{name}: inv_freq must be 1-D (rotary_dim/2,), got shape {tuple(inv_freq.shape)}")
    R = rotary_dim if rotary_dim is not None else (D if inv_freq is None else 2 * inv_freq.shape[0])
    if isinstance(R, bool) or not isinstance(R, int):
        raise TypeError(f"{name}: rotary_dim must be an int, got {type(R).__name__}")
    if R % 2 or R < 2:
        raise ValueError(f"{name}: rotary_dim must be even and positive, got {R}")
    if R > D:
        raise ValueError(f"{name}: rotary_dim={R} exceeds head_dim={D}")
    if inv_freq is not None and inv_freq.shape[0] != R // 2:
        raise ValueError(f"{name}: inv_freq must have rotary_dim/2={R // 2} entries, got {inv_freq.shape[0]}")
    if axis_layout not in _ref.AXIS_LAYOUTS:
        raise ValueError(f"{name}: axis_layout must be one of {_ref.AXIS_LAYOUTS}, got {axis_layout!r}")
    backend = _resolve_backend(name, backend, q)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    q4 = q.unsqueeze(0) if packed else q
    k4 = None if k is None else (k.unsqueeze(0) if packed else k)
    B, S = q4.shape[0], q4.shape[1]
    if packed:
        cu_seqlens = _check_cu_seqlens(name, cu_seqlens, S, q)
    pos = None
    if positions is not None:
        if offsets is not None:
            raise ValueError(f"{name}: offsets apply to the default positions; add them to positions instead")
        pos = _normalise_positions(name, positions, q4, packed)
        cu_seqlens = None  # explicit positions are already per token
    num_axes = 1 if pos is None else pos.shape[-1]
    if sections is not None:
        secs = tuple(int(n) for n in sections)
        if any(n < 0 for n in secs) or sum(secs) != R // 2:
            raise ValueError(f"{name}: sections must be non-negative and sum to rotary_dim/2={R // 2}, "
                             f"got {list(secs)}")
        if pos is not None and len(secs) != num_axes:
            raise ValueError(f"{name}: sections must have one entry per position axis ({num_axes}), got {list(secs)}")
        sections, num_axes = secs, len(secs)
    if offsets is not None:
        n = cu_seqlens.numel() - 1 if packed else B
        if isinstance(offsets, int):
            offsets = torch.full((n,), offsets, dtype=torch.long, device=q.device)
        if not isinstance(offsets, Tensor) or not _is_int_tensor(offsets):
            raise TypeError(f"{name}: offsets must be an int or an integer tensor, got "
                            f"{offsets.dtype if isinstance(offsets, Tensor) else type(offsets).__name__}")
        _check_device(name, "offsets", offsets, q)
        if tuple(offsets.shape) != (n,):
            raise ValueError(f"{name}: offsets must have shape ({n},) (one per sequence), got {tuple(offsets.shape)}")
        offsets = offsets.long().contiguous()

    base = float(base)
    if inv_freq is None:
        if not base > 0:
            raise ValueError(f"{name}: base must be positive, got {base}")
        inv_freq, axis = _tables(R, base, num_axes, axis_layout, sections, acc, q.device)
    else:
        inv_freq = inv_freq.to(acc).contiguous()
        _, axis = _tables(R, 10000.0, num_axes, axis_layout, sections, acc, q.device)
    if pos is None:
        axis = None  # default positions are the same on every axis

    if backend == "reference":
        return _reference(q4, k4, packed, pos, offsets, cu_seqlens, inv_freq, axis, R, interleaved, inplace, q, k)

    args = (pos, offsets, cu_seqlens, inv_freq, axis, R, interleaved)
    rope_op, rope_op_, rope_qk_op, rope_qk_op_ = _ops(backend)
    if inplace:
        tensors = (q,) if k is None else (q, k)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            q, k = _RopeInplace.apply(backend, q, k, packed, *args)
        elif k is None:
            rope_op_(q4, *args, False)
        else:
            rope_qk_op_(q4, k4, *args, False)
        return q if k is None else (q, k)
    if k is None:
        out = rope_op(q4, *args, False)
        return out[0] if packed else out
    qo, ko = rope_qk_op(q4, k4, *args, False)
    return (qo[0], ko[0]) if packed else (qo, ko)


def _reference(q4, k4, packed, pos, offsets, cu_seqlens, inv_freq, axis, R, interleaved, inplace, q, k):
    outs = []
    for t4, t in ((q4, q), (k4, k)):
        if t4 is None:
            continue
        y = _ref.rope_ref(t4, pos, offsets, cu_seqlens, inv_freq=inv_freq, axis=axis, rotary_dim=R,
                          interleaved=interleaved)
        y = y[0] if packed else y
        outs.append(t.copy_(y) if inplace else y)
    return outs[0] if k is None else tuple(outs)


def rope(x: Tensor, positions: Optional[Tensor] = None, *, base: float = 10000.0, inv_freq: Optional[Tensor] = None,
         rotary_dim: Optional[int] = None, interleaved: bool = False, axis_layout: str = "halves",
         sections: Optional[Sequence[int]] = None, offsets=None, cu_seqlens: Optional[Tensor] = None,
         inplace: bool = False, backend: str = "auto") -> Tensor:
    """Rotary position embedding (Su et al., RoFormer), fused: angles and sin/cos are computed in float32
    inside the kernel, no cos/sin cache is needed.

    x: (batch, seq, heads, head_dim), any strides; or packed (total_tokens, heads, head_dim) with
       cu_seqlens (int32, (batch + 1,)), positions restarting at 0 in each sequence.
    positions: None (0..seq-1, plus `offsets` (batch,) if given, e.g. the KV-cache length), or integer
       (seq,) / (batch, seq) for 1-D RoPE, or (batch or 1, seq, axes) for N-D RoPE (axes = 2 for images,
       3 for video); packed: (total_tokens,) or (total_tokens, axes).
    rotary_dim: rotate only the first rotary_dim coordinates (even, <= head_dim; default head_dim or
       2 * len(inv_freq)); the rest are returned bit-identical.
    inv_freq: (rotary_dim/2,) frequencies replacing base^(-2i/rotary_dim) (linear / NTK / YaRN scaling).
    interleaved: True pairs (x[2i], x[2i+1]) (RoFormer, bert4keras, GPT-J); False pairs (x[i], x[i + r/2])
       (GPT-NeoX, LLaMA, HF transformers' rotate_half).
    axis_layout / sections: how N-D rotary pairs are split among the position axes: "halves" (contiguous
       parts, each with the 1-D schedule of its own size), "alternating" (pair i follows axis i mod A,
       full schedule; x = y = n equals 1-D RoPE at n), "mrope" (Qwen2-VL: contiguous parts, full schedule);
       `sections` gives the number of pairs per axis.
    inplace: write the result into x (autograd still works: the rotation is invertible).
    backend: "auto" (fastest for x's device), "cpu", "cuda", "triton" or "reference".
    Returns a tensor of x's shape and dtype (contiguous unless inplace).
    """
    return _rope("rope", x, None, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
                 offsets, cu_seqlens, inplace, backend)


def rope_qk(q: Tensor, k: Tensor, positions: Optional[Tensor] = None, *, base: float = 10000.0,
            inv_freq: Optional[Tensor] = None, rotary_dim: Optional[int] = None, interleaved: bool = False,
            axis_layout: str = "halves", sections: Optional[Sequence[int]] = None, offsets=None,
            cu_seqlens: Optional[Tensor] = None, inplace: bool = False, backend: str = "auto"):
    """rope() of q (batch, seq, heads_q, head_dim) and k (batch, seq, heads_k, head_dim) in one launch:
    each token's sin/cos are computed once for both (heads_q != heads_k is fine: grouped-query attention).
    Same arguments as rope(); returns (q_out, k_out)."""
    return _rope("rope_qk", q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
                 offsets, cu_seqlens, inplace, backend)
