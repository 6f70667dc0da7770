"""GlobalPointer span loss: kxops.global_pointer_loss against the eager reference (einsum logits + masks +
dense labels + the loss over all L x L spans, what bert4torch / bert4keras do) and torch.compile of it.

q, k: (batch, L, types, d) with RoPE, a padding mask (the second half of the batch padded by a quarter),
sparse gold spans (4 per (batch, type) row, start <= end). The output is the mean loss; the backward
differentiates q and k. The reference materialises (batch, types, L, L) tensors: its setup raises Skip
where they would not fit, and `expected` (the reference on the same inputs, one batch row at a time)
checks every provider on every shape.
"""
from __future__ import annotations

import torch

from .core import Case, Inputs, Op, Provider, Skip, Target, import_module, rel_rms_error
from .linear_attention import memory_budget

SPANS_PER_ROW = 4
# The eager reference's peak, in (B, H, L, L) float32 tensors (logits, the masked logits, the dense labels
# and the two where() terms of the loss; more in the backward).
REF_TENSORS = 6

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _case(device, dtype, B, H, L, d, quick=False) -> Case:
    return Case(f"loss-B{B}-H{H}-L{L}-d{d}-{_DT[dtype]}", device, dtype, dict(B=B, H=H, L=L, d=d), quick=quick)


def gpu_target_case() -> Case:
    return _case("cuda", torch.bfloat16, 16, 10, 512, 64, quick=True)


def cpu_target_case() -> Case:
    return _case("cpu", torch.float32, 4, 8, 256, 64, quick=True)


def cpu_memory_cases() -> list:
    return [cpu_target_case(), _case("cpu", torch.float32, 4, 8, 1024, 64)]


def cases(device: str) -> list:
    if device == "cuda":
        return [gpu_target_case(), _case("cuda", torch.bfloat16, 16, 10, 2048, 64),
                _case("cuda", torch.bfloat16, 1, 10, 16384, 64)]
    return cpu_memory_cases()


def small_cases(device: str) -> list:
    if device == "cuda":
        return [_case(device, torch.bfloat16, 2, 3, 64, 32)]
    return [_case(device, torch.float32, 2, 3, 23, 16), _case(device, torch.bfloat16, 1, 2, 17, 8)]


def make_inputs(case: Case, seed: int) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, H, L, d = case["B"], case["H"], case["L"], case["d"]
    q, k = (torch.randn(B, L, H, d, generator=gen).to(case.dtype).to(case.device).requires_grad_(case.needs_grad)
            for _ in range(2))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[B // 2:, L - L // 4:] = False
    n = B * H * SPANS_PER_ROW
    i = torch.randint(0, max(1, L - L // 4), (n,), generator=gen)
    j = torch.minimum(i + torch.randint(0, 8, (n,), generator=gen), torch.tensor(L - 1))
    bh = torch.arange(B * H).repeat_interleave(SPANS_PER_ROW)
    spans = torch.stack((bh // H, bh % H, i, j), 1)
    return Inputs(dict(q=q, k=k, mask=mask.to(case.device), spans=spans.to(case.device)),
                  grad=("q", "k") if case.needs_grad else (), seed=seed)


def bytes_moved(case: Case, mode: str) -> int:
    """Forward: read q, k; backward: read q, k and write dq, dk (the labels and mask are negligible)."""
    qk = 2 * case["B"] * case["L"] * case["H"] * case["d"] * case.dtype.itemsize
    return {"fwd": qk, "bwd": 2 * qk, "fwd_bwd": 3 * qk}[mode]


def flops(case: Case, mode: str) -> float:
    """The span scores of the upper triangle (tril): 2 d per span; the backward two such products (dq, dk;
    the recomputation of the scores not counted)."""
    L = case["L"]
    fwd = 2.0 * case["B"] * case["H"] * (L * (L + 1) // 2) * case["d"]
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode]


def _ref():
    return import_module("kxops.reference.global_pointer")


def _kxops():
    return import_module("kxops")


def reference_bytes(case) -> int:
    return REF_TENSORS * case["B"] * case["H"] * case["L"] ** 2 * 4


def reference_fits(case) -> None:
    need, budget = reference_bytes(case), memory_budget(case.device)
    if need > budget:
        raise Skip(f"its (B, H, L, L) tensors need ~{need / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget")


def expected(case: Case, inputs: Inputs):
    """The reference's mean loss computed one batch row at a time (so that it fits on every shape)."""
    ref = _ref()
    q, k, mask, spans = (inputs[n].detach() if n in "qk" else inputs[n] for n in ("q", "k", "mask", "spans"))
    rows = []
    with torch.no_grad():
        for b in range(case["B"]):
            sp = spans[spans[:, 0] == b].clone()
            sp[:, 0] = 0
            rows.append(ref.global_pointer_loss(q[b:b + 1], k[b:b + 1], sp, mask[b:b + 1], reduction="none"))
    return torch.cat(rows).mean()


def _call(fn, inputs, **kw):
    q, k, spans, mask = inputs.q, inputs.k, inputs.spans, inputs.mask
    return lambda: fn(q, k, spans, mask, **kw)


def setup_reference(case, inputs):
    reference_fits(case)
    return _call(_ref().global_pointer_loss, inputs)


def setup_compile(case, inputs):
    reference_fits(case)
    torch._dynamo.reset()
    return _call(torch.compile(_ref().global_pointer_loss, dynamic=False), inputs)


def _backend_available(backend: str):
    def available():
        try:
            k = _kxops()
        except Exception as e:  # noqa: BLE001
            return f"kxops not importable ({type(e).__name__}: {e}); run `make build`"
        if not hasattr(k, "global_pointer_loss"):
            return "kxops has no global_pointer_loss yet"
        if backend not in k.backends():
            return f"backend {backend!r} not in kxops.backends()"
        if backend == "triton" and not import_module("kxops.global_pointer").TRITON_KERNELS:
            return "no Triton kernels for global_pointer_loss yet"
        if backend in ("cpu", "cuda") and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "kxops::global_pointer_loss", backend.upper()):
            return f"no {backend} kernel for kxops::global_pointer_loss yet"
        return None
    return available


def _setup_kxops(backend):
    def setup(case, inputs):
        return _call(_kxops().global_pointer_loss, inputs, backend=backend)
    return setup


def _reference_available():
    try:
        _ref()
    except Exception as e:  # noqa: BLE001
        return f"kxops.reference.global_pointer not importable ({type(e).__name__}: {e}); run `make build`"
    return None


PROVIDERS = [
    Provider("reference", setup_reference, available=_reference_available, kind="reference",
             note="kxops.reference.global_pointer_loss: einsum logits, masks, dense labels, loss over L x L "
                  "(as bert4torch); n/a where it would not fit"),
    Provider("compile", setup_compile, available=_reference_available, kind="compile",
             note="torch.compile(the reference, dynamic=False)"),
    Provider("kxops-cpu", _setup_kxops("cpu"), devices=("cpu",), available=_backend_available("cpu"), kind="kxops"),
    Provider("kxops-cuda", _setup_kxops("cuda"), devices=("cuda",), available=_backend_available("cuda"),
             kind="kxops"),
    Provider("kxops-triton", _setup_kxops("triton"), devices=("cuda",), available=_backend_available("triton"),
             kind="kxops"),
]


def check(ref, out, case) -> float:
    return rel_rms_error([ref], [out])


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 1e-2)


def linear_memory_mib(case) -> float:
    """Peak memory that grows linearly in L: 10 float64 (B, L, H, d) tensors (the CPU kernel's rotated q, k
    and their gradients in double, the outputs), against the reference's (B, H, L, L) tensors."""
    return 10 * case["B"] * case["L"] * case["H"] * case["d"] * 8 / 2**20


def targets() -> list:
    """GPU bf16 (B16, H10, L512, d64) fwd_bwd: ours (CUDA or Triton, the faster) >= 5x the reference and >= 2x
    its torch.compile, peak memory under 10% of the reference's (REF_TENSORS (B, H, L, L) float32 tensors).
    CPU fp32 (B4, H8, L256, d64) fwd_bwd: >= 3x the reference; peak memory linear in L at L 256 and 1024."""
    ours, g = ("kxops-cuda", "kxops-triton"), gpu_target_case()
    goals = [Target(g.name, ours, 5.0, modes=("fwd_bwd",), faster_than=("compile",), faster_by=2.0,
                    max_mem_mib=0.1 * reference_bytes(g) / 2**20)]
    c = cpu_target_case()
    goals.append(Target(c.name, "kxops-cpu", 3.0, modes=("fwd_bwd",)))
    goals += [Target(m.name, "kxops-cpu", modes=("fwd_bwd",), max_mem_mib=linear_memory_mib(m))
              for m in cpu_memory_cases()]
    return goals


OP = Op(
    name="global_pointer",
    description="GlobalPointer span loss: multi-label categorical cross-entropy over all L x L spans, fused",
    cases=cases,
    small_cases=small_cases,
    make_inputs=make_inputs,
    providers=PROVIDERS,
    bytes_moved=bytes_moved,
    flops=flops,
    record_memory=True,
    check=check,
    tolerance=tolerance,
    expected=expected,
    targets=targets(),
)
