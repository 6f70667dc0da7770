"""kxops.global_pointer_loss: GlobalPointer's multi-label categorical cross-entropy over every span, fused:
tiles of span scores are recomputed from q and k (RoPE on the fly) and folded into two online
log-sum-exps per (batch, type) row, so that nothing of size batch x types x L x L exists, forward or
backward (with sparse labels).

The public function is one call into the C++ front (csrc/global_pointer.cpp, through the
CompositeImplicitAutograd op kxops::global_pointer_loss_front): argument checks, normalisation to the
kernel contract (docs/global_pointer_kernel_contract.md) and the backend choice happen there. This module
registers what is Python: the fake implementations of the C++ ops, the reference op and the Triton ops.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from .reference import global_pointer as _ref

__all__ = ["global_pointer_loss"]


# ----------------------------------------------------------------------------------------------
# Op registration: q, k and the normalised arguments (mask, start_bias, end_bias, inv_freq, H, scale, tril,
# pos_offsets, pos_index, targets).

def _state(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_loss(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets):
    out = q.new_empty((q.shape[0], H), dtype=_state(q))
    return out, out.new_empty(out.shape), out.new_empty(out.shape)


def _bias_grad_shape(q, H, bias):
    return (q.shape[0], H, q.shape[1]) if bias is not None else (0,)


def _fake_loss_backward(dloss, q, k, mask, start_bias, end_bias, inv_freq, H, *args):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(_bias_grad_shape(q, H, start_bias), dtype=_state(q)),
            q.new_empty(_bias_grad_shape(q, H, end_bias), dtype=_state(q)))


_dispatch.register_fakes({"kxops::global_pointer_loss": _fake_loss,
                          "kxops::global_pointer_loss_backward": _fake_loss_backward})
_dispatch.implement_reference("kxops::global_pointer_loss_reference", _ref.loss_ref)

TRITON_KERNELS = _dispatch.TRITON_IMPORTABLE and importlib.util.find_spec(
    "kxops.triton_kernels.global_pointer") is not None

if TRITON_KERNELS:
    from torch.library import triton_op as _triton_op

    from .triton_kernels.global_pointer import loss_backward as _triton_bwd
    from .triton_kernels.global_pointer import loss_forward as _triton_fwd

    @_triton_op("kxops::global_pointer_loss_triton", mutates_args=())
    def _global_pointer_loss_triton(q: Tensor, k: Tensor, mask: Optional[Tensor], start_bias: Optional[Tensor],
                                    end_bias: Optional[Tensor], inv_freq: Optional[Tensor], H: int, scale: float,
                                    tril: bool, pos_offsets: Optional[Tensor], pos_index: Optional[Tensor],
                                    targets: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_fwd(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index, targets)

    @_triton_op("kxops::global_pointer_loss_backward_triton", mutates_args=())
    def _global_pointer_loss_backward_triton(dloss: Tensor, q: Tensor, k: Tensor, mask: Optional[Tensor],
                                             start_bias: Optional[Tensor], end_bias: Optional[Tensor],
                                             inv_freq: Optional[Tensor], H: int, scale: float, tril: bool,
                                             pos_offsets: Optional[Tensor], pos_index: Optional[Tensor],
                                             targets: Optional[Tensor], lse_neg: Tensor,
                                             lse_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _triton_bwd(dloss, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index,
                           targets, lse_neg, lse_pos)

    def _triton_grads(inputs, outputs, dloss, *_):
        """Autograd of kxops::global_pointer_loss_triton: its backward op (the C++ ops' formula,
        GlobalPointerLossFn in csrc/global_pointer.cpp)."""
        if dloss is None:
            return (None,) * 5
        dq, dk, ds, de = torch.ops.kxops.global_pointer_loss_backward_triton(dloss.contiguous(), *inputs, outputs[1],
                                                                             outputs[2])
        return (dq, dk, None, ds if inputs[3] is not None else None, de if inputs[4] is not None else None)

    _dispatch.register_triton_autograd("kxops::global_pointer_loss_triton", _triton_grads, with_outputs=True)
    _dispatch.register_eager_cuda({"kxops::global_pointer_loss_triton": _triton_fwd,
                                   "kxops::global_pointer_loss_backward_triton": _triton_bwd})


# ----------------------------------------------------------------------------------------------
# The public functions.

def global_pointer_loss(q: Tensor, k: Tensor, labels: Tensor, mask: Optional[Tensor] = None, *, rope: bool = True,
                        base: float = 10000.0, tril: bool = True, scale: Optional[float] = None,
                        start_bias: Optional[Tensor] = None, end_bias: Optional[Tensor] = None,
                        reduction: str = "mean", backend: str = "auto") -> Tensor:
    """GlobalPointer's multi-label categorical cross-entropy (Su, kexue.fm 8373, 7359), per (batch, type) row
    over all L x L spans, without the (batch, types, L, L) logits:

        s[b, h, i, j] = scale * (R_i q[b, i, h]) . (R_j k[b, j, h]) + start_bias[b, h, i] + end_bias[b, h, j]
        loss[b, h] = log(1 + sum_neg e^s) + log(1 + sum_pos e^-s)     (over valid spans only)

    q, k: (batch, L, types, head_size), or (batch, L, 1, head_size) shared by every type (Efficient
       GlobalPointer, with start_bias / end_bias (batch, types, L)); RoPE with interleaved pairs (bert4keras).
    labels: int64 (N, 4) gold spans [batch, type, start, end], or dense (batch, types, L, L) in [0, 1]
       (soft labels weigh a span as a negative by 1 - t and as a positive by t).
    mask: (batch, L), True / 1 for tokens; a span is valid when its start and end are tokens and, with
       tril, end >= start. A gold span that is not valid adds nothing.
    scale: None is head_size ** -0.5. reduction: "mean" (over rows), "sum", "none" -> (batch, types).
    Gradients for q, k and the biases. backend: "auto", "cpu", "cuda", "triton" or "reference".
    """
    return torch.ops.kxops.global_pointer_loss_front(q, k, labels, mask, bool(rope), float(base), bool(tril),
                                                     None if scale is None else float(scale), start_bias, end_bias,
                                                     reduction, backend)
