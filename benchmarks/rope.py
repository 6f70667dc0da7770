"""RoPE: kxops.rope / kxops.rope_qk against the eager reference, torch.compile of it, and the libraries
users would pick instead (Liger-Kernel, flash-linear-attention, rotary-embedding-torch, FlashInfer).

Every case rotates the full head (rotary_dim = head_dim, base 10000) at positions 0..S-1 (restarting at
0 in each packed sequence), plus the case's offsets: per sequence (an int64 tensor (batch,), the KV-cache
lengths of a decoding step) or one int. x, q, k: (batch, seq, heads, head_dim), or packed (total_tokens,
heads, head_dim) with cu_seqlens. kxops and the reference take no cos/sin cache (angles are computed from
the positions in the call); the anchors get the cache (or the per-token positions) their users
precompute once per model forward and share across layers, built in setup, outside the timed region.

Decoding cases (decode-*, tiny-*) are forward-only on inputs that do not require grad, and host-timed:
their calls cost more on the host than on the device, and the wall clock of eager calls is what a user
waits for. There the yardstick torch.mul (one aten op on the same q) puts the host overhead of a call in
units that travel between machines, and the CUDA-graph providers give the kernel time alone.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import random

import torch

from . import timing
from .core import Case, Inputs, Op, Provider, Target

BASE = 10000.0
# Per-sequence offsets of the decoding cases are drawn below this (KV-cache lengths).
MAX_OFFSET = 4096


# ----------------------------------------------------------------------------------------------
# Cases

def _name(kind, p, dtype, tag=None):
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]
    il = "-interleaved" if p.get("interleaved") else ""
    heads = f"Hq{p['H']}-Hk{p['Hk']}" if kind == "qk" else f"H{p['H']}"
    lead = f"varlen-N{len(p['lens'])}-T{sum(p['lens'])}" if p.get("lens") else f"B{p['B']}-S{p['S']}"
    off = "-offsets" if p.get("offsets") else (f"-offset{p['offset']}" if p.get("offset") is not None else "")
    return f"{tag + '-' if tag else ''}{kind}{il}-{lead}-{heads}-D{p['D']}{off}-{dt}"


def _case(device, dtype, kind, quick=False, interleaved=False, tag=None, **p):
    p = dict(kind=kind, interleaved=interleaved, **p)
    return Case(_name(kind, p, dtype, tag), device, dtype, p, quick=quick)


def _decode_case(device, dtype, tag, quick=False, **p):
    """A decoding step's q and k: forward only, no grad, host-timed."""
    return dataclasses.replace(_case(device, dtype, "qk", quick, tag=tag, **p), modes=("fwd",), timing="host")


def decode_cases(device: str) -> list:
    """Per-call host overhead. GPU: one LLaMA-style GQA layer's decoding step at batch 64 and batch 1, with
    the per-sequence offsets (KV-cache lengths) a server passes. CPU: a tiny tensor whose call is all
    overhead, plain, with an offsets tensor and with an int offset."""
    if device == "cuda":
        layer = dict(S=1, H=32, Hk=8, D=128, offsets=True)
        return [_decode_case(device, torch.bfloat16, "decode", quick=True, B=64, **layer),
                _decode_case(device, torch.bfloat16, "decode", B=1, **layer)]
    tiny = dict(B=1, S=1, H=4, Hk=2, D=8)
    return [_decode_case(device, torch.float32, "tiny", quick=True, **tiny),
            _decode_case(device, torch.float32, "tiny", offsets=True, **tiny),
            _decode_case(device, torch.float32, "tiny", offset=17, **tiny)]


def varlen_lengths(n: int, total: int, seed: int = 1234) -> tuple:
    """n random sequence lengths (>= 1) summing to total, fixed by the seed so every run packs the same."""
    cuts = sorted(random.Random(seed).sample(range(1, total), n - 1))
    return tuple(b - a for a, b in zip([0] + cuts, cuts + [total]))


def cases(device: str) -> list:
    if device == "cuda":
        bf = torch.bfloat16
        return [
            # the headline: a LLaMA-style GQA layer's q and k in one launch
            _case(device, bf, "qk", quick=True, B=8, S=4096, H=32, Hk=8, D=128),
            _case(device, bf, "qk", B=8, S=512, H=32, Hk=8, D=128),
            _case(device, bf, "qk", quick=True, lens=varlen_lengths(8, 16384), H=32, Hk=8, D=128),
            _case(device, bf, "rope", B=8, S=4096, H=32, D=128),
            _case(device, bf, "rope", B=8, S=4096, H=32, D=128, interleaved=True),
        ] + decode_cases(device)
    return [
        # the CPU target: kxops at least 3x faster than the eager reference
        _case(device, torch.float32, "rope", quick=True, B=4, S=2048, H=16, D=64),
        _case(device, torch.bfloat16, "rope", B=4, S=2048, H=16, D=64),
        _case(device, torch.float32, "qk", quick=True, B=2, S=2048, H=16, Hk=4, D=64),
        _case(device, torch.float32, "rope", B=4, S=2048, H=16, D=64, interleaved=True),
        _case(device, torch.float32, "qk", lens=varlen_lengths(4, 4096), H=16, Hk=4, D=64),
    ] + decode_cases(device)


def small_cases(device: str) -> list:
    """Tiny shapes for the pytest-benchmark suite (fast on a 2-core CPU)."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    small = [
        _case(device, dt, "rope", B=2, S=128, H=4, D=64),
        _case(device, torch.bfloat16, "rope", B=2, S=128, H=4, D=64) if device == "cpu" else None,
        _case(device, dt, "qk", B=2, S=128, H=4, Hk=2, D=64),
        _case(device, dt, "rope", B=2, S=128, H=4, D=64, interleaved=True),
        _case(device, dt, "qk", lens=varlen_lengths(3, 300), H=4, Hk=2, D=64),
        _decode_case(device, dt, "decode", B=2, S=1, H=4, Hk=2, D=64, offsets=True),
        _decode_case(device, dt, "decode", B=2, S=1, H=4, Hk=2, D=64, offset=17) if device == "cpu" else None,
    ]
    return [c for c in small if c is not None]


def _shapes(case):
    p = case.params
    lead = (sum(p["lens"]),) if p.get("lens") else (p["B"], p["S"])
    shapes = {"q": lead + (p["H"], p["D"])}
    if p["kind"] == "qk":
        shapes["k"] = lead + (p["Hk"], p["D"])
    return shapes


def make_inputs(case: Case, seed: int) -> Inputs:
    gen = torch.Generator(device=case.device).manual_seed(seed)
    t = {n: torch.randn(s, dtype=case.dtype, device=case.device, generator=gen).requires_grad_(case.needs_grad)
         for n, s in _shapes(case).items()}
    grad = tuple(t) if case.needs_grad else ()
    lens = case.get("lens")
    if lens:
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        t["cu_seqlens"] = cu.to(case.device)
    if case.get("offsets"):
        nseq = len(lens) if lens else case["B"]
        t["offsets"] = torch.randint(0, MAX_OFFSET, (nseq,), generator=gen, device=case.device)
    return Inputs(t, grad=grad, seed=seed)


def bytes_moved(case: Case, mode: str) -> int:
    """Read q (and k) and write q_out (and k_out); the backward reads and writes as many gradients.
    Positions are computed in the kernel (cu_seqlens: a few bytes)."""
    n = 0
    for s in _shapes(case).values():
        n += torch.Size(s).numel()
    one = 2 * n * case.dtype.itemsize
    return 2 * one if mode == "fwd_bwd" else one


# ----------------------------------------------------------------------------------------------
# Providers

@functools.cache
def _import(module: str):
    return importlib.import_module(module)


def _kxops():
    return _import("kxops")


def _kw(case, inputs) -> dict:
    kw = {"interleaved": bool(case["interleaved"])}
    if "cu_seqlens" in inputs:
        kw["cu_seqlens"] = inputs.cu_seqlens
    offsets = inputs.get("offsets", case.get("offset"))
    if offsets is not None:
        kw["offsets"] = offsets
    return kw


def _call(fn_rope, fn_qk, case, inputs):
    kw = _kw(case, inputs)
    if case["kind"] == "qk":
        q, k = inputs.q, inputs.k
        return lambda: fn_qk(q, k, **kw)
    x = inputs.q
    return lambda: fn_rope(x, **kw)


def _kxops_available() -> str | None:
    try:
        k = _kxops()
    except Exception as e:  # noqa: BLE001
        return f"kxops not importable ({type(e).__name__}: {e}); run `make build`"
    if not hasattr(k, "rope") or not hasattr(k, "rope_qk"):
        return "kxops has no rope/rope_qk yet"
    return None


def _backend_available(backend: str):
    def available():
        why = _kxops_available()
        if why:
            return why
        return None if backend in _kxops().backends() else f"backend {backend!r} not in kxops.backends()"
    return available


def setup_reference(case, inputs):
    ref = _kxops().reference
    return _call(ref.rope, ref.rope_qk, case, inputs)


def setup_compile(case, inputs):
    # A fresh dynamo cache per case: the shared code object of the reference would otherwise hit the
    # recompile limit after a few cases and silently fall back to eager.
    torch._dynamo.reset()
    ref = _kxops().reference
    return _call(torch.compile(ref.rope, dynamic=False), torch.compile(ref.rope_qk, dynamic=False), case, inputs)


def _without_grad(inputs) -> Inputs:
    """The same tensors detached: in-place and inference-only calls must not meet leaves requiring grad."""
    return Inputs({n: t.detach() for n, t in inputs.items()}, seed=inputs.seed)


def _setup_kxops(backend, inplace=False):
    def setup(case, inputs):
        k = _kxops()
        kw = dict(backend=backend, inplace=inplace)
        return _call(functools.partial(k.rope, **kw), functools.partial(k.rope_qk, **kw), case,
                     _without_grad(inputs) if inplace else inputs)
    return setup


def _setup_kxops_graph(backend):
    eager = _setup_kxops(backend)

    def setup(case, inputs):
        """The eager call captured in a CUDA graph, for the host-timed inference cases: replaying it times
        the kernel without the host's part of a call."""
        if case.timing != "host" or case.needs_grad:
            return None
        return timing.cuda_graph(eager(case, inputs))
    return setup


def setup_torch_mul(case, inputs):
    """The yardstick of the host-timed cases: torch.mul(q, q), one aten op on the same q, whose time is the
    host overhead of a call that does nearly nothing."""
    if case.timing != "host":
        return None
    q = inputs.q.detach()
    return lambda: torch.mul(q, q)


def positions_of(case, inputs) -> torch.Tensor:
    """Every token's position, int64: (batch or 1, seq) for dense cases (0..S-1 plus the offsets; batch
    rows only with per-sequence offsets), (1, total_tokens) packed (restarting in each sequence, plus
    its offset)."""
    dev = case.device
    lens = case.get("lens")
    offsets = inputs.get("offsets", case.get("offset") or 0)
    if lens:
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        if isinstance(offsets, torch.Tensor):
            pos = pos + offsets.repeat_interleave(torch.tensor(lens, device=dev))
        return (pos + (offsets if isinstance(offsets, int) else 0))[None]
    pos = torch.arange(case["S"], device=dev)[None]
    return pos + (offsets[:, None] if isinstance(offsets, torch.Tensor) else offsets)


def _angles(pos, dim, device):
    """pos (...) -> angles (..., dim/2), float32."""
    inv_freq = 1.0 / (BASE ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    return pos.to(torch.float32)[..., None] * inv_freq


def _module_available(module: str, pip: str):
    @functools.cache
    def available():
        try:
            _import(module)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, ModuleNotFoundError):
                return f"not installed (pip install --no-deps {pip})"
            return f"import failed: {type(e).__name__}: {e}"
        return None
    return available


def _liger_fn():
    try:
        return _import("liger_kernel.transformers.rope").liger_rotary_pos_emb
    except Exception:  # noqa: BLE001  (older layouts: the autograd Function itself)
        return _import("liger_kernel.ops.rope").LigerRopeFunction.apply


def hf_cos_sin(case, inputs):
    """cos, sin (batch or 1, tokens, D) in x's dtype, halves duplicated: what HF's LlamaRotaryEmbedding
    returns for the position_ids of the case (computed once per model forward, shared by the layers)."""
    ang = _angles(positions_of(case, inputs), case["D"], case.device)
    emb = torch.cat((ang, ang), -1)
    return emb.cos().to(case.dtype), emb.sin().to(case.dtype)


def setup_liger(case, inputs):
    """liger_rotary_pos_emb(q, k, cos, sin): q/k (B, H, S, D) views of the (B, S, H, D) tensors (the
    transposes HF's attention does; Liger works on the physical (B, S, H, D) layout, in place), cos/sin
    (batch or 1, S, D) from hf_cos_sin. Packed batches use the per-token cos/sin HF builds from
    position_ids (restarting)."""
    if case["kind"] != "qk" or case["interleaved"]:
        return None  # q and k together, rotate-half layout only
    fn = _liger_fn()
    packed = case.get("lens") is not None
    cos, sin = hf_cos_sin(case, inputs)
    q, k = inputs.q, inputs.k

    def run():
        q4, k4 = (q[None], k[None]) if packed else (q, k)
        out = fn(q4.transpose(1, 2), k4.transpose(1, 2), cos, sin)
        qo, ko = out[0].transpose(1, 2), out[1].transpose(1, 2)
        return (qo[0], ko[0]) if packed else (qo, ko)
    return run


def setup_fla(case, inputs):
    """fla.modules.rotary.rotary_embedding(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens):
    x (B, T, H, D) (packed: (1, total, H, D) with cu_seqlens), cos/sin (TR, R/2) in x's dtype, the cache
    fla's RotaryEmbedding module keeps (precomputed), long enough for the largest offset; seqlen_offsets
    takes the case's int or (batch,) offsets. One call per tensor: fla has no q+k entry."""
    rotary_embedding = _import("fla.modules.rotary").rotary_embedding
    dev = case.device
    lens = case.get("lens")
    offsets = inputs.get("offsets", case.get("offset") or 0)
    longest = int(offsets.max()) if isinstance(offsets, torch.Tensor) else offsets
    n_pos = (sum(lens) if lens else case["S"]) + longest  # older fla asserts TR >= T even for packed input
    ang = _angles(torch.arange(n_pos, device=dev), case["D"], dev)
    cos, sin = ang.cos().to(case.dtype), ang.sin().to(case.dtype)
    il = bool(case["interleaved"])
    cu = inputs.get("cu_seqlens")

    def one(t):
        if cu is not None:
            return rotary_embedding(t[None], cos, sin, interleaved=il, seqlen_offsets=offsets, cu_seqlens=cu)[0]
        return rotary_embedding(t, cos, sin, interleaved=il, seqlen_offsets=offsets)
    if case["kind"] == "qk":
        q, k = inputs.q, inputs.k
        return lambda: (one(q), one(k))
    x = inputs.q
    return lambda: one(x)


def setup_rotary_embedding_torch(case, inputs):
    """rotary_embedding_torch.RotaryEmbedding(dim).rotate_queries_or_keys(t): interleaved pairs only, no
    packed batches, no offsets. seq_before_head_dim=True takes t as (B, S, H, D) with no transpose. It
    caches its angle table itself on the first call, from positions in t's dtype (bf16 rounds positions
    above 256), so the cache is primed here with float32 positions."""
    if not case["interleaved"] or case.get("lens") or "offsets" in inputs or case.get("offset"):
        return None
    RotaryEmbedding = _import("rotary_embedding_torch").RotaryEmbedding
    D, S, dev = case["D"], case["S"], case.device
    rot = RotaryEmbedding(dim=D, seq_before_head_dim=True).to(dev)
    with torch.no_grad():
        rot.rotate_queries_or_keys(torch.zeros(1, S, 1, D, device=dev))
    if case["kind"] == "qk":
        q, k = inputs.q, inputs.k
        return lambda: (rot.rotate_queries_or_keys(q), rot.rotate_queries_or_keys(k))
    x = inputs.q
    return lambda: rot.rotate_queries_or_keys(x)


@functools.cache
def _flashinfer_build():
    """flashinfer.rope and the error of building its kernels, if any. FlashInfer JIT-compiles them with
    nvcc on first use (about a minute; cached under ~/.cache/flashinfer): built here, in the first
    setup, rather than in a timed call, and a failed build is remembered rather than retried per case."""
    rope = _import("flashinfer.rope")
    try:
        if hasattr(rope, "get_rope_module"):
            rope.get_rope_module()
    except Exception as e:  # noqa: BLE001
        return rope, f"{type(e).__name__}: {e}"
    return rope, None


def flashinfer_args(case, inputs):
    """FlashInfer's ragged layout of the case: pos_ids (tokens,) int64, every token's position (a server
    computes them once per step for all layers); q (tokens, Hq, D) and k (tokens, Hk, D), views of the
    inputs (dense (B, S, H, D) flattened, packed as they are; detached: FlashInfer has no autograd);
    cos_sin_cache (max position + 1, D) float32, cos in the first half, sin in the second."""
    pos = positions_of(case, inputs)
    pos = (pos if case.get("lens") else pos.expand(case["B"], -1)).reshape(-1).contiguous()
    D = case["D"]
    q, k = inputs.q.detach(), inputs.k.detach()
    ang = _angles(torch.arange(int(pos.max()) + 1, device=case.device), D, case.device)
    cos_sin = torch.cat((ang.cos(), ang.sin()), -1)
    return pos, q.view(-1, q.shape[-2], D), k.view(-1, k.shape[-2], D), cos_sin


def _setup_flashinfer(cache: bool, inplace: bool):
    def setup(case, inputs):
        """apply_rope_pos_ids[_inplace](q, k, pos_ids, interleave=, rope_theta=) (cos/sin computed in the
        kernel), or with cache=True apply_rope_with_cos_sin_cache[_inplace](pos_ids, q, k, head_size,
        cos_sin_cache, is_neox=) (the vLLM/SGLang-compatible entry, q/k flattened to (tokens, H * D)),
        on flashinfer_args. q and k together only."""
        if case["kind"] != "qk":
            return None
        rope, err = _flashinfer_build()
        if err:
            raise RuntimeError(f"flashinfer JIT build failed: {err}")
        pos, q, k, cos_sin = flashinfer_args(case, inputs)
        il, D = bool(case["interleaved"]), case["D"]
        shapes = inputs.q.shape, inputs.k.shape
        if cache:
            q, k = q.flatten(1), k.flatten(1)
            fn = rope.apply_rope_with_cos_sin_cache_inplace if inplace else rope.apply_rope_with_cos_sin_cache
            call = functools.partial(fn, pos, q, k, D, cos_sin, is_neox=not il)
        else:
            fn = rope.apply_rope_pos_ids_inplace if inplace else rope.apply_rope_pos_ids
            call = functools.partial(fn, q, k, pos, interleave=il, rope_theta=BASE)
        if inplace:
            rotated = q.view(shapes[0]), k.view(shapes[1])  # the inputs, which every call rotates

            def run():
                call()
                return rotated
            return run

        def run():
            qo, ko = call()
            return qo.view(shapes[0]), ko.view(shapes[1])
        return run
    return setup


_FWD = ("fwd",)
_flashinfer_available = _module_available("flashinfer.rope", "flashinfer-python apache-tvm-ffi")

PROVIDERS = [
    Provider("reference", setup_reference, available=_kxops_available, kind="reference",
             note="kxops.reference (eager PyTorch)"),
    Provider("compile", setup_compile, available=_kxops_available, kind="compile",
             note="torch.compile(kxops.reference, dynamic=False)"),
    Provider("kxops-cpu", _setup_kxops("cpu"), devices=("cpu",), available=_backend_available("cpu"),
             kind="kxops"),
    Provider("kxops-cuda", _setup_kxops("cuda"), devices=("cuda",), available=_backend_available("cuda"),
             kind="kxops"),
    Provider("kxops-triton", _setup_kxops("triton"), devices=("cuda",), available=_backend_available("triton"),
             kind="kxops"),
    Provider("kxops-cpu-inplace", _setup_kxops("cpu", inplace=True), devices=("cpu",),
             available=_backend_available("cpu"), kind="kxops", modes=_FWD, note="inplace=True, no grad"),
    Provider("kxops-cuda-inplace", _setup_kxops("cuda", inplace=True), devices=("cuda",),
             available=_backend_available("cuda"), kind="kxops", modes=_FWD, note="inplace=True, no grad"),
    Provider("kxops-triton-inplace", _setup_kxops("triton", inplace=True), devices=("cuda",),
             available=_backend_available("triton"), kind="kxops", modes=_FWD, note="inplace=True, no grad"),
    Provider("kxops-cuda-graph", _setup_kxops_graph("cuda"), devices=("cuda",), available=_backend_available("cuda"),
             kind="kxops", modes=_FWD, timing="device",
             note="host-timed cases: the call in a CUDA graph, replay timed by CUDA events (the kernel alone)"),
    Provider("kxops-triton-graph", _setup_kxops_graph("triton"), devices=("cuda",),
             available=_backend_available("triton"), kind="kxops", modes=_FWD, timing="device",
             note="host-timed cases: the call in a CUDA graph, replay timed by CUDA events (the kernel alone)"),
    Provider("liger", setup_liger, devices=("cuda",), available=_module_available("liger_kernel", "liger-kernel"),
             note="liger_kernel.transformers.rope.liger_rotary_pos_emb"),
    Provider("fla", setup_fla, devices=("cuda",), available=_module_available("fla.modules.rotary", "fla-core einops"),
             note="fla.modules.rotary.rotary_embedding (flash-attention's Triton rotary)"),
    Provider("rotary-emb-torch", setup_rotary_embedding_torch,
             available=_module_available("rotary_embedding_torch", "rotary-embedding-torch einops"),
             note="rotary_embedding_torch.RotaryEmbedding (interleaved only)"),
    Provider("flashinfer", _setup_flashinfer(cache=False, inplace=False), devices=("cuda",),
             available=_flashinfer_available, modes=_FWD,
             note="flashinfer.rope.apply_rope_pos_ids (JIT-compiled on first use: about a minute)"),
    Provider("flashinfer-inplace", _setup_flashinfer(cache=False, inplace=True), devices=("cuda",),
             available=_flashinfer_available, modes=_FWD, note="flashinfer.rope.apply_rope_pos_ids_inplace"),
    Provider("flashinfer-cache", _setup_flashinfer(cache=True, inplace=False), devices=("cuda",),
             available=_flashinfer_available, modes=_FWD, note="flashinfer.rope.apply_rope_with_cos_sin_cache"),
    Provider("flashinfer-cache-inplace", _setup_flashinfer(cache=True, inplace=True), devices=("cuda",),
             available=_flashinfer_available, modes=_FWD,
             note="flashinfer.rope.apply_rope_with_cos_sin_cache_inplace"),
    Provider("torch.mul", setup_torch_mul, kind="yardstick", modes=_FWD,
             note="host-timed cases: torch.mul(q, q), one aten op on the same q"),
]


def targets() -> list:
    """CPU: kxops-cpu >= 3x the reference; a tiny call <= 2.5x one aten op. GPU decoding: an eager call of
    kxops-cuda <= 15 us and of kxops-triton <= 30 us, both faster than Liger."""
    goals = [Target("rope-B4-S2048-H16-D64-fp32", "kxops-cpu", 3.0)]
    goals += [Target(c.name, "kxops-cpu", max_ratio=2.5) for c in decode_cases("cpu")]
    for c in decode_cases("cuda"):
        goals += [Target(c.name, "kxops-cuda", max_us=15, faster_than=("liger",)),
                  Target(c.name, "kxops-triton", max_us=30, faster_than=("liger",))]
    return goals


OP = Op(
    name="rope",
    description="rotary position embedding: rope (one tensor) and rope_qk (q and k, GQA), dense and packed",
    cases=cases,
    small_cases=small_cases,
    make_inputs=make_inputs,
    providers=PROVIDERS,
    bytes_moved=bytes_moved,
    record_memory=True,
    targets=targets(),
)
