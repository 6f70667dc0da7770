"""kxops.linear_attention / causal_dot_product / linear_attention_step: causal (prefix-sum) and global linear
attention with fused feature maps, RoPE in the numerator, state passing, packed sequences and decoding.

Each public function is one call into the C++ front (csrc/linear_attention.cpp): argument checks,
normalisation to the kernel contract (docs/linear_attention_kernel_contract.md) and the backend choice
happen there, and the chosen backend op runs: the C++ CPU / CUDA ops kxops::linear_attention*, the Triton
ops kxops::linear_attention*_triton or the reference ops kxops::linear_attention*_reference. This module
registers what is Python: the fake implementations of the C++ ops, the reference ops and the Triton ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C, _dispatch
from .reference import linear_attention_impl as _ref

__all__ = ["linear_attention", "causal_dot_product", "linear_attention_step"]


# ----------------------------------------------------------------------------------------------
# Op registration. Kernel ops take q, k, v, S0, z0 and the normalised arguments
# (cu_seqlens, positions, inv_freq, interleaved, feature_map, scale, normalize, eps, causal).

def _state_shape(q, v, cu_seqlens, feature_map):
    n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    f = q.shape[-1] + (1 if feature_map == 3 else 0)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (n, q.shape[2], f, v.shape[-1]), acc


def _fake_forward(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, *args):
    shape, acc = _state_shape(q, v, cu_seqlens, feature_map)
    out = q.new_empty(v.shape)
    return out, q.new_empty(shape, dtype=acc), q.new_empty(shape[:-1], dtype=acc)


def _fake_backward(dout, dS, dz, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, *args):
    shape, acc = _state_shape(q, v, cu_seqlens, feature_map)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(shape, dtype=acc),
            q.new_empty(shape[:-1], dtype=acc))


def _fake_step(q, k, v, S, z, *args):
    return q.new_empty(v.shape), S.new_empty(S.shape), z.new_empty(z.shape)


_dispatch.register_fakes({"kxops::linear_attention": _fake_forward, "kxops::linear_attention_backward": _fake_backward,
                          "kxops::linear_attention_step": _fake_step})


def _reference(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale, normalize, eps,
               causal):
    return _ref.linear_attention_ref(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved,
                                     _ref.FEATURE_MAPS[feature_map], scale, normalize, eps, causal)


def _reference_step(q, k, v, S, z, feature_map, scale, normalize, eps):
    return _ref.linear_attention_step_ref(q, k, v, S, z, _ref.FEATURE_MAPS[feature_map], scale, normalize, eps)


_dispatch.implement_reference("kxops::linear_attention_reference", _reference)
_dispatch.implement_reference("kxops::linear_attention_step_reference", _reference_step)


def _triton_forward(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale, normalize,
                    eps, causal, traceable=True):
    (n, h, f, dv), _ = _state_shape(q, v, cu_seqlens, feature_map)
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    S = torch.empty((n, h, f, dv), dtype=torch.float32, device=q.device)
    z = torch.empty((n, h, f), dtype=torch.float32, device=q.device)
    _triton_fwd(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale, normalize, eps,
                causal, out, S, z, traceable=traceable)
    return out, S, z


def _triton_backward(dout, dS, dz, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                     normalize, eps, causal, traceable=True):
    (n, h, f, dv), _ = _state_shape(q, v, cu_seqlens, feature_map)
    dq, dk, dvv = (torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    dS0 = torch.empty((n, h, f, dv), dtype=torch.float32, device=q.device)
    dz0 = torch.empty((n, h, f), dtype=torch.float32, device=q.device)
    _triton_bwd(dout, dS, dz, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                normalize, eps, causal, dq, dk, dvv, dS0, dz0, traceable=traceable)
    return dq, dk, dvv, dS0, dz0


def _triton_step(q, k, v, S, z, feature_map, scale, normalize, eps, traceable=True):
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    S1, z1 = torch.empty_like(S), torch.empty_like(z)
    _triton_step_launch(q, k, v, S, z, feature_map, scale, normalize, eps, out, S1, z1, traceable=traceable)
    return out, S1, z1


def _triton_forward_grads(inputs, dout, dS, dz):
    """Autograd of kxops::linear_attention_triton: kxops::linear_attention_backward_triton (the C++ ops' formula,
    LinearAttentionFn in csrc/linear_attention.cpp)."""
    q, v, S0 = inputs[0], inputs[2], inputs[3]
    dout = torch.zeros(v.shape, dtype=q.dtype, device=q.device) if dout is None else dout.contiguous()
    dS = None if dS is None else dS.contiguous()
    dz = None if dz is None else dz.contiguous()
    dq, dk, dv, dS0, dz0 = torch.ops.kxops.linear_attention_backward_triton(dout, dS, dz, *inputs)
    return (dq, dk, dv) + ((dS0, dz0) if S0 is not None else (None, None))


def _step_grads(inputs, dout, dS, dz):
    """Autograd of kxops::linear_attention_step_triton: the reference's, as the C++ ops' (StepFn)."""
    leaves = [t.detach().requires_grad_() for t in inputs[:5]]
    with torch.enable_grad():
        outs = torch.ops.kxops.linear_attention_step_reference(*leaves, *inputs[5:])
    pairs = [(o, g) for o, g in zip(outs, (dout, dS, dz)) if g is not None]
    if not pairs:
        return (None,) * 5
    return tuple(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True))


if _dispatch.TRITON_IMPORTABLE:
    from torch.library import triton_op as _triton_op

    from .triton_kernels.linear_attention import linear_attention_bwd as _triton_bwd
    from .triton_kernels.linear_attention import linear_attention_fwd as _triton_fwd
    from .triton_kernels.linear_attention import linear_attention_step as _triton_step_launch

    # The ops as torch.compile and export see them (triton_op: the kernel launches are traced).
    @_triton_op("kxops::linear_attention_triton", mutates_args=())
    def _linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, S0: Optional[Tensor], z0: Optional[Tensor],
                                 cu_seqlens: Optional[Tensor], positions: Optional[Tensor],
                                 inv_freq: Optional[Tensor], interleaved: bool, feature_map: int, scale: float,
                                 normalize: bool, eps: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_forward(q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved, feature_map, scale,
                               normalize, eps, causal)

    @_triton_op("kxops::linear_attention_backward_triton", mutates_args=())
    def _linear_attention_backward_triton(dout: Tensor, dS: Optional[Tensor], dz: Optional[Tensor], q: Tensor,
                                          k: Tensor, v: Tensor, S0: Optional[Tensor], z0: Optional[Tensor],
                                          cu_seqlens: Optional[Tensor], positions: Optional[Tensor],
                                          inv_freq: Optional[Tensor], interleaved: bool, feature_map: int,
                                          scale: float, normalize: bool, eps: float,
                                          causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _triton_backward(dout, dS, dz, q, k, v, S0, z0, cu_seqlens, positions, inv_freq, interleaved,
                                feature_map, scale, normalize, eps, causal)

    @_triton_op("kxops::linear_attention_step_triton", mutates_args=())
    def _linear_attention_step_triton(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, feature_map: int,
                                      scale: float, normalize: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_step(q, k, v, S, z, feature_map, scale, normalize, eps)

    _dispatch.register_triton_autograd("kxops::linear_attention_triton", _triton_forward_grads)
    _dispatch.register_triton_autograd("kxops::linear_attention_step_triton", _step_grads)
    # Eager calls on real CUDA tensors launch directly, without triton_op's wrappers.
    _dispatch.register_eager_cuda({"kxops::linear_attention_triton": _triton_forward,
                                   "kxops::linear_attention_backward_triton": _triton_backward,
                                   "kxops::linear_attention_step_triton": _triton_step})


# ----------------------------------------------------------------------------------------------
# The public functions.

def _split_state(state, what):
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{what} must be a tuple (S, z) of tensors (z may be None), got {type(state).__name__}")
    return state[0], state[1]


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, feature_map: str = "elu1",
                     normalize: bool = True, eps: float = 1e-6, scale: Optional[float] = None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None, rope: bool = False,
                     rope_base: float = 10000.0, positions: Optional[Tensor] = None, interleaved: bool = False,
                     backend: str = "auto"):
    """Linear attention (Katharopoulos et al.; Su, kexue.fm 7546), fused: the feature map, the scale, RoPE
    and the normalisation run inside the kernels, the state in float32.

        causal:  out_t = phi_q(q_t)^T S_t / (phi_q(q_t) . z_t + eps),  S_t = S_(t-1) + phi(k_t) v_t^T,
                 z_t = z_(t-1) + phi(k_t)   (causal=False: S, z over the whole sequence)

    q, k: (batch, seq, heads, Dk); v: (batch, seq, heads, Dv); Dk, Dv <= 256; any strides. Packed:
       (total_tokens, heads, D) with cu_seqlens (int32, (batch + 1,)), every sequence on its own.
    feature_map: "elu1" (elu(x) + 1), "relu", "identity", or "taylor" (Su's [1, x/|x|]: one feature more).
    scale: multiplies phi(q); None: Dk ** -0.5 (as flash-linear-attention).
    normalize: divide by phi(q) . z + eps (False: the numerator alone).
    initial_state: (S, z) with S (batch or sequences, heads, F, Dv) and z (batch or sequences, heads, F),
       F the feature size, float32 (float64 for float64 inputs); z may be None (zeros).
    output_final_state: also return the state after the last token, (out, (S, z)): passing it as the next
       call's initial_state continues the sequence.
    rope: rotate phi(q) and phi(k) in the numerator only, over the unrotated denominator (kexue.fm 8265);
       rope_base, interleaved as kxops.rope; positions: None (0.. in each sequence) or integer (seq,) /
       (batch or 1, seq) (packed: (total_tokens,)).
    backend: "auto", "cpu", "cuda", "triton" or "reference".
    Returns out (batch, seq, heads, Dv) in q's dtype (or (out, (S, z))).
    """
    S0, z0 = _split_state(initial_state, "linear_attention: initial_state")
    args = (q, k, v, causal, feature_map, normalize, eps, scale, S0, z0, cu_seqlens, rope, rope_base, positions,
            interleaved, backend)
    if not _dispatch.compiling():
        out, S, z = _C.linear_attention("linear_attention", *args)
    else:
        out, S, z = torch.ops.kxops.linear_attention_front(
            q, k, v, bool(causal), feature_map, bool(normalize), float(eps), None if scale is None else float(scale),
            S0, z0, cu_seqlens, bool(rope), float(rope_base), positions, bool(interleaved), backend)
    return (out, (S, z)) if output_final_state else out


def causal_dot_product(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto") -> Tensor:
    """out_i = sum_(j<=i) (q_i . k_j) v_j: causal linear attention without feature map, scale or normalisation
    (the primitive of Katharopoulos et al.). q, k (batch, seq, heads, Dk), v (batch, seq, heads, Dv)."""
    if not _dispatch.compiling():
        return _C.linear_attention("causal_dot_product", q, k, v, True, "identity", False, 0.0, 1.0, None, None,
                                   None, False, 10000.0, None, False, backend)[0]
    return torch.ops.kxops.linear_attention_front(q, k, v, True, "identity", False, 0.0, 1.0, None, None, None, False,
                                                  10000.0, None, False, backend)[0]


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state, *, feature_map: str = "elu1",
                          normalize: bool = True, scale: Optional[float] = None, eps: float = 1e-6,
                          backend: str = "auto"):
    """One decoding step of causal linear attention: the recurrent form.

    q, k: (batch, heads, Dk) or (batch, 1, heads, Dk); v likewise with Dv; state: (S, z) as returned by
    linear_attention(..., output_final_state=True) or a previous step (z may be None: zeros).
    Returns (out in q's layout, (S', z')): new state tensors, the given ones are not modified.
    """
    S, z = _split_state(state, "linear_attention_step: state")
    if not _dispatch.compiling():
        out, S1, z1 = _C.linear_attention_step(q, k, v, S, z, feature_map, normalize, eps, scale, backend)
    else:
        if z is None:
            z = S.new_zeros(S.shape[:-1])
        out, S1, z1 = torch.ops.kxops.linear_attention_step_front(
            q, k, v, S, z, feature_map, bool(normalize), float(eps), None if scale is None else float(scale), backend)
    return out, (S1, z1)
