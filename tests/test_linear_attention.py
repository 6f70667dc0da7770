"""kxops.linear_attention / causal_dot_product / linear_attention_step: every backend equals the float64
reference, forward and backward; state chaining, decoding steps and packed sequences agree with one call."""
import pytest
import torch

import kxops
from testing import (BACKENDS, BACKEND_IDS, COMPILABLE, INTERPRETING, backends_where, DTYPE_IDS, DTYPES, HAS_CUDA, assert_close_to_ref,
                     assert_raises_with, bad_input_params, called_ops, compiled, fake_cuda, opcheck,
                     stand_in_cuda_kernels)

LA = kxops.linear_attention


def _packed(lengths, H, Dk, Dv, dtype, device):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    n = sum(lengths)
    r = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return r(n, H, Dk), r(n, H, Dk), r(n, H, Dv), cu


def _state(N, H, F, Dv, device, dtype=torch.float32):
    return (torch.randn(N, H, F, Dv, dtype=dtype, device=device),
            torch.rand(N, H, F, dtype=dtype, device=device) + 1)


# Each case builds (q, k, v, kwargs). Shapes stay small: the Triton interpreter runs ~1 ms per program.
def _case(name, dtype, dev):
    r = lambda *s: torch.randn(*s, dtype=dtype, device=dev)  # noqa: E731
    if name == "B2-T16-H2-D8-elu1":
        return r(2, 16, 2, 8), r(2, 16, 2, 8), r(2, 16, 2, 8), {}
    if name == "B1-T1-H2-D8":
        return r(1, 1, 2, 8), r(1, 1, 2, 8), r(1, 1, 2, 8), {}
    if name == "B2-T37-H2-Dk6-Dv10-relu":
        return r(2, 37, 2, 6), r(2, 37, 2, 6), r(2, 37, 2, 10), dict(feature_map="relu")
    if name == "B1-T70-H1-D16-identity-nonorm":  # more than one chunk
        return r(1, 70, 1, 16), r(1, 70, 1, 16), r(1, 70, 1, 16), dict(feature_map="identity", normalize=False)
    if name == "B2-T12-H1-Dk7-Dv5-taylor":  # feature size 8
        return r(2, 12, 1, 7), r(2, 12, 1, 7), r(2, 12, 1, 5), dict(feature_map="taylor")
    if name == "global-elu1":
        return r(2, 13, 2, 8), r(2, 13, 2, 8), r(2, 13, 2, 6), dict(causal=False)
    if name == "global-taylor-nonorm":
        return r(1, 9, 2, 6), r(1, 9, 2, 6), r(1, 9, 2, 4), dict(causal=False, feature_map="taylor", normalize=False)
    if name == "rope-half-elu1":
        return r(2, 15, 2, 8), r(2, 15, 2, 8), r(2, 15, 2, 8), dict(rope=True)
    if name == "rope-interleaved-taylor-positions":
        pos = torch.randint(0, 3000, (2, 11), device=dev)
        return r(2, 11, 1, 8), r(2, 11, 1, 8), r(2, 11, 1, 6), dict(rope=True, interleaved=True, feature_map="taylor",
                                                                      positions=pos, rope_base=500.0)
    if name == "state-in-out":
        return r(2, 10, 2, 8), r(2, 10, 2, 8), r(2, 10, 2, 4), dict(initial_state=_state(2, 2, 8, 4, dev),
                                                                      output_final_state=True)
    if name == "global-state-taylor":
        return r(1, 8, 2, 6), r(1, 8, 2, 6), r(1, 8, 2, 4), dict(causal=False, feature_map="taylor",
                                                                   initial_state=_state(1, 2, 7, 4, dev),
                                                                   output_final_state=True)
    if name == "varlen":
        q, k, v, cu = _packed([5, 0, 9, 3], 2, 8, 6, dtype, dev)
        return q, k, v, dict(cu_seqlens=cu, output_final_state=True)
    if name == "varlen-state-rope-relu":
        q, k, v, cu = _packed([4, 7], 1, 8, 4, dtype, dev)
        return q, k, v, dict(cu_seqlens=cu, initial_state=_state(2, 1, 8, 4, dev), rope=True, feature_map="relu",
                             output_final_state=True)
    if name == "varlen-global":
        q, k, v, cu = _packed([6, 3], 2, 6, 6, dtype, dev)
        return q, k, v, dict(cu_seqlens=cu, causal=False)
    if name == "qkv-slices":  # q, k, v: views of one fused projection
        qkv = r(2, 9, 3, 3 * 8)
        return qkv[..., :8], qkv[..., 8:16], qkv[..., 16:], dict(feature_map="elu1")
    if name == "BHTD-transposed":
        return (r(2, 2, 11, 8).transpose(1, 2), r(2, 2, 11, 8).transpose(1, 2), r(2, 2, 11, 4).transpose(1, 2),
                dict(rope=True))
    if name == "scale-2.5-identity":
        return r(1, 10, 2, 8), r(1, 10, 2, 8), r(1, 10, 2, 8), dict(feature_map="identity", scale=2.5)
    if name == "Dk60-Dv100":
        return r(1, 5, 1, 60), r(1, 5, 1, 60), r(1, 5, 1, 100), dict(output_final_state=True)
    if name == "B2-T63-H2-D8-global-relu":
        return r(2, 63, 2, 8), r(2, 63, 2, 8), r(2, 63, 2, 8), dict(causal=False, feature_map="relu")
    if name == "B1-T1000-H1-Dk8-Dv4":  # many chunks: the state carried a long way
        return r(1, 1000, 1, 8), r(1, 1000, 1, 8), r(1, 1000, 1, 4), dict(output_final_state=True)
    if name == "T0":
        return r(2, 0, 2, 8), r(2, 0, 2, 8), r(2, 0, 2, 4), dict(output_final_state=True)
    raise KeyError(name)


CASES = ["B2-T16-H2-D8-elu1", "B1-T1-H2-D8", "B2-T37-H2-Dk6-Dv10-relu", "B1-T70-H1-D16-identity-nonorm",
         "B2-T12-H1-Dk7-Dv5-taylor", "global-elu1", "global-taylor-nonorm", "rope-half-elu1",
         "rope-interleaved-taylor-positions", "state-in-out", "global-state-taylor", "varlen", "varlen-state-rope-relu",
         "varlen-global", "qkv-slices", "BHTD-transposed", "scale-2.5-identity", "Dk60-Dv100", "B2-T63-H2-D8-global-relu",
         "B1-T1000-H1-Dk8-Dv4", "T0"]
GRAD_CASES = ["B2-T16-H2-D8-elu1", "B2-T37-H2-Dk6-Dv10-relu", "B1-T70-H1-D16-identity-nonorm",
              "B2-T12-H1-Dk7-Dv5-taylor", "global-state-taylor", "rope-interleaved-taylor-positions", "state-in-out",
              "varlen-state-rope-relu", "varlen-global", "qkv-slices", "Dk60-Dv100", "B1-T1000-H1-Dk8-Dv4"]


def _double(kw):
    """kwargs with the initial state in float64 (the reference's state dtype for float64 inputs)."""
    kw = dict(kw)
    if kw.get("initial_state") is not None:
        kw["initial_state"] = tuple(t.double() for t in kw["initial_state"])
    return kw


def _flat(out):
    """out or (out, (S, z)) as a flat tuple."""
    return (out[0], *out[1]) if isinstance(out, tuple) else (out,)


def _refs(q, k, v, kw):
    """(ref64, ref_lp) of linear_attention with backend="reference", each a flat tuple (out[, S, z])."""
    ref64 = _flat(LA(q.double(), k.double(), v.double(), **_double(kw), backend="reference"))
    ref_lp = _flat(LA(q, k, v, **kw, backend="reference"))
    return ref64, ref_lp


def _assert_all(outs, ref64, ref_lp, what="output"):
    names = ["out", "S", "z"]
    for i, (o, r64, rlp) in enumerate(zip(outs, ref64, ref_lp)):
        assert_close_to_ref(o, r64, rlp, f"{what} {names[i] if len(outs) <= 3 else i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_forward_matches_reference(backend, device, case, dtype):
    q, k, v, kw = _case(case, dtype, device)
    out = _flat(LA(q, k, v, **kw, backend=backend))
    assert out[0].dtype == q.dtype and out[0].shape == v.shape
    _assert_all(out, *_refs(q, k, v, kw))


@pytest.mark.parametrize("case", CASES)
def test_forward_float64_cpu(case):
    q, k, v, kw = _case(case, torch.float64, "cpu")
    kw = _double(kw)
    _assert_all(_flat(LA(q, k, v, **kw, backend="cpu")), *_refs(q, k, v, kw))


def _grads(q, k, v, kw, backend, gouts):
    """out[, S, z] and the gradients of q, k, v[, S0, z0] for output gradients gouts."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    if kw.get("initial_state") is not None:
        st = [t.detach().requires_grad_() for t in kw["initial_state"]]
        kw["initial_state"] = tuple(st)
        leaves += st
    outs = _flat(LA(*leaves[:3], **kw, backend=backend))
    gs = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(gouts, outs)])
    return (*outs, *gs)


def _assert_grads_match(backend, device, q, k, v, kw):
    """Outputs and the gradients of q, k, v (and the initial state) under the rule, for random output grads."""
    shapes = [o.shape for o in _flat(LA(q, k, v, **kw, backend="reference"))]
    gouts = [torch.randn(s, dtype=torch.float32, device=device) for s in shapes]
    got = _grads(q, k, v, kw, backend, gouts)
    ref64 = _grads(q.double(), k.double(), v.double(), _double(kw), "reference", gouts)
    ref_lp = _grads(q, k, v, kw, "reference", gouts)
    for i, (o, r64, rlp) in enumerate(zip(got, ref64, ref_lp)):
        assert_close_to_ref(o, r64, rlp, f"output/grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_backward_matches_reference(backend, device, case, dtype):
    if INTERPRETING and backend == "triton" and case == "B1-T1000-H1-Dk8-Dv4" and dtype != torch.float32:
        pytest.skip("45 s in the Triton interpreter; its multi-chunk backward path: test_triton_small_blocks_and_segments")
    _assert_grads_match(backend, device, *_case(case, dtype, device))


SMALL_BLOCK_CASES = ["B1-T70-H1-D16-identity-nonorm", "B2-T37-H2-Dk6-Dv10-relu", "rope-interleaved-taylor-positions",
                     "varlen-state-rope-relu", "global-state-taylor", "Dk60-Dv100", "B2-T63-H2-D8-global-relu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES)
@pytest.mark.parametrize(**backends_where(lambda b, d: b == "triton"))
def test_triton_small_blocks_and_segments(backend, device, case, dtype, monkeypatch):
    """The Triton kernels' multi-chunk, multi-Dv-block and multi-segment paths (the sequence cut into segments
    whose start states come from a state pass and a scan), reached at test sizes by shrinking the blocks."""
    from kxops.triton_kernels import linear_attention as tk
    for key in ("chunk_fwd", "chunk_fwd_mapped", "chunk_bwd", "chunk_bwd_mapped", "chunk_fp32", "block_v_fwd",
                "block_v_bwd", "block_v_fp32"):
        monkeypatch.setitem(tk.TUNING, key, 16)
    monkeypatch.setitem(tk.TUNING, "segments", 3)
    q, k, v, kw = _case(case, dtype, device)
    _assert_all(_flat(LA(q, k, v, **kw, backend=backend)), *_refs(q, k, v, kw))
    _assert_grads_match(backend, device, q, k, v, kw)


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    S0 = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(1, 2, 5, dtype=torch.float64) + 1).requires_grad_()

    def f(q, k, v, S0, z0):
        out, (S, z) = LA(q, k, v, feature_map="taylor", rope=True, initial_state=(S0, z0), output_final_state=True,
                         backend="cpu")
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0))
    assert torch.autograd.gradcheck(lambda q, k, v: LA(q, k, v, causal=False, backend="cpu"), (q, k, v))


# ---------------------------------------------------------------------------------------------
# State passing, decoding, packed sequences.

@pytest.mark.parametrize("feature_map", ["elu1", "taylor"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_state_chaining_equals_one_call(backend, device, feature_map):
    q, k, v = (torch.randn(2, 23, 2, 8, device=device) for _ in range(3))
    kw = dict(feature_map=feature_map, output_final_state=True)
    full, (S, z) = LA(q, k, v, **kw, backend=backend)
    out1, st = LA(q[:, :9], k[:, :9], v[:, :9], **kw, backend=backend)
    out2, (S2, z2) = LA(q[:, 9:], k[:, 9:], v[:, 9:], **kw, initial_state=st, backend=backend)
    ref64, ref_lp = _refs(q, k, v, kw)
    _assert_all((torch.cat((out1, out2), 1), S2, z2), ref64, ref_lp, "chained")


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity", "taylor"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_decoding_steps_equal_the_causal_output(backend, device, feature_map):
    B, T, H, Dk, Dv = 2, 7, 2, 8, 6
    q, k, v = torch.randn(B, T, H, Dk, device=device), torch.randn(B, T, H, Dk, device=device), \
        torch.randn(B, T, H, Dv, device=device)
    # identity features make phi(q).z cross zero, so a normalised output's error depends on the order of
    # summation, not on the kernel: identity is used (as flash-linear-attention uses it) without normalisation
    normalize = feature_map != "identity"
    kw = dict(feature_map=feature_map, normalize=normalize, output_final_state=True)
    ref64, ref_lp = _refs(q, k, v, kw)
    F = Dk + (feature_map == "taylor")
    state = (torch.zeros(B, H, F, Dv, device=device), None)
    for t in range(T):
        out, state = kxops.linear_attention_step(q[:, t], k[:, t], v[:, t], state, feature_map=feature_map,
                                                 normalize=normalize, backend=backend)
        assert_close_to_ref(out, ref64[0][:, t], ref_lp[0][:, t], f"step {t}")
    assert_close_to_ref(state[0], ref64[1], ref_lp[1], "S")
    assert_close_to_ref(state[1], ref64[2], ref_lp[2], "z")
    # (batch, 1, heads, D) in, the same layout out
    out4, _ = kxops.linear_attention_step(q[:, :1], k[:, :1], v[:, :1], (torch.zeros(B, H, F, Dv, device=device),
                                                                         None), feature_map=feature_map, backend=backend)
    assert out4.shape == (B, 1, H, Dv)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_step_gradients_match_reference(backend, device):
    q, k, v = torch.randn(2, 2, 8, device=device), torch.randn(2, 2, 8, device=device), torch.randn(2, 2, 4, device=device)
    S, z = _state(2, 2, 8, 4, device)
    g = [torch.randn(2, 2, 4, device=device), torch.randn(2, 2, 8, 4, device=device), torch.randn(2, 2, 8, device=device)]

    def run(b, dtype=torch.float32):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v, S, z)]
        out, (S1, z1) = kxops.linear_attention_step(*leaves[:3], tuple(leaves[3:]), backend=b)
        gs = torch.autograd.grad((out, S1, z1), leaves, [x.to(dtype) for x in g])
        return (out, S1, z1, *gs)

    for i, (o, r64, rlp) in enumerate(zip(run(backend), run("reference", torch.float64), run("reference"))):
        assert_close_to_ref(o, r64, rlp, f"step output/grad {i}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_varlen_equals_separate_calls(backend, device):
    lens = [4, 0, 11, 6]
    q, k, v, cu = _packed(lens, 2, 8, 6, torch.float32, device)
    out, (S, z) = LA(q, k, v, cu_seqlens=cu, rope=True, output_final_state=True, backend=backend)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o, (Sn, zn) = LA(q[None, a:b], k[None, a:b], v[None, a:b], rope=True, output_final_state=True,
                         backend=backend)
        torch.testing.assert_close(out[a:b], o[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S[n], Sn[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z[n], zn[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_causal_dot_product_is_the_primitive(backend, device):
    q, k, v = torch.randn(2, 9, 2, 8, device=device), torch.randn(2, 9, 2, 8, device=device), \
        torch.randn(2, 9, 2, 5, device=device)
    out = kxops.causal_dot_product(q, k, v, backend=backend)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()).tril()
    expected = torch.einsum("bhij,bjhe->bihe", scores, v.double())
    assert_close_to_ref(out, expected, kxops.causal_dot_product(q, k, v, backend="reference"))


def test_rope_rotates_the_numerator_only():
    # relativity: with RoPE the numerator's scores depend on position differences; the denominator not at all
    q, k, v = (torch.randn(1, 10, 1, 8, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(10)
    a = LA(q, k, v, rope=True, positions=pos, backend="cpu")
    b = LA(q, k, v, rope=True, positions=pos + 1234, backend="cpu")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(a, LA(q, k, v, backend="cpu"))


# ---------------------------------------------------------------------------------------------
# Ops and tracing.

def _opcheck_args(device):
    r = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    q, k, v = r(2, 7, 2, 8), r(2, 7, 2, 8), r(2, 7, 2, 6)
    S0, z0 = (t.requires_grad_() for t in _state(2, 2, 9, 6, device))
    inv = 10000.0 ** (-torch.arange(0, 8, 2, device=device) / 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    base = (None, None, None, False, 1, 0.35, True, 1e-6, True)
    return [
        (q, k, v, None, None, *base),
        (q, k, v, S0, z0, None, torch.arange(7, device=device)[None], inv.float(), True, 3, 0.5, True, 1e-6, True),
        (q[:1].detach(), k[:1].detach(), v[:1].detach(), None, None, cu, None, inv.float(), False, 2, 1.0, False, 0.0,
         False),
    ]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_opcheck(device):
    ops = torch.ops.kxops
    for args in _opcheck_args(device):
        opcheck(ops.linear_attention, args)
        out = ops.linear_attention(*args)
        g = (torch.randn_like(out[0]), torch.randn_like(out[1]), None)
        opcheck(ops.linear_attention_backward, (*g, *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)))
    q, k, v = (torch.randn(2, 3, 8, device=device) for _ in range(3))
    S, z = _state(2, 3, 8, 8, device)
    opcheck(ops.linear_attention_step, (q, k, v, S, z, 1, 0.35, True, 1e-6))


def _compiled_la():
    def f(q, k, v, S0, z0, backend):
        out, (S, z) = LA(q, k, v, feature_map="taylor", rope=True, initial_state=(S0, z0), output_final_state=True,
                         backend=backend)
        return out.square().sum() + S.sum() + z.sum(), out
    return f, compiled("linear_attention", f, dynamic=False)


@pytest.mark.parametrize(**COMPILABLE)
def test_compile_fullgraph_equals_eager(backend, device):
    eager, comp = _compiled_la()
    q, k, v = (torch.randn(2, 9, 2, 8, device=device, requires_grad=True) for _ in range(3))
    S0, z0 = (t.requires_grad_() for t in _state(2, 2, 9, 8, device))
    le, oe = eager(q, k, v, S0, z0, backend)
    ge = torch.autograd.grad(le, (q, k, v, S0, z0))
    lc, oc = comp(q, k, v, S0, z0, backend)
    gc = torch.autograd.grad(lc, (q, k, v, S0, z0))
    for a, b in zip((oe, *ge), (oc, *gc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


_CPP_OPS = ("kxops::linear_attention", "kxops::linear_attention_backward", "kxops::linear_attention_step")


class _LA(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v):
        out, (S, z) = LA(q, k, v, output_final_state=True, **self.kw)
        last = [t.select(1, -1) for t in (q, k, v)]  # (indexing a fake CUDA tensor needs a CUDA build)
        step, _ = kxops.linear_attention_step(*last, (S, z), backend=self.kw.get("backend", "auto"))
        return out * 2, step


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_export_fullgraph_on_cuda_tensors(backend):
    q, k, v = fake_cuda(((2, 9, 2, 8), torch.bfloat16), ((2, 9, 2, 8), torch.bfloat16), ((2, 9, 2, 6), torch.bfloat16))
    with stand_in_cuda_kernels(_CPP_OPS):
        ep = torch.export.export(_LA(backend=backend, rope=True), (q, k, v), strict=True)
        assert any("linear_attention_front" in t for t in called_ops(ep.graph))
        ep = ep.run_decompositions()
    targets = called_ops(ep.graph)
    assert "kxops.linear_attention.default" in targets and "kxops.linear_attention_step.default" in targets, targets


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q, K, V = _t(2, 5, 2, 8), _t(2, 5, 2, 8), _t(2, 5, 2, 4)
CU = torch.tensor([0, 2, 5], dtype=torch.int32)
BAD_INPUTS = [
    ("k-seq-differs", lambda: LA(Q, _t(2, 4, 2, 8), V), ValueError, "k must have q's shape (2, 5, 2, 8)"),
    ("k-Dk-differs", lambda: LA(Q, _t(2, 5, 2, 6), V), ValueError, "k must have q's shape"),
    ("v-heads-differ", lambda: LA(Q, K, _t(2, 5, 3, 4)), ValueError, "v must be (batch, seq, heads, Dv) with q's"),
    ("v-batch-differs", lambda: LA(Q, K, _t(1, 5, 2, 4)), ValueError, "v must be"),
    ("q-3d-without-cu-seqlens", lambda: LA(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 4)), ValueError,
     "q must be (batch, seq, heads, Dk)"),
    ("integer-q", lambda: LA(Q.long(), K, V), TypeError, "q must be a floating-point tensor"),
    ("dtype-mismatch", lambda: LA(Q, K.double(), V), TypeError, "q, k and v must have one dtype"),
    ("k-other-device", lambda: LA(Q, K.to("meta"), V), ValueError, "k must be on q's device cpu, got meta"),
    ("head-dim-too-big", lambda: LA(_t(1, 2, 1, 300), _t(1, 2, 1, 300), _t(1, 2, 1, 4)), ValueError,
     "head dims must be in [1, 256], got Dk=300"),
    ("unknown-feature-map", lambda: LA(Q, K, V, feature_map="softmax"), ValueError,
     "feature_map must be one of 'elu1', 'relu', 'identity', 'taylor', got 'softmax'"),
    ("state-not-a-tuple", lambda: LA(Q, K, V, initial_state=_t(2, 2, 8, 4)), TypeError,
     "initial_state must be a tuple (S, z)"),
    ("state-shape", lambda: LA(Q, K, V, initial_state=(_t(2, 2, 8, 5), None)), ValueError,
     "initial_state[0] (S) must have shape (2, 2, 8, 4), got (2, 2, 8, 5)"),
    ("state-taylor-feature-size", lambda: LA(Q, K, V, feature_map="taylor", initial_state=(_t(2, 2, 8, 4), None)),
     ValueError, "must have shape (2, 2, 9, 4)"),
    ("state-dtype", lambda: LA(Q, K, V, initial_state=(_t(2, 2, 8, 4, dtype=torch.bfloat16), None)), TypeError,
     "initial_state[0] (S) must be torch.float32"),
    ("z-shape", lambda: LA(Q, K, V, initial_state=(_t(2, 2, 8, 4), _t(2, 2, 4))), ValueError,
     "initial_state[1] (z) must have shape (2, 2, 8)"),
    ("cu-seqlens-int64", lambda: LA(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 4), cu_seqlens=CU.long()), TypeError,
     "cu_seqlens must be int32, got torch.int64"),
    ("cu-seqlens-end", lambda: LA(_t(6, 2, 8), _t(6, 2, 8), _t(6, 2, 4), cu_seqlens=CU), ValueError,
     "cu_seqlens must end at total_tokens=6, got 5"),
    ("cu-seqlens-decreasing", lambda: LA(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 4),
                                         cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    ("cu-seqlens-state-count", lambda: LA(_t(5, 2, 8), _t(5, 2, 8), _t(5, 2, 4), cu_seqlens=CU,
                                          initial_state=(_t(1, 2, 8, 4), None)), ValueError,
     "initial_state[0] (S) must have shape (2, 2, 8, 4)"),
    ("rope-odd-dk", lambda: LA(_t(1, 3, 1, 7), _t(1, 3, 1, 7), _t(1, 3, 1, 4), rope=True), ValueError,
     "rope=True needs an even head dimension Dk, got 7"),
    ("positions-without-rope", lambda: LA(Q, K, V, positions=torch.arange(5)), ValueError,
     "positions are RoPE positions: pass rope=True"),
    ("positions-shape", lambda: LA(Q, K, V, rope=True, positions=torch.arange(4)), ValueError,
     "positions must be (seq=5,) or (batch=2 or 1, seq)"),
    ("positions-float", lambda: LA(Q, K, V, rope=True, positions=torch.arange(5.0)), TypeError,
     "positions must be an integer tensor, got torch.float32"),
    ("bad-backend", lambda: LA(Q, K, V, backend="gpu"), ValueError, "backend must be one of"),
    ("float64-on-triton", lambda: LA(Q.double(), K.double(), V.double(), backend="triton"), TypeError,
     "float64 is supported by the 'cpu' and 'reference' backends only"),
    ("step-two-tokens", lambda: kxops.linear_attention_step(_t(2, 2, 2, 8), _t(2, 2, 2, 8), _t(2, 2, 2, 4),
                                                            (_t(2, 2, 8, 4), None)), ValueError,
     "one token per sequence"),
    ("step-state-shape", lambda: kxops.linear_attention_step(_t(2, 2, 8), _t(2, 2, 8), _t(2, 2, 4),
                                                             (_t(2, 2, 8, 5), None)), ValueError,
     "state[0] (S) must have shape (2, 2, 8, 4)"),
    ("step-state-missing", lambda: kxops.linear_attention_step(_t(2, 2, 8), _t(2, 2, 8), _t(2, 2, 4), None),
     TypeError, "state[0] (S) must be a torch.Tensor, got NoneType"),
]


@pytest.mark.parametrize(**bad_input_params(BAD_INPUTS))
def test_bad_input_error_names_the_argument(call, exc, message):
    assert_raises_with(call, exc, message)
