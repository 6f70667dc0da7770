"""What an operator family declares to the benchmark harness: its cases, its providers, the bytes (and
optionally FLOPs) a call must move, and how its outputs are checked. One module per family
(benchmarks/rope.py, ...) builds an `Op` and names it `OP`; the runner discovers it by that name.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

MODES = ("fwd", "bwd", "fwd_bwd")
DEVICES = ("cpu", "cuda")
KINDS = ("reference", "compile", "kxops", "anchor", "yardstick")
# device: CUDA events around each call with L2 flushed in between (do_bench) on GPU, blocked_autorange on
# CPU. host: the wall clock of many back-to-back calls, what a user waits for when calls are host-bound.
TIMINGS = ("device", "host")


@dataclass(frozen=True)
class Case:
    """One benchmark point. `params` holds the shapes and flags the op module reads; `name` says them
    (e.g. "qk-B8-S4096-Hq32-Hk8-D128"). `quick` cases form the --quick subset. `modes`: the modes the case
    runs (None: the family's; an inference case: ("fwd",), its inputs then need not require grad).
    `timing`: one of TIMINGS."""
    name: str
    device: str
    dtype: torch.dtype
    params: dict = field(default_factory=dict)
    quick: bool = False
    modes: Optional[tuple] = None
    timing: str = "device"

    def __post_init__(self):
        if self.timing not in TIMINGS:
            raise ValueError(f"Case {self.name}: timing must be one of {TIMINGS}, got {self.timing!r}")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def needs_grad(self) -> bool:
        """Whether a mode of the case differentiates, so that make_inputs must return leaves requiring grad."""
        return self.modes is None or any(m != "fwd" for m in self.modes)

    def __getitem__(self, key):
        return self.params[key]

    def get(self, key, default=None):
        return self.params.get(key, default)


class Inputs(dict):
    """The tensors of one case (a dict, also readable as attributes), built afresh for every provider so
    that an in-place provider cannot disturb the next one. `grad` names the tensors that require grad
    (the leaves the backward differentiates); `seed` is the case's RNG seed, for ops that draw noise."""

    def __init__(self, tensors: dict, grad: Sequence[str] = (), seed: int = 0):
        super().__init__(tensors)
        self.grad = tuple(grad)
        self.seed = seed

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def grad_leaves(self) -> list:
        return [self[n] for n in self.grad]


class Skip(Exception):
    """Raised by a provider's setup when it could express the case but cannot run it here (the eager
    reference of a family whose reference materialises O(T d^2) state, on a shape that would not fit): the
    case's rows for it say `n/a: <reason>`, they are never timed nor counted as errors. (A setup that
    returns None instead cannot express the case at all and leaves no row.)"""


@dataclass(frozen=True)
class Provider:
    """An implementation to time.

    setup(case, inputs) does the untimed preparation (cos/sin caches the library expects precomputed,
    torch.compile wrappers, free layout views) and returns the closure whose call is timed, or None
    when the provider cannot express the case (it is then left out of that case), or raises Skip when
    it could but cannot run it on this machine.
    available() returns None when the provider can run on this machine, else the reason it cannot.
    devices: where it runs (Triton-only anchors: ("cuda",)).
    kind: "reference" (eager spec), "compile" (torch.compile of it), "kxops" (ours: an error or a
    failed check makes the run exit non-zero), "anchor" (a library users would pick instead),
    "yardstick" (a cheap call such as one aten op on the same tensor: never checked, never a competitor;
    the other rows report their time as a multiple of it).
    modes: the modes it supports (None: all; an in-place or inference-only provider: ("fwd",)).
    timing: overrides the case's timing (a CUDA-graph replay: "device", the kernel time).
    check: replaces Op.check for this provider (same signature, check(ref, out, case), compared with
    Op.tolerance): for a provider whose output cannot be compared with the reference's (a sampler that
    draws other random noise, such as torch's gumbel_softmax), a property of its own output instead (rows
    that sum to 1, indices in range). None: Op.check."""
    name: str
    setup: Callable[[Case, Inputs], Optional[Callable[[], Any]]]
    devices: tuple = DEVICES
    available: Callable[[], Optional[str]] = lambda: None
    kind: str = "anchor"
    note: str = ""
    modes: Optional[tuple] = None
    timing: Optional[str] = None
    check: Optional[Callable[[Any, Any, "Case"], float]] = None


@functools.cache
def import_module(module: str):
    """importlib.import_module, remembered: providers look their library up in setup, case after case."""
    return importlib.import_module(module)


def module_available(module: str, install: str) -> Callable[[], Optional[str]]:
    """A Provider.available for a library: None when `module` imports, else why not ("not installed
    (<install>)" for a missing module, the import error otherwise). Asked once."""
    @functools.cache
    def available():
        try:
            import_module(module)
        except ModuleNotFoundError:
            return f"not installed ({install})"
        except Exception as e:  # noqa: BLE001  (a library that fails to import is unavailable, not fatal)
            return f"import failed: {type(e).__name__}: {e}"
        return None
    return available


def float_tensors(out) -> list:
    """The floating-point tensors of a provider's result (a tensor, or a tuple/list/dict of them)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in float_tensors(o)]
    return []


def rel_rms_error(ref_out, out) -> float:
    """max over outputs of ||out - ref|| / ||ref||, in float64 (flash-linear-attention's check); inf when
    the outputs do not pair up or one is non-finite."""
    refs, outs = float_tensors(ref_out), float_tensors(out)
    if len(refs) != len(outs) or not refs:
        return math.inf
    err = 0.0
    for r, o in zip(refs, outs):
        if r.shape != o.shape:
            return math.inf
        r64, o64 = r.detach().double(), o.detach().double().to(r.device)
        if not bool(torch.isfinite(o64).all()):
            return math.inf
        den = r64.norm().item() or 1.0
        err = max(err, (o64 - r64).norm().item() / den)
    return err


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative RMS tolerance of the sanity check: loose enough for float32-vs-float64 angles and bf16
    cos/sin caches, far below the O(1) error of a wrong pair layout or wrong positions."""
    return {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 2e-2)


@dataclass(frozen=True)
class Target:
    """A performance goal the run reports on (never fails it: timings on shared machines are noisy):
    `provider` on `case`, in each of `modes`, meets every goal that is set:
    min_speedup  at least this many times faster than the reference;
    max_us       a median of at most this many microseconds;
    faster_than  a lower median than each of these providers (same case, mode and timing), at least
                 `faster_by` times lower when that is set above 1;
    max_ratio    at most this multiple of the yardstick's median;
    max_mem_mib  a peak memory (the table's peak MiB) of at most this many MiB;
    min_frac_copy  at least this fraction of the copy bandwidth measured in the same run (the table's
                 %copy / 100: GB/s over copy GB/s).
    `provider`, and each entry of `faster_than`, may also be a tuple of names: the fastest of them that
    ran and passed its check stands for the group ("ours, CUDA or Triton, whichever is faster")."""
    case: str
    provider: Union[str, tuple]
    min_speedup: Optional[float] = None
    modes: tuple = MODES
    max_us: Optional[float] = None
    faster_than: tuple = ()
    max_ratio: Optional[float] = None
    faster_by: float = 1.0
    max_mem_mib: Optional[float] = None
    min_frac_copy: Optional[float] = None


@dataclass
class Op:
    """An operator family.

    cases(device)           the benchmark cases on "cpu" or "cuda" (mark a few quick=True).
    small_cases(device)     tiny versions for the pytest-benchmark suite (default: cases(device)).
    make_inputs(case, seed) -> Inputs: fresh tensors; Inputs.grad names the leaves that require grad.
    providers               Provider list, in table order; the first of kind "reference" is the one
                            the others are checked against and `speedup_vs_ref` divides.
    bytes_moved(case, mode) bytes a call must read + write at minimum: the GB/s numerator, the same for
                            every provider.
    flops(case, mode)       floating-point operations of a call, for the TFLOP/s column (matrix-bound
                            families such as linear attention); None leaves the column empty.
    record_memory           record each call's peak extra memory (CUDA: max_memory_allocated; CPU: the
                            blocks torch's CPU allocator holds, from torch.profiler's memory events).
    expected(case, inputs)  the result every provider is checked against, when it must not come from the
                            reference provider's own call (a reference that would not fit in memory on
                            some cases: computed in pieces); None: the reference provider's first call.
    outputs(result)         the tensors of a result that are checked and take an output gradient;
                            default every floating tensor. A family whose calls also return state
                            (linear attention's final state) selects here.
    check(ref, out, case)   an error number compared with tolerance(dtype); None disables the check
                            (random outputs: seed them from inputs.seed instead where possible). A
                            Provider.check replaces it for that provider (outputs not comparable with
                            the reference's: other random noise).
    modes                   the modes the family supports (a forward-only family: ("fwd",)); a Case or
                            a Provider may narrow them (modes_for).
    targets                 Target goals printed under the table (e.g. "kxops-cpu >= 3x the reference").
    """
    name: str
    cases: Callable[[str], list]
    make_inputs: Callable[[Case, int], Inputs]
    providers: list
    bytes_moved: Callable[[Case, str], int]
    flops: Optional[Callable[[Case, str], float]] = None
    record_memory: bool = True
    outputs: Callable[[Any], list] = float_tensors
    check: Optional[Callable[[Any, Any, Case], float]] = lambda ref, out, case: rel_rms_error(ref, out)
    tolerance: Callable[[torch.dtype], float] = default_tolerance
    modes: tuple = MODES
    small_cases: Optional[Callable[[str], list]] = None
    targets: list = field(default_factory=list)
    description: str = ""
    expected: Optional[Callable[[Case, Inputs], Any]] = None

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"{self.name}: no provider {name!r}")

    @property
    def reference(self) -> Optional[Provider]:
        return next((p for p in self.providers if p.kind == "reference"), None)

    def modes_for(self, case: Case, provider: Provider) -> tuple:
        """The family's modes that both the case and the provider run."""
        return tuple(m for m in self.modes if (case.modes is None or m in case.modes)
                     and (provider.modes is None or m in provider.modes))

    def with_cases(self, cases: Callable[[str], list]) -> "Op":
        return dataclasses.replace(self, cases=cases)
