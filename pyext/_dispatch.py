"""The Python half of the layer every op family shares (the C++ half, argument checks and backend
choice, is csrc/front.h; a family's front is csrc/<family>.cpp).

A public function (pyext/<family>.py) is one call: `kxops._C.<family>(...)` in eager mode, or the
family's CompositeImplicitAutograd front op under torch.compile / export (`compiling()` tells which;
Dynamo records the op and AOTAutograd runs the same C++ on fake tensors). What the build contains is
known here at import (`HAS_CUDA_KERNELS`, `TRITON_IMPORTABLE`), never looked up while tracing.

Registration helpers for the ops whose implementations are Python: fake (shape-only) implementations
of the C++ kernel ops, the reference ops (CompositeImplicitAutograd: the reference on the normalised
arguments), and the Triton ops (triton_op + an autograd formula).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from . import _C  # noqa: F401  (the ops must be registered before anything below looks at them)

__all__ = ["HAS_CUDA_KERNELS", "TRITON_IMPORTABLE", "backends", "compiling", "triton_interpreting",
           "register_fakes", "implement_reference", "register_triton_autograd", "register_eager_cuda"]


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


# Build facts, fixed at import. A CPU-only build leaves the .cu files (and so every CUDA kernel) out.
HAS_CUDA_KERNELS: bool = _has_kernel("kxops::rope", "CUDA")
TRITON_IMPORTABLE: bool = importlib.util.find_spec("triton") is not None

# True while Dynamo traces (torch.compile, torch.export): the public functions then call the front op.
compiling: Callable[[], bool] = torch.compiler.is_compiling


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> list[str]:
    """Backends usable here: 'reference' always; 'cpu' (the C++ extension is always built); 'cuda' when
    the build carries the CUDA kernels and a GPU is visible; 'triton' when Triton is installed and a GPU
    is visible (or TRITON_INTERPRET=1 runs it on CPU tensors, for tests)."""
    out = ["reference"]
    if _has_kernel("kxops::rope", "CPU"):
        out.append("cpu")
    gpu = torch.cuda.is_available()
    if gpu and HAS_CUDA_KERNELS:
        out.append("cuda")
    if TRITON_IMPORTABLE and (gpu or triton_interpreting()):
        out.append("triton")
    return out


_LIB = torch.library.Library("kxops", "IMPL")  # lives as long as the package: holds the registrations


def register_fakes(fakes: dict) -> None:
    """{"kxops::op": fake_fn}: shape-only implementations of C++ ops, for fake tensors (torch.compile)."""
    for name, fn in fakes.items():
        torch.library.register_fake(name, fn)


def implement_reference(name: str, fn: Callable) -> None:
    """The reference backend of a family: `fn` (pure PyTorch, differentiable) implements the op `name`
    (schema in csrc/kxops.cpp) as CompositeImplicitAutograd, so autograd and tracing see its aten ops."""
    _LIB.impl(name.split("::")[1], fn, "CompositeImplicitAutograd")


def register_triton_autograd(name: str, backward: Callable, skip: int = 0, with_outputs: bool = False,
                             materialize_grads: bool = True) -> None:
    """Autograd of a Triton op (C++ ops carry theirs in C++, csrc/<family>.cpp): the inputs are saved (tensors
    through save_for_backward; the first `skip` not at all, for a backward that does not need them) and
    backward(inputs, *grads) returns the gradients of the leading inputs (the others get None). with_outputs:
    the op's outputs are saved too and backward(inputs, outputs, *grads) gets them (statistics the forward
    computed for its backward, e.g. log-sum-exps). materialize_grads=False: the gradients of unused outputs
    reach backward as None rather than as zero tensors (no pass over zeros)."""
    def setup_context(ctx, inputs, output):
        ctx.tensor_idx = [i for i, a in enumerate(inputs) if i >= skip and isinstance(a, torch.Tensor)]
        outs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
        ctx.n_out = len(outs) if with_outputs else 0
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_idx), *(outs if with_outputs else ()))
        ctx.inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        if not materialize_grads:
            ctx.set_materialize_grads(False)

    def _backward(ctx, *grads):
        inputs = list(ctx.inputs)
        saved = ctx.saved_tensors
        for i, t in zip(ctx.tensor_idx, saved):
            inputs[i] = t
        if with_outputs:
            dx = backward(inputs, list(saved[len(saved) - ctx.n_out:]), *grads)
        else:
            dx = backward(inputs, *grads)
        dx = dx if isinstance(dx, tuple) else (dx,)
        return (*dx, *([None] * (len(inputs) - len(dx))))

    torch.library.register_autograd(name, _backward, setup_context=setup_context)


def register_eager_cuda(impls: dict) -> None:
    """{"kxops::op_triton": fn(*args, traceable=...)}: the CUDA-key kernels of Triton ops, for eager calls on
    real CUDA tensors. They launch the kernel directly (traceable=False), without the wrappers triton_op
    puts around its function (dynamo-disable, wrap_triton switch: tens of microseconds a call). Tracing
    never reaches them: fake and functional tensors dispatch to triton_op's own handling first."""
    for name, fn in impls.items():
        _LIB.impl(name.split("::")[1], functools.partial(fn, traceable=False), "CUDA")
