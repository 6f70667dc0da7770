"""kxops.sparsemax, entmax15, entmax, topk_softmax and their losses: softmaxes with exact zeros, sort-free.

sparsemax (Martins and Astudillo), entmax15 and alpha-entmax (Peters, Niculae and Martins) find their
threshold by a safeguarded Newton iteration on the support (exact for sparsemax and entmax15) or by
bisection (any alpha), over the row held on chip; top-k softmax (Su Jianlin, kexue.fm 8046) selects its k
entries by a radix select. Backward passes use the support only (docs/sparse_softmax_kernel_contract.md).

The public functions are one call into the C++ front (csrc/sparse_softmax.cpp, through the
CompositeImplicitAutograd ops kxops::*_front): argument checks, `dim` moved last, the backend choice.
This module registers what is Python: the fake implementations of the C++ ops, the reference ops and the
Triton ops.

Masked entries are -inf. An all -inf row gives all zeros (not NaN) and zero gradients; its loss is +inf
unless the row is ignored.
"""
from __future__ import annotations

import importlib
import importlib.util
import operator
from typing import Optional, Union

import torch
from torch import Tensor

from . import _dispatch
from .reference import sparse_softmax as _ref

__all__ = ["sparsemax", "entmax15", "entmax", "topk_softmax", "sparsemax_loss", "entmax15_loss",
           "topk_softmax_cross_entropy"]

SPARSEMAX, ENTMAX15, BISECT, SOFTMAX = 0, 1, 2, 3


def _state(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, *args):
    target = args[-2]
    return x.new_empty(x.shape), x.new_empty((x.shape[0],) if target is not None else (0,), dtype=_state(x))


def _fake_backward(dp, p, alpha, kind, alpha_grad):
    return p.new_empty(p.shape), p.new_empty((p.shape[0],) if alpha_grad else (0,), dtype=_state(p))


_dispatch.register_fakes({"kxops::entmax": _fake_forward, "kxops::topk_softmax": _fake_forward,
                          "kxops::entmax_backward": _fake_backward})
_dispatch.implement_reference("kxops::entmax_reference", _ref.entmax_ref)
_dispatch.implement_reference("kxops::topk_softmax_reference", _ref.topk_softmax_ref)

_TRITON_MODULE = ("kxops.triton_kernels.sparse_softmax" if _dispatch.TRITON_IMPORTABLE and importlib.util.find_spec(
    "kxops.triton_kernels.sparse_softmax") is not None else None)
_tss = importlib.import_module(_TRITON_MODULE) if _TRITON_MODULE else None


def triton_kernels(*launchers: str) -> bool:
    """Whether the Triton module of the family has these launchers (the ops registered from them)."""
    return _tss is not None and all(hasattr(_tss, n) for n in launchers)


TRITON_KERNELS = triton_kernels("entmax_forward", "entmax_backward", "topk_softmax_forward")

if TRITON_KERNELS:
    from torch.library import triton_op as _triton_op

    @_triton_op("kxops::entmax_triton", mutates_args=())
    def _entmax_triton(x: Tensor, alpha: Optional[Tensor], kind: int, n_iter: int, target: Optional[Tensor],
                       ignore_index: int) -> tuple[Tensor, Tensor]:
        return _tss.entmax_forward(x, alpha, kind, n_iter, target, ignore_index)

    @_triton_op("kxops::entmax_backward_triton", mutates_args=())
    def _entmax_backward_triton(dp: Tensor, p: Tensor, alpha: Optional[Tensor], kind: int,
                                alpha_grad: bool) -> tuple[Tensor, Tensor]:
        return _tss.entmax_backward(dp, p, alpha, kind, alpha_grad)

    @_triton_op("kxops::topk_softmax_triton", mutates_args=())
    def _topk_softmax_triton(x: Tensor, k: int, target: Optional[Tensor], ignore_index: int) -> tuple[Tensor, Tensor]:
        return _tss.topk_softmax_forward(x, k, target, ignore_index)

    def _grads(p, alpha, kind, target, ignore_index, dp, dloss):
        """The C++ ops' formula (grads_of in csrc/sparse_softmax.cpp) with the Triton backward."""
        dx = dalpha = None
        if dp is not None:
            dx, dalpha = torch.ops.kxops.entmax_backward_triton(dp.contiguous(), p, alpha, kind, alpha is not None)
        if dloss is not None and target is not None:
            dl = torch.ops.kxops.sparse_softmax_loss_backward(dloss, p, target, ignore_index)
            dx = dl if dx is None else dx + dl
        return dx, (dalpha if alpha is not None else None)

    def _entmax_grads(inputs, outputs, dp, dloss):
        _, alpha, kind, _, target, ignore_index = inputs
        return _grads(outputs[0], alpha, kind, target, ignore_index, dp, dloss)

    def _topk_grads(inputs, outputs, dp, dloss):
        _, _, target, ignore_index = inputs
        return _grads(outputs[0], None, SOFTMAX, target, ignore_index, dp, dloss)[:1]

    # x itself is never needed by a backward (skip=1): p carries everything
    _dispatch.register_triton_autograd("kxops::entmax_triton", _entmax_grads, skip=1, with_outputs=True)
    _dispatch.register_triton_autograd("kxops::topk_softmax_triton", _topk_grads, skip=1, with_outputs=True)
    _dispatch.register_eager_cuda({"kxops::entmax_triton": _tss.entmax_forward,
                                   "kxops::entmax_backward_triton": _tss.entmax_backward,
                                   "kxops::topk_softmax_triton": _tss.topk_softmax_forward})


# ----------------------------------------------------------------------------------------------
# The public functions.

def _int(v, op: str, arg: str) -> int:
    if isinstance(v, (bool, Tensor)) or not hasattr(type(v), "__index__"):
        raise TypeError(f"{op}: {arg} must be an int, got {type(v).__name__}")
    return operator.index(v)


def sparsemax(x: Tensor, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """Sparsemax along dim: the Euclidean projection of x onto the simplex, p = relu(x - tau) with sum 1
    (exact zeros below the threshold tau). x: any shape and strides, float16 / bfloat16 / float32 (float64 on
    CPU and the reference); the output has x's shape and dtype. Masked entries may be -inf. backend: "auto",
    "cpu", "cuda", "triton" or "reference"."""
    return torch.ops.kxops.entmax_front(x, None, 2.0, SPARSEMAX, _int(dim, "sparsemax", "dim"), 0, backend)


def entmax15(x: Tensor, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """1.5-entmax along dim: p = relu(x / 2 - tau)^2 with sum 1 (exact zeros; between softmax and sparsemax).
    Arguments as sparsemax."""
    return torch.ops.kxops.entmax_front(x, None, 1.5, ENTMAX15, _int(dim, "entmax15", "dim"), 0, backend)


def entmax(x: Tensor, alpha: Union[float, Tensor], dim: int = -1, n_iter: int = 50, *,
           backend: str = "auto") -> Tensor:
    """alpha-entmax along dim: p = relu((alpha - 1) x - tau)^(1 / (alpha - 1)) with sum 1, alpha > 1
    (alpha -> 1 approaches softmax, 2 is sparsemax). alpha: a float, or a tensor broadcastable to x with size
    1 along dim (one alpha per row; it gets a gradient, as the entmax package's entmax_bisect; 16-bit rows then
    run in float32, since that gradient divides by (alpha - 1)^2). tau is found
    by n_iter bisection steps (fewer when the interval collapses in float32) and p renormalised, as
    entmax_bisect does. A float alpha of exactly 2 or 1.5 runs sparsemax / entmax15 (exact closed forms)."""
    if isinstance(alpha, Tensor):
        return torch.ops.kxops.entmax_front(x, alpha, 0.0, BISECT, _int(dim, "entmax", "dim"),
                                            _int(n_iter, "entmax", "n_iter"), backend)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"entmax: alpha must be a float or a tensor, got {type(alpha).__name__}")
    return torch.ops.kxops.entmax_front(x, None, float(alpha), BISECT, _int(dim, "entmax", "dim"),
                                        _int(n_iter, "entmax", "n_iter"), backend)


def topk_softmax(x: Tensor, k: int, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """Su's top-k Sparse Softmax along dim: softmax over the k largest entries, exact zeros elsewhere
    (1 <= k <= x.size(dim); ties at the k-th value go to the lower indices). k = x.size(dim) is softmax.
    Arguments as sparsemax."""
    return torch.ops.kxops.topk_softmax_front(x, _int(k, "topk_softmax", "k"), _int(dim, "topk_softmax", "dim"),
                                              backend)


_LOSS_DOC = """
    x: (..., classes) scores (classes last), target: integer (...) class indices; rows whose target is
    ignore_index add 0. reduction: "mean" (over the rows not ignored, as torch.nn.functional.cross_entropy:
    NaN when every row is ignored), "sum", or "none" (x's leading shape, the entmax package's per-row
    losses). The result has x's dtype; the gradient is p - onehot(target) per row. A target entry of -inf
    (or an all -inf row) gives +inf."""


def sparsemax_loss(x: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean", *,
                   backend: str = "auto") -> Tensor:
    return torch.ops.kxops.entmax_loss_front(x, target, SPARSEMAX, _int(ignore_index, "sparsemax_loss", "ignore_index"),
                                             reduction, backend)


def entmax15_loss(x: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean", *,
                  backend: str = "auto") -> Tensor:
    return torch.ops.kxops.entmax_loss_front(x, target, ENTMAX15, _int(ignore_index, "entmax15_loss", "ignore_index"),
                                             reduction, backend)


def topk_softmax_cross_entropy(x: Tensor, target: Tensor, k: int, ignore_index: int = -100, reduction: str = "mean",
                               *, backend: str = "auto") -> Tensor:
    op = "topk_softmax_cross_entropy"
    return torch.ops.kxops.topk_softmax_cross_entropy_front(x, target, _int(k, op, "k"),
                                                            _int(ignore_index, op, "ignore_index"), reduction, backend)


sparsemax_loss.__doc__ = ("The sparsemax loss (Martins and Astudillo): 1/2 - x_t + sum_S (x_i^2 - tau^2) / 2 per "
                          "row, the Fenchel-Young loss of sparsemax." + _LOSS_DOC)
entmax15_loss.__doc__ = ("The 1.5-entmax loss (Peters et al.): (1 - sum p^1.5) / 0.75 + p . x - x_t per row, the "
                         "Fenchel-Young loss of entmax15." + _LOSS_DOC)
topk_softmax_cross_entropy.__doc__ = (
    "Su's Sparse Softmax cross-entropy (kexue.fm 8046): log sum_{top-k} exp(x) - x_t per row; the target is "
    "not forced into the top-k set (1 <= k <= classes)." + _LOSS_DOC)
