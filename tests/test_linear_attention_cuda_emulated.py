"""The CUDA kernels of csrc/cuda/linear_attention_cuda.cu, compiled for the host by tools/cuda_emulate.py
(threads as fibers, tensor cores through the emulator's nvcuda::wmma), against the reference on the
kernel contract's normalised arguments (docs/linear_attention_kernel_contract.md).

The ops are called directly (torch.ops.kxops_emu.linear_attention*, on CPU tensors): forward, backward
and step, each held to the project's rule max|out - ref64| <= 2 max|ref_lp - ref64| + floor, with
ref_lp the reference in the test dtype and gradients from the reference's autograd. The state outputs
(S, z and their gradients) are float32 whatever q's dtype, and so are the reference's: they are held to
the float32 rule (the kernels' tensor-core products that feed them take exact three-piece operands).
Sizes stay small (the emulator runs a block's threads one after another); on a GPU machine the real
kernel is tested through the public API instead.
"""
import os
import sys

import pytest
import torch

import kxops
from testing import HAS_CUDA, assert_close_to_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import cuda_emulate  # noqa: E402

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the real CUDA kernel is tested through kxops"),
    pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None, reason="CUDA headers not found (set CUDA_HOME)"),
]

LA = kxops.reference.linear_attention_impl
FMAPS = LA.FEATURE_MAPS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARLEN_CU = [0, 5, 5, 20]  # three packed sequences, the second empty


@pytest.fixture(scope="module")
def ops():
    return cuda_emulate.load("linear_attention")


def make_case(dtype, fm="elu1", causal=True, normalize=True, rope=None, s0=False, varlen=False, B=2, T=20, H=2,
              Dk=16, Dv=16, positions=False, strided=False, big=1.0, seed=0):
    """Inputs on normalised arguments: a dict of tensors and the op's other arguments."""
    g = torch.Generator().manual_seed(seed)
    if varlen:
        B, T = 1, VARLEN_CU[-1]
    N = len(VARLEN_CU) - 1 if varlen else B
    F = LA.feature_size(Dk, fm)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    if strided:  # q, k, v: views of one fused (B, H, T, 2 Dk + Dv + 3) tensor, time and heads swapped
        qkv = rnd(B, H, T, 2 * Dk + Dv + 3).to(dtype).transpose(1, 2)
        q, k, v = qkv[..., :Dk], qkv[..., Dk + 1:2 * Dk + 1], qkv[..., 2 * Dk + 2:2 * Dk + 2 + Dv]
    else:
        q, k, v = rnd(B, T, H, Dk).to(dtype), rnd(B, T, H, Dk).to(dtype), rnd(B, T, H, Dv).to(dtype)
    if fm == "identity" and normalize:  # positive features: a denominator far from 0
        q, k = q.abs(), k.abs()
    v = v * big
    case = dict(q=q, k=k, v=v, S0=None, z0=None,
                cu_seqlens=torch.tensor(VARLEN_CU, dtype=torch.int32) if varlen else None,
                positions=None, inv_freq=None, interleaved=rope == "interleaved", feature_map=fm,
                scale=Dk ** -0.5, normalize=normalize, eps=1e-6, causal=causal)
    if s0:  # a state as a previous segment of 8 tokens leaves it
        pq, pk, pv = rnd(N, 8, H, Dk), rnd(N, 8, H, Dk), rnd(N, 8, H, Dv) * big
        if fm == "identity" and normalize:
            pq, pk = pq.abs(), pk.abs()
        _, S0, z0 = LA.linear_attention_ref(pq, pk, pv, feature_map=fm)
        case["S0"], case["z0"] = S0.contiguous(), z0.contiguous()
    if rope:
        case["inv_freq"] = 1.0 / 100.0 ** (torch.arange(0, Dk, 2, dtype=torch.float32) / Dk)
        if positions:  # (B, T) int64 with a stride of 3 along T
            case["positions"] = torch.randint(0, 1000, (B, 3 * T), generator=g)[:, ::3]
    grads = dict(dout=rnd(B, T, H, Dv).to(dtype), dS=rnd(N, H, F, Dv), dz=rnd(N, H, F))
    return case, grads


ARGS = ("cu_seqlens", "positions", "inv_freq", "interleaved", "feature_map", "scale", "normalize", "eps", "causal")


def op_args(c):
    return [c[a] if a != "feature_map" else FMAPS.index(c[a]) for a in ARGS]


def reference(c, cast):
    """linear_attention_ref on the case's tensors cast by `cast` (float64 or as they are)."""
    kw = {a: c[a] for a in ARGS}
    if kw["inv_freq"] is not None:
        kw["inv_freq"] = cast(kw["inv_freq"])
    st = [None if c[s] is None else cast(c[s]) for s in ("S0", "z0")]
    return LA.linear_attention_ref(cast(c["q"]), cast(c["k"]), cast(c["v"]), *st, **kw)


def ref_outputs_and_grads(c, gr, cast, state_grads=True):
    """The reference's (out, S, z) and, by its autograd, the gradients of (q, k, v, S0, z0) (zero S0, z0
    when absent), on the case's tensors cast by `cast` (float64 or as they are)."""
    N, F, Dv = gr["dS"].shape[0], gr["dS"].shape[2], c["v"].shape[-1]
    H = c["q"].shape[2]
    x = {n: cast(c[n]).detach().requires_grad_() for n in ("q", "k", "v")}
    acc = torch.float64 if x["q"].dtype == torch.float64 else torch.float32
    s0 = c["S0"] if c["S0"] is not None else torch.zeros(N, H, F, Dv)
    z0 = c["z0"] if c["z0"] is not None else torch.zeros(N, H, F)
    x["S0"], x["z0"] = s0.to(acc).requires_grad_(), z0.to(acc).requires_grad_()
    outs = reference(dict(c, **x), lambda t: t)
    gos = [cast(gr["dout"])] + ([gr["dS"].to(acc), gr["dz"].to(acc)] if state_grads else [])
    grads = torch.autograd.grad(outs[:len(gos)], [x[n] for n in ("q", "k", "v", "S0", "z0")], gos)
    return outs, grads


def compare(got, r64, rlp, names, state_div=1.0):
    """Tensors under the rule; the float32 state tensors (S, z, dS0, dz0) as float32, divided by state_div
    (a power of two: exact; the bound scales with it but for its absolute floor)."""
    for name, o, r, lp in zip(names, got, r64, rlp):
        if name in ("S", "z", "dS0", "dz0"):
            assert o.dtype == torch.float32, name
            o, r, lp = o / state_div, r / state_div, lp / state_div
        assert_close_to_ref(o, r.detach(), lp.detach(), name)


def check_case(ops, c, gr, state_grads=True, state_div=1.0):
    """Forward and backward of the emulated kernels against the reference."""
    fwd = ops.linear_attention(c["q"], c["k"], c["v"], c["S0"], c["z0"], *op_args(c))
    bwd = ops.linear_attention_backward(gr["dout"], gr["dS"] if state_grads else None,
                                        gr["dz"] if state_grads else None, c["q"], c["k"], c["v"], c["S0"],
                                        c["z0"], *op_args(c))
    (o64, g64), (olp, glp) = (ref_outputs_and_grads(c, gr, cast, state_grads)
                              for cast in (lambda t: t.double(), lambda t: t))
    compare(fwd, o64, olp, ("out", "S", "z"), state_div)
    compare(bwd, g64, glp, ("dq", "dk", "dv", "dS0", "dz0"), state_div)
    return fwd, bwd


# The matrix: every feature map x causal/global x normalize x RoPE x dtype; S0 and the packed var-len
# layout (an empty sequence among three) alternate so that each meets every value of every other factor.
MATRIX = []
for fi, fm in enumerate(FMAPS):
    for ci, causal in enumerate((True, False)):
        for ni, normalize in enumerate((True, False)):
            for ri, rope in enumerate((None, "interleaved", "half")):
                for di, dname in enumerate(DTYPES):
                    s0 = (fi + ci + ni + ri + di) % 2 == 0
                    varlen = (fi + ni + ri + di) % 2 == 1
                    MATRIX.append(pytest.param(
                        dict(fm=fm, causal=causal, normalize=normalize, rope=rope, s0=s0, varlen=varlen), dname,
                        id="-".join([fm, "causal" if causal else "global", "norm" if normalize else "raw",
                                     f"rope_{rope}" if rope else "norope", "S0" if s0 else "noS0",
                                     "varlen" if varlen else "B2-T20", dname])))


@pytest.mark.parametrize("kw, dname", MATRIX)
def test_forward_and_backward_match_reference(ops, kw, dname):
    c, gr = make_case(DTYPES[dname], H=2, Dk=16, Dv=16, **kw)
    check_case(ops, c, gr)


# Odd sizes: one token, a chunk's worth less one (fp32 chunks are 32 tokens, fp16 / bf16 ones 64), more
# than a chunk; head dims that are not multiples of 16 (Dv = 100: two value tiles), Dk odd.
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape, kw", [
    (dict(B=1, T=1, H=1, Dk=16, Dv=16), dict(fm="elu1", rope="half", s0=True)),
    (dict(B=1, T=63, H=1, Dk=8, Dv=8), dict(fm="taylor", rope="interleaved")),
    (dict(B=1, T=70, H=1, Dk=8, Dv=24), dict(fm="relu", s0=True)),
    (dict(B=1, T=70, H=1, Dk=8, Dv=8), dict(fm="identity", normalize=False, causal=False)),
    (dict(B=1, T=5, H=1, Dk=60, Dv=100), dict(fm="elu1", rope="half", s0=True)),
    (dict(B=2, T=9, H=1, Dk=7, Dv=5), dict(fm="taylor", s0=True)),
], ids=["T1", "T63-taylor-rope", "T70-relu", "T70-identity-global-raw", "Dk60-Dv100-rope", "Dk7-Dv5-taylor"])
def test_odd_sizes(ops, shape, kw, dname):
    c, gr = make_case(DTYPES[dname], **shape, **kw)
    check_case(ops, c, gr)


def test_head_dim_256(ops):
    # the largest head dims: the F x Dv state does not fit shared memory whole, the value tiles split it
    c, gr = make_case(torch.bfloat16, fm="taylor", rope="half", s0=True, B=1, T=3, H=1, Dk=256, Dv=256)
    check_case(ops, c, gr)


@pytest.mark.parametrize("smem_kb", [163, 99], ids=["A100-163KB", "sm86-99KB"])
def test_devices_with_less_shared_memory(ops, monkeypatch, smem_kb):
    # an A100 (or a GeForce) offers less shared memory a block: shorter chunks and narrower value tiles
    monkeypatch.setenv("KXOPS_EMU_SMEM_OPTIN", str(smem_kb * 1024))
    c, gr = make_case(torch.float16, fm="elu1", rope="half", s0=True, B=1, T=40, H=1, Dk=128, Dv=80)
    check_case(ops, c, gr)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "global"])
def test_strided_inputs_and_positions(ops, causal, dname):
    # q, k, v views of one fused tensor with time and heads swapped; positions (B, T) with a stride
    c, gr = make_case(DTYPES[dname], fm="elu1", causal=causal, rope="interleaved", positions=True, s0=True,
                      strided=True, B=2, T=20, H=3, Dk=16, Dv=12)
    assert not c["q"].is_contiguous() and c["q"].stride(-1) == 1
    check_case(ops, c, gr)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_without_state_gradients(ops, dname):
    # dS, dz None: the final state's gradients are zero; dS0, dz0 are what a zero state would get
    c, gr = make_case(DTYPES[dname], fm="elu1", rope="half", B=2, T=20, H=2)
    check_case(ops, c, gr, state_grads=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "global"])
def test_fp16_beyond_its_range(ops, causal):
    # values in the thousands: the state and the scores outgrow fp16 (65504); the splits that feed the
    # tensor cores are scaled by powers of two
    c, gr = make_case(torch.float16, fm="elu1", causal=causal, s0=True, B=1, T=70, H=1, big=2000.0)
    (out, S, _), _ = check_case(ops, c, gr, state_div=2.0 ** 8)
    assert S.abs().max() > 65504


def test_grid_stride_loops(ops, monkeypatch):
    # two blocks for every launch: each walks several (sequence, head, tile) items and token rows
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "2")
    c, gr = make_case(torch.bfloat16, fm="taylor", rope="half", s0=True, varlen=True, H=3, Dk=16, Dv=100)
    check_case(ops, c, gr)
    step_case = dict(B=3, H=2, Dk=8, Dv=40)
    check_step(ops, torch.float32, "elu1", True, **step_case)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_empty_inputs(ops, dname):
    dt = DTYPES[dname]
    # T = 0: no tokens, the state passes through
    c, gr = make_case(dt, s0=True, B=2, T=0, H=2)
    out, S, z = ops.linear_attention(c["q"], c["k"], c["v"], c["S0"], c["z0"], *op_args(c))
    assert out.shape == (2, 0, 2, 16) and torch.equal(S, c["S0"]) and torch.equal(z, c["z0"])
    dq, dk, dv, dS0, dz0 = ops.linear_attention_backward(gr["dout"], gr["dS"], gr["dz"], c["q"], c["k"], c["v"],
                                                         c["S0"], c["z0"], *op_args(c))
    assert dq.shape == (2, 0, 2, 16) and torch.equal(dS0, gr["dS"]) and torch.equal(dz0, gr["dz"])
    # no initial state: zeros
    c, _ = make_case(dt, B=2, T=0, H=2)
    _, S, z = ops.linear_attention(c["q"], c["k"], c["v"], None, None, *op_args(c))
    assert (S == 0).all() and (z == 0).all()
    # no heads, no sequences
    c, _ = make_case(dt, B=2, T=5, H=0)
    out, S, z = ops.linear_attention(c["q"], c["k"], c["v"], None, None, *op_args(c))
    assert out.shape == (2, 5, 0, 16) and S.shape == (2, 0, 16, 16)
    c, _ = make_case(dt, B=1, T=0, H=2)
    c["cu_seqlens"] = torch.zeros(1, dtype=torch.int32)
    out, S, z = ops.linear_attention(c["q"], c["k"], c["v"], None, None, *op_args(c))
    assert S.shape == (0, 2, 16, 16) and z.shape == (0, 2, 16)


def test_bad_cu_seqlens_do_not_crash(ops):
    # values a direct op call may pass (decreasing, past the end): blocks clamp them to the packed row
    c, _ = make_case(torch.bfloat16, varlen=True)
    c["cu_seqlens"] = torch.tensor([0, 30, -4, 7], dtype=torch.int32)
    out, S, z = ops.linear_attention(c["q"], c["k"], c["v"], None, None, *op_args(c))
    assert S.isfinite().all() and z.isfinite().all()


# ---- decoding step ----

def check_step(ops, dt, fm, normalize, B=2, H=2, Dk=16, Dv=16, strided=False):
    g = torch.Generator().manual_seed(1)
    F = LA.feature_size(Dk, fm)
    if strided:  # views of one (B, H, 2 Dk + Dv) tensor
        qkv = torch.randn(B, H, 2 * Dk + Dv + 2, generator=g).to(dt)
        q, k, v = qkv[..., :Dk], qkv[..., Dk + 1:2 * Dk + 1], qkv[..., 2 * Dk + 2:]
    else:
        q, k, v = (torch.randn(B, H, d, generator=g).to(dt) for d in (Dk, Dk, Dv))
    if fm == "identity" and normalize:
        q, k = q.abs(), k.abs()
    S, z = torch.randn(B, H, F, Dv, generator=g), torch.rand(B, H, F, generator=g) + 1
    args = (FMAPS.index(fm), Dk ** -0.5, normalize, 1e-6)
    out, S1, z1 = ops.linear_attention_step(q, k, v, S, z, *args)
    kw = dict(feature_map=fm, scale=Dk ** -0.5, normalize=normalize, eps=1e-6)
    r64 = LA.linear_attention_step_ref(q.double(), k.double(), v.double(), S.double(), z.double(), **kw)
    rlp = LA.linear_attention_step_ref(q, k, v, S, z, **kw)
    assert_close_to_ref(out, r64[0], rlp[0], "out")
    assert_close_to_ref(S1, r64[1], rlp[1], "S")  # float32 like the reference's: the float32 rule
    assert_close_to_ref(z1, r64[2], rlp[2], "z")
    assert not torch.equal(S1, S)  # new tensors, the inputs unchanged


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("fm", FMAPS)
def test_step_matches_reference(ops, fm, normalize, dname):
    check_step(ops, DTYPES[dname], fm, normalize)


@pytest.mark.parametrize("dims", [(7, 5), (60, 200), (256, 256)], ids=["Dk7-Dv5", "Dk60-Dv200", "Dk256-Dv256"])
def test_step_sizes_and_strides(ops, dims):
    check_step(ops, torch.float32, "taylor", True, B=3, H=2, Dk=dims[0], Dv=dims[1], strided=True)


def test_step_continues_the_chunked_forward(ops):
    # the forward's final state, stepped by one token, gives the forward's output at that token
    c, _ = make_case(torch.float32, fm="elu1", B=2, T=9, H=2)
    out, S, z = ops.linear_attention(c["q"], c["k"], c["v"], None, None, *op_args(c))
    head = {n: c[n][:, :8] for n in ("q", "k", "v")}
    _, S8, z8 = ops.linear_attention(head["q"], head["k"], head["v"], None, None, *op_args(c))
    o9, S9, z9 = ops.linear_attention_step(c["q"][:, 8], c["k"][:, 8], c["v"][:, 8], S8, z8, 1, c["scale"], True, 1e-6)
    torch.testing.assert_close(o9, out[:, 8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S9, S, rtol=1e-5, atol=1e-5)


# ---- argument checks: a direct op call gets an error, never a crash ----

def _bad(ops, **change):
    c, gr = make_case(torch.float32, s0=True, B=2, T=4, H=1, Dk=8, Dv=8)
    c.update(change)
    return lambda: ops.linear_attention(c["q"], c["k"], c["v"], c["S0"], c["z0"], *op_args(c))


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.randn(2, 4, 1, 8, dtype=torch.float64)), "float64 is supported on CPU only"),
    (dict(k=torch.randn(2, 4, 1, 8).half()), "k must have q's dtype"),
    (dict(v=torch.randn(2, 5, 1, 8)), "v must be (2, 4, 1, Dv)"),
    (dict(q=torch.randn(2, 4, 1, 300), k=torch.randn(2, 4, 1, 300)), "head dims must be in [1, 256]"),
    (dict(feature_map="softmax"), None),
    (dict(z0=None), "S0 and z0 must be given together"),
    (dict(S0=torch.randn(2, 1, 8, 8).double()), "S0 must be a contiguous float32 tensor of shape [2, 1, 8, 8]"),
    (dict(S0=torch.randn(2, 1, 8, 9)), "S0 must be a contiguous float32 tensor"),
    (dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_seqlens needs packed input of batch 1"),
    (dict(inv_freq=torch.ones(3)), "inv_freq must be a contiguous float32 (4,) tensor"),
    (dict(inv_freq=torch.ones(4), positions=torch.zeros(2, 5, dtype=torch.long)), "positions must be an int64"),
    (dict(q=torch.randn(2, 4, 1, 16)[..., ::2]), "unit stride in the last dimension"),
], ids=["fp64", "k-dtype", "v-shape", "Dk300", "feature-map", "z0-missing", "S0-dtype", "S0-shape", "cu-batch",
        "inv-freq-size", "positions-shape", "last-stride"])
def test_bad_arguments_raise(ops, change, message):
    if message is None:  # an unknown feature map id
        c, _ = make_case(torch.float32, B=1, T=2, H=1, Dk=8, Dv=8)
        args = op_args(c)
        args[ARGS.index("feature_map")] = 7
        with pytest.raises(RuntimeError, match="feature_map must be 0"):
            ops.linear_attention(c["q"], c["k"], c["v"], None, None, *args)
        return
    with pytest.raises(RuntimeError) as info:
        _bad(ops, **change)()
    assert message in str(info.value)


def test_bad_backward_and_step_arguments_raise(ops):
    c, gr = make_case(torch.float32, B=2, T=4, H=1, Dk=8, Dv=8)
    with pytest.raises(RuntimeError, match="dout must be a contiguous"):
        ops.linear_attention_backward(gr["dout"].transpose(1, 2), None, None, c["q"], c["k"], c["v"], None, None,
                                      *op_args(c))
    with pytest.raises(RuntimeError, match="dz must be a contiguous float32"):
        ops.linear_attention_backward(gr["dout"], None, torch.zeros(2, 1, 9), c["q"], c["k"], c["v"], None, None,
                                      *op_args(c))
    q = torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError, match="S must be a contiguous float32 tensor of shape"):
        ops.linear_attention_step(q, q, q, torch.zeros(2, 1, 9, 8), torch.zeros(2, 1, 8), 1, 1.0, True, 1e-6)
    with pytest.raises(RuntimeError, match="q, k, v must be 3-D"):
        ops.linear_attention_step(q[None], q[None], q[None], torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8), 1, 1.0,
                                  True, 1e-6)
