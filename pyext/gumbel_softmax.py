"""kxops.gumbel_softmax, gumbel_max and perturb_max_softmax: sampling through the argmax of perturbed scores
(Su Jianlin, kexue.fm 6705 and 9085; Jang et al.; Maddison et al.).

gumbel_softmax draws its Gumbel noise inside the kernel (Philox4x32-10, the same bits on every backend) and
makes one pass over each row; its backward saves the soft output only, never the noise. The noise comes from
the open interval: u in [2^-24, 1 - 2^-24], so no inf and no NaN for any tau > 0 (unlike
torch.nn.functional.gumbel_softmax, pytorch issues 22442, 41663, 127749).

Randomness: each call draws one 64-bit Philox key from `generator` (torch's default generator for the
logits' device when None) with torch.randint, so torch.manual_seed makes calls reproducible and successive
calls differ; under torch.compile that draw is torch's own random op and is handled as torch's are (a
torch.Generator argument is not traceable by Dynamo, as for torch.randint). The key stays on the device: no
host sync, CUDA-graph safe. docs/gumbel_softmax_kernel_contract.md fixes the counters and the arithmetic.

The public functions are one call into the C++ front (csrc/gumbel_softmax.cpp, through the
CompositeImplicitAutograd ops kxops::*_front): argument checks, `dim` moved last, the backend choice. This
module registers what is Python: the fake implementations of the C++ ops, the reference ops and the Triton ops.

Masked entries are -inf: never sampled, probability 0. An all -inf row gives all zeros (soft and hard),
a zero gradient, and the sample index -1.
"""
from __future__ import annotations

import importlib
import importlib.util
import operator
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from .reference import gumbel_softmax as _ref

__all__ = ["gumbel_softmax", "gumbel_max", "perturb_max_softmax"]


def _fake_gumbel_softmax(x, seed, tau, hard):
    return (x.new_empty(x.shape), x.new_empty(x.shape if hard else (0,)),
            x.new_empty((x.shape[0],), dtype=torch.int64))


_dispatch.register_fakes({
    "kxops::gumbel_softmax": _fake_gumbel_softmax,
    "kxops::gumbel_softmax_backward": lambda dy, y, tau: y.new_empty(y.shape),
    "kxops::gumbel_max": lambda x, seed: x.new_empty((x.shape[0],), dtype=torch.int64),
    "kxops::perturb_max": lambda x, nodes: x.new_empty(x.shape),
    "kxops::perturb_max_backward": lambda dp, x, nodes: x.new_empty(x.shape),
})
_dispatch.implement_reference("kxops::gumbel_softmax_reference", _ref.gumbel_softmax_ref)
_dispatch.implement_reference("kxops::gumbel_max_reference", _ref.gumbel_max_ref)
_dispatch.implement_reference("kxops::perturb_max_reference", _ref.perturb_max_ref)

_TRITON_MODULE = ("kxops.triton_kernels.gumbel_softmax" if _dispatch.TRITON_IMPORTABLE and importlib.util.find_spec(
    "kxops.triton_kernels.gumbel_softmax") is not None else None)
_tgs = importlib.import_module(_TRITON_MODULE) if _TRITON_MODULE else None

TRITON_KERNELS = _tgs is not None and all(hasattr(_tgs, n) for n in (
    "gumbel_softmax_forward", "gumbel_softmax_backward", "gumbel_max_forward", "perturb_max_forward",
    "perturb_max_backward"))

if TRITON_KERNELS:
    from torch.library import triton_op as _triton_op

    @_triton_op("kxops::gumbel_softmax_triton", mutates_args=())
    def _gumbel_softmax_triton(x: Tensor, seed: Optional[Tensor], tau: float,
                               hard: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _tgs.gumbel_softmax_forward(x, seed, tau, hard)

    @_triton_op("kxops::gumbel_softmax_backward_triton", mutates_args=())
    def _gumbel_softmax_backward_triton(dy: Tensor, y: Tensor, tau: float) -> Tensor:
        return _tgs.gumbel_softmax_backward(dy, y, tau)

    @_triton_op("kxops::gumbel_max_triton", mutates_args=())
    def _gumbel_max_triton(x: Tensor, seed: Tensor) -> Tensor:
        return _tgs.gumbel_max_forward(x, seed)

    @_triton_op("kxops::perturb_max_triton", mutates_args=())
    def _perturb_max_triton(x: Tensor, nodes: Tensor) -> Tensor:
        return _tgs.perturb_max_forward(x, nodes)

    @_triton_op("kxops::perturb_max_backward_triton", mutates_args=())
    def _perturb_max_backward_triton(dp: Tensor, x: Tensor, nodes: Tensor) -> Tensor:
        return _tgs.perturb_max_backward(dp, x, nodes)

    def _gumbel_softmax_grads(inputs, outputs, dy, dsoft, dindex):
        """The C++ ops' formula (GumbelSoftmaxFn in csrc/gumbel_softmax.cpp): the soft output's gradient."""
        hard, tau = inputs[3], inputs[2]
        g = dy
        if hard and dsoft is not None:  # soft is an output only when hard (else an empty placeholder)
            g = dsoft if g is None else g + dsoft
        if g is None:
            return None
        return torch.ops.kxops.gumbel_softmax_backward_triton(g.contiguous(), outputs[1] if hard else outputs[0], tau)

    def _perturb_max_grads(inputs, dp):
        x, nodes = inputs
        return torch.ops.kxops.perturb_max_backward_triton(dp.contiguous(), x, nodes)

    # x is never needed by the Gumbel-softmax backward (skip=1): the soft output carries everything
    _dispatch.register_triton_autograd("kxops::gumbel_softmax_triton", _gumbel_softmax_grads, skip=1,
                                       with_outputs=True, materialize_grads=False)
    _dispatch.register_triton_autograd("kxops::perturb_max_triton", _perturb_max_grads)
    _dispatch.register_eager_cuda({"kxops::gumbel_softmax_triton": _tgs.gumbel_softmax_forward,
                                   "kxops::gumbel_softmax_backward_triton": _tgs.gumbel_softmax_backward,
                                   "kxops::gumbel_max_triton": _tgs.gumbel_max_forward,
                                   "kxops::perturb_max_triton": _tgs.perturb_max_forward,
                                   "kxops::perturb_max_backward_triton": _tgs.perturb_max_backward})


# ----------------------------------------------------------------------------------------------
# The public functions.

def _int(v, op: str, arg: str) -> int:
    if isinstance(v, (bool, Tensor)) or not hasattr(type(v), "__index__"):
        raise TypeError(f"{op}: {arg} must be an int, got {type(v).__name__}")
    return operator.index(v)


def _tensor(t, op: str, arg: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {arg} must be a tensor, got {type(t).__name__}")
    return t


def _seed(logits: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One 64-bit Philox key from the generator (torch's default one for the logits' device when None), left on
    that device: torch's own random op, so seeding, successive calls and torch.compile behave as torch's do."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=logits.device, generator=generator)


def gumbel_softmax(logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1,
                   generator: Optional[torch.Generator] = None, *, backend: str = "auto") -> Tensor:
    """Gumbel-softmax along dim: y = softmax((logits + g) / tau), g = -log(-log u) with u uniform in the open
    interval (0, 1) (drawn in the kernel, seeded from `generator`). hard=True returns the exact one-hot of
    argmax(logits + g) (a sample of softmax(logits)) with the soft gradient (straight-through).

    logits: any shape and strides, float16 / bfloat16 / float32 (float64 on CPU and the reference); -inf
    entries are never sampled. tau: a positive finite float. The output has logits' shape and dtype.
    Drop-in for torch.nn.functional.gumbel_softmax (the same arguments, plus generator) with a fused kernel.
    backend: "auto", "cpu", "cuda", "triton" or "reference"."""
    op = "gumbel_softmax"
    logits = _tensor(logits, op, "logits")
    if isinstance(tau, (bool, Tensor)) or not isinstance(tau, (int, float)):
        raise TypeError(f"{op}: tau must be a float, got {type(tau).__name__}")
    return torch.ops.kxops.gumbel_softmax_front(logits, _seed(logits, generator), float(tau), bool(hard),
                                                _int(dim, op, "dim"), backend)


def gumbel_max(logits: Tensor, dim: int = -1, generator: Optional[torch.Generator] = None, *,
               backend: str = "auto") -> Tensor:
    """Samples of softmax(logits) along dim by the Gumbel-max trick, argmax(logits + g), without materialising
    the noise: int64 indices of logits' shape without dim (as torch.argmax(logits, dim)). Entries at -inf are
    never chosen; an all -inf row gives -1. Arguments as gumbel_softmax; the same generator state gives the
    same samples as gumbel_softmax(..., hard=True)'s one-hots."""
    op = "gumbel_max"
    logits = _tensor(logits, op, "logits")
    return torch.ops.kxops.gumbel_max_front(logits, _seed(logits, generator), _int(dim, op, "dim"), backend)


def perturb_max_softmax(x: Tensor, noise: str = "gaussian", num_quantiles: int = 64, dim: int = -1, *,
                        backend: str = "auto") -> Tensor:
    """The probabilities p_i = P[argmax_j (x_j + eps_j) = i] of i.i.d. noise eps (Su Jianlin, kexue.fm 9085),
    with their gradient. noise="gaussian": by quadrature over num_quantiles (K >= 2) quantiles of the normal,
    p_i ~ (1/K) sum_k prod_{j != i} Phi(x_i - x_j + Phi^-1(k / (K + 1))), products in log space, in float64
    whatever x's dtype, then renormalised to sum to 1 (the quadrature alone sums to 1 up to its error). Costs
    O(K N^2) per row of N entries. The quadrature's error is O(1/K)-like (the quantile nodes miss the tails):
    against Monte-Carlo frequencies, ~7e-3 at K = 64 and ~1.4e-3 at K = 1024 for six entries of spread ~3. noise="gumbel": the closed form, exactly softmax(x) (num_quantiles unused).
    x: any shape and strides; -inf entries get 0; an all -inf row gives zeros."""
    op = "perturb_max_softmax"
    x = _tensor(x, op, "x")
    if not isinstance(noise, str):
        raise TypeError(f"{op}: noise must be a str, got {type(noise).__name__}")
    return torch.ops.kxops.perturb_max_softmax_front(x, noise, _int(num_quantiles, op, "num_quantiles"),
                                                     _int(dim, op, "dim"), backend)
