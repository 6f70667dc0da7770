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

__all__ = ["global_pointer", "global_pointer_loss", "global_pointer_decode", "multilabel_categorical_crossentropy",
           "sparse_multilabel_categorical_crossentropy"]


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


def _fake_logits(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril):
    return q.new_empty((q.shape[0], H, q.shape[1], q.shape[1]), dtype=_state(q))


def _fake_decode(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, threshold):
    n = torch.library.get_ctx().new_dynamic_size()  # as many spans as score above the threshold
    return q.new_empty((n, 4), dtype=torch.long), q.new_empty((n,), dtype=_state(q))


def _fake_mlce(x, targets, positives, mask_zero):
    out = x.new_empty((x.shape[0],), dtype=_state(x))
    return out, out.new_empty(out.shape), out.new_empty(out.shape)


def _fake_mlce_backward(dloss, x, *args):
    return x.new_empty(x.shape)


_dispatch.register_fakes({"kxops::global_pointer_loss": _fake_loss,
                          "kxops::global_pointer_loss_backward": _fake_loss_backward,
                          "kxops::global_pointer": _fake_logits,
                          "kxops::global_pointer_backward": lambda dlogits, *a: _fake_loss_backward(None, *a),
                          "kxops::global_pointer_decode": _fake_decode,
                          "kxops::multilabel_categorical_crossentropy": _fake_mlce,
                          "kxops::multilabel_categorical_crossentropy_backward": _fake_mlce_backward})
_dispatch.implement_reference("kxops::global_pointer_loss_reference", _ref.loss_ref)
_dispatch.implement_reference("kxops::global_pointer_reference", _ref.logits_ref)
_dispatch.implement_reference("kxops::global_pointer_decode_reference", _ref.decode_ref)
_dispatch.implement_reference("kxops::multilabel_categorical_crossentropy_reference", _ref.mlce_ref)

_TRITON_MODULE = ("kxops.triton_kernels.global_pointer" if _dispatch.TRITON_IMPORTABLE and importlib.util.find_spec(
    "kxops.triton_kernels.global_pointer") is not None else None)
_tgp = importlib.import_module(_TRITON_MODULE) if _TRITON_MODULE else None


def triton_kernels(*launchers: str) -> bool:
    """Whether the Triton module of the family has these launchers (the ops registered from them)."""
    return _tgp is not None and all(hasattr(_tgp, n) for n in launchers)


TRITON_KERNELS = triton_kernels("loss_forward", "loss_backward")  # the span loss

if _tgp is not None:
    from torch.library import triton_op as _triton_op

if TRITON_KERNELS:
    @_triton_op("kxops::global_pointer_loss_triton", mutates_args=())
    def _global_pointer_loss_triton(q: Tensor, k: Tensor, mask: Optional[Tensor], start_bias: Optional[Tensor],
                                    end_bias: Optional[Tensor], inv_freq: Optional[Tensor], H: int, scale: float,
                                    tril: bool, pos_offsets: Optional[Tensor], pos_index: Optional[Tensor],
                                    targets: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return _tgp.loss_forward(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets, pos_index,
                                 targets)

    @_triton_op("kxops::global_pointer_loss_backward_triton", mutates_args=())
    def _global_pointer_loss_backward_triton(dloss: Tensor, q: Tensor, k: Tensor, mask: Optional[Tensor],
                                             start_bias: Optional[Tensor], end_bias: Optional[Tensor],
                                             inv_freq: Optional[Tensor], H: int, scale: float, tril: bool,
                                             pos_offsets: Optional[Tensor], pos_index: Optional[Tensor],
                                             targets: Optional[Tensor], lse_neg: Tensor,
                                             lse_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _tgp.loss_backward(dloss, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, pos_offsets,
                                  pos_index, targets, lse_neg, lse_pos)

    def _loss_grads(inputs, outputs, dloss, *_):
        """Autograd of kxops::global_pointer_loss_triton: its backward op (the C++ ops' formula,
        GlobalPointerLossFn in csrc/global_pointer.cpp)."""
        if dloss is None:
            return (None,) * 5
        dq, dk, ds, de = torch.ops.kxops.global_pointer_loss_backward_triton(dloss.contiguous(), *inputs, outputs[1],
                                                                             outputs[2])
        return (dq, dk, None, ds if inputs[3] is not None else None, de if inputs[4] is not None else None)

    _dispatch.register_triton_autograd("kxops::global_pointer_loss_triton", _loss_grads, with_outputs=True)
    _dispatch.register_eager_cuda({"kxops::global_pointer_loss_triton": _tgp.loss_forward,
                                   "kxops::global_pointer_loss_backward_triton": _tgp.loss_backward})

if triton_kernels("logits_forward", "logits_backward"):
    @_triton_op("kxops::global_pointer_triton", mutates_args=())
    def _global_pointer_triton(q: Tensor, k: Tensor, mask: Optional[Tensor], start_bias: Optional[Tensor],
                               end_bias: Optional[Tensor], inv_freq: Optional[Tensor], H: int, scale: float,
                               tril: bool) -> Tensor:
        return _tgp.logits_forward(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril)

    @_triton_op("kxops::global_pointer_backward_triton", mutates_args=())
    def _global_pointer_backward_triton(dlogits: Tensor, q: Tensor, k: Tensor, mask: Optional[Tensor],
                                        start_bias: Optional[Tensor], end_bias: Optional[Tensor],
                                        inv_freq: Optional[Tensor], H: int, scale: float,
                                        tril: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _tgp.logits_backward(dlogits, q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril)

    def _logits_grads(inputs, dlogits):
        if dlogits is None:
            return (None,) * 5
        dq, dk, ds, de = torch.ops.kxops.global_pointer_backward_triton(dlogits.contiguous(), *inputs)
        return (dq, dk, None, ds if inputs[3] is not None else None, de if inputs[4] is not None else None)

    _dispatch.register_triton_autograd("kxops::global_pointer_triton", _logits_grads)
    _dispatch.register_eager_cuda({"kxops::global_pointer_triton": _tgp.logits_forward,
                                   "kxops::global_pointer_backward_triton": _tgp.logits_backward})

if triton_kernels("decode"):
    # Not a triton_op: its output size depends on the data (it reads a count back), which triton_op's
    # tracing cannot express; a custom op with the dynamic-size fake instead.
    @torch.library.custom_op("kxops::global_pointer_decode_triton", mutates_args=())
    def _global_pointer_decode_triton(q: Tensor, k: Tensor, mask: Optional[Tensor], start_bias: Optional[Tensor],
                                      end_bias: Optional[Tensor], inv_freq: Optional[Tensor], H: int, scale: float,
                                      tril: bool, threshold: float) -> tuple[Tensor, Tensor]:
        return _tgp.decode(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril, threshold, traceable=False)

    torch.library.register_fake("kxops::global_pointer_decode_triton", _fake_decode)

if triton_kernels("mlce_forward", "mlce_backward"):
    @_triton_op("kxops::multilabel_categorical_crossentropy_triton", mutates_args=())
    def _mlce_triton(x: Tensor, targets: Optional[Tensor], positives: Optional[Tensor],
                     mask_zero: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _tgp.mlce_forward(x, targets, positives, mask_zero)

    @_triton_op("kxops::multilabel_categorical_crossentropy_backward_triton", mutates_args=())
    def _mlce_backward_triton(dloss: Tensor, x: Tensor, targets: Optional[Tensor], positives: Optional[Tensor],
                              mask_zero: bool, lse_neg: Tensor, lse_pos: Tensor) -> Tensor:
        return _tgp.mlce_backward(dloss, x, targets, positives, mask_zero, lse_neg, lse_pos)

    def _mlce_grads(inputs, outputs, dloss, *_):
        if dloss is None:
            return (None,)
        return (torch.ops.kxops.multilabel_categorical_crossentropy_backward_triton(dloss.contiguous(), *inputs,
                                                                                    outputs[1], outputs[2]),)

    _dispatch.register_triton_autograd("kxops::multilabel_categorical_crossentropy_triton", _mlce_grads,
                                       with_outputs=True)
    _dispatch.register_eager_cuda({"kxops::multilabel_categorical_crossentropy_triton": _tgp.mlce_forward,
                                   "kxops::multilabel_categorical_crossentropy_backward_triton":
                                       _tgp.mlce_backward})


# ----------------------------------------------------------------------------------------------
# The public functions.

def global_pointer(q: Tensor, k: Tensor, mask: Optional[Tensor] = None, *, rope: bool = True, base: float = 10000.0,
                   tril: bool = True, scale: Optional[float] = None, start_bias: Optional[Tensor] = None,
                   end_bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """GlobalPointer's span logits (Su, kexue.fm 8373, 8877), fused: (batch, types, L, L) float32 (float64 for
    float64 inputs), s[b, h, i, j] = scale * (R_i q[b, i, h]) . (R_j k[b, j, h]) + start_bias[b, h, i] +
    end_bias[b, h, j], -inf where the span is invalid (a padding start or end, or j < i when tril). Arguments
    as global_pointer_loss. Gradients for q, k and the biases."""
    return torch.ops.kxops.global_pointer_front(q, k, mask, bool(rope), float(base), bool(tril),
                                                None if scale is None else float(scale), start_bias, end_bias,
                                                backend)


def global_pointer_decode(q: Tensor, k: Tensor, mask: Optional[Tensor] = None, *, threshold: float = 0.0,
                          rope: bool = True, base: float = 10000.0, tril: bool = True, scale: Optional[float] = None,
                          start_bias: Optional[Tensor] = None, end_bias: Optional[Tensor] = None,
                          backend: str = "auto"):
    """Every valid span whose logit exceeds `threshold` (0: the threshold class of the loss), without the
    logits tensor: (spans (N, 4) int64 [batch, type, start, end] in row-major order, scores (N,) float32).
    Arguments as global_pointer_loss. The number of spans depends on the data: under torch.compile the call
    needs torch._dynamo.config.capture_dynamic_output_shape_ops (or breaks the graph)."""
    return torch.ops.kxops.global_pointer_decode_front(q, k, mask, float(threshold), bool(rope), float(base),
                                                       bool(tril), None if scale is None else float(scale),
                                                       start_bias, end_bias, backend)


def multilabel_categorical_crossentropy(logits: Tensor, targets: Tensor, reduction: str = "mean",
                                        backend: str = "auto") -> Tensor:
    """Su's multi-label categorical cross-entropy (kexue.fm 7359, soft labels 9064) over the last dim:
    log(1 + sum_n (1 - t_n) e^(s_n)) + log(1 + sum_p t_p e^(-s_p)); masked logits (-inf) are neither
    positives nor negatives (no NaN for rows without positives, with only positives, or with a positive at
    -inf). targets: logits' shape, 0/1 or soft in [0, 1]. reduction "mean" / "sum" over the rows, or "none"
    (the leading dims). float32 (float64 for float64 logits). Gradient for the logits."""
    return torch.ops.kxops.multilabel_categorical_crossentropy_front(logits, targets, None, False, reduction, backend)


def sparse_multilabel_categorical_crossentropy(logits: Tensor, positive_indices: Tensor, mask_zero: bool = False,
                                               reduction: str = "mean", backend: str = "auto") -> Tensor:
    """The loss above with the positives as indices (..., P) into the last dim of logits (..., C) (bert4keras'
    sparse version, computed exactly: the negatives' sum is never formed as a difference, so no NaN where
    the positives carry the row). An index given twice counts once. mask_zero: index 0 is padding and class
    0 is no class (bert4keras' mask_zero)."""
    return torch.ops.kxops.multilabel_categorical_crossentropy_front(logits, None, positive_indices, bool(mask_zero),
                                                                     reduction, backend)


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
