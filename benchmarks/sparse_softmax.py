"""Sparse softmaxes: kxops.sparsemax, entmax15, entmax (bisection, a per-row alpha tensor) and topk_softmax
against the eager reference, torch.compile of it, the entmax package, Liger-Kernel's sparsemax and
adasplash's Triton entmax, with torch.softmax on the same input as the yardstick (the time of a one-pass
row op: the bandwidth a fused sparse softmax can hope for).

x: (rows, width) standard normal logits, the softmax taken along the last dimension; the backward
differentiates x (and alpha, for entmax_bisect: a (rows, 1) tensor of 1.5 that requires grad, the entmax
package's learnable per-row alpha). The case's `fn` says which function: sparsemax, entmax15,
entmax_bisect (alpha 1.5 as a tensor, 50 bisection steps: the entmax package's default) or topk_softmax
(k = 64).

The reference (and torch.compile of it) is kxops.reference.sparse_softmax, which computes 16-bit inputs
in float32 (the kernel contract's state dtype; in bf16 the sort-based closed forms would lose the
threshold: entmax15 at 32768 wide had rows summing to 19) and returns x's dtype. Every provider is
checked against it. The anchors run in x's dtype, as their users call them: the entmax
package's cumulative sums and bisection in bf16 are off by up to ~2.5e-2 relative RMS, hence the bf16
tolerance below (5e-2: far under the O(1) error of a wrong threshold or support).
"""
from __future__ import annotations

import torch

from .core import Case, Inputs, Op, Provider, Skip, Target, import_module, module_available, rel_rms_error

FNS = ("sparsemax", "entmax15", "entmax_bisect", "topk_softmax")
ALPHA = 1.5     # entmax_bisect's alpha (as a (rows, 1) tensor)
N_ITER = 50     # bisection steps: the entmax package's default, and kxops.entmax's
TOPK = 64       # topk_softmax's k
LIGER_MAX_WIDTH = 65536  # Liger holds a row in one Triton block of at most 2^16 (calculate_settings)

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# ----------------------------------------------------------------------------------------------
# Cases

def _case(device, dtype, fn, R, N, quick=False) -> Case:
    tag = {"entmax_bisect": f"entmax_bisect-a{ALPHA:g}", "topk_softmax": f"topk_softmax-k{TOPK}"}.get(fn, fn)
    p = dict(fn=fn, R=R, N=N)
    if fn == "topk_softmax":
        p["k"] = TOPK
    return Case(f"{tag}-R{R}-N{N}-{_DT[dtype]}", device, dtype, p, quick=quick)


def gpu_target_cases() -> list:
    """4096 x 32768, bf16 and fp32, sparsemax and entmax15: the GPU targets."""
    return [_case("cuda", dt, fn, 4096, 32768, quick=dt == torch.bfloat16)
            for fn in ("sparsemax", "entmax15") for dt in (torch.bfloat16, torch.float32)]


def cpu_target_cases() -> list:
    """256 x 32768 fp32, sparsemax and entmax15: the CPU targets."""
    return [_case("cpu", torch.float32, fn, 256, 32768, quick=True) for fn in ("sparsemax", "entmax15")]


def cases(device: str) -> list:
    if device == "cuda":
        bf = torch.bfloat16
        return gpu_target_cases() + [
            _case(device, bf, fn, 4096, N) for N in (131072, 512) for fn in ("sparsemax", "entmax15")
        ] + [_case(device, bf, "entmax_bisect", 4096, 32768), _case(device, bf, "topk_softmax", 4096, 32768)]
    return cpu_target_cases() + [_case(device, torch.float32, fn, 256, 32768) for fn in ("entmax_bisect", "topk_softmax")]


def small_cases(device: str) -> list:
    """Tiny shapes for the pytest-benchmark suite: every function at an odd width, and bf16."""
    if device == "cuda":
        return [_case(device, torch.bfloat16, fn, 64, 1000) for fn in FNS] + \
               [_case(device, torch.float32, fn, 64, 1000) for fn in ("sparsemax", "entmax15")]
    return [_case(device, torch.float32, fn, 8, 300) for fn in FNS] + \
           [_case(device, torch.bfloat16, fn, 4, 257) for fn in ("sparsemax", "entmax15")]


def make_inputs(case: Case, seed: int) -> Inputs:
    gen = torch.Generator(device=case.device).manual_seed(seed)
    R, N = case["R"], case["N"]
    x = torch.randn(R, N, device=case.device, generator=gen).to(case.dtype).requires_grad_(case.needs_grad)
    t, grad = {"x": x}, ["x"]
    if case["fn"] == "entmax_bisect":
        t["alpha"] = torch.full((R, 1), ALPHA, dtype=case.dtype, device=case.device).requires_grad_(case.needs_grad)
        grad.append("alpha")
    return Inputs(t, grad=tuple(grad) if case.needs_grad else (), seed=seed)


def bytes_moved(case: Case, mode: str) -> int:
    """Forward: read x, write p. Backward: read p and dp, write dx (alpha's (rows, 1) is negligible)."""
    one = case["R"] * case["N"] * case.dtype.itemsize
    return {"fwd": 2 * one, "bwd": 3 * one, "fwd_bwd": 5 * one}[mode]


# ----------------------------------------------------------------------------------------------
# Providers

def _kxops():
    return import_module("kxops")


def _ref():
    return import_module("kxops.reference.sparse_softmax")


def _reference_fn(fn: str):
    """The reference of `fn` (it computes 16-bit inputs in float32 itself and returns x's dtype)."""
    ref = _ref()
    if fn == "entmax_bisect":
        return lambda x, alpha: ref.entmax_bisect(x, alpha, -1, N_ITER)
    if fn == "topk_softmax":
        return lambda x: ref.topk_softmax(x, TOPK, -1)
    f = getattr(ref, fn)
    return lambda x: f(x, -1)


def _bind(f, case, inputs):
    if case["fn"] == "entmax_bisect":
        x, alpha = inputs.x, inputs.alpha
        return lambda: f(x, alpha)
    x = inputs.x
    return lambda: f(x)


def _reference_available():
    try:
        _ref()
    except Exception as e:  # noqa: BLE001
        return f"kxops.reference.sparse_softmax not importable ({type(e).__name__}: {e}); run `make build`"
    return None


def setup_reference(case, inputs):
    return _bind(_reference_fn(case["fn"]), case, inputs)


def setup_compile(case, inputs):
    torch._dynamo.reset()
    return _bind(torch.compile(_reference_fn(case["fn"]), dynamic=False), case, inputs)


def setup_torch_softmax(case, inputs):
    x = inputs.x
    return lambda: torch.softmax(x, -1)


def setup_entmax(case, inputs):
    """The entmax package (deep-spin/entmax 1.3): sort-based sparsemax / entmax15, entmax_bisect; in x's dtype."""
    em = import_module("entmax")
    fn = case["fn"]
    if fn == "sparsemax":
        return _bind(lambda x: em.sparsemax(x, -1), case, inputs)
    if fn == "entmax15":
        return _bind(lambda x: em.entmax15(x, -1), case, inputs)
    if fn == "entmax_bisect":
        return _bind(lambda x, a: em.entmax_bisect(x, a, -1, N_ITER), case, inputs)
    return None  # no top-k softmax


def setup_liger(case, inputs):
    """liger_kernel.ops.sparsemax.LigerSparsemaxFunction: torch.sort of x in float32, then one Triton
    program per row holding it whole (rows up to 65536 wide); sparsemax only."""
    if case["fn"] != "sparsemax":
        return None
    if case["N"] > LIGER_MAX_WIDTH:
        raise Skip(f"Liger's sparsemax holds a row in one Triton block of at most {LIGER_MAX_WIDTH}")
    f = import_module("liger_kernel.ops.sparsemax").LigerSparsemaxFunction
    return _bind(lambda x: f.apply(x, -1), case, inputs)


def setup_adasplash(case, inputs):
    """adasplash.triton_entmax(x, alpha, n_iter=2, use_histogram=True, fast_math=False) (0.2.2's defaults):
    histogram initialisation then hybrid Halley steps; alpha 2 is sparsemax, 1.5 entmax15. A float alpha
    only (no per-row tensor): entmax_bisect and topk_softmax are not expressible. Its forward kernel is
    autotuned on first use (keyed on n_iter and use_histogram, not the width), outside the timed calls."""
    alpha = {"sparsemax": 2.0, "entmax15": 1.5}.get(case["fn"])
    if alpha is None:
        return None
    f = import_module("adasplash").triton_entmax
    return _bind(lambda x: f(x, alpha=alpha), case, inputs)


def _kernel_missing(op: str, backend: str):
    if backend in ("cpu", "cuda") and not torch._C._dispatch_has_kernel_for_dispatch_key(op, backend.upper()):
        return f"no {backend} kernel for {op} yet"
    return None


def _backend_available(backend: str):
    def available():
        try:
            k = _kxops()
        except Exception as e:  # noqa: BLE001
            return f"kxops not importable ({type(e).__name__}: {e}); run `make build`"
        if not all(hasattr(k, f) for f in ("sparsemax", "entmax15", "entmax", "topk_softmax")):
            return "kxops has no sparse softmaxes yet"
        if backend not in k.backends():
            return f"backend {backend!r} not in kxops.backends()"
        if backend == "triton" and not getattr(import_module("kxops.sparse_softmax"), "TRITON_KERNELS", False):
            return "no Triton kernels for the sparse softmaxes yet"
        for op in ("kxops::entmax", "kxops::entmax_backward"):
            why = _kernel_missing(op, backend)
            if why:
                return why
        return None
    return available


def _setup_kxops(backend):
    def setup(case, inputs):
        k, fn = _kxops(), case["fn"]
        if fn == "sparsemax":
            return _bind(lambda x: k.sparsemax(x, -1, backend=backend), case, inputs)
        if fn == "entmax15":
            return _bind(lambda x: k.entmax15(x, -1, backend=backend), case, inputs)
        if fn == "entmax_bisect":
            return _bind(lambda x, a: k.entmax(x, a, -1, N_ITER, backend=backend), case, inputs)
        why = _kernel_missing("kxops::topk_softmax", backend)
        if why:
            raise Skip(why)
        return _bind(lambda x: k.topk_softmax(x, TOPK, -1, backend=backend), case, inputs)
    return setup


PROVIDERS = [
    Provider("reference", setup_reference, available=_reference_available, kind="reference",
             note="kxops.reference.sparse_softmax (sort-based closed forms, bisection), eager; 16-bit x computed in float32"),
    Provider("compile", setup_compile, available=_reference_available, kind="compile",
             note="torch.compile(the reference, dynamic=False)"),
    Provider("torch-softmax", setup_torch_softmax, kind="yardstick",
             note="torch.softmax(x, -1): a one-pass row op's time; never checked"),
    Provider("entmax", setup_entmax, available=module_available("entmax", "pip install --no-deps entmax==1.3"),
             note="entmax.sparsemax / entmax15 / entmax_bisect (deep-spin, sort-based), in x's dtype"),
    Provider("liger", setup_liger, devices=("cuda",),
             available=module_available("liger_kernel.ops.sparsemax", "pip install --no-deps liger-kernel"),
             note="liger_kernel.ops.sparsemax.LigerSparsemaxFunction (sparsemax only, rows <= 65536)"),
    Provider("adasplash", setup_adasplash, devices=("cuda",),
             available=module_available("adasplash.triton_entmax_v2", "pip install --no-deps adasplash==0.2.2"),
             note="adasplash.triton_entmax(x, alpha=2.0 / 1.5) (Triton, sparsemax and entmax15)"),
    Provider("kxops-cpu", _setup_kxops("cpu"), devices=("cpu",), available=_backend_available("cpu"), kind="kxops"),
    Provider("kxops-cuda", _setup_kxops("cuda"), devices=("cuda",), available=_backend_available("cuda"),
             kind="kxops"),
    Provider("kxops-triton", _setup_kxops("triton"), devices=("cuda",), available=_backend_available("triton"),
             kind="kxops"),
]


def check(ref, out, case) -> float:
    return rel_rms_error(ref, out)


def tolerance(dtype: torch.dtype) -> float:
    """Relative RMS against the float32-state reference: bf16/fp16 loose enough for the anchors' sums in
    that dtype (the entmax package: up to ~2.5e-2) and the output's rounding, float32 for iterative
    solvers that stop short of exact (adasplash's two Halley steps)."""
    return {torch.float16: 5e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 5e-2)


def targets() -> list:
    """The issue's speed section. GPU, 4096 x 32768, bf16 and fp32, sparsemax and entmax15: ours (the faster
    of kxops-cuda and kxops-triton) >= 5x the entmax package in fwd_bwd, faster than Liger's (sparsemax) and
    adasplash's in fwd_bwd, and a forward within 2x of torch.softmax's. CPU, 256 x 32768 fp32: kxops-cpu
    >= 3x the entmax package in fwd_bwd."""
    ours, goals = ("kxops-cuda", "kxops-triton"), []
    for c in gpu_target_cases():
        rivals = ("liger", "adasplash") if c["fn"] == "sparsemax" else ("adasplash",)
        goals += [Target(c.name, ours, modes=("fwd_bwd",), faster_than=("entmax",), faster_by=5.0),
                  Target(c.name, ours, modes=("fwd_bwd",), faster_than=rivals),
                  Target(c.name, ours, modes=("fwd",), max_ratio=2.0)]
    goals += [Target(c.name, "kxops-cpu", modes=("fwd_bwd",), faster_than=("entmax",), faster_by=3.0)
              for c in cpu_target_cases()]
    return goals


OP = Op(
    name="sparse_softmax",
    description="sparsemax, entmax15, alpha-entmax (bisection) and top-k softmax along rows, sort-free",
    cases=cases,
    small_cases=small_cases,
    make_inputs=make_inputs,
    providers=PROVIDERS,
    bytes_moved=bytes_moved,
    record_memory=True,
    check=check,
    tolerance=tolerance,
    targets=targets(),
)
