"""Causal linear attention: kxops.linear_attention / linear_attention_step against the eager reference,
torch.compile of it, and the libraries users would pick instead (flash-linear-attention's chunk and
fused-recurrent kernels, fast-transformers' causal_dot_product).

q, k: (batch, seq, heads, Dk), v: (batch, seq, heads, Dv), Dk = Dv = D in every case. Three kinds:
- la-*: the causal prefix-sum form. `identity` cases are unnormalised with scale D**-0.5: what FLA's
  chunk_linear_attn(normalize=False) computes and what FLA's LinearAttention layer calls by default (a
  normalised identity map divides by q.z_t, which crosses zero for signed inputs). `elu1-norm` cases are
  kxops' default call; FLA computes them with elu(x) + 1 applied before its call, as its layer does.
- cdp-*: causal_dot_product, out_i = sum_(j<=i) (q_i . k_j) v_j (identity, unnormalised, scale 1), the
  op of fast-transformers, whose kernels are float32 only.
- step-*: one decoding step from a state (S, z) as if PREFIX tokens had been seen: forward only, no
  grad, host-timed, with the torch.mul yardstick and CUDA-graph rows for the kernel time.

The eager reference materialises the O(T Dk Dv) cumulative sum, tens of GiB on most of FLA's shapes:
its setup raises Skip where that would not fit (reference_fits), and every provider is checked against
`expected`, the same reference computed in pieces of the sequence with the state carried between
them, whatever the size.
"""
from __future__ import annotations

import dataclasses
import os
import types

import torch

from . import timing
from .core import Case, Inputs, Op, Provider, Skip, Target, import_module, module_available, rel_rms_error

# The six shapes flash-linear-attention benchmarks its ops on (benchmarks/ops/registry.py): B, T, H, D.
FLA_SHAPES = ((1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128),
              (8, 2048, 32, 256), (8, 1024, 8, 64))
CHUNK = 64            # the chunk size of the FLOP count (FLA's)
PREFIX = 1024         # tokens the state of a decoding case has seen
# The eager reference's peak, in (B, T, H, F, Dv) tensors of the state dtype (measured: 3 in the
# forward, 4 in fwd_bwd, 4 in a backward on top of the 1 its retained graph keeps).
REF_TENSORS = 5
# On CPU the reference runs where that peak stays under this: past it a 2-core machine spends minutes
# per call (T=8192, D=64: about 40 s per training step) to show the memory the T=2048 case shows.
REF_CPU_MAX_BYTES = 4 << 30
PIECE_BYTES = 1 << 30  # the materialised state of one piece of `expected`


# ----------------------------------------------------------------------------------------------
# Cases

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _case(device, dtype, kind, B, H, D, T=1, fm="identity", norm=False, quick=False) -> Case:
    """kind: "la" (linear_attention), "cdp" (causal_dot_product) or "step" (linear_attention_step)."""
    p = dict(kind=kind, B=B, T=T, H=H, Dk=D, Dv=D, fm=fm, norm=norm, scale=1.0 if kind == "cdp" else None)
    seq = "" if kind == "step" else f"-T{T}"
    flags = "" if kind == "cdp" else f"-{fm}" + ("-norm" if norm else "")
    case = Case(f"{kind}-B{B}{seq}-H{H}-D{D}{flags}-{_DT[dtype]}", device, dtype, p, quick=quick)
    return dataclasses.replace(case, modes=("fwd",), timing="host") if kind == "step" else case


def fla_cases(device: str = "cuda") -> list:
    """FLA's six shapes, bf16, identity map: the cases of the training targets."""
    quick = {(4, 2048, 16, 128), (8, 1024, 8, 64)}
    return [_case(device, torch.bfloat16, "la", B, H, D, T, quick=(B, T, H, D) in quick) for B, T, H, D in FLA_SHAPES]


def step_cases(device: str) -> list:
    """Decoding: GPU batch 64, 16 heads, D 64 and 128 (the identity map as FLA's layer, and kxops' default
    elu1 with its normaliser); CPU one small step."""
    if device == "cuda":
        bf = torch.bfloat16
        return [_case(device, bf, "step", 64, 16, 64, quick=True), _case(device, bf, "step", 64, 16, 128),
                _case(device, bf, "step", 64, 16, 128, fm="elu1", norm=True)]
    return [_case(device, torch.float32, "step", 8, 8, 64, fm="elu1", norm=True, quick=True)]


def memory_cases() -> list:
    """CPU fp32 (2, T, 8, 64) at T 2048 and 8192, kxops' default call: the speed target and the peak memory
    that must grow linearly with T."""
    return [_case("cpu", torch.float32, "la", 2, 8, 64, T, fm="elu1", norm=True, quick=T == 2048) for T in (2048, 8192)]


def cases(device: str) -> list:
    if device == "cuda":
        return fla_cases() + [
            _case(device, torch.bfloat16, "la", 4, 16, 128, 2048, fm="elu1", norm=True),
            _case(device, torch.float32, "cdp", 4, 16, 64, 2048),
        ] + step_cases(device)
    return memory_cases() + [_case(device, torch.float32, "cdp", 2, 8, 64, 1024)] + step_cases(device)


def small_cases(device: str) -> list:
    """Tiny shapes for the pytest-benchmark suite, odd sizes on CPU (fast on a 2-core CPU)."""
    if device == "cuda":
        bf = torch.bfloat16
        return [_case(device, bf, "la", 2, 4, 64, 256), _case(device, bf, "la", 2, 4, 64, 256, fm="elu1", norm=True),
                _case(device, torch.float32, "cdp", 2, 4, 64, 256), _case(device, bf, "step", 4, 4, 64),
                _case(device, bf, "step", 4, 4, 64, fm="elu1", norm=True)]
    f32 = torch.float32
    return [_case(device, f32, "la", 2, 2, 24, 67, fm="elu1", norm=True),
            _case(device, torch.bfloat16, "la", 1, 2, 32, 130), _case(device, f32, "cdp", 1, 2, 16, 67),
            _case(device, f32, "step", 3, 2, 16, fm="elu1", norm=True), _case(device, f32, "step", 3, 2, 24)]


def feature_size(case) -> int:
    return case["Dk"] + (case["fm"] == "taylor")


def scale_of(case) -> float:
    return case["scale"] if case["scale"] is not None else case["Dk"] ** -0.5


def make_inputs(case: Case, seed: int) -> Inputs:
    """q, k, v ~ N(0, 1) ((B, 1, H, D) for a step); a step's state S ~ N(0, PREFIX) (B, H, F, Dv) and
    z ~ PREFIX |1 + N(0, 1/16)| (B, H, F), float32: the size of a sum of PREFIX outer products and of
    PREFIX positive features (z matters only to the normalised cases)."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    B, H, Dk, Dv = case["B"], case["H"], case["Dk"], case["Dv"]
    step = case["kind"] == "step"
    lead = (B, 1 if step else case["T"], H)
    t = {n: torch.randn(lead + (d,), dtype=case.dtype, device=case.device, generator=gen)
         .requires_grad_(case.needs_grad) for n, d in (("q", Dk), ("k", Dk), ("v", Dv))}
    if step:
        F = feature_size(case)
        t["S"] = PREFIX ** 0.5 * torch.randn(B, H, F, Dv, device=case.device, generator=gen)
        t["z"] = PREFIX * (1 + torch.randn(B, H, F, device=case.device, generator=gen) / 4).abs()
    return Inputs(t, grad=("q", "k", "v") if case.needs_grad else (), seed=seed)


def bytes_moved(case: Case, mode: str) -> int:
    """The forward reads q, k, v and writes out; the backward reads q, k, v, dout and writes dq, dk, dv (in
    the inputs' dtype); fwd_bwd the sum. A step also reads and writes the float32 state: S, and z when it
    normalises."""
    s = case.dtype.itemsize
    B, T, H, Dk, Dv = (case[n] for n in ("B", "T", "H", "Dk", "Dv"))
    if case["kind"] == "step":
        F = feature_size(case)
        state = B * H * F * (Dv + case["norm"])
        return B * H * (2 * Dk + 2 * Dv) * s + 2 * 4 * state
    fwd = B * T * H * (2 * Dk + 2 * Dv) * s
    bwd = B * T * H * (4 * Dk + 3 * Dv) * s
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def flops(case: Case, mode: str) -> float:
    """The chunked algorithm's useful FLOPs (a multiply-add counts 2), chunk C = CHUNK, per token and head:
    forward 4 Dk Dv (the output's q S and the state's k v^T, one chunk at a time) + C (Dk + Dv) (the
    intra-chunk q k^T and its product with v, causal half of each C x C block); the backward twice that
    (dq, dk, dv and the state's gradient, recomputation not counted); fwd_bwd three times. The normaliser
    (O(Dk) per token) is left out. A step: 4 Dk Dv per head."""
    B, T, H, Dk, Dv = (case[n] for n in ("B", "T", "H", "Dk", "Dv"))
    if case["kind"] == "step":
        return 4.0 * B * H * Dk * Dv
    fwd = float(B * T * H) * (4 * Dk * Dv + CHUNK * (Dk + Dv))
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode]


# ----------------------------------------------------------------------------------------------
# The reference, what it needs, and what every provider is checked against

def _ref():
    """The module kxops.reference.linear_attention (its package re-exports its functions under the same
    names, so the module is taken from sys.modules)."""
    return import_module("kxops.reference.linear_attention")


def _kxops():
    return import_module("kxops")


def _flags(case) -> dict:
    return dict(feature_map=case["fm"], normalize=bool(case["norm"]), scale=scale_of(case))


def reference_bytes(case) -> int:
    """The eager reference's peak: REF_TENSORS tensors (B, T, H, F, Dv) of the state dtype."""
    acc = 8 if case.dtype == torch.float64 else 4
    return REF_TENSORS * case["B"] * case["T"] * case["H"] * feature_size(case) * case["Dv"] * acc


def memory_budget(device: str) -> int:
    """GPU: 90% of what is free (the device's free memory and the allocator's unused cache). CPU: half
    of MemAvailable, at most REF_CPU_MAX_BYTES."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(0.9 * (free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()))
    return min(REF_CPU_MAX_BYTES, _mem_available() // 2)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def reference_fits(case) -> None:
    """Raises Skip where the eager reference's cumulative sum would not fit in memory_budget."""
    if case["kind"] == "step":
        return
    need, budget = reference_bytes(case), memory_budget(case.device)
    if need > budget:
        raise Skip(f"its O(T Dk Dv) cumulative sum needs ~{need / 2**30:.1f} GiB, over the "
                   f"{budget / 2**30:.1f} GiB budget")


def expected(case: Case, inputs: Inputs):
    """What every provider is checked against: kxops.reference on the case's inputs, the sequence cut into
    pieces short enough that the state it materialises stays under PIECE_BYTES, the state (S, z) carried
    from piece to piece through initial_state. Causality makes this the same function of the inputs as
    one call (up to float32 summation order), on every shape, whether or not the reference provider
    fits. A step: the reference step."""
    ref = _ref()
    q, k, v = (inputs[n].detach() for n in "qkv")
    with torch.no_grad():
        if case["kind"] == "step":
            return ref.linear_attention_step(q, k, v, (inputs.S, inputs.z), **_flags(case))
        per_token = 3 * case["B"] * case["H"] * feature_size(case) * case["Dv"] * 4  # no graph: 3 tensors
        n = max(1, PIECE_BYTES // per_token)
        outs, state = [], None
        for a in range(0, case["T"], n):
            out, state = ref.linear_attention(q[:, a:a + n], k[:, a:a + n], v[:, a:a + n], initial_state=state,
                                              output_final_state=True, **_flags(case))
            outs.append(out)
        return torch.cat(outs, 1)


def comparable(result, case) -> list:
    """The tensors of a provider's result that are compared: out; for a step also the new S (and z when
    the case normalises). Results come as each library returns them: out, or (out, (S, z)) from kxops
    and the reference; (o, None), (o, S) or (o, (S, z (B, 1, H, F))) from FLA."""
    out = result[0] if isinstance(result, (tuple, list)) else result
    if case["kind"] != "step":
        return [out]
    state = result[1]
    S, z = (state, None) if isinstance(state, torch.Tensor) else state
    return [out, S] + ([z.reshape(S.shape[:-1])] if case["norm"] else [])


def check(ref, out, case) -> float:
    return rel_rms_error(comparable(ref, case), comparable(out, case))


def tolerance(dtype: torch.dtype) -> float:
    """Relative RMS error allowed. float32 2e-3: Triton's fp32 dots (FLA's, and kxops' Triton kernels)
    round their inputs to tf32 by default, a few 1e-4 after two products; an error in the algorithm
    (a chunk boundary, a missing state) is O(1)."""
    return {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 2e-3, torch.float64: 1e-9}.get(dtype, 2e-2)


def first_output(result) -> list:
    """The output that takes the gradient: out (FLA's normalised calls also return a z state that requires
    grad, which a training step does not differentiate)."""
    return [result[0] if isinstance(result, (tuple, list)) else result]


# ----------------------------------------------------------------------------------------------
# Providers

def _call(fns, case, inputs, **extra):
    """The timed call of kxops' API on the case (fns: kxops, kxops.reference or their compiled functions):
    linear_attention(q, k, v, ...) -> out, or linear_attention_step(q, k, v, (S, z), ...) -> (out, (S, z))."""
    kw = dict(_flags(case), **extra)
    q, k, v = inputs.q, inputs.k, inputs.v
    if case["kind"] == "step":
        state, fn = (inputs.S, inputs.z), fns.linear_attention_step
        return lambda: fn(q, k, v, state, **kw)
    fn = fns.linear_attention
    return lambda: fn(q, k, v, **kw)


def _reference_available():
    try:
        _ref()
    except Exception as e:  # noqa: BLE001
        return f"kxops.reference.linear_attention not importable ({type(e).__name__}: {e}); run `make build`"
    return None


def setup_reference(case, inputs):
    reference_fits(case)
    return _call(_ref(), case, inputs)


def setup_compile(case, inputs):
    """torch.compile of the reference (dynamic=False, a fresh dynamo cache per case); it keeps the
    cumulative sum, so it declines where the reference does."""
    reference_fits(case)
    torch._dynamo.reset()
    ref = _ref()
    fns = types.SimpleNamespace(linear_attention=torch.compile(ref.linear_attention, dynamic=False),
                                linear_attention_step=torch.compile(ref.linear_attention_step, dynamic=False))
    return _call(fns, case, inputs)


_OPS = ("linear_attention", "linear_attention_step")


def _has_kernel(op: str, backend: str) -> bool:
    """CPU / CUDA: kxops::<op> has a kernel for that dispatch key. Triton: an op kxops::<op>*triton* is
    registered (the kernel contract names them kxops::linear_attention*_triton)."""
    if backend == "triton":
        names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(f"kxops::{op}") and "triton" in n]
        return any(op.endswith("_step") or "_step" not in n for n in names)
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"kxops::{op}", backend.upper())
    except RuntimeError:  # no such op
        return False


def _backend_available(backend: str):
    def available():
        try:
            k = _kxops()
        except Exception as e:  # noqa: BLE001
            return f"kxops not importable ({type(e).__name__}: {e}); run `make build`"
        missing = [f for f in _OPS if not hasattr(k, f)]
        if missing:
            return f"kxops has no {', '.join(missing)} yet"
        if backend not in k.backends():
            return f"backend {backend!r} not in kxops.backends()"
        suffix = "*_triton" if backend == "triton" else ""
        missing = [f"kxops::{op}{suffix}" for op in _OPS if not _has_kernel(op, backend)]
        return f"no {backend} kernel for {', '.join(missing)} yet" if missing else None
    return available


def _setup_kxops(backend):
    def setup(case, inputs):
        return _call(_kxops(), case, inputs, backend=backend)
    return setup


def _setup_graph(eager):
    def setup(case, inputs):
        """The eager call captured in a CUDA graph, for the host-timed steps: its replay times the kernels
        without the host's part of a call."""
        if case.timing != "host" or case.needs_grad:
            return None
        return timing.cuda_graph(eager(case, inputs))
    return setup


def setup_torch_mul(case, inputs):
    """The yardstick of the host-timed steps: torch.mul(q, q), one aten op on the same q."""
    if case.timing != "host":
        return None
    q = inputs.q.detach()
    return lambda: torch.mul(q, q)


def _fla(name: str):
    return getattr(import_module("fla.ops.linear_attn"), name)


_FEATURE_MAPS = {"identity": None, "elu1": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu}


def _setup_fla(name: str):
    def setup(case, inputs):
        """fla.ops.linear_attn.<name>(q, k, v, scale=, normalize=, initial_state=, output_final_state=) on
        the (B, T, H, D) tensors as they are (FLA 0.6's layout; head_first is gone). FLA has no feature
        map: elu1 / relu are applied to q and k before the call, in the timed region, as FLA's
        LinearAttention layer does. Its normaliser divides the scaled numerator by scale q.z_t + 1e-10
        (kxops: + eps = 1e-6; the difference is below bf16's resolution for positive features). A step
        passes the state as initial_state: S, or (S, z (B, 1, H, F)) when normalising."""
        if case["fm"] not in _FEATURE_MAPS or (case["kind"] == "step" and name == "chunk_linear_attn"):
            return None
        fn, phi = _fla(name), _FEATURE_MAPS[case["fm"]]
        kw = dict(scale=scale_of(case), normalize=bool(case["norm"]))
        if case["kind"] == "step":
            kw.update(initial_state=(inputs.S, inputs.z[:, None]) if case["norm"] else inputs.S,
                      output_final_state=True)
        q, k, v = inputs.q, inputs.k, inputs.v
        if phi is None:
            return lambda: fn(q, k, v, **kw)
        return lambda: fn(phi(q), phi(k), v, **kw)
    return setup


def _fast_transformers_fn():
    return import_module("fast_transformers.causal_product").causal_dot_product


def setup_fast_transformers(case, inputs):
    """fast_transformers.causal_product.causal_dot_product(Q, K, V): (N, H, L, E) contiguous float32
    tensors (its output is allocated float32), out_i = sum_(j<=i) (q_i . k_j) v_j, no scale, no
    normaliser. The transposes to its layout are in the timed call, as in its CausalLinearAttention
    layer; the output comes back as a (B, T, H, D) view. q is scaled first where the case's scale is not
    1."""
    if case["kind"] == "step" or case["fm"] != "identity" or case["norm"] or case.dtype != torch.float32:
        return None
    fn, scale = _fast_transformers_fn(), scale_of(case)
    q, k, v = inputs.q, inputs.k, inputs.v

    def run():
        qs = q if scale == 1.0 else q * scale
        return fn(*(t.transpose(1, 2).contiguous() for t in (qs, k, v))).transpose(1, 2)
    return run


_FWD = ("fwd",)
_FLA_AVAILABLE = module_available("fla.ops.linear_attn", "pip install --no-deps fla-core einops")
# PyPI has no wheel of it: pytorch-fast-transformers 0.4.0 is an sdist that compiles its C++/CUDA
# extension against the installed torch (needs nvcc for the CUDA half).
_FT_AVAILABLE = module_available("fast_transformers.causal_product", "no wheel: pip install --no-build-isolation "
                                  "pytorch-fast-transformers builds it against this torch")
_GRAPH_NOTE = "host-timed steps: the call in a CUDA graph, replay timed by CUDA events (the kernels alone)"

PROVIDERS = [
    Provider("reference", setup_reference, available=_reference_available, kind="reference",
             note="kxops.reference (eager PyTorch, cumulative-sum form; n/a where it would not fit)"),
    Provider("compile", setup_compile, available=_reference_available, kind="compile",
             note="torch.compile(kxops.reference, dynamic=False)"),
    Provider("kxops-cpu", _setup_kxops("cpu"), devices=("cpu",), available=_backend_available("cpu"), kind="kxops"),
    Provider("kxops-cuda", _setup_kxops("cuda"), devices=("cuda",), available=_backend_available("cuda"),
             kind="kxops"),
    Provider("kxops-triton", _setup_kxops("triton"), devices=("cuda",), available=_backend_available("triton"),
             kind="kxops"),
    Provider("kxops-cuda-graph", _setup_graph(_setup_kxops("cuda")), devices=("cuda",),
             available=_backend_available("cuda"), kind="kxops", modes=_FWD, timing="device", note=_GRAPH_NOTE),
    Provider("kxops-triton-graph", _setup_graph(_setup_kxops("triton")), devices=("cuda",),
             available=_backend_available("triton"), kind="kxops", modes=_FWD, timing="device", note=_GRAPH_NOTE),
    Provider("fla-chunk", _setup_fla("chunk_linear_attn"), devices=("cuda",),
             available=_FLA_AVAILABLE,
             note="fla.ops.linear_attn.chunk_linear_attn (Triton)"),
    Provider("fla-recurrent", _setup_fla("fused_recurrent_linear_attn"), devices=("cuda",),
             available=_FLA_AVAILABLE,
             note="fla.ops.linear_attn.fused_recurrent_linear_attn (Triton)"),
    Provider("fla-recurrent-graph", _setup_graph(_setup_fla("fused_recurrent_linear_attn")), devices=("cuda",),
             available=_FLA_AVAILABLE, modes=_FWD, timing="device",
             note=_GRAPH_NOTE),
    Provider("fast-transformers", setup_fast_transformers,
             available=_FT_AVAILABLE,
             note="fast_transformers.causal_product.causal_dot_product (C++/CUDA extension, float32)"),
    Provider("torch.mul", setup_torch_mul, kind="yardstick", modes=_FWD,
             note="host-timed steps: torch.mul(q, q), one aten op on the same q"),
]


def linear_memory_mib(case) -> float:
    """The peak memory goal of the CPU cases: 8 float32 tensors (B, T, H, Dk + Dv), O(T (Dk + Dv)) as the
    kernel contract allows (the reference's cumulative sum alone is Dk Dv / (Dk + Dv) times one)."""
    return 8 * case["B"] * case["T"] * case["H"] * (case["Dk"] + case["Dv"]) * 4 / 2**20


def targets() -> list:
    """GPU, FLA's shapes: ours (CUDA or Triton, the faster) >= 1.7x FLA (its faster kernel) in fwd_bwd and
    >= 1.2x in fwd. GPU decoding: an eager step of each backend faster than FLA's fused_recurrent step.
    CPU: kxops-cpu >= 5x the reference at T=2048, and a peak memory linear in T at 2048 and 8192."""
    ours, fla = ("kxops-cuda", "kxops-triton"), ("fla-chunk", "fla-recurrent")
    goals = []
    for c in fla_cases():
        goals += [Target(c.name, ours, modes=("fwd_bwd",), faster_than=(fla,), faster_by=1.7),
                  Target(c.name, ours, modes=("fwd",), faster_than=(fla,), faster_by=1.2)]
    for c in step_cases("cuda"):
        goals += [Target(c.name, p, faster_than=("fla-recurrent",)) for p in ours]
    goals += [Target(c.name, "kxops-cpu", 5.0 if c["T"] == 2048 else None, max_mem_mib=linear_memory_mib(c))
              for c in memory_cases()]
    return goals


OP = Op(
    name="linear_attention",
    description="causal linear attention: linear_attention (prefix-sum form), causal_dot_product, decoding step",
    cases=cases,
    small_cases=small_cases,
    make_inputs=make_inputs,
    providers=PROVIDERS,
    bytes_moved=bytes_moved,
    flops=flops,
    record_memory=True,
    outputs=first_output,
    check=check,
    tolerance=tolerance,
    expected=expected,
    targets=targets(),
)
