"""kxops.gumbel_softmax, gumbel_max and perturb_max_softmax against the float64 reference
(pyext/reference/gumbel_softmax.py, with its own Philox4x32-10) under the project's rule, on every backend this
machine runs (CPU; Triton in the interpreter without a GPU; CUDA and Triton on a GPU), forward and backward, with
the noise fixed by the generator's state (the same Philox key for the kernel and the reference); the sampling
properties (chi-square, means against torch's, seeds and generators); gradcheck, opcheck, torch.compile and
export; bad input one by one."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kxops
from kxops.reference import gumbel_softmax as R
from testing import (DTYPE_IDS, DTYPES, HAS_CUDA, INTERPRETING, assert_close_to_ref, assert_raises_with,
                     backends_where, bad_input_params, called_ops, compiled, fake_cuda, grads, masked_rows, opcheck,
                     stand_in_cuda_kernels, strided_rows)

_GS = importlib.import_module("kxops.gumbel_softmax")  # the module (kxops.gumbel_softmax is the function)
TRITON_OK = _GS.TRITON_KERNELS
RUNNABLE = backends_where(lambda b, d: b != "triton" or TRITON_OK)
NINF = float("-inf")


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


CASES = {
    "R3-N1": lambda g: (torch.randn(3, 1, generator=g), -1),
    "R4-N3": lambda g: (torch.randn(4, 3, generator=g) * 2, -1),
    "R5-N37": lambda g: (torch.randn(5, 37, generator=g) * 3, -1),
    "B2-N23-H3-dim1": lambda g: (torch.randn(2, 23, 3, generator=g) * 2, 1),
    "strided-dim2": strided_rows,
    "masked": masked_rows,
    "R2-N700": lambda g: (torch.randn(2, 700, generator=g) * 4, -1),
}


def _case(name, dtype, device):
    x, dim = CASES[name](torch.Generator().manual_seed(sum(map(ord, name))))
    return x.to(dtype).to(device), dim


def _rule(out, fn, xs, device, seed):
    """out (tensor or tuple) against fn(*xs, generator) with backend="reference" on float64 copies and in the
    test dtype, the generator in the same state (so the same Philox key)."""
    ref64 = fn(*(x.double() for x in xs), _gen(device, seed), "reference")
    ref_lp = fn(*xs, _gen(device, seed), "reference")
    if isinstance(out, torch.Tensor):
        out, ref64, ref_lp = (out,), (ref64,), (ref_lp,)
    for i, (o, r64, rlp) in enumerate(zip(out, ref64, ref_lp)):
        assert_close_to_ref(o, r64, rlp, f"output[{i}]")


# ---- Gumbel-softmax: the rule, forward and backward ---------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize(**RUNNABLE)
def test_gumbel_softmax_and_gradient_match_reference(backend, device, hard, dtype, case):
    x, dim = _case(case, dtype, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    tau = 0.7

    def fn(*ts):
        x_, gen, b = ts[0], ts[-2], ts[-1]
        return grads(lambda leaf: kxops.gumbel_softmax(leaf, tau, hard, dim, gen, backend=b), (x_,), (dy,))

    out = fn(x, _gen(device, 11), backend)
    _rule(out, fn, (x,), device, 11)
    if hard:  # the same one-hot as the reference in the test dtype, exactly
        assert torch.equal(out[0], fn(x, _gen(device, 11), "reference")[0])


@pytest.mark.parametrize(**RUNNABLE)
def test_float64(backend, device):
    if backend != "cpu":
        pytest.skip("float64 runs on the CPU kernel and the reference only")
    x, dim = _case("masked", torch.float64, device)
    for hard in (False, True):
        out = kxops.gumbel_softmax(x, 0.5, hard, dim, _gen(device, 2), backend=backend)
        ref = kxops.gumbel_softmax(x, 0.5, hard, dim, _gen(device, 2), backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(**RUNNABLE)
def test_outputs_are_distributions(backend, device):
    x, dim = _case("R5-N37", torch.float32, device)
    for tau in (1e-3, 0.1, 1.0, 1e3):
        y = kxops.gumbel_softmax(x, tau, generator=_gen(device, 5), backend=backend)
        assert torch.isfinite(y).all() and (y >= 0).all()
        torch.testing.assert_close(y.sum(-1), torch.ones(5, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(**RUNNABLE)
def test_extreme_tau_stays_finite(backend, device, dtype):
    """tau = 1e-3 (almost the one-hot sample) and 1e3 (almost uniform): finite values and gradients."""
    x = (torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3).to(dtype).to(device)
    for tau in (1e-3, 1e3):
        leaf = x.clone().requires_grad_()
        y = kxops.gumbel_softmax(leaf, tau, generator=_gen(device, 9), backend=backend)
        (y * torch.arange(50, device=device)).sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(leaf.grad).all()
        idx = kxops.gumbel_max(x, generator=_gen(device, 9), backend=backend)
        if tau == 1e-3:  # the soft sample is (nearly) the one-hot of the Gumbel-max sample
            assert torch.equal(y.float().argmax(-1), idx)
        else:
            assert (y.float() - 1 / 50).abs().max() < 0.05


@pytest.mark.parametrize(**RUNNABLE)
def test_hard_is_an_exact_one_hot_with_the_soft_gradient(backend, device):
    x = (torch.randn(6, 19, generator=torch.Generator().manual_seed(2)) * 2).to(device)
    w = torch.randn(6, 19, generator=torch.Generator().manual_seed(3)).to(device)
    hard_leaf, soft_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yh = kxops.gumbel_softmax(hard_leaf, 0.5, True, generator=_gen(device, 4), backend=backend)
    ys = kxops.gumbel_softmax(soft_leaf, 0.5, False, generator=_gen(device, 4), backend=backend)
    assert set(yh.unique().tolist()) <= {0.0, 1.0} and torch.equal(yh.sum(-1), torch.ones(6, device=device))
    assert torch.equal(yh.argmax(-1), kxops.gumbel_max(x, generator=_gen(device, 4), backend=backend))
    (yh * w).sum().backward()
    (ys * w).sum().backward()
    torch.testing.assert_close(hard_leaf.grad, soft_leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize(**RUNNABLE)
def test_masked_entries_are_never_chosen(backend, device):
    x, _ = _case("masked", torch.float32, device)
    xs = x.repeat(8 if (backend == "triton" and INTERPRETING) else 40, 1)
    idx = kxops.gumbel_max(xs, generator=_gen(device, 8), backend=backend)
    dead = torch.isinf(xs).all(-1)
    assert (idx[dead] == -1).all()
    assert torch.isfinite(xs[~dead].gather(1, idx[~dead, None])).all()
    leaf = xs.clone().requires_grad_()
    for hard in (False, True):
        y = kxops.gumbel_softmax(leaf, 0.5, hard, generator=_gen(device, 8), backend=backend)
        assert torch.isfinite(y).all() and (y[torch.isinf(xs)] == 0).all() and (y[dead] == 0).all()
        (g,) = torch.autograd.grad(y.sum(), leaf)
        assert torch.isfinite(g).all() and (g[dead] == 0).all()


@pytest.mark.parametrize(**RUNNABLE)
def test_rows_of_256k_entries(backend, device):
    x = (torch.randn(1, 262144, generator=torch.Generator().manual_seed(6)) * 3).to(device)
    x[0, ::7] = NINF
    dy = torch.randn(1, 262144, generator=torch.Generator().manual_seed(7)).to(device)

    def fn(x_, gen, b):
        return grads(lambda leaf: kxops.gumbel_softmax(leaf, 0.5, False, -1, gen, backend=b), (x_,), (dy,))

    _rule(fn(x, _gen(device, 1), backend), fn, (x,), device, 1)
    assert torch.equal(kxops.gumbel_max(x, generator=_gen(device, 1), backend=backend),
                       kxops.gumbel_max(x, generator=_gen(device, 1), backend="reference"))


# ---- sampling: seeds, generators, distributions ------------------------------------------------------------

@pytest.mark.parametrize(**RUNNABLE)
def test_seeds_and_generators(backend, device):
    x = torch.randn(8, 30, generator=torch.Generator().manual_seed(0)).to(device)

    def draw(**kw):
        return kxops.gumbel_softmax(x, backend=backend, **kw)

    torch.manual_seed(123)
    a, b = draw(), draw()
    torch.manual_seed(123)
    assert torch.equal(draw(), a) and not torch.equal(a, b)      # reproducible; successive calls differ
    g1, g2 = _gen(device, 5), _gen(device, 5)
    assert torch.equal(draw(generator=g1), draw(generator=g2))   # a generator is honoured...
    assert not torch.equal(draw(generator=g1), draw(generator=_gen(device, 6)))  # ...and advanced; seeds differ
    torch.manual_seed(123)
    draw(generator=_gen(device, 5))
    assert torch.equal(draw(), a)                                # ...and the default generator left alone


def test_reference_philox_is_philox4x32_10():
    """The reference's Philox against Random123's known-answer vectors (kat_vectors, philox4x32 10 rounds), and the
    contract's uniforms: open interval, exact in float32."""
    t = lambda v: torch.tensor([v])  # noqa: E731
    M = 0xFFFFFFFF
    kat = [(0, (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((M << 32) | M, (M, M, M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x299F31D0 << 32) | 0xA4093822, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for key, ctr, want in kat:
        got = tuple(int(w) for w in R.philox4x32_10(key, *(t(c) for c in ctr)))
        assert got == want, [hex(w) for w in got]
    u = R.uniforms(torch.tensor([-7]), 64, 1001)
    assert u.min() >= 2.0 ** -24 and u.max() <= 1 - 2.0 ** -24 and torch.equal(u.float().double(), u)


def test_backends_draw_identical_samples():
    """The same generator state gives the same Philox key, and every backend draws the same bits for it: the
    samples are equal across backends (CPU kernel, Triton, the reference's own Philox; CUDA and Triton on GPU
    tensors). CPU and CUDA generators differ, so CPU and GPU calls give different samples."""
    x = (torch.randn(64, 45, generator=torch.Generator().manual_seed(1)) * 2)
    pairs = [(b, d) for b, d in [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"),
                                 ("triton", "cuda"), ("reference", "cuda")]
             if (d == "cpu" or HAS_CUDA) and (b != "triton" or (TRITON_OK and (d == "cuda" or INTERPRETING)))]
    by_device = {}
    for b, d in pairs:
        idx = kxops.gumbel_max(x.to(d), generator=_gen(d, 77), backend=b).cpu()
        one = kxops.gumbel_softmax(x.to(d), 0.3, True, generator=_gen(d, 77), backend=b).argmax(-1).cpu()
        assert torch.equal(idx, one), (b, d)
        by_device.setdefault(d, []).append((b, idx))
    for d, got in by_device.items():
        for b, idx in got[1:]:
            assert torch.equal(idx, got[0][1]), (b, d)


def _chi2_critical_0001(df):
    # Wilson-Hilferty: the 0.999 quantile of chi-square(df)
    z = 3.090232
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(**RUNNABLE)
def test_gumbel_max_frequencies_follow_softmax(backend, device):
    """Chi-square goodness of fit of many samples (one call, a fixed seed) to softmax(logits), at the 0.1% level."""
    # the interpreter runs a program per row at milliseconds each: fewer draws there, over logits whose smallest
    # probability still expects >= 10 counts (the chi-square approximation's condition)
    slow = backend == "triton" and INTERPRETING
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, NINF, 0.5] + ([] if slow else [-3.0]))
    n = 500 if slow else 40000
    C = logits.numel()
    idx = kxops.gumbel_max(logits.to(device).expand(n, C).contiguous(), generator=_gen(device, 2024),
                           backend=backend).cpu()
    counts = torch.bincount(idx, minlength=C).double()
    expected = torch.softmax(logits.double(), 0) * n
    assert counts[4] == 0
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < _chi2_critical_0001(int(keep.sum()) - 1), (chi2, counts, expected)


@pytest.mark.parametrize(**RUNNABLE)
def test_soft_means_match_torch_gumbel_softmax(backend, device):
    """E[y] of our soft samples and of torch.nn.functional.gumbel_softmax's agree (within 5 standard errors)."""
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4])
    n = 500 if (backend == "triton" and INTERPRETING) else 20000
    xs = logits.to(device).expand(n, 5).contiguous()
    ours = kxops.gumbel_softmax(xs, 0.6, generator=_gen(device, 31), backend=backend).double().cpu()
    torch.manual_seed(31)
    theirs = F.gumbel_softmax(xs, tau=0.6).double().cpu()
    se = (ours.var(0) / n + theirs.var(0) / n).sqrt()
    assert ((ours.mean(0) - theirs.mean(0)).abs() < 5 * se).all(), (ours.mean(0), theirs.mean(0), se)


# ---- perturb-max --------------------------------------------------------------------------------------------

PM_CASES = ["R3-N1", "R4-N3", "R5-N37", "B2-N23-H3-dim1", "strided-dim2", "masked"]


@pytest.mark.parametrize("K", [2, 16])
@pytest.mark.parametrize("case", PM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(**RUNNABLE)
def test_perturb_max_and_gradient_match_reference(backend, device, dtype, case, K):
    if backend == "triton" and INTERPRETING and K > 2 and not (dtype == torch.float32 and case == "masked"):
        pytest.skip("interpreter time: K = 16 runs on the masked fp32 case here (and K = 2, 5, 16 in "
                    "test_gumbel_softmax_triton_kernels.py); every case on a GPU")
    x, dim = _case(case, dtype, device)
    dp = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)

    def fn(x_, b):
        return grads(lambda leaf: kxops.perturb_max_softmax(leaf, "gaussian", K, dim, backend=b), (x_,), (dp,))

    out = fn(x, backend)
    ref64, ref_lp = fn(x.double(), "reference"), fn(x, "reference")
    for i, (o, r64, rlp) in enumerate(zip(out, ref64, ref_lp)):
        assert_close_to_ref(o, r64, rlp, f"output[{i}]")


@pytest.mark.parametrize(**RUNNABLE)
def test_perturb_max_gumbel_is_softmax(backend, device):
    x, dim = _case("masked", torch.float32, device)
    x = x[[0, 1, 3, 4]]
    dp = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out = grads(lambda leaf: kxops.perturb_max_softmax(leaf, "gumbel", 64, dim, backend=backend), (x,), (dp,))
    ref = grads(lambda leaf: torch.softmax(leaf, dim), (x,), (dp,))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=1e-7)


def test_perturb_max_properties():
    """The spec's properties: non-negative, sums to 1, order preserving, shift invariant; N = 2 equal entries
    give 1/2 each; and the Gaussian probabilities agree with Monte-Carlo frequencies of argmax(x + eps)."""
    x = torch.tensor([[0.5, -0.2, 1.3, 0.0, 1.3, -2.0]], dtype=torch.float64)
    p = kxops.perturb_max_softmax(x, num_quantiles=64)
    assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-12
    order = x[0].argsort()
    assert (p[0, order].diff() >= -1e-15).all() and abs(p[0, 2] - p[0, 4]) < 1e-15
    torch.testing.assert_close(kxops.perturb_max_softmax(x + 3.7, num_quantiles=64), p, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(kxops.perturb_max_softmax(torch.zeros(1, 2), num_quantiles=5), torch.full((1, 2), 0.5))
    g = torch.Generator().manual_seed(0)
    n = 400000
    eps = torch.randn(n, 6, generator=g, dtype=torch.float64)
    freq = torch.bincount((x + eps).argmax(-1), minlength=6).double() / n
    # the quadrature's own error (mid-point quantiles miss the tails) shrinks with K down to the Monte-Carlo
    # noise (standard error ~8e-4 here): 7.4e-3 at K = 64, 1.4e-3 at K = 1024
    errs = [(freq - kxops.perturb_max_softmax(x, num_quantiles=K)[0]).abs().max().item() for K in (16, 64, 1024)]
    assert errs[0] > errs[1] > errs[2] and errs[1] < 0.01 and errs[2] < 0.0025, errs


def test_perturb_max_quadrature_converges_to_the_integral():
    """As K grows, the quadrature's raw sum approaches 1 (so the renormalisation changes less and less)."""
    x = torch.tensor([[0.5, -0.2, 1.3, 0.0, 2.3, -2.0, 0.1]], dtype=torch.float64)
    gaps = []
    for K in (4, 16, 64, 256):
        z = R.perturb_max_nodes(K)
        d = x[0, :, None, None] - x[0, None, :, None] + z
        L = torch.special.log_ndtr(d) * (1 - torch.eye(7, dtype=torch.float64))[..., None]
        gaps.append(abs(torch.exp(L.sum(1)).mean(-1).sum().item() - 1))
    assert gaps[-1] < gaps[0] and gaps[-1] < 0.02, gaps


# ---- tooling: gradcheck, opcheck, compile, export -----------------------------------------------------------

def test_gradcheck_cpu_float64():
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 2] = NINF
    for hard in (False, True):
        # hard: the straight-through gradient is the soft one's (checked against it above), not y's derivative
        if hard:
            continue
        torch.autograd.gradcheck(lambda t: kxops.gumbel_softmax(t, 0.7, hard, generator=_gen("cpu", 3)),
                                 (x.clone().requires_grad_(),))
    torch.autograd.gradcheck(lambda t: kxops.perturb_max_softmax(t, num_quantiles=8), (x.clone().requires_grad_(),))
    torch.autograd.gradcheck(lambda t: kxops.perturb_max_softmax(t, "gumbel"), (x.clone().requires_grad_(),))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_opcheck_kernels(device):
    x = torch.randn(4, 9, device=device, requires_grad=True)
    seed = torch.tensor([12345], device=device)
    nodes = R.perturb_max_nodes(5, device)
    for hard in (False, True):
        opcheck(torch.ops.kxops.gumbel_softmax.default, (x, seed, 0.5, hard))
    opcheck(torch.ops.kxops.gumbel_softmax.default, (x, None, 1.0, False))
    y = torch.softmax(x.detach(), -1)
    opcheck(torch.ops.kxops.gumbel_softmax_backward.default, (torch.randn(4, 9, device=device), y, 0.5))
    opcheck(torch.ops.kxops.gumbel_max.default, (x.detach(), seed))
    opcheck(torch.ops.kxops.perturb_max.default, (x, nodes))
    opcheck(torch.ops.kxops.perturb_max_backward.default, (torch.randn(4, 9, device=device), x.detach(), nodes))


@pytest.mark.skipif(not (HAS_CUDA and TRITON_OK), reason="Triton ops are traced on a GPU only")
def test_opcheck_triton_ops_schema_and_fakes():
    x = torch.randn(4, 9, device="cuda")
    seed = torch.tensor([12345], device="cuda")
    nodes = R.perturb_max_nodes(5, "cuda")
    for hard in (False, True):
        opcheck(torch.ops.kxops.gumbel_softmax_triton.default, (x, seed, 0.5, hard), full=False)
    opcheck(torch.ops.kxops.gumbel_max_triton.default, (x, seed), full=False)
    opcheck(torch.ops.kxops.perturb_max_triton.default, (x, nodes), full=False)


def _everything(x, backend):
    return (kxops.gumbel_softmax(x, 0.5, backend=backend) + kxops.gumbel_softmax(x, 2.0, True, backend=backend)
            + kxops.perturb_max_softmax(x, num_quantiles=4, backend=backend)
            + kxops.perturb_max_softmax(x, "gumbel", backend=backend)), kxops.gumbel_max(x, backend=backend)


@pytest.mark.parametrize(**backends_where(lambda b, d: not (b == "triton" and (INTERPRETING or not TRITON_OK))))
def test_compile_fullgraph(backend, device):
    """Every function under torch.compile(fullgraph=True), forward and backward. With Inductor's
    fallback_random the seed draw is torch's eager randint, so the compiled call equals the eager one for the
    same manual_seed; either way successive compiled calls differ."""
    x = (torch.randn(4, 12, generator=torch.Generator().manual_seed(4)) * 2).to(device)
    w = torch.randn(4, 12, generator=torch.Generator().manual_seed(5)).to(device)
    fn = compiled(f"gumbel_softmax-{backend}", lambda x: _everything(x, backend),
                  options={"fallback_random": True})
    torch.manual_seed(0)
    leaf = x.clone().requires_grad_()
    y, idx = fn(leaf)
    (g,) = torch.autograd.grad((y * w).sum(), leaf)
    torch.manual_seed(0)
    leaf2 = x.clone().requires_grad_()
    y2, idx2 = _everything(leaf2, backend)
    (g2,) = torch.autograd.grad((y2 * w).sum(), leaf2)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g, g2)
    assert torch.equal(idx, idx2)
    assert not torch.equal(fn(x)[0], fn(x)[0])


_CPP_OPS = ("kxops::gumbel_softmax", "kxops::gumbel_softmax_backward", "kxops::gumbel_max", "kxops::perturb_max",
            "kxops::perturb_max_backward")


class _All(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x):
        return (kxops.gumbel_softmax(x, 0.5, True, backend=self.backend), kxops.gumbel_max(x, backend=self.backend),
                kxops.perturb_max_softmax(x, num_quantiles=3, backend=self.backend))


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_export_fullgraph_on_cuda_tensors(backend):
    """Strict export over fake CUDA tensors: the seed draw, the GPU's backend choice and the fakes trace
    without a break."""
    (x,) = fake_cuda(((4, 7), torch.bfloat16))
    with stand_in_cuda_kernels(_CPP_OPS):
        ep = torch.export.export(_All(backend), (x,), strict=True)
        assert any("gumbel_softmax_front" in n for n in called_ops(ep.graph))
        ep = ep.run_decompositions()
    targets = called_ops(ep.graph)
    assert {"kxops.gumbel_softmax.default", "kxops.gumbel_max.default", "kxops.perturb_max.default"} <= targets
    assert any("randint" in t for t in targets), targets


# ---- bad input --------------------------------------------------------------------------------------------------

def _bad(name):
    x = torch.randn(3, 5)
    calls = {
        "tau-zero": (lambda: kxops.gumbel_softmax(x, 0.0), ValueError,
                     "gumbel_softmax: tau must be a positive finite number, got 0"),
        "tau-negative": (lambda: kxops.gumbel_softmax(x, -1.0), ValueError, "tau must be a positive finite number"),
        "tau-inf": (lambda: kxops.gumbel_softmax(x, float("inf")), ValueError, "tau must be a positive finite"),
        "tau-nan": (lambda: kxops.gumbel_softmax(x, float("nan")), ValueError, "tau must be a positive finite"),
        "tau-str": (lambda: kxops.gumbel_softmax(x, "1"), TypeError, "gumbel_softmax: tau must be a float"),
        "integer-logits": (lambda: kxops.gumbel_softmax(torch.ones(3, 4, dtype=torch.long)), TypeError,
                           "gumbel_softmax: logits must be a floating-point tensor"),
        "integer-logits-max": (lambda: kxops.gumbel_max(torch.ones(3, 4, dtype=torch.int32)), TypeError,
                               "gumbel_max: logits must be a floating-point tensor"),
        "integer-x-perturb": (lambda: kxops.perturb_max_softmax(torch.ones(3, 4, dtype=torch.long)), TypeError,
                              "perturb_max_softmax: x must be a floating-point tensor"),
        "logits-list": (lambda: kxops.gumbel_softmax([1.0, 2.0]), TypeError, "logits must be a tensor"),
        "bad-noise": (lambda: kxops.perturb_max_softmax(x, "uniform"), ValueError,
                      "perturb_max_softmax: noise must be 'gaussian' or 'gumbel', got 'uniform'"),
        "noise-not-str": (lambda: kxops.perturb_max_softmax(x, 1), TypeError, "noise must be a str"),
        "quantiles-one": (lambda: kxops.perturb_max_softmax(x, num_quantiles=1), ValueError,
                          "num_quantiles must be >= 2, got 1"),
        "quantiles-one-gumbel": (lambda: kxops.perturb_max_softmax(x, "gumbel", 1), ValueError,
                                 "num_quantiles must be >= 2"),
        "quantiles-float": (lambda: kxops.perturb_max_softmax(x, num_quantiles=8.0), TypeError,
                            "num_quantiles must be an int"),
        "dim-out-of-range": (lambda: kxops.gumbel_softmax(x, dim=2), IndexError, "Dimension out of range"),
        "gumbel-max-empty-dim": (lambda: kxops.gumbel_max(torch.randn(3, 0)), ValueError,
                                 "gumbel_max: logits must have at least one entry along dim 1"),
        "seed-float": (lambda: torch.ops.kxops.gumbel_softmax_front(x, torch.tensor([1.0]), 1.0, False, -1, "auto"),
                       TypeError, "gumbel_softmax: seed must be an int64 tensor"),
        "seed-two": (lambda: torch.ops.kxops.gumbel_max_front(x, torch.tensor([1, 2]), -1, "auto"), ValueError,
                     "gumbel_max: seed must have exactly one element"),
        "bad-backend": (lambda: kxops.gumbel_softmax(x, backend="gpu"), ValueError, "backend must be one of"),
        "cuda-backend-on-cpu": (lambda: kxops.gumbel_max(x, backend="cuda"), ValueError,
                                "backend='cuda' needs CUDA"),
    }
    return calls[name]


BAD = ["tau-zero", "tau-negative", "tau-inf", "tau-nan", "tau-str", "integer-logits", "integer-logits-max",
       "integer-x-perturb", "logits-list", "bad-noise", "noise-not-str", "quantiles-one", "quantiles-one-gumbel",
       "quantiles-float", "dim-out-of-range", "gumbel-max-empty-dim", "seed-float", "seed-two", "bad-backend",
       "cuda-backend-on-cpu"]


@pytest.mark.parametrize(**bad_input_params([(n, *_bad(n)) for n in BAD]))
def test_bad_input(call, exc, message):
    assert_raises_with(call, exc, message)


def test_empty_and_scalar_inputs():
    assert kxops.gumbel_softmax(torch.randn(0, 5)).shape == (0, 5)
    assert kxops.gumbel_softmax(torch.randn(3, 0)).shape == (3, 0)
    assert kxops.gumbel_softmax(torch.tensor(2.0)) == 1
    assert kxops.gumbel_max(torch.tensor(2.0)) == 0 and kxops.gumbel_max(torch.tensor(2.0)).shape == ()
    assert kxops.gumbel_max(torch.randn(0, 5)).shape == (0,)
    assert kxops.perturb_max_softmax(torch.randn(2, 0, 3), dim=1).shape == (2, 0, 3)
