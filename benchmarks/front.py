"""The shared front's per-call host cost: the smallest eager call of every family, host-timed against one
aten op (torch.mul on the same tensor).

What a tiny call costs beyond its kernel is the shared layer: the CPython entry or torch.ops dispatch,
the argument checks and backend choice of csrc/front.h, and on CUDA tensors the capture probe of
csrc/cuda/front_cuda.cu (cudaStreamIsCapturing, asked before anything may sync with the host). A
family's own benchmark shows it for that family (RoPE's tiny-* and decode-* cases); here every family's
smallest call sits side by side, on CPU and, where there is one, on a GPU, in units of torch.mul
(`x torch.mul`), a measure that travels between machines.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .core import Case, Inputs, Op, Provider, import_module
from .rope import setup_torch_mul

# (case name, the public function it calls)
CALLS = (("rope", "rope"), ("linear_attention_step", "linear_attention_step"),
         ("global_pointer_loss", "global_pointer_loss"),
         ("multilabel_categorical_crossentropy", "multilabel_categorical_crossentropy"),
         ("sparsemax", "sparsemax"), ("gumbel_softmax", "gumbel_softmax"))


def _case(device, name) -> Case:
    return dataclasses.replace(Case(f"tiny-{name}", device, torch.float32, dict(call=name), quick=True),
                               modes=("fwd",), timing="host")


def cases(device: str) -> list:
    return [_case(device, name) for name, _ in CALLS]


def make_inputs(case: Case, seed: int) -> Inputs:
    """A few elements each: the call's time is its host cost. `q` is what the yardstick multiplies."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(case.device)
    call = case["call"]
    if call == "rope":
        t = dict(q=r(1, 1, 4, 8))
    elif call == "linear_attention_step":
        t = dict(q=r(1, 2, 8), k=r(1, 2, 8), v=r(1, 2, 8), S=r(1, 2, 8, 8), z=r(1, 2, 8).abs() + 1)
    elif call == "global_pointer_loss":
        t = dict(q=r(1, 4, 2, 8), k=r(1, 4, 2, 8), spans=torch.tensor([[0, 1, 0, 2]], device=case.device))
    elif call in ("sparsemax", "gumbel_softmax"):
        t = dict(q=r(2, 8))
    else:
        t = dict(q=r(2, 8), targets=(r(2, 8) > 0).float())
    return Inputs(t, seed=seed)


def _run(fns, case, inputs):
    call, t = case["call"], inputs
    if call == "rope":
        return lambda: fns.rope(t.q)
    if call == "linear_attention_step":
        return lambda: fns.linear_attention_step(t.q, t.k, t.v, (t.S, t.z))
    if call == "global_pointer_loss":
        return lambda: fns.global_pointer_loss(t.q, t.k, t.spans)
    if call == "sparsemax":
        return lambda: fns.sparsemax(t.q)
    if call == "gumbel_softmax":  # with the seed draw; a fresh generator per call keeps the noise checkable
        dev = t.q.device
        return lambda: fns.gumbel_softmax(t.q, generator=torch.Generator(device=dev).manual_seed(0))
    return lambda: fns.multilabel_categorical_crossentropy(t.q, t.targets)


class _Reference:
    """The references of the calls, under the public functions' names."""

    def __getattr__(self, name):
        if name == "global_pointer_loss":
            return import_module("kxops.reference.global_pointer").global_pointer_loss
        if name == "multilabel_categorical_crossentropy":
            return import_module("kxops.reference.global_pointer").multilabel_categorical_crossentropy
        if name == "sparsemax":
            return import_module("kxops.reference.sparse_softmax").sparsemax
        if name == "gumbel_softmax":  # the reference backend behind the public function (it draws the seed)
            return functools.partial(import_module("kxops").gumbel_softmax, backend="reference")
        return getattr(import_module("kxops.reference"), name)


def setup_reference(case, inputs):
    return _run(_Reference(), case, inputs)


def setup_kxops(case, inputs):
    return _run(import_module("kxops"), case, inputs)


def _available():
    try:
        import_module("kxops")
    except Exception as e:  # noqa: BLE001
        return f"kxops not importable ({type(e).__name__}: {e}); run `make build`"
    return None


def bytes_moved(case: Case, mode: str) -> int:
    return 0  # host-bound: nothing worth counting moves


def first_output(result) -> list:
    """The call's first tensor (rope's output, the step's output, the losses)."""
    return [result[0] if isinstance(result, tuple) else result]


OP = Op(
    name="front",
    description="the shared front's per-call host cost: every family's smallest eager call vs one aten op",
    cases=cases,
    small_cases=cases,
    make_inputs=make_inputs,
    providers=[
        Provider("reference", setup_reference, available=_available, kind="reference",
                 note="the family's reference (eager PyTorch)"),
        Provider("kxops", setup_kxops, available=_available, kind="kxops",
                 note="the public function, backend='auto' (CPU / CUDA kernel)"),
        Provider("torch.mul", setup_torch_mul, kind="yardstick", modes=("fwd",),
                 note="torch.mul(q, q), one aten op on the same q"),
    ],
    bytes_moved=bytes_moved,
    record_memory=False,
    outputs=first_output,
    modes=("fwd",),
)
