"""What every family's tests share: the devices and backends to test, the equivalence rule against the
float64 reference, gradients, bad-input cases, opcheck, one compiled function per key, and tracing for
a GPU on machines without one (fake CUDA tensors)."""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = not HAS_CUDA  # conftest switches Triton's interpreter on without a GPU

# (backend, device) pairs that run on this machine. Triton runs in the interpreter on CPU tensors
# when there is no GPU (tiny shapes only), on the GPU otherwise.
BACKENDS = [("cpu", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")]
if HAS_CUDA:
    BACKENDS.insert(1, ("cuda", "cuda"))
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


def backends_where(keep) -> dict:
    """pytest.mark.parametrize arguments over the (backend, device) pairs for which keep(b, d) holds."""
    pairs = [(p, i) for p, i in zip(BACKENDS, BACKEND_IDS) if keep(*p)]
    return dict(argnames="backend,device", argvalues=[p for p, _ in pairs], ids=[i for _, i in pairs])


# the compiled backends minus Triton in the interpreter (triton_op is not traceable there)
COMPILABLE = backends_where(lambda b, d: not (b == "triton" and INTERPRETING))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Floor of the tolerance rule at magnitude <= 1: two units in the last place for fp16 / bf16 (2 * eps),
# about sixteen for fp32. Larger outputs (long sums: linear attention's float32 states) get two units in the
# last place at their own magnitude, 2 * eps * max|ref64|, when that is larger: below one ulp of the output
# a floor would demand correct rounding, which an fp32 reference only meets when torch accumulates it in
# double (CPU cumsum does).
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def floor_for(dtype, magnitude: float) -> float:
    return max(FLOOR[dtype], 2 * torch.finfo(dtype).eps * magnitude)


# ---------------------------------------------------------------------------------------------
# The equivalence rule.

def assert_close_to_ref(out, ref64, ref_lp, what="output"):
    """max|out - ref64| <= 2 * max|ref_lp - ref64| + floor: the reference's own error in out's dtype
    sets the bar (strict in fp32, fair in bf16)."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert out.dtype == ref_lp.dtype, (out.dtype, ref_lp.dtype)
    out64 = out.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    ref64 = ref64.detach().double().cpu()
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lp.detach().double().cpu() - ref64).abs().max().item() if out.numel() else 0.0
    floor = floor_for(out.dtype, ref64.abs().max().item() if out.numel() else 0.0)
    bound = 2 * ref_err + floor
    assert err <= bound, f"{what}: max|out - ref64| = {err:.3g} > 2 * {ref_err:.3g} + {floor:g}"


def refs(fn, *xs, **kw):
    """(ref64, ref_lp): public function `fn` with backend="reference" on float64 copies of the tensors
    xs, and on xs in their own dtype."""
    ref64 = fn(*(x.double() for x in xs), **kw, backend="reference")
    ref_lp = fn(*xs, **kw, backend="reference")
    return ref64, ref_lp


def assert_matches_reference(out, fn, *xs, what="output", **kw):
    """`out` (a tensor or a tuple) against fn(*xs, **kw, backend="reference") under the rule."""
    ref64, ref_lp = refs(fn, *xs, **kw)
    if isinstance(out, torch.Tensor):
        out, ref64, ref_lp = (out,), (ref64,), (ref_lp,)
    for i, (o, r64, rlp) in enumerate(zip(out, ref64, ref_lp)):
        assert_close_to_ref(o, r64, rlp, f"{what}[{i}]" if len(out) > 1 else what)


def grads(fn, inputs, grad_outputs):
    """The outputs of fn(*inputs) followed by the gradients of `inputs` (fresh leaves) for grad_outputs
    (cast to each output's dtype): one tuple to compare under the rule."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    gs = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grad_outputs, outs)])
    return (*outs, *gs)


def reference_module(family: str):
    """kxops.reference.<family>, or, while the package is being rebuilt (the extension not importable), the
    reference file itself (pyext/reference/<family>.py imports only torch)."""
    try:
        return importlib.import_module(f"kxops.reference.{family}")
    except Exception:  # noqa: BLE001
        path = pathlib.Path(__file__).parents[1] / "pyext" / "reference" / f"{family}.py"
        spec = importlib.util.spec_from_file_location(f"{family}_ref", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


# ---------------------------------------------------------------------------------------------
# Rows for the softmax families (x, dim): masked entries and a strided, transposed view.

def masked_rows(g):
    """(5, 33) rows: half masked, all but one, all (-inf: zeros and zero gradients), all but the last."""
    x = torch.randn(5, 33, generator=g) * 2
    x[0, torch.randperm(33, generator=g)[:16]] = float("-inf")
    x[1, 1:] = float("-inf")
    x[2] = float("-inf")
    x[3, :32] = float("-inf")
    return x, -1


def strided_rows(g):
    """(5, 2, 6): rows of 6 along a transposed, sliced dim (2)."""
    base = torch.randn(6, 2, 10, generator=g) * 2
    return base[..., ::2].transpose(0, 2), 2


# ---------------------------------------------------------------------------------------------
# Bad input: each case is (id, call, exception type, message substring).

def bad_input_params(cases) -> dict:
    return dict(argnames="call,exc,message", argvalues=[c[1:] for c in cases], ids=[c[0] for c in cases])


def assert_raises_with(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"expected {message!r} in {str(info.value)!r}"


def run_isolated(code: str, timeout: float = 120) -> str:
    """Runs `code` in a fresh interpreter with faulthandler on and returns its stdout: a crash there
    fails the test with the native stack, instead of taking the test process (a pytest-xdist worker)
    down with it."""
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Ops and compilation.

def opcheck(op, args, full=True):
    """torch.library.opcheck; full=False runs the schema and fake-tensor checks only (for ops whose
    AOT checks recompile GPU kernels for every variant: the Triton ops)."""
    utils = None if full else ("test_schema", "test_faketensor")
    if utils is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=utils)


_COMPILED: dict = {}


def compiled(key, fn, **kw):
    """torch.compile(fn, fullgraph=True, **kw), once per key for the whole test session (the first
    compile costs ~15 s on a 2-core CPU)."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True, **kw)
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------------
# Tracing for a GPU without one: Dynamo (torch.export, strict = fullgraph) over fake CUDA tensors runs
# the same Python and backend choice as torch.compile on a GPU, so a call it cannot trace fails here.

def fake_cuda(*specs):
    """Fake CUDA tensors (no GPU needed): specs are (shape, dtype) pairs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in specs]


class stand_in_cuda_kernels:
    """Context manager: on a CPU-only build, CUDA kernels that must never run are registered for the
    given C++ ops, so that the backend choice sees what a CUDA build has (fake tensors never run them)."""

    def __init__(self, ops):
        self.ops = ops
        self.lib = None

    def __enter__(self):
        if not all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in self.ops):
            def never_called(*args):
                raise AssertionError("a stand-in CUDA kernel ran")
            self.lib = torch.library.Library(self.ops[0].split("::")[0], "IMPL")
            for op in self.ops:
                self.lib.impl(op.split("::")[1], never_called, "CUDA")
        return self

    def __exit__(self, *exc):
        if self.lib is not None:
            self.lib._destroy()


def called_ops(graph) -> set:
    """Targets of a graph's calls; a functionalised in-place op counts as the op it wraps."""
    out = set()
    for n in graph.nodes:
        if n.op == "call_function":
            out.add(str(n.target))
            if "auto_functionalized" in str(n.target):
                out.add(str(n.args[0]))
    return out
