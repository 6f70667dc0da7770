"""RoPE: kxops.rope / kxops.rope_qk against the eager reference, torch.compile of it, and the libraries
users would pick instead (Liger-Kernel, flash-linear-attention, rotary-embedding-torch).

Every case rotates the full head (rotary_dim = head_dim, base 10000) at positions 0..S-1 (restarting at
0 in each packed sequence). x, q, k: (batch, seq, heads, head_dim), or packed (total_tokens, heads,
head_dim) with cu_seqlens. kxops and the reference take no cos/sin cache (angles are computed from the
positions in the call); the anchors get the cache their users precompute once per model forward and
share across layers, built in setup, outside the timed region.
"""
from __future__ import annotations

import functools
import importlib
import random

import torch

from .core import Case, Inputs, Op, Provider, Target

BASE = 10000.0


# ----------------------------------------------------------------------------------------------
# Cases

def _name(kind, p, dtype):
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]
    il = "-interleaved" if p.get("interleaved") else ""
    if p.get("lens"):
        heads = f"Hq{p['H']}-Hk{p['Hk']}" if kind == "qk" else f"H{p['H']}"
        return f"{kind}{il}-varlen-N{len(p['lens'])}-T{sum(p['lens'])}-{heads}-D{p['D']}-{dt}"
    heads = f"Hq{p['H']}-Hk{p['Hk']}" if kind == "qk" else f"H{p['H']}"
    return f"{kind}{il}-B{p['B']}-S{p['S']}-{heads}-D{p['D']}-{dt}"


def _case(device, dtype, kind, quick=False, interleaved=False, **p):
    p = dict(kind=kind, interleaved=interleaved, **p)
    return Case(_name(kind, p, dtype), device, dtype, p, quick=quick)


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
        ]
    return [
        # the CPU target: kxops at least 3x faster than the eager reference
        _case(device, torch.float32, "rope", quick=True, B=4, S=2048, H=16, D=64),
        _case(device, torch.bfloat16, "rope", B=4, S=2048, H=16, D=64),
        _case(device, torch.float32, "qk", quick=True, B=2, S=2048, H=16, Hk=4, D=64),
        _case(device, torch.float32, "rope", B=4, S=2048, H=16, D=64, interleaved=True),
        _case(device, torch.float32, "qk", lens=varlen_lengths(4, 4096), H=16, Hk=4, D=64),
    ]


def small_cases(device: str) -> list:
    """Tiny shapes for the pytest-benchmark suite (fast on a 2-core CPU)."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    small = [
        _case(device, dt, "rope", B=2, S=128, H=4, D=64),
        _case(device, torch.bfloat16, "rope", B=2, S=128, H=4, D=64) if device == "cpu" else None,
        _case(device, dt, "qk", B=2, S=128, H=4, Hk=2, D=64),
        _case(device, dt, "rope", B=2, S=128, H=4, D=64, interleaved=True),
        _case(device, dt, "qk", lens=varlen_lengths(3, 300), H=4, Hk=2, D=64),
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
    t = {n: torch.randn(s, dtype=case.dtype, device=case.device, generator=gen).requires_grad_()
         for n, s in _shapes(case).items()}
    grad = tuple(t)
    lens = case.get("lens")
    if lens:
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        t["cu_seqlens"] = cu.to(case.device)
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


def _setup_kxops(backend):
    def setup(case, inputs):
        k = _kxops()
        return _call(functools.partial(k.rope, backend=backend), functools.partial(k.rope_qk, backend=backend),
                     case, inputs)
    return setup


def positions_of(case, device) -> torch.Tensor:
    """Every token's position (S,) or (total_tokens,): 0..S-1, restarting in each packed sequence."""
    lens = case.get("lens")
    if lens:
        return torch.cat([torch.arange(n, device=device) for n in lens])
    return torch.arange(case["S"], device=device)


def _angles(pos, dim, device):
    inv_freq = 1.0 / (BASE ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    return pos.to(torch.float32)[:, None] * inv_freq[None]  # (S, dim/2)


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


def setup_liger(case, inputs):
    """liger_rotary_pos_emb(q, k, cos, sin): q/k (B, H, S, D) views of the (B, S, H, D) tensors (the
    transposes HF's attention does; Liger works on the physical (B, S, H, D) layout, in place), cos/sin
    (1, S, D) in x's dtype, duplicated halves, as HF's LlamaRotaryEmbedding precomputes them once per
    forward. Packed batches use the per-token cos/sin HF builds from position_ids (restarting)."""
    if case["kind"] != "qk" or case["interleaved"]:
        return None  # q and k together, rotate-half layout only
    fn = _liger_fn()
    dev, packed = case.device, case.get("lens") is not None
    ang = _angles(positions_of(case, dev), case["D"], dev)
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().to(case.dtype)[None], emb.sin().to(case.dtype)[None]
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
    fla's RotaryEmbedding module keeps (precomputed). One call per tensor: fla has no q+k entry."""
    rotary_embedding = _import("fla.modules.rotary").rotary_embedding
    dev = case.device
    lens = case.get("lens")
    n_pos = sum(lens) if lens else case["S"]  # older fla asserts TR >= T even for packed input
    ang = _angles(torch.arange(n_pos, device=dev), case["D"], dev)
    cos, sin = ang.cos().to(case.dtype), ang.sin().to(case.dtype)
    il = bool(case["interleaved"])
    cu = inputs.get("cu_seqlens")

    def one(t):
        if cu is not None:
            return rotary_embedding(t[None], cos, sin, interleaved=il, cu_seqlens=cu)[0]
        return rotary_embedding(t, cos, sin, interleaved=il)
    if case["kind"] == "qk":
        q, k = inputs.q, inputs.k
        return lambda: (one(q), one(k))
    x = inputs.q
    return lambda: one(x)


def setup_rotary_embedding_torch(case, inputs):
    """rotary_embedding_torch.RotaryEmbedding(dim).rotate_queries_or_keys(t): interleaved pairs only, no
    packed batches. seq_before_head_dim=True takes t as (B, S, H, D) with no transpose. It caches its
    angle table itself on the first call, from positions in t's dtype (bf16 rounds positions above 256),
    so the cache is primed here with float32 positions."""
    if not case["interleaved"] or case.get("lens"):
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
    Provider("liger", setup_liger, devices=("cuda",), available=_module_available("liger_kernel", "liger-kernel"),
             note="liger_kernel.transformers.rope.liger_rotary_pos_emb"),
    Provider("fla", setup_fla, devices=("cuda",), available=_module_available("fla.modules.rotary", "fla-core einops"),
             note="fla.modules.rotary.rotary_embedding (flash-attention's Triton rotary)"),
    Provider("rotary-emb-torch", setup_rotary_embedding_torch,
             available=_module_available("rotary_embedding_torch", "rotary-embedding-torch einops"),
             note="rotary_embedding_torch.RotaryEmbedding (interleaved only)"),
]

OP = Op(
    name="rope",
    description="rotary position embedding: rope (one tensor) and rope_qk (q and k, GQA), dense and packed",
    cases=cases,
    small_cases=small_cases,
    make_inputs=make_inputs,
    providers=PROVIDERS,
    bytes_moved=bytes_moved,
    record_memory=True,
    targets=[Target("rope-B4-S2048-H16-D64-fp32", "kxops-cpu", 3.0)],
)
