"""kxops.sparsemax, entmax15, entmax, topk_softmax and their losses against the float64 reference
(pyext/reference/sparse_softmax.py, sort-based) under the project's rule, on every backend this machine
runs (CPU; Triton in the interpreter without a GPU; CUDA and Triton on a GPU), forward and backward; the
spec's properties; gradcheck, opcheck, torch.compile and export; bad input one by one."""
import pytest
import torch

import kxops
from kxops import sparse_softmax as _SSM
from kxops.reference import sparse_softmax as R
from testing import (DTYPE_IDS, DTYPES, HAS_CUDA, INTERPRETING, assert_close_to_ref, assert_raises_with,
                     backends_where, bad_input_params, called_ops, compiled, fake_cuda, grads, masked_rows, opcheck,
                     stand_in_cuda_kernels, strided_rows)

TRITON_OK = _SSM.TRITON_KERNELS
RUNNABLE = backends_where(lambda b, d: b != "triton" or TRITON_OK)


def _ties(g):
    # random values, each twice (ties inside and outside the support, none at the threshold by construction)
    r = torch.randn(3, 12, generator=g) * 2
    return torch.cat([r, r.flip(-1)], -1), -1


CASES = {
    "R3-N1": lambda g: (torch.randn(3, 1, generator=g), -1),
    "R4-N2": lambda g: (torch.randn(4, 2, generator=g) * 2, -1),
    "R5-N37": lambda g: (torch.randn(5, 37, generator=g) * 3, -1),
    "B2-N23-H3-dim1": lambda g: (torch.randn(2, 23, 3, generator=g) * 2, 1),
    "strided-dim2": strided_rows,
    "ties": _ties,
    "masked": masked_rows,
    "R2-N700": lambda g: (torch.randn(2, 700, generator=g) * 4, -1),
}


def _case(name, dtype, device):
    x, dim = CASES[name](torch.Generator().manual_seed(sum(map(ord, name))))
    return x.to(dtype).to(device), dim


def _alpha(x, dim, device):
    shape = list(x.shape)
    shape[dim] = 1
    g = torch.Generator().manual_seed(7)
    return (1.1 + 0.8 * torch.rand(shape, generator=g)).to(x.dtype).to(device)  # alpha in the model's dtype


ACTIVATIONS = {
    "sparsemax": lambda x, a, dim, **kw: kxops.sparsemax(x, dim, **kw),
    "entmax15": lambda x, a, dim, **kw: kxops.entmax15(x, dim, **kw),
    "entmax-1.3": lambda x, a, dim, **kw: kxops.entmax(x, 1.3, dim, **kw),
    "entmax-alpha-rows": lambda x, a, dim, **kw: kxops.entmax(x, a, dim, **kw),
    "topk3": lambda x, a, dim, **kw: kxops.topk_softmax(x, min(3, x.shape[dim]), dim, **kw),
}


def _check_activation(fn_name, backend, device, dtype, x, dim, with_alpha_grad):
    fn = ACTIVATIONS[fn_name]
    a = _alpha(x, dim, device)
    dp = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    inputs = (x, a) if with_alpha_grad else (x,)

    def run(backend_, *ts):
        return lambda *leaves: fn(leaves[0], leaves[1] if with_alpha_grad else ts[0], dim, backend=backend_)

    out = grads(run(backend, a), inputs, (dp,))
    ref64 = grads(run("reference", a.double()), tuple(t.double() for t in inputs), (dp.double(),))
    ref_lp = grads(run("reference", a), inputs, (dp,))
    names = ["p", "dx", "dalpha"]
    for i, (o, r64, rlp) in enumerate(zip(out, ref64, ref_lp)):
        assert_close_to_ref(o, r64, rlp, names[i])
    return out[0]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("fn_name", list(ACTIVATIONS))
@pytest.mark.parametrize(**RUNNABLE)
def test_activation_and_gradients_match_reference(backend, device, fn_name, dtype, case):
    x, dim = _case(case, dtype, device)
    p = _check_activation(fn_name, backend, device, dtype, x, dim, fn_name == "entmax-alpha-rows")
    sums = p.double().sum(dim)
    live = x.double().amax(dim) > float("-inf")
    assert (p >= 0).all()
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=0)
    assert (sums[~live] == 0).all()


@pytest.mark.parametrize(**RUNNABLE)
def test_float64_on_cpu(backend, device):
    if backend != "cpu":
        pytest.skip("float64 runs on the cpu and reference backends")
    for fn_name in ACTIVATIONS:
        x, dim = _case("masked", torch.float64, device)
        _check_activation(fn_name, backend, device, torch.float64, x, dim, fn_name == "entmax-alpha-rows")


LOSSES = {
    "sparsemax_loss": lambda x, t, **kw: kxops.sparsemax_loss(x, t, **kw),
    "entmax15_loss": lambda x, t, **kw: kxops.entmax15_loss(x, t, **kw),
    "topk_softmax_cross_entropy": lambda x, t, **kw: kxops.topk_softmax_cross_entropy(x, t, 4, **kw),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize(**RUNNABLE)
def test_loss_and_gradient_match_reference(backend, device, loss, dtype, reduction):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 3, 19, generator=g) * 3).to(dtype).to(device)
    x[0, 1, :10] = float("-inf")  # masked entries, the target among the live ones
    t = torch.randint(0, 19, (2, 3), generator=g).to(device)
    t[0, 1] = 15
    t[1, 2] = -100  # ignored
    fn = LOSSES[loss]
    gl = torch.randn(2, 3) if reduction == "none" else torch.tensor(1.7)
    out = grads(lambda x: fn(x, t, reduction=reduction, backend=backend), (x,), (gl.to(device),))
    ref64 = grads(lambda x: fn(x, t, reduction=reduction, backend="reference"), (x.double(),), (gl.double().to(device),))
    ref_lp = grads(lambda x: fn(x, t, reduction=reduction, backend="reference"), (x,), (gl.to(device),))
    for name, o, r64, rlp in zip(("loss", "dx"), out, ref64, ref_lp):
        assert_close_to_ref(o, r64, rlp, name)


# ---- the spec's properties ----------------------------------------------------------------------------------

def spec_sparsemax_ref(x, dim=-1):
    """../shared/spec/softmaxes.md's reference, verbatim."""
    zs = x.sort(dim, descending=True).values
    shape = [1] * x.dim()
    shape[dim] = -1
    r = torch.arange(1, x.size(dim) + 1, dtype=x.dtype).view(shape)
    lam_k = (zs.cumsum(dim) - 1) / r
    support = (zs > lam_k).sum(dim, keepdim=True)
    lam = lam_k.gather(dim, support - 1)
    return (x - lam).clamp_min(0)


def entmax15_closed_form(x):
    """Peters et al.'s sort-based entmax15, written out for one row: tau from the largest k with tau_k <= z_(k)."""
    z = (x - x.max()) / 2
    zs = z.sort(descending=True).values
    best = None
    for k in range(1, len(zs) + 1):
        top = zs[:k]
        tau = top.mean() - torch.sqrt((1 / k - (top * top).mean() + top.mean() ** 2).clamp_min(0))
        if tau <= zs[k - 1]:
            best = tau
    return (z - best).clamp_min(0) ** 2


@pytest.mark.parametrize(**RUNNABLE)
def test_sparsemax_and_entmax15_are_the_closed_forms(backend, device):
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)) * 3
    torch.testing.assert_close(kxops.sparsemax(x.to(device), backend=backend).cpu(), spec_sparsemax_ref(x),
                               atol=2e-6, rtol=0)
    want = torch.stack([entmax15_closed_form(r.double()) for r in x]).float()
    torch.testing.assert_close(kxops.entmax15(x.to(device), backend=backend).cpu(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(R.sparsemax(x.double()), spec_sparsemax_ref(x.double()), atol=1e-14, rtol=0)


@pytest.mark.parametrize(**RUNNABLE)
def test_entmax_special_alphas(backend, device):
    """alpha = 2 is sparsemax, 1.5 is entmax15 (bisection with a tensor alpha, closed forms with a float one);
    alpha -> 1 approaches softmax; top-k with k = n is softmax."""
    x = (torch.randn(4, 30, generator=torch.Generator().manual_seed(9)) * 2).to(device)
    two, one_five = torch.full((4, 1), 2.0, device=device), torch.full((4, 1), 1.5, device=device)
    sm, e15 = kxops.sparsemax(x, backend=backend), kxops.entmax15(x, backend=backend)
    torch.testing.assert_close(kxops.entmax(x, two, backend=backend), sm, atol=1e-5, rtol=0)
    torch.testing.assert_close(kxops.entmax(x, one_five, backend=backend), e15, atol=1e-5, rtol=0)
    assert torch.equal(kxops.entmax(x, 2.0, backend=backend), sm)
    assert torch.equal(kxops.entmax(x, 1.5, backend=backend), e15)
    torch.testing.assert_close(kxops.entmax(x, 1.001, backend=backend), x.softmax(-1), atol=2e-2, rtol=0)
    torch.testing.assert_close(kxops.topk_softmax(x, 30, backend=backend), x.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(**RUNNABLE)
def test_ties_at_the_threshold(backend, device):
    """Equal entries at the threshold get exactly 0 (sparsemax of [1, 0, 0] is [1, 0, 0]); equal entries at
    the k-th value of top-k go to the lower indices."""
    x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, -0.5], [2.0, 1.0, 1.0]], device=device)
    assert torch.equal(kxops.sparsemax(x, backend=backend).cpu(),
                       torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    y = torch.tensor([[2.0, 2.0, 2.0, 2.0]], device=device)  # every entry at z = 0, tau = -1/4 (sparsemax)
    assert torch.equal(kxops.sparsemax(y, backend=backend).cpu(), torch.full((1, 4), 0.25))
    z = torch.tensor([[0.0, 3.0, 1.0, 3.0, 1.0, 1.0, -2.0]], device=device)
    p = kxops.topk_softmax(z, 4, backend=backend).cpu()
    assert (p[0] > 0).tolist() == [False, True, True, True, True, False, False]
    e = torch.exp(torch.tensor([0.0, 3.0, 1.0, 3.0, 1.0]) - 3)
    torch.testing.assert_close(p[0, :5], torch.cat([torch.zeros(1), e[1:] / e[1:].sum()]))


@pytest.mark.parametrize(**RUNNABLE)
def test_all_masked_rows_give_zeros_and_infinite_loss(backend, device):
    x = torch.full((2, 5), float("-inf"), device=device)
    x[1, 2] = 0.3
    for p in (kxops.sparsemax(x, backend=backend), kxops.entmax15(x, backend=backend),
              kxops.entmax(x, 1.7, backend=backend), kxops.topk_softmax(x, 2, backend=backend)):
        assert torch.equal(p.cpu(), torch.tensor([[0.0] * 5, [0, 0, 1.0, 0, 0]]))
    t = torch.tensor([1, 2], device=device)
    for loss in LOSSES.values():
        rows = loss(x, t, reduction="none", backend=backend).cpu()
        assert rows[0] == float("inf") and rows[1] == 0
        ignored = loss(x, torch.tensor([-100, 2], device=device), reduction="none", backend=backend).cpu()
        assert ignored[0] == 0
    xx = x.clone().requires_grad_()
    dx, = torch.autograd.grad(kxops.sparsemax(xx, backend=backend), xx, torch.ones_like(x))
    assert torch.equal(dx, torch.zeros_like(x))


@pytest.mark.parametrize(**RUNNABLE)
def test_mean_over_ignored_rows_only_is_nan_as_cross_entropy(backend, device):
    x = torch.randn(3, 6, device=device)
    t = torch.full((3,), -100, device=device)
    assert torch.isnan(kxops.sparsemax_loss(x, t, backend=backend))
    assert torch.isnan(torch.nn.functional.cross_entropy(x, t))
    assert kxops.sparsemax_loss(x, t, reduction="sum", backend=backend) == 0


@pytest.mark.parametrize(**RUNNABLE)
def test_rows_of_256k_entries(backend, device):
    """The longest rows the issue names (past every on-chip cap: the streamed passes), forward and backward."""
    rows = 1 if backend == "triton" and INTERPRETING else 2  # the interpreter: ~15 s a row
    x = (torch.randn(rows, 262144, generator=torch.Generator().manual_seed(1)) * 4).to(device)
    dp = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for fn in (kxops.sparsemax, kxops.entmax15, lambda x, **kw: kxops.topk_softmax(x, 1000, **kw)):
        out = grads(lambda x: fn(x, backend=backend), (x,), (dp,))
        ref64 = grads(lambda x: fn(x, backend="reference"), (x.double(),), (dp.double(),))
        ref_lp = grads(lambda x: fn(x, backend="reference"), (x,), (dp,))
        for name, o, r64, rlp in zip(("p", "dx"), out, ref64, ref_lp):
            assert_close_to_ref(o, r64, rlp, name)


def test_sparsemax_loss_is_the_spec_formula():
    """sparsemax loss = 1/2 - x_t + sum_S (x_i^2 - tau^2) / 2 (the spec's form; the kernels compute the entmax
    package's omega(p) + p . x - x_t)."""
    x = torch.randn(4, 9, dtype=torch.float64) * 2
    t = torch.tensor([0, 3, 8, 5])
    p = R.sparsemax(x)
    rows = []
    for r in range(4):
        on = p[r] > 0
        tau = (x[r] - p[r])[on][0]  # x_i - p_i = tau on the support
        rows.append(0.5 - x[r, t[r]] + ((x[r][on] ** 2 - tau ** 2) / 2).sum())
    torch.testing.assert_close(kxops.sparsemax_loss(x, t, reduction="none", backend="cpu"), torch.stack(rows))


# ---- gradcheck, opcheck, compile, export ---------------------------------------------------------------------------

def test_gradcheck_cpu_float64():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    a = (1.2 + torch.rand(3, 1, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.tensor([1, 4, -100])
    assert torch.autograd.gradcheck(lambda x: kxops.sparsemax(x, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x: kxops.entmax15(x, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x, a: kxops.entmax(x, a, n_iter=100, backend="cpu"), (x, a))
    assert torch.autograd.gradcheck(lambda x: kxops.topk_softmax(x, 4, backend="cpu"), (x,))
    for loss in LOSSES.values():
        assert torch.autograd.gradcheck(lambda x: loss(x, t, reduction="none", backend="cpu"), (x,))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_opcheck_kernels(device):
    """The C++ kernel ops (CPU; CUDA on a GPU) in full; the Triton ops' schema and fakes on a GPU."""
    x = (torch.randn(3, 10) * 2).to(device)
    a = torch.full((3,), 1.4, device=device)
    t = torch.tensor([0, 9, -100], device=device)
    k = torch.ops.kxops
    ops = [(k.entmax.default, k.entmax_backward.default, k.topk_softmax.default, True)]
    if device == "cuda" and TRITON_OK:
        ops.append((k.entmax_triton.default, k.entmax_backward_triton.default, k.topk_softmax_triton.default, False))
    for fwd, bwd, topk, full in ops:
        opcheck(fwd, (x.clone().requires_grad_(), None, 0, 0, t, -100), full)
        opcheck(fwd, (x.clone().requires_grad_(), None, 1, 0, None, -100), full)
        opcheck(fwd, (x.clone().requires_grad_(), a.clone().requires_grad_(), 2, 30, None, -100), full)
        opcheck(topk, (x.clone().requires_grad_(), 3, t, -100), full)
        p = fwd(x, a, 2, 30, None, -100)[0]
        opcheck(bwd, (torch.randn_like(x), p, a, 2, True), full)


def _everything(x, a, t, backend):
    return (kxops.sparsemax(x, backend=backend) + kxops.entmax15(x, backend=backend)
            + kxops.entmax(x, a, backend=backend) + kxops.topk_softmax(x, 3, backend=backend)).square().sum() + \
        kxops.sparsemax_loss(x, t, backend=backend) + kxops.entmax15_loss(x, t, backend=backend) + \
        kxops.topk_softmax_cross_entropy(x, t, 3, backend=backend)


@pytest.mark.parametrize(**backends_where(lambda b, d: not (b == "triton" and (INTERPRETING or not TRITON_OK))))
def test_compile_fullgraph(backend, device):
    """Every function under torch.compile(fullgraph=True), forward and backward, equal to eager."""
    x = (torch.randn(4, 12, generator=torch.Generator().manual_seed(4)) * 2).to(device)
    a = torch.full((4, 1), 1.3, device=device)
    t = torch.tensor([0, 5, -100, 11], device=device)
    fn = compiled(f"sparse_softmax-{backend}", lambda x, a, t: _everything(x, a, t, backend))
    leaves = (x.clone().requires_grad_(), a.clone().requires_grad_())
    out = fn(*leaves, t)
    g = torch.autograd.grad(out, leaves)
    leaves2 = (x.clone().requires_grad_(), a.clone().requires_grad_())
    out2 = _everything(*leaves2, t, backend)
    g2 = torch.autograd.grad(out2, leaves2)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(g, g2)


_CPP_OPS = ("kxops::entmax", "kxops::entmax_backward", "kxops::topk_softmax")


class _All(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x, a, t):
        return (kxops.sparsemax(x, backend=self.backend), kxops.entmax(x, a, backend=self.backend),
                kxops.topk_softmax(x, 2, backend=self.backend), kxops.entmax15_loss(x, t, backend=self.backend),
                kxops.topk_softmax_cross_entropy(x, t, 2, backend=self.backend))


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_export_fullgraph_on_cuda_tensors(backend):
    """Strict export over fake CUDA tensors: the GPU's backend choice and the fakes trace without a break."""
    x, a, t = fake_cuda(((4, 7), torch.bfloat16), ((4, 1), torch.float32), ((4,), torch.int64))
    with stand_in_cuda_kernels(_CPP_OPS):
        ep = torch.export.export(_All(backend), (x, a, t), strict=True)
        assert any("entmax_front" in n for n in called_ops(ep.graph))
        ep = ep.run_decompositions()
    targets = called_ops(ep.graph)
    assert "kxops.entmax.default" in targets and "kxops.topk_softmax.default" in targets, targets


# ---- bad input --------------------------------------------------------------------------------------------------

def _bad(name):
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    calls = {
        "k-zero": (lambda: kxops.topk_softmax(x, 0), ValueError, "topk_softmax: k must be in [1, 5]"),
        "k-above-n": (lambda: kxops.topk_softmax(x, 6), ValueError, "topk_softmax: k must be in [1, 5]"),
        "k-above-n-loss": (lambda: kxops.topk_softmax_cross_entropy(x, t, 9), ValueError, "k must be in [1, 5]"),
        "k-float": (lambda: kxops.topk_softmax(x, 2.0), TypeError, "k must be an int"),
        "alpha-one": (lambda: kxops.entmax(x, 1.0), ValueError, "entmax: alpha must be > 1"),
        "alpha-below-one": (lambda: kxops.entmax(x, 0.5), ValueError, "alpha must be > 1"),
        "alpha-tensor-one": (lambda: kxops.entmax(x, torch.tensor([[1.5], [1.0], [2.0]])), ValueError,
                             "alpha must be > 1"),
        "alpha-tensor-shape": (lambda: kxops.entmax(x, torch.full((3, 5), 1.5)), ValueError,
                               "alpha must be a float or a tensor broadcastable to (3, 1)"),
        "alpha-str": (lambda: kxops.entmax(x, "1.5"), TypeError, "alpha must be a float or a tensor"),
        "n-iter-zero": (lambda: kxops.entmax(x, 1.3, n_iter=0), ValueError, "n_iter must be >= 1"),
        "integer-x": (lambda: kxops.sparsemax(torch.ones(3, 4, dtype=torch.long)), TypeError,
                      "sparsemax: x must be a floating-point tensor"),
        "integer-x-loss": (lambda: kxops.entmax15_loss(torch.ones(3, 4, dtype=torch.long), t), TypeError,
                           "entmax15_loss: x must be a floating-point tensor"),
        "dim-out-of-range": (lambda: kxops.entmax15(x, 2), IndexError, "Dimension out of range"),
        "target-out-of-range": (lambda: kxops.sparsemax_loss(x, torch.tensor([0, 5, 1])), ValueError,
                                "sparsemax_loss: target must be in [0, 5) or ignore_index=-100, got a value of 5"),
        "target-negative": (lambda: kxops.entmax15_loss(x, torch.tensor([0, -1, 1])), ValueError,
                            "got a value of -1"),
        "target-float": (lambda: kxops.sparsemax_loss(x, t.float()), TypeError, "target must be an integer tensor"),
        "target-shape": (lambda: kxops.sparsemax_loss(x, t[:2]), ValueError,
                         "target must have x's shape without the class dimension, (3,)"),
        "bad-reduction": (lambda: kxops.sparsemax_loss(x, t, reduction="avg"), ValueError, "reduction must be one of"),
        "bad-backend": (lambda: kxops.sparsemax(x, backend="gpu"), ValueError, "backend must be one of"),
        "cuda-backend-on-cpu": (lambda: kxops.sparsemax(x, backend="cuda"), ValueError, "backend='cuda' needs CUDA"),
    }
    return calls[name]


BAD = ["k-zero", "k-above-n", "k-above-n-loss", "k-float", "alpha-one", "alpha-below-one", "alpha-tensor-one",
       "alpha-tensor-shape", "alpha-str", "n-iter-zero", "integer-x", "integer-x-loss", "dim-out-of-range",
       "target-out-of-range", "target-negative", "target-float", "target-shape", "bad-reduction", "bad-backend",
       "cuda-backend-on-cpu"]


@pytest.mark.parametrize(**bad_input_params([(n, *_bad(n)) for n in BAD]))
def test_bad_input(call, exc, message):
    assert_raises_with(call, exc, message)


def test_empty_and_scalar_inputs():
    assert kxops.sparsemax(torch.randn(0, 5)).shape == (0, 5)
    assert kxops.entmax15(torch.randn(3, 0)).shape == (3, 0)
    assert kxops.sparsemax(torch.tensor(2.0)) == 1
