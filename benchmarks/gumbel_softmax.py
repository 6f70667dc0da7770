"""Gumbel / perturb-max softmaxes: kxops.gumbel_softmax (soft and hard), gumbel_max and perturb_max_softmax
(Gaussian noise, K = 64 quantiles) against the eager reference, torch.compile of it, torch's
F.gumbel_softmax and the Gumbel-max users write in torch, with torch.softmax on the same input as the
yardstick (a one-pass row op's time: the bandwidth a fused Gumbel-softmax can hope for) and quack-kernels'
softmax as a second one where it imports (GPU).

x: (rows, width) standard normal logits, the op along the last dimension; the backward differentiates x.
The case's `fn` says which function: gumbel_softmax (tau = 1, soft), gumbel_softmax_hard (tau = 1, the
exact one-hot with the soft gradient), gumbel_max (int64 samples: forward only) or perturb_max (Gaussian
noise by quadrature over K = 64 nodes: O(K N^2) per row, so narrow rows only).

Checking random outputs. A sample can only be compared with the reference's for the same noise. kxops
and the reference draw the same Philox bits from the same 64-bit key, and the public functions draw that
key from their `generator` with torch.randint (pyext/gumbel_softmax.py's _seed). So: the kxops providers
get a torch.Generator seeded with noise_seed(inputs) in setup, the reference (and `expected`, what every
provider is checked against) a key drawn by the same torch.randint from a generator seeded alike. The
first call of a kxops provider, the one the harness checks, then uses exactly the reference's noise;
its later (timed) calls advance the generator and draw fresh noise, as a user's do. The reference keeps
its key (drawn once, in setup) for every call. Soft outputs are compared by relative RMS error, samples
(gumbel_max, the hard one-hots' positions) by the fraction of rows whose sample differs from the
reference's (other noise differs in nearly every row; a float32 log rounding one ulp apart flips a near
tie at the maximum in a vanishing fraction), both against the dtype's tolerance.
torch's F.gumbel_softmax and torch-gumbel-max draw their own noise (exponential_ on torch's generator):
their outputs are checked for what they must be instead (Provider.check): finite rows of non-negative
entries summing to 1 (hard: with a maximum of 1), or indices in [0, width).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .core import Case, Inputs, Op, Provider, Skip, Target, default_tolerance, import_module, module_available, \
    rel_rms_error

FNS = ("gumbel_softmax", "gumbel_softmax_hard", "gumbel_max", "perturb_max")
TAU = 1.0
K = 64                    # perturb_max's quadrature nodes (the public function's default)
NOISE_SEED_OFFSET = 7919  # the noise generator's seed is the case's seed + this: not the stream x came from
# The reference's perturb-max materialises (R, N, N, K) float64 tensors: ~3 of them in the forward, ~10
# with its autograd graph and backward (measured with the CPU profiler at 64 x 64, K = 64).
REF_UNITS = 10
EXPECTED_UNITS = 3
PIECE_BYTES = 1 << 30     # `expected` computes perturb-max on pieces of rows that fit in this
REF_CPU_MAX_BYTES = 4 << 30

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# ----------------------------------------------------------------------------------------------
# Cases

def _case(device, dtype, fn, R, N, quick=False) -> Case:
    tag = {"gumbel_softmax": f"gumbel_softmax-tau{TAU:g}", "gumbel_softmax_hard": f"gumbel_softmax_hard-tau{TAU:g}",
           "perturb_max": f"perturb_max-gaussian-K{K}"}.get(fn, fn)
    p = dict(fn=fn, R=R, N=N)
    if fn.startswith("gumbel_softmax"):
        p.update(tau=TAU, hard=fn == "gumbel_softmax_hard")
    if fn == "perturb_max":
        p["K"] = K
    modes = ("fwd",) if fn == "gumbel_max" else None  # int64 samples: nothing to differentiate
    return Case(f"{tag}-R{R}-N{N}-{_DT[dtype]}", device, dtype, p, quick=quick, modes=modes)


def gpu_target_cases() -> list:
    """4096 x 32768, bf16 and fp32: gumbel_softmax (fwd_bwd targets) and gumbel_max (forward target)."""
    return [_case("cuda", dt, fn, 4096, 32768, quick=dt == torch.bfloat16)
            for fn in ("gumbel_softmax", "gumbel_max") for dt in (torch.bfloat16, torch.float32)]


def cpu_target_cases() -> list:
    """256 x 32768 fp32 gumbel_softmax: the CPU target."""
    return [_case("cpu", torch.float32, "gumbel_softmax", 256, 32768, quick=True)]


def cases(device: str) -> list:
    if device == "cuda":
        bf = torch.bfloat16
        return gpu_target_cases() + [
            _case(device, bf, "gumbel_softmax_hard", 4096, 32768),
            _case(device, bf, "gumbel_softmax", 4096, 131072),
            _case(device, bf, "perturb_max", 4096, 256, quick=True),
            _case(device, torch.float32, "perturb_max", 4096, 256),
        ]
    f32 = torch.float32
    return cpu_target_cases() + [
        _case(device, f32, "gumbel_softmax_hard", 256, 32768),
        _case(device, f32, "gumbel_max", 256, 32768, quick=True),
        _case(device, f32, "perturb_max", 64, 64, quick=True),
    ]


def small_cases(device: str) -> list:
    """Tiny shapes for the pytest-benchmark suite: every function at an odd width, and bf16."""
    if device == "cuda":
        return [_case(device, torch.bfloat16, fn, 64, 1000 if fn != "perturb_max" else 100) for fn in FNS] + \
               [_case(device, torch.float32, fn, 64, 1000) for fn in ("gumbel_softmax", "gumbel_max")]
    return [_case(device, torch.float32, fn, 8, 300 if fn != "perturb_max" else 30) for fn in FNS] + \
           [_case(device, torch.bfloat16, fn, 4, 257) for fn in ("gumbel_softmax", "gumbel_max")]


def make_inputs(case: Case, seed: int) -> Inputs:
    gen = torch.Generator(device=case.device).manual_seed(seed)
    x = torch.randn(case["R"], case["N"], device=case.device, generator=gen).to(case.dtype)
    x.requires_grad_(case.needs_grad)
    return Inputs({"x": x}, grad=("x",) if case.needs_grad else (), seed=seed)


def bytes_moved(case: Case, mode: str) -> int:
    """The kernel contract's traffic. gumbel_softmax: the forward reads x and writes y, the backward reads y
    and dy and writes dx. hard: the forward also writes the soft output (the backward's y). gumbel_max:
    reads x, writes the (rows,) int64 samples. perturb_max: the forward reads x and writes p, the backward
    reads dp and x (it recomputes) and writes dx."""
    R, N, fn = case["R"], case["N"], case["fn"]
    one = R * N * case.dtype.itemsize
    if fn == "gumbel_max":
        return one + 8 * R
    fwd = 3 * one if fn == "gumbel_softmax_hard" else 2 * one
    return {"fwd": fwd, "bwd": 3 * one, "fwd_bwd": fwd + 3 * one}[mode]


# ----------------------------------------------------------------------------------------------
# The noise both sides share

def noise_generator(case: Case, inputs: Inputs) -> torch.Generator:
    """The generator a kxops provider samples from: seeded from the case's seed, fresh in each setup."""
    return torch.Generator(device=case.device).manual_seed(inputs.seed + NOISE_SEED_OFFSET)


def noise_key(case: Case, inputs: Inputs) -> torch.Tensor:
    """The Philox key the first call of a kxops provider draws from noise_generator: the same torch.randint
    as kxops' own (pyext/gumbel_softmax.py, _seed), on a generator seeded alike."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=case.device,
                         generator=noise_generator(case, inputs))


# ----------------------------------------------------------------------------------------------
# Providers

def _kxops():
    return import_module("kxops")


def _ref():
    return import_module("kxops.reference.gumbel_softmax")


def _reference_fn(case: Case):
    """The reference of the case's function, of (x, key) (perturb_max: (x, nodes)); x (R, N) rows as the
    contract's. gumbel_softmax returns y only (kxops' public function returns nothing else)."""
    ref, fn = _ref(), case["fn"]
    if fn == "gumbel_max":
        return ref.gumbel_max_ref
    if fn == "perturb_max":
        return ref.perturb_max_ref
    tau, hard = case["tau"], case["hard"]
    return lambda x, key: ref.gumbel_softmax_ref(x, key, tau, hard)[0]


def _reference_arg(case: Case, inputs: Inputs):
    """The reference's second argument: the shared Philox key, or perturb-max's quadrature nodes."""
    if case["fn"] == "perturb_max":
        return _ref().perturb_max_nodes(case["K"], case.device)
    return noise_key(case, inputs)


def _unit_bytes(case: Case) -> int:
    """One (rows, N, N, K) float64 tensor of the reference's perturb-max."""
    return case["R"] * case["N"] ** 2 * case["K"] * 8


def memory_budget(device: str) -> int:
    """GPU: 90% of what is free (the device's and the allocator's unused cache). CPU: half of
    MemAvailable, at most REF_CPU_MAX_BYTES."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(0.9 * (free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(REF_CPU_MAX_BYTES, avail // 2)


def reference_fits(case: Case) -> None:
    """Raises Skip where the reference's perturb-max (REF_UNITS (R, N, N, K) float64 tensors) would not fit."""
    if case["fn"] != "perturb_max":
        return
    need, budget = REF_UNITS * _unit_bytes(case), memory_budget(case.device)
    if need > budget:
        raise Skip(f"its (R, N, N, K) float64 tensors need ~{need / 2**30:.0f} GiB, over the "
                   f"{budget / 2**30:.1f} GiB budget (checked against `expected`, computed in pieces)")


def expected(case: Case, inputs: Inputs):
    """What every provider is checked against: the reference on the case's x, with the shared key; perturb-max
    on pieces of rows small enough that its (rows, N, N, K) float64 tensors stay under PIECE_BYTES (rows are
    independent: the same function as one call), so every shape is checked, the reference's own rows too."""
    f, arg = _reference_fn(case), _reference_arg(case, inputs)
    x = inputs.x.detach()
    with torch.no_grad():
        if case["fn"] != "perturb_max":
            return f(x, arg)
        n = max(1, PIECE_BYTES // (EXPECTED_UNITS * _unit_bytes(case) // case["R"]))
        return torch.cat([f(x[a:a + n], arg) for a in range(0, case["R"], n)])


def _reference_available():
    try:
        _ref()
    except Exception as e:  # noqa: BLE001
        return f"kxops.reference.gumbel_softmax not importable ({type(e).__name__}: {e}); run `make build`"
    return None


def setup_reference(case, inputs):
    """The eager reference; its key (or perturb-max's nodes) made once, here."""
    reference_fits(case)
    f, arg, x = _reference_fn(case), _reference_arg(case, inputs), inputs.x
    return lambda: f(x, arg)


def setup_compile(case, inputs):
    reference_fits(case)
    torch._dynamo.reset()
    f, arg, x = torch.compile(_reference_fn(case), dynamic=False), _reference_arg(case, inputs), inputs.x
    return lambda: f(x, arg)


def setup_torch_softmax(case, inputs):
    x = inputs.x
    return lambda: torch.softmax(x, -1)


def setup_quack(case, inputs):
    """quack-kernels' softmax (CuTe DSL): the one-pass bandwidth of a tuned softmax, a second yardstick."""
    f, x = import_module("quack").softmax, inputs.x
    return lambda: f(x)


def setup_torch_gumbel_softmax(case, inputs):
    """torch.nn.functional.gumbel_softmax(x, tau, hard): noise by exponential_ in x's dtype, then softmax
    (and the one-hot scatter when hard): several kernels."""
    if not case["fn"].startswith("gumbel_softmax"):
        return None
    x, tau, hard = inputs.x, case["tau"], case["hard"]
    return lambda: F.gumbel_softmax(x, tau=tau, hard=hard, dim=-1)


def setup_torch_gumbel_max(case, inputs):
    """The Gumbel-max users write in torch: x + Gumbel noise (F.gumbel_softmax's: -log of exponential_),
    then argmax."""
    if case["fn"] != "gumbel_max":
        return None
    x = inputs.x.detach()
    return lambda: (x - torch.empty_like(x).exponential_().log()).argmax(-1)


_KERNEL_OPS = {"gumbel_softmax": ("kxops::gumbel_softmax", "kxops::gumbel_softmax_backward"),
               "gumbel_softmax_hard": ("kxops::gumbel_softmax", "kxops::gumbel_softmax_backward"),
               "gumbel_max": ("kxops::gumbel_max",),
               "perturb_max": ("kxops::perturb_max", "kxops::perturb_max_backward")}


def _kernel_missing(op: str, backend: str):
    if backend in ("cpu", "cuda"):
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(op, backend.upper())
        except RuntimeError:  # the schema is not registered at all
            has = False
        if not has:
            return f"no {backend} kernel for {op} yet"
    return None


def _backend_available(backend: str):
    def available():
        try:
            k = _kxops()
        except Exception as e:  # noqa: BLE001
            return f"kxops not importable ({type(e).__name__}: {e}); run `make build`"
        if not all(hasattr(k, f) for f in ("gumbel_softmax", "gumbel_max", "perturb_max_softmax")):
            return "kxops has no Gumbel softmaxes yet"
        if backend not in k.backends():
            return f"backend {backend!r} not in kxops.backends()"
        if backend == "triton" and not getattr(import_module("kxops.gumbel_softmax"), "TRITON_KERNELS", False):
            return "no Triton kernels for the Gumbel softmaxes yet"
        return _kernel_missing("kxops::gumbel_softmax", backend)
    return available


def _setup_kxops(backend):
    def setup(case, inputs):
        """kxops' public function on backend; the Gumbel ones sample from noise_generator (the first call
        draws the reference's key). A function whose kernel that backend lacks: n/a."""
        k, fn, x = _kxops(), case["fn"], inputs.x
        for op in _KERNEL_OPS[fn]:
            why = _kernel_missing(op, backend)
            if why:
                raise Skip(why)
        if fn == "perturb_max":
            K_ = case["K"]
            return lambda: k.perturb_max_softmax(x, "gaussian", K_, -1, backend=backend)
        gen = noise_generator(case, inputs)
        if fn == "gumbel_max":
            return lambda: k.gumbel_max(x, -1, gen, backend=backend)
        tau, hard = case["tau"], case["hard"]
        return lambda: k.gumbel_softmax(x, tau, hard, -1, gen, backend=backend)
    return setup


# ----------------------------------------------------------------------------------------------
# Checks

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def sample_mismatch(ref, out) -> float:
    """The fraction of rows whose sample (int64 index) differs from the reference's; inf when the outputs
    are not (rows,) int64 tensors of one shape."""
    ref, out = _first(ref), _first(out)
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)) or ref.shape != out.shape \
            or out.dtype != torch.int64:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    return (ref != out.to(ref.device)).double().mean().item()


def _is_one_hot(y: torch.Tensor) -> bool:
    y = y.detach().float()
    return bool(((y == 0) | (y == 1)).all()) and bool((y.sum(-1) == 1).all())


def check(ref, out, case) -> float:
    """Against `expected` (the reference with the shared key): soft outputs by relative RMS error, samples
    by sample_mismatch; the hard output must be an exact one-hot, at the reference's sample."""
    fn = case["fn"]
    if fn == "gumbel_max":
        return sample_mismatch(ref, out)
    if fn == "gumbel_softmax_hard":
        ref, out = _first(ref), _first(out)
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape or not _is_one_hot(out):
            return math.inf
        return sample_mismatch(ref.detach().argmax(-1), out.detach().argmax(-1))
    return rel_rms_error(ref, out)


def check_distribution(ref, out, case) -> float:
    """torch's F.gumbel_softmax (its own noise: not comparable with the reference): finite, non-negative
    rows of the case's shape; the error is the largest |row sum - 1| (hard: also |row max - 1|: its
    y_hard - soft + soft is one up to rounding)."""
    y = _first(out)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (case["R"], case["N"]):
        return math.inf
    y = y.detach().float()
    if not bool(torch.isfinite(y).all()) or bool((y < 0).any()):
        return math.inf
    err = (y.sum(-1) - 1).abs().max().item()
    if case.get("hard"):
        err = max(err, (y.amax(-1) - 1).abs().max().item())
    return err


def check_samples(ref, out, case) -> float:
    """torch-gumbel-max (its own noise): (rows,) int64 indices in [0, width): 0, else inf."""
    s = _first(out)
    ok = isinstance(s, torch.Tensor) and s.dtype == torch.int64 and tuple(s.shape) == (case["R"],) \
        and bool(((s >= 0) & (s < case["N"])).all())
    return 0.0 if ok else math.inf


def tolerance(dtype: torch.dtype) -> float:
    """Relative RMS of soft outputs (kxops and the reference compute in float32, perturb-max in float64, and
    round to x's dtype) and the fraction of rows whose sample may differ from the reference's (near ties
    flipped by a float32 log one ulp apart: rare; other noise: nearly every row): 1e-3 in float32, 2e-2 in
    16 bits."""
    return default_tolerance(dtype)


PROVIDERS = [
    Provider("reference", setup_reference, available=_reference_available, kind="reference",
             note="kxops.reference.gumbel_softmax (pure-PyTorch Philox4x32-10, key drawn once), eager"),
    Provider("compile", setup_compile, available=_reference_available, kind="compile",
             note="torch.compile(the reference, dynamic=False)"),
    Provider("torch-softmax", setup_torch_softmax, kind="yardstick",
             note="torch.softmax(x, -1): a one-pass row op's time; never checked"),
    Provider("quack", setup_quack, devices=("cuda",), kind="yardstick",
             available=module_available("quack", "pip install --no-deps quack-kernels; needs nvidia-cutlass-dsl"),
             note="quack.softmax(x) (quack-kernels, CuTe DSL): a tuned one-pass softmax; never checked"),
    Provider("torch-gumbel-softmax", setup_torch_gumbel_softmax, check=check_distribution,
             note="torch.nn.functional.gumbel_softmax(x, tau, hard) (its own noise: rows checked to sum to 1)"),
    Provider("torch-gumbel-max", setup_torch_gumbel_max, check=check_samples, modes=("fwd",),
             note="(x - empty_like(x).exponential_().log()).argmax(-1) (its own noise: indices checked in range)"),
    Provider("kxops-cpu", _setup_kxops("cpu"), devices=("cpu",), available=_backend_available("cpu"), kind="kxops"),
    Provider("kxops-cuda", _setup_kxops("cuda"), devices=("cuda",), available=_backend_available("cuda"),
             kind="kxops"),
    Provider("kxops-triton", _setup_kxops("triton"), devices=("cuda",), available=_backend_available("triton"),
             kind="kxops"),
]


def targets() -> list:
    """The issue's speed section. GPU, 4096 x 32768, bf16 and fp32: gumbel_softmax forward + backward at
    >= 80% of the copy bandwidth and >= 3x F.gumbel_softmax; gumbel_max >= 5x torch's Gumbel-max; ours is
    the faster of kxops-cuda and kxops-triton. CPU, 256 x 32768 fp32: gumbel_softmax forward + backward
    >= 2x F.gumbel_softmax."""
    ours, goals = ("kxops-cuda", "kxops-triton"), []
    for c in gpu_target_cases():
        if c["fn"] == "gumbel_softmax":
            goals += [Target(c.name, ours, modes=("fwd_bwd",), min_frac_copy=0.8),
                      Target(c.name, ours, modes=("fwd_bwd",), faster_than=("torch-gumbel-softmax",), faster_by=3.0)]
        else:
            goals.append(Target(c.name, ours, modes=("fwd",), faster_than=("torch-gumbel-max",), faster_by=5.0))
    goals += [Target(c.name, "kxops-cpu", modes=("fwd_bwd",), faster_than=("torch-gumbel-softmax",), faster_by=2.0)
              for c in cpu_target_cases()]
    return goals


OP = Op(
    name="gumbel_softmax",
    description="Gumbel-softmax (soft, hard), Gumbel-max sampling and Gaussian perturb-max softmax along rows",
    cases=cases,
    small_cases=small_cases,
    make_inputs=make_inputs,
    providers=PROVIDERS,
    bytes_moved=bytes_moved,
    record_memory=True,
    check=check,
    tolerance=tolerance,
    targets=targets(),
    expected=expected,
)
