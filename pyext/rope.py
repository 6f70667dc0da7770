"""kxops.rope / kxops.rope_qk: fused rotary position embedding, 1-D and N-D.

Each public function is one call into the C++ front (csrc/rope.cpp): argument checks, normalisation to
the kernel contract (docs/rope_kernel_contract.md) and the backend choice happen there, and the chosen
backend op runs: the C++ CPU / CUDA ops kxops::rope*, the Triton ops kxops::rope*_triton or the reference
ops kxops::rope*_reference. This module registers what is Python: the Triton ops (with their autograd),
the reference ops and the fake implementations of the C++ ops.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C, _dispatch
from .reference import rope_impl as _ref

__all__ = ["rope", "rope_qk", "grid_positions", "text_image_positions"]

grid_positions = _ref.grid_positions
text_image_positions = _ref.text_image_positions


# ----------------------------------------------------------------------------------------------
# Op registration. The backend ops take x (or q, k) and the normalised arguments
# (positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, conjugate).

def _fake_rope(x, *args):
    return x.new_empty(x.shape)


def _fake_rope_qk(q, k, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _fake_inplace(*args):
    return None


_dispatch.register_fakes({"kxops::rope": _fake_rope, "kxops::rope_": _fake_inplace,
                          "kxops::rope_qk": _fake_rope_qk, "kxops::rope_qk_": _fake_inplace})


def _reference(x, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, conjugate):
    return _ref.rope_ref(x, positions, offsets, cu_seqlens, inv_freq=inv_freq, axis=axis, rotary_dim=rotary_dim,
                         interleaved=interleaved, conjugate=conjugate, offset=offset)


def _reference_qk(q, k, *args):
    return _reference(q, *args), _reference(k, *args)


_dispatch.implement_reference("kxops::rope_reference", _reference)
_dispatch.implement_reference("kxops::rope_qk_reference", _reference_qk)


def _rope_backward(op, n):
    """y = R(theta) x  =>  dx = R(-theta) dy: the same op with `conjugate` flipped (x itself is not needed)."""
    def backward(inputs, *grads):
        args = inputs[n:]
        return op(*grads, *args[:-1], not args[-1])
    return backward


def _triton_rope(x, *args, traceable=True):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _triton_launch(x, out, None, None, *args, in_place=False, traceable=traceable)
    return out


def _triton_rope_(x, *args, traceable=True):
    _triton_launch(x, x, None, None, *args, in_place=True, traceable=traceable)


def _triton_rope_qk(q, k, *args, traceable=True):
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _triton_launch(q, q_out, k, k_out, *args, in_place=False, traceable=traceable)
    return q_out, k_out


def _triton_rope_qk_(q, k, *args, traceable=True):
    _triton_launch(q, q, k, k, *args, in_place=True, traceable=traceable)


if _dispatch.TRITON_IMPORTABLE:
    from torch.library import triton_op as _triton_op

    from .triton_kernels.rope import rope_launch as _triton_launch

    # The ops as torch.compile and export see them (triton_op: the kernel launch is traced).
    @_triton_op("kxops::rope_triton", mutates_args=())
    def _rope_triton(x: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor], offset: int,
                     cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                     interleaved: bool, conjugate: bool) -> Tensor:
        return _triton_rope(x, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved,
                            conjugate)

    @_triton_op("kxops::rope_triton_", mutates_args=("x",))
    def _rope_triton_op_(x: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor], offset: int,
                         cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                         interleaved: bool, conjugate: bool) -> None:
        _triton_rope_(x, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved, conjugate)

    @_triton_op("kxops::rope_qk_triton", mutates_args=())
    def _rope_qk_triton(q: Tensor, k: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor], offset: int,
                        cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor], rotary_dim: int,
                        interleaved: bool, conjugate: bool) -> tuple[Tensor, Tensor]:
        return _triton_rope_qk(q, k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim,
                               interleaved, conjugate)

    @_triton_op("kxops::rope_qk_triton_", mutates_args=("q", "k"))
    def _rope_qk_triton_op_(q: Tensor, k: Tensor, positions: Optional[Tensor], offsets: Optional[Tensor],
                            offset: int, cu_seqlens: Optional[Tensor], inv_freq: Tensor, axis: Optional[Tensor],
                            rotary_dim: int, interleaved: bool, conjugate: bool) -> None:
        _triton_rope_qk_(q, k, positions, offsets, offset, cu_seqlens, inv_freq, axis, rotary_dim, interleaved,
                         conjugate)

    _dispatch.register_triton_autograd("kxops::rope_triton", _rope_backward(torch.ops.kxops.rope_triton, 1), skip=1)
    _dispatch.register_triton_autograd("kxops::rope_qk_triton", _rope_backward(torch.ops.kxops.rope_qk_triton, 2),
                                       skip=2)
    # Eager calls on real CUDA tensors launch directly, without triton_op's wrappers.
    _dispatch.register_eager_cuda({"kxops::rope_triton": _triton_rope, "kxops::rope_triton_": _triton_rope_,
                                   "kxops::rope_qk_triton": _triton_rope_qk,
                                   "kxops::rope_qk_triton_": _triton_rope_qk_})


# ----------------------------------------------------------------------------------------------
# The public functions.

def _traced(qk, q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections, offsets,
            cu_seqlens, inplace, backend):
    """Under torch.compile / export: the front op (the same C++ as the eager entry), which Dynamo records
    and AOTAutograd traces into the chosen backend's op."""
    offset = None
    if isinstance(offsets, int):
        offset, offsets = int(offsets), None
    secs = None if sections is None else [int(s) for s in sections]
    args = (positions, float(base), inv_freq, rotary_dim, bool(interleaved), axis_layout, secs, offsets, offset,
            cu_seqlens, backend)
    ops = torch.ops.kxops
    if inplace:
        if qk:
            ops.rope_qk_front_(q, k, *args)
            return q, k
        ops.rope_front_(q, *args)
        return q
    return ops.rope_qk_front(q, k, *args) if qk else ops.rope_front(q, *args)


def rope(x: Tensor, positions: Optional[Tensor] = None, *, base: float = 10000.0, inv_freq: Optional[Tensor] = None,
         rotary_dim: Optional[int] = None, interleaved: bool = False, axis_layout: str = "halves",
         sections: Optional[Sequence[int]] = None, offsets=None, cu_seqlens: Optional[Tensor] = None,
         inplace: bool = False, backend: str = "auto") -> Tensor:
    """Rotary position embedding (Su et al., RoFormer), fused: angles and sin/cos are computed in float32
    inside the kernel, no cos/sin cache is needed.

    x: (batch, seq, heads, head_dim), any strides; or packed (total_tokens, heads, head_dim) with
       cu_seqlens (int32, (batch + 1,)), positions restarting at 0 in each sequence.
    positions: None (0..seq-1, plus `offsets` if given), or integer (seq,) / (batch, seq) for 1-D RoPE, or
       (batch or 1, seq, axes) for N-D RoPE (axes = 2 for images, 3 for video); packed: (total_tokens,)
       or (total_tokens, axes).
    offsets: added to the default positions: an int (e.g. the KV-cache length; nothing is allocated for
       it) or an integer tensor (batch,) (with cu_seqlens: one per sequence).
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
    if not _dispatch.compiling():
        return _C.rope(False, x, None, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
                       offsets, cu_seqlens, inplace, backend)
    return _traced(False, x, None, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
                   offsets, cu_seqlens, inplace, backend)


def rope_qk(q: Tensor, k: Tensor, positions: Optional[Tensor] = None, *, base: float = 10000.0,
            inv_freq: Optional[Tensor] = None, rotary_dim: Optional[int] = None, interleaved: bool = False,
            axis_layout: str = "halves", sections: Optional[Sequence[int]] = None, offsets=None,
            cu_seqlens: Optional[Tensor] = None, inplace: bool = False, backend: str = "auto"):
    """rope() of q (batch, seq, heads_q, head_dim) and k (batch, seq, heads_k, head_dim) in one launch:
    each token's sin/cos are computed once for both (heads_q != heads_k is fine: grouped-query attention).
    Same arguments as rope(); returns (q_out, k_out)."""
    if not _dispatch.compiling():
        return _C.rope(True, q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
                       offsets, cu_seqlens, inplace, backend)
    return _traced(True, q, k, positions, base, inv_freq, rotary_dim, interleaved, axis_layout, sections,
                   offsets, cu_seqlens, inplace, backend)
